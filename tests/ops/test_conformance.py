"""Conformance with kornia 0.9: the same user code runs through ``kornia.geometry.subpix`` and through
``decafa_fast.nn`` (which takes kornia's arguments: `temperature`, `normalized_coordinates`) on each decafa_fast
backend available here (reference, cpp, triton under TRITON_INTERPRET=1, cuda on a GPU), selected with
``ops.use_backend``, and the results must agree.

Covered: values; first- and second-order gradients (``torch.autograd.grad(create_graph=True)`` then
``backward``) and ``gradgradcheck``; forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``);
``torch.func`` ``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``vmap``; a parameter temperature (its gradient and an
optimiser step equal kornia's, also through ``torch.compile(fullgraph=True)``); per-map temperatures;
one-pixel axes (normalized: kornia's 0); extreme magnitudes (float32 against float64); an empty batch.

Tolerances, |ours - kornia| <= rtol |kornia| + atol, atol = ATOL_SCALE * max |kornia| (so a tensor of large
gradients is not held to the absolute error of a tensor of probabilities):
- float64 (reference and cpp on CPU): rtol 1e-9, ATOL_SCALE 1e-11 for values and first-order gradients; 1e-8 /
  1e-10 for second order (two more reductions, summed in a different order than kornia sums).
- float32 (Triton, CUDA: no float64 kernels; kornia runs in float64 and is rounded to float32): rtol 2e-5,
  ATOL_SCALE 2e-6 for values; 1e-4 / 1e-5 for gradients of any order (float32 accumulation over the map).
- extreme magnitudes: float32 ours against float64 kornia on the same float32 inputs, Phi elementwise
  rtol 1e-6 (the op contract: relative error <= 1e-6 up to |beta*T| = 1e30); z within 1e-6 of the largest
  coordinate; the attention mask and the fusion channels I*M, E*M against the float64 reference, rtol 1e-6.
``gradgradcheck`` / ``gradcheck`` run in float64 with torch's default tolerances, on the backends that have
float64 kernels.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from conftest import backend_device
from decafa_fast import nn as decafa_nn
from decafa_fast import ops, reference

kornia = pytest.importorskip("kornia")
KORNIA = kornia.geometry.subpix

BACKENDS = ("reference", "cpp", "triton", "cuda")
FLOAT64_BACKENDS = ("reference", "cpp")  # the Triton and CUDA kernels stop at float32
B, L, H, W = 2, 3, 5, 7


@pytest.fixture(params=BACKENDS)
def decafa_backend(request):
    """Each decafa_fast backend in turn, for this context (ops.use_backend); skipped, with the reason, where it
    is not available."""
    status = ops.backends()[request.param]
    if not status.startswith("available"):
        pytest.skip(f"backend {request.param!r}: {status}")
    with ops.use_backend(request.param):
        yield request.param


def setting(backend: str) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype a backend is checked: float64 where it has float64 kernels."""
    return backend_device(backend), torch.float64 if backend in FLOAT64_BACKENDS else torch.float32


@pytest.fixture(autouse=True)
def seeded_upstream_gradients():
    """The random upstream gradients below (randn_like) the same whatever ran before: unseeded, a draw whose
    temperature gradient cancels to a small sum can miss the float32 tolerance in one test order only."""
    torch.manual_seed(0)


def tolerances(dtype: torch.dtype, order: int) -> tuple[float, float]:
    """(rtol, atol scale) for values (order 0), first- (1) and second-order (2) gradients."""
    if dtype == torch.float64:
        return (1e-9, 1e-11) if order < 2 else (1e-8, 1e-10)
    return (2e-5, 2e-6) if order == 0 else (1e-4, 1e-5)


def assert_matches(ours, theirs, dtype: torch.dtype, order: int = 0, what: str = "") -> None:
    """ours (decafa_fast) against theirs (kornia, computed in float64 and cast to ours' dtype)."""
    assert ours is not None, f"{what}: decafa_fast gave no result (None) where kornia gives one"
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, kornia {tuple(theirs.shape)}"
    theirs = theirs.to(ours.dtype)
    rtol, scale = tolerances(dtype, order)
    atol = scale * (theirs.abs().max().item() if theirs.numel() else 1.0)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=max(atol, 1e-300), msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------------
# The user code: one function per kornia entry point, run with api = kornia's module or decafa_fast.nn
# --------------------------------------------------------------------------------------------------
def soft_argmax_normalized(api, x, temperature):
    return api.spatial_soft_argmax2d(x, temperature, True)


def soft_argmax_pixels(api, x, temperature):
    return api.spatial_soft_argmax2d(x, temperature, normalized_coordinates=False)


def softmax(api, x, temperature):
    return api.spatial_softmax2d(x, temperature)


def module(api, x, temperature):
    return api.SpatialSoftArgmax2d(temperature, normalized_coordinates=True)(x)


CODES = {f.__name__: f for f in (soft_argmax_normalized, soft_argmax_pixels, softmax, module)}


def heatmaps(shape=(B, L, H, W), seed: int = 0, device="cpu", dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(device=device, dtype=dtype)


def leaf(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new leaf tensor that requires grad: a copy of t in dtype (never t itself, so the kornia and the
    decafa_fast runs of a test do not share a tensor)."""
    return t.detach().to(dtype=dtype, copy=True).requires_grad_()


def both(code, x: torch.Tensor, temperature, device, dtype):
    """code through kornia in float64 and through decafa_fast in `dtype`, each on its own copy of x (and of
    a tensor temperature): (ours, theirs)."""
    def copy(t, to_dtype):
        return t.detach().to(device=device, dtype=to_dtype) if isinstance(t, torch.Tensor) else t

    ours = code(decafa_nn, copy(x, dtype), copy(temperature, dtype))
    theirs = code(KORNIA, copy(x, torch.float64), copy(temperature, torch.float64))
    return ours, theirs


# --------------------------------------------------------------------------------------------------
# Values and reverse mode, first and second order
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
@pytest.mark.parametrize("temperature", [None, 0.3, "tensor"])
def test_values(decafa_backend, code, temperature):
    device, dtype = setting(decafa_backend)
    if temperature == "tensor":
        temperature = torch.tensor(0.3)
    ours, theirs = both(code, heatmaps(), temperature, device, dtype)
    assert_matches(ours, theirs, dtype, what=f"{code.__name__} values")


def first_and_second_order(api, code, x0, t0, w, v):
    """A gradient-penalty step: d(loss)/dx with create_graph, a penalty on it, then backward to x and the
    temperature. Returns (d loss/dx, d penalty/dx, d penalty/dtemperature)."""
    x = x0.clone().requires_grad_()
    temperature = t0.clone().requires_grad_()
    out = code(api, x, temperature)
    (grad_x,) = torch.autograd.grad((out * w).sum(), x, create_graph=True)
    penalty = (grad_x * v).sum() + (grad_x**2).sum()
    penalty.backward()
    return grad_x.detach(), x.grad, temperature.grad


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
def test_first_and_second_order_gradients(decafa_backend, code):
    device, dtype = setting(decafa_backend)
    x = heatmaps(device=device)
    t = torch.tensor(0.7, dtype=torch.float64, device=device)
    w = torch.randn_like(code(KORNIA, x, t))
    v = torch.randn_like(x)
    theirs = first_and_second_order(KORNIA, code, x, t, w, v)
    ours = first_and_second_order(decafa_nn, code, x.to(dtype), t.to(dtype), w.to(dtype), v.to(dtype))
    for o, k, what, order in zip(ours, theirs, ("dloss/dx", "dpenalty/dx", "dpenalty/dtemperature"), (1, 2, 2)):
        assert_matches(o, k, dtype, order, f"{code.__name__} {what}")


@pytest.mark.parametrize("code", [soft_argmax_normalized, soft_argmax_pixels, softmax], ids=lambda f: f.__name__)
def test_gradcheck_and_gradgradcheck(decafa_backend, code):  # (the module runs soft_argmax_normalized's code)
    if decafa_backend not in FLOAT64_BACKENDS:
        pytest.skip(f"gradcheck needs float64; the {decafa_backend} kernels stop at float32 (second order is "
                    "compared with kornia in float32 in test_first_and_second_order_gradients)")
    device = backend_device(decafa_backend)
    x = heatmaps((1, 2, 2, 3), device=device).requires_grad_()  # gradgradcheck's cost grows as numel squared
    temperature = torch.tensor([[0.8], [1.3]], dtype=torch.float64, device=device, requires_grad=True)

    def f(x, temperature):
        return code(decafa_nn, x, temperature)

    assert torch.autograd.gradcheck(f, (x, temperature))
    assert torch.autograd.gradgradcheck(f, (x, temperature))


# --------------------------------------------------------------------------------------------------
# Forward mode and torch.func
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
def test_forward_mode(decafa_backend, code):
    """torch.func.jvp and torch.autograd.forward_ad, tangents on the heatmaps and on the temperature."""
    device, dtype = setting(decafa_backend)
    x, t = heatmaps(device=device), torch.tensor(0.6, dtype=torch.float64, device=device)
    dx, dt = torch.randn_like(x), torch.tensor(0.25, dtype=torch.float64, device=device)

    def run(api, dt_):
        def f(x, t):
            return code(api, x, t)

        args = (x.to(dt_), t.to(dt_))
        tangents = (dx.to(dt_), dt.to(dt_))
        _, jvp_out = torch.func.jvp(f, args, tangents)
        with fwAD.dual_level():
            dual_out = f(*(fwAD.make_dual(a, d) for a, d in zip(args, tangents)))
            dual_tangent = fwAD.unpack_dual(dual_out).tangent
        return jvp_out, dual_tangent

    theirs = run(KORNIA, torch.float64)
    ours = run(decafa_nn, dtype)
    assert_matches(ours[0], theirs[0], dtype, 1, f"{code.__name__} torch.func.jvp tangent")
    assert_matches(ours[1], theirs[1], dtype, 1, f"{code.__name__} forward_ad tangent")


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
def test_func_transforms(decafa_backend, code):
    """grad, vjp, jacrev, jacfwd and vmap (over the heatmaps, and over heatmaps with one temperature each)."""
    device, dtype = setting(decafa_backend)
    x = heatmaps((1, 2, 3, 4), device=device)
    t = torch.tensor(0.6, dtype=torch.float64, device=device)
    xs = heatmaps((3, 1, 2, 3, 4), seed=1, device=device)
    ts = torch.tensor([0.5, 0.9, 1.7], dtype=torch.float64, device=device)
    w = torch.randn_like(code(KORNIA, x, t))

    def run(api, dt_):
        def f(x, t):
            return code(api, x, t)

        def loss(x, t):
            return (f(x, t) * w.to(dt_)).sum()

        a = (x.to(dt_), t.to(dt_))
        out, vjp_fn = torch.func.vjp(f, *a)
        return {
            "grad": torch.func.grad(loss, argnums=(0, 1))(*a),
            "vjp": vjp_fn(w.to(dt_)),
            "jacrev": torch.func.jacrev(f, argnums=(0, 1))(*a),
            "jacfwd": torch.func.jacfwd(f, argnums=(0, 1))(*a),
            "vmap": (torch.func.vmap(f, in_dims=(0, None))(xs.to(dt_), a[1]),),
            # kornia reads the temperature's values, which vmap cannot batch: its answer is a loop
            "vmap_temperature": (torch.func.vmap(f, in_dims=(0, 0))(xs.to(dt_), ts.to(dt_)) if api is decafa_nn
                                 else torch.stack([f(xi, ti) for xi, ti in zip(xs, ts)]),),
        }

    theirs, ours = run(KORNIA, torch.float64), run(decafa_nn, dtype)
    for name, results in theirs.items():
        order = 0 if name.startswith("vmap") else 1
        for i, (o, k) in enumerate(zip(ours[name], results)):
            assert_matches(o, k, dtype, order, f"{code.__name__} torch.func.{name}[{i}]")


# --------------------------------------------------------------------------------------------------
# Temperature as kornia takes it
# --------------------------------------------------------------------------------------------------
def test_parameter_temperature_trains_like_kornia(decafa_backend):
    device, dtype = setting(decafa_backend)
    x = heatmaps(device=device)
    target = torch.rand(B, L, 2, dtype=torch.float64, device=device) * 2 - 1
    results = {}
    for name, api, dt_ in (("kornia", KORNIA, torch.float64), ("decafa_fast", decafa_nn, dtype)):
        mod = api.SpatialSoftArgmax2d(nn.Parameter(torch.tensor(0.5, dtype=dt_, device=device)))
        params = dict(mod.named_parameters())
        assert list(params) == ["temperature"], f"{name}: parameters {list(params)}"
        assert list(mod.state_dict()) == ["temperature"], name
        optimiser = torch.optim.SGD(mod.parameters(), lr=0.1)
        loss = (mod(x.to(dt_)) - target.to(dt_)).abs().sum()
        loss.backward()
        grad = mod.temperature.grad.clone()
        optimiser.step()
        results[name] = (grad, mod.temperature.detach().clone())
    (grad, stepped), (k_grad, k_stepped) = results["decafa_fast"], results["kornia"]
    assert k_grad.abs() > 1e-3  # the check can fail: the temperature matters to this loss
    assert_matches(grad, k_grad, dtype, 1, "d loss / d temperature (nn.Parameter)")
    assert_matches(stepped, k_stepped, dtype, 1, "temperature after one SGD step")


def test_compiled_module_with_parameter_temperature(decafa_backend):
    """torch.compile(fullgraph=True) (AOTAutograd, no code generation) of the module with an nn.Parameter
    temperature: one graph, and values and gradients equal to kornia's eager ones."""
    device, dtype = setting(decafa_backend)
    x0 = heatmaps(device=device)
    results = {}
    for name, api, dt_ in (("kornia", KORNIA, torch.float64), ("decafa_fast", decafa_nn, dtype)):
        mod = api.SpatialSoftArgmax2d(nn.Parameter(torch.full((L, 1), 0.6, dtype=dt_, device=device)))
        run = mod if api is KORNIA else torch.compile(mod, backend="aot_eager", fullgraph=True)
        x = leaf(x0, dt_)
        out = run(x)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dt_, device=device).reshape(out.shape))
        results[name] = (out.detach(), x.grad, mod.temperature.grad)
    torch._dynamo.reset()
    for o, k, what, order in zip(results["decafa_fast"], results["kornia"], ("values", "d/dx", "d/dtemperature"),
                                 (0, 1, 1)):
        assert_matches(o, k, dtype, order, f"compiled SpatialSoftArgmax2d: {what}")


def test_tensor_temperature_gets_its_gradient(decafa_backend):
    """A plain tensor that requires grad (a leaf, and one computed from a parameter) is kept, not copied, as in
    kornia: its gradient reaches the caller's tensor."""
    device, dtype = setting(decafa_backend)
    x = heatmaps(device=device)
    grads = {}
    for name, api, dt_ in (("kornia", KORNIA, torch.float64), ("decafa_fast", decafa_nn, dtype)):
        leaf = torch.tensor(0.4, dtype=dt_, device=device, requires_grad=True)
        raw = torch.tensor([-0.3, 0.2, 0.9], dtype=dt_, device=device, requires_grad=True)
        computed = nn.functional.softplus(raw).unsqueeze(-1)  # (L, 1), not a leaf
        mod = api.SpatialSoftArgmax2d(leaf)
        out = mod(x.to(dt_)).sum() + api.spatial_soft_argmax2d(x.to(dt_), computed, False).pow(2).sum()
        out.backward()
        assert mod.temperature is leaf
        grads[name] = (leaf.grad, raw.grad)
    for o, k, what in zip(grads["decafa_fast"], grads["kornia"], ("leaf temperature", "computed temperature")):
        assert_matches(o, k, dtype, 1, f"gradient of a {what}")


@pytest.mark.parametrize("shape", [(L, 1), (B, L, 1), (B, 1, 1), (1,), (1, 1, 1)])
@pytest.mark.parametrize("code", [soft_argmax_normalized, softmax, module], ids=lambda f: f.__name__)
def test_per_map_temperature(decafa_backend, shape, code):
    device, dtype = setting(decafa_backend)
    gen = torch.Generator().manual_seed(3)
    t0 = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.3).to(device)
    x0 = heatmaps(device=device)
    results = {}
    for name, api, dt_ in (("kornia", KORNIA, torch.float64), ("decafa_fast", decafa_nn, dtype)):
        x = leaf(x0, dt_)
        t = leaf(t0, dt_)
        out = code(api, x, t)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dt_, device=device).reshape(out.shape))
        results[name] = (out.detach(), x.grad, t.grad)
    for o, k, what, order in zip(results["decafa_fast"], results["kornia"], ("values", "d/dx", "d/dtemperature"),
                                 (0, 1, 1)):
        assert_matches(o, k, dtype, order, f"{code.__name__}, temperature {shape}: {what}")


def test_temperature_errors_name_the_problem(decafa_backend):
    device, dtype = setting(decafa_backend)
    x = heatmaps(device=device, dtype=dtype)
    with pytest.raises(ValueError, match="per pixel"):
        decafa_nn.spatial_soft_argmax2d(x, torch.ones(H * W, dtype=dtype, device=device))
    with pytest.raises(ValueError, match="does not broadcast"):
        decafa_nn.spatial_soft_argmax2d(x, torch.ones(L + 1, 1, dtype=dtype, device=device))
    with pytest.raises(ValueError, match=r"input must have shape \(B, N, H, W\)"):
        decafa_nn.spatial_soft_argmax2d(x[0], torch.ones(L, 1, dtype=dtype, device=device))
    for bad in (0.0, -1.0, torch.tensor([[0.5], [-0.5], [1.0]], dtype=dtype, device=device)):
        with pytest.raises(ValueError, match="positive"):  # kornia raises ValueError as well
            decafa_nn.spatial_soft_argmax2d(x, bad)
        with pytest.raises(ValueError, match="[Pp]ositive"):
            KORNIA.spatial_soft_argmax2d(x, bad)


# --------------------------------------------------------------------------------------------------
# Shapes at the edges
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw", [(1, 6), (5, 1), (1, 1)])
@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
def test_one_pixel_axes(decafa_backend, hw, code):
    """A one-pixel axis: normalized coordinates give kornia's 0 (the centre), pixel coordinates 0."""
    device, dtype = setting(decafa_backend)
    x0 = heatmaps((B, L, *hw), device=device)
    results = {}
    for name, api, dt_ in (("kornia", KORNIA, torch.float64), ("decafa_fast", decafa_nn, dtype)):
        x = leaf(x0, dt_)
        out = code(api, x, 0.5)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dt_, device=device).reshape(out.shape))
        results[name] = (out.detach(), x.grad)
    ours, theirs = results["decafa_fast"], results["kornia"]
    assert_matches(ours[0], theirs[0], dtype, 0, f"{code.__name__} {hw} values")
    assert_matches(ours[1], theirs[1], dtype, 1, f"{code.__name__} {hw} d/dx")
    if code is not softmax:
        for axis, n in ((0, hw[1]), (1, hw[0])):  # z[..., 0] is x (columns, W), z[..., 1] is y (rows, H)
            if n == 1:
                assert (ours[0][..., axis] == 0).all(), f"{code.__name__}: one-pixel axis {axis} is not 0"


@pytest.mark.parametrize("code", CODES.values(), ids=CODES.keys())
def test_empty_batch(decafa_backend, code):
    device, dtype = setting(decafa_backend)
    x0 = heatmaps((0, L, H, W), device=device)
    for temperature in (0.5, torch.full((L, 1), 0.5, dtype=torch.float64, device=device)):
        results = {}
        for name, api, dt_ in (("kornia", KORNIA, torch.float64), ("decafa_fast", decafa_nn, dtype)):
            x = leaf(x0, dt_)
            t = leaf(temperature, dt_) if isinstance(temperature, torch.Tensor) else temperature
            out = code(api, x, t)
            out.sum().backward()
            results[name] = (out.detach(), x.grad, t.grad if isinstance(t, torch.Tensor) else None)
        ours, theirs = results["decafa_fast"], results["kornia"]
        assert_matches(ours[0], theirs[0], dtype, 0, f"{code.__name__} B=0 values")
        assert_matches(ours[1], theirs[1], dtype, 1, f"{code.__name__} B=0 d/dx")
        if theirs[2] is not None:  # no maps: the temperature's gradient is zero, not missing
            assert_matches(ours[2], theirs[2], dtype, 1, f"{code.__name__} B=0 d/dtemperature")


# --------------------------------------------------------------------------------------------------
# Extreme magnitudes: float32 against float64
# --------------------------------------------------------------------------------------------------
MAGNITUDES = (1e4, 1e6, 1e7, 1e10, 1e20, 1e30)


def near_ties(magnitude: float, sign: float, device) -> torch.Tensor:
    """float32 maps of values sign * magnitude * (1 + j 2^-22), j in 0..3: ties and neighbours a few ulps
    apart, so at any magnitude Phi spreads over several pixels (nearly even at 1e4, over ties at 1e30)."""
    j = torch.randint(0, 4, (B, L, H, W), generator=torch.Generator().manual_seed(5))
    return (sign * magnitude * (1 + j.double() * 2.0**-22)).float().to(device)


def structured_offset(magnitude: float, sign: float, device) -> tuple[torch.Tensor, float]:
    """float32 maps T = (c + q) 2^e with c ~ 2^18, q in [-4, 4] in steps of 1/16, and temperature 2^e, so that
    s = T / temperature = c + q is exact in float32: Phi has O(1) structure on an offset of ~2.6e5, where
    normalising by exp(s - lse) loses ~1e-2 in float32."""
    e = math.floor(math.log2(magnitude)) - 18
    c = sign * 2.0**18
    q = torch.randint(-64, 65, (B, L, H, W), generator=torch.Generator().manual_seed(6)).double() / 16
    t = ((c + q) * 2.0**e).float()
    assert torch.equal(t.double() / 2.0**e, c + q)  # exact, so float32 and float64 see the same s
    return t.to(device), 2.0**e


@pytest.mark.slow
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_extreme_magnitudes_float32(decafa_backend, magnitude, sign):
    device = backend_device(decafa_backend)
    for x, temperature in ((near_ties(magnitude, sign, device), 1.0), structured_offset(magnitude, sign, device)):
        assert x.dtype == torch.float32 and x.abs().max() >= magnitude / 2
        phi = decafa_nn.spatial_softmax2d(x, temperature)
        exact_phi = KORNIA.spatial_softmax2d(x.double(), temperature)
        assert exact_phi.amax(dim=(2, 3)).max() < 1  # Phi spreads over more than one pixel
        torch.testing.assert_close(phi.double(), exact_phi, rtol=1e-6, atol=1e-30,
                                   msg=lambda m: f"Phi at |T| ~ {magnitude:g}, temperature {temperature:g}: {m}")
        for normalized in (True, False):
            z = decafa_nn.spatial_soft_argmax2d(x, temperature, normalized)
            exact_z = KORNIA.spatial_soft_argmax2d(x.double(), temperature, normalized)
            atol = 1e-6 * (1 if normalized else max(H, W) - 1)
            torch.testing.assert_close(z.double(), exact_z, rtol=0, atol=atol,
                                       msg=lambda m: f"z at |T| ~ {magnitude:g} (normalized={normalized}): {m}")


@pytest.mark.parametrize("magnitude", MAGNITUDES)
def test_extreme_magnitudes_mask_and_fusion_float32(decafa_backend, magnitude):
    """The attention mask and the fusion channels I*M, E*M of the fused head, against float64."""
    device = backend_device(decafa_backend)
    x, temperature = structured_offset(magnitude, -1.0, device)
    beta = 1.0 / temperature
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(B, 1, H, W, generator=gen).to(device) + 0.5
    embedding = torch.rand(B, 2, H, W, generator=gen).to(device) + 0.5
    m = ops.attention_mask(x, beta)
    _, fused = ops.decafa_head(x, image, embedding, "F5", beta)
    exact_m = reference.attention_mask(x.double(), beta)
    exact_fused = reference.fuse(image.double(), embedding.double(), exact_m, "F5")
    torch.testing.assert_close(m.double(), exact_m, rtol=1e-6, atol=0, msg=lambda s: f"M at {magnitude:g}: {s}")
    torch.testing.assert_close(fused.double(), exact_fused, rtol=1e-6, atol=0,
                               msg=lambda s: f"F5 (I, I*M, E, E*M) at {magnitude:g}: {s}")
