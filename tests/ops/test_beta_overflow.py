"""A finite beta whose product with a map's logits overflows the compute type (float32 for float16, bfloat16
and float32 logits, float64 for float64 logits) gives the exact limit of softmax(beta * T), on every backend:
with c the map's largest logit for beta > 0 (its smallest for beta < 0) and k the number of pixels where
t == c, Phi = 1/k on those pixels and 0 elsewhere; a map holding a NaN, or whose c is infinite, is NaN as
before. The moments, the mask and the fusion follow from that Phi. The logits gradient of such a map is
beta * Phi * (G - sum Phi G) (G: the gradient w.r.t. Phi), exactly 0 without ties, and its grad_beta is 0
(every term of sum_p t_p g_s,p has t_p = c, and the g_s sum to 0).

Expected values come from that definition (limit_phi below, in float64), not from a backend. Tolerances,
with eps the storage dtype's machine epsilon: Phi within rtol eps and atol 0 (so the pixels off the ties
are exactly 0); z, M and F within rtol 2 eps, atol 2 eps times the largest expected magnitude; the logits
gradient with ties within rtol 4 eps, atol 4 eps times its largest expected magnitude (float64, float32 and
bfloat16; a float16 gradient with ties, beta * g_s with |beta| > 5e33, is beyond float16's range), exactly 0
off the ties and everywhere without ties; grad_beta within 8 eps_acc |c| max |G| of 0 (the rounding of the
formula sum_p t_p g_s,p) with ties, exactly 0 without.
"""
from __future__ import annotations

import math

import pytest
import torch

from decafa_fast import ops, reference

BACKENDS = [name for name in ("reference", "cpp", "triton") if ops.backends()[name].startswith("available")]
FLOAT64_BACKENDS = ("reference", "cpp")  # the Triton kernels stop at float32
FLOAT32_MAX = torch.finfo(torch.float32).max
B, L, H, W = 2, 3, 4, 5

# per storage dtype: the scale of the logits and a beta (with its negative) that overflows beta * T
SETTINGS = {
    torch.float64: (1e300, 1e10),
    torch.float32: (1e37, 100.0),
    torch.bfloat16: (3.3e38, 100.0),
    torch.float16: (6e4, 1e35),
}
DTYPES = list(SETTINGS)


def cases(dtypes=DTYPES):
    return [pytest.param(backend, dtype, id=f"{backend}-{str(dtype)[6:]}") for backend in BACKENDS
            for dtype in dtypes if dtype != torch.float64 or backend in FLOAT64_BACKENDS]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def betas(dtype: torch.dtype) -> list:
    """Python numbers of both signs, the largest float32, and a (B, L) tensor of mixed signs."""
    big = SETTINGS[dtype][1]
    per_map = torch.tensor([[big, -big, FLOAT32_MAX], [-FLOAT32_MAX, 10 * big, -10 * big]], dtype=acc_dtype(dtype))
    return [big, -big, FLOAT32_MAX, -FLOAT32_MAX, per_map]


def beta_map(beta, dtype: torch.dtype, b: int = B, l: int = L) -> torch.Tensor:
    if isinstance(beta, torch.Tensor):
        return reference.expand_beta(beta.detach(), b, l).to(torch.float64)
    return torch.full((b, l), float(beta), dtype=torch.float64)


def logits(dtype: torch.dtype, ties: int = 1, shape=(B, L, H, W), seed: int = 0) -> torch.Tensor:
    """Logits of magnitude SETTINGS[dtype][0] whose largest and smallest values are each held by `ties` pixels
    (at fixed places), all others strictly between."""
    scale = SETTINGS[dtype][0]
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5) * scale  # in (-0.5, 0.5) * scale
    flat = t.view(*shape[:2], -1)
    for i in range(ties):
        flat[..., 3 + 7 * i] = 0.9 * scale
        flat[..., 5 + 7 * i] = -0.9 * scale
    return t.to(dtype)


def assert_overflows(t: torch.Tensor, beta) -> None:
    """The precondition: the largest beta * t of every map is +-inf in the compute type."""
    acc = acc_dtype(t.dtype)
    s = t.to(acc).flatten(2) * beta_map(beta, t.dtype, *t.shape[:2]).to(acc).unsqueeze(-1)
    assert torch.isinf(s.amax(dim=-1)).all(), "the test's beta does not overflow every map"


def limit_phi(t: torch.Tensor, beta) -> torch.Tensor:
    """The definition, in float64: [t == c] / k, NaN where the map holds a NaN or c is not finite."""
    flat = t.to(torch.float64).flatten(2)
    bm = beta_map(beta, t.dtype, *t.shape[:2]).unsqueeze(-1)
    c = torch.where(bm > 0, flat.amax(dim=-1, keepdim=True), flat.amin(dim=-1, keepdim=True))
    ties = (flat == c).to(torch.float64)
    p = ties / ties.sum(dim=-1, keepdim=True)
    bad = flat.isnan().any(dim=-1, keepdim=True) | ~torch.isfinite(c)
    return torch.where(bad, math.nan, p).reshape(t.shape)


def moments(p: torch.Tensor) -> torch.Tensor:
    h, w = p.shape[2:]
    xs, ys = reference.pixel_grid(h, w, False, p.device, p.dtype)
    flat = p.flatten(2)
    return torch.stack([flat @ xs, flat @ ys], dim=-1)


def assert_near(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_scale: float, what: str) -> None:
    want = want.to(torch.float64)
    scale = want[torch.isfinite(want)].abs().max().item() if torch.isfinite(want).any() else 0.0
    torch.testing.assert_close(got.to(torch.float64), want, rtol=rtol, atol=atol_scale * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def companions(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b, _, h, w = t.shape
    return (torch.rand(b, 1, h, w, generator=g).to(t.dtype), torch.rand(b, 2, h, w, generator=g).to(t.dtype))


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,dtype", cases())
@pytest.mark.parametrize("ties", [1, 2])
def test_every_op_gives_the_exact_limit(backend, dtype, ties):
    t = logits(dtype, ties)
    image, embedding = companions(t)
    e = eps(dtype)
    for beta in betas(dtype):
        assert_overflows(t, beta)
        p_want = limit_phi(t, beta)
        assert torch.isfinite(p_want).all()
        z_want, m_want = moments(p_want), p_want.sum(dim=1, keepdim=True)
        f_want = reference.fuse(image.double(), embedding.double(), m_want, "F5")
        with ops.use_backend(backend):
            p = ops.spatial_softmax(t, beta)
            z = ops.soft_argmax(t, beta)
            m = ops.attention_mask(t, beta)
            z2, m2 = ops.landmark_attention(t, beta)
            z3, f = ops.decafa_head(t, image, embedding, "F5", beta)
        shown = "tensor" if isinstance(beta, torch.Tensor) else beta
        assert_near(p, p_want, e, 0.0, f"Phi, beta={shown}")
        if ties == 1:
            assert torch.equal(p, p_want.to(dtype)), f"Phi is not one-hot, beta={shown}"
        for name, got in (("soft_argmax", z), ("landmark_attention z", z2), ("decafa_head z", z3)):
            assert_near(got, z_want, 2 * e, 2 * e, f"{name}, beta={shown}")
        for name, got in (("attention_mask", m), ("landmark_attention M", m2)):
            assert_near(got, m_want, 2 * e, 2 * e, f"{name}, beta={shown}")
        assert_near(f, f_want, 2 * e, 2 * e, f"decafa_head F, beta={shown}")
        # and what the reference formulation gives
        assert_near(p, reference.spatial_softmax(t, beta), e, 0.0, f"Phi vs reference, beta={shown}")
        assert_near(z2, reference.soft_argmax(t, beta), 2 * e, 2 * e, f"z vs reference, beta={shown}")


@pytest.mark.parametrize("backend,dtype", cases())
def test_two_equal_extremes_share_the_map(backend, dtype):
    t = logits(dtype, ties=2)
    big = SETTINGS[dtype][1]
    with ops.use_backend(backend):
        for beta, places in ((big, [3, 10]), (-big, [5, 12])):
            p = ops.spatial_softmax(t, beta).flatten(2)
            want = torch.zeros_like(p)
            want[..., places] = 0.5
            assert torch.equal(p, want), f"beta={beta}: {p[0, 0]}"


@pytest.mark.parametrize("backend,dtype", cases([torch.float64, torch.float32, torch.bfloat16]))
def test_a_map_next_to_an_overflowing_one_is_unchanged(backend, dtype):
    """Map 1 is ordinary; map 0 overflows in one run and is ordinary in the other: map 1's Phi, z, logits
    gradient and grad_beta are the same bits in both."""
    scale, big = SETTINGS[dtype]
    g = torch.Generator().manual_seed(2)
    ordinary = torch.randn(1, 2, H, W, generator=g, dtype=torch.float64).to(dtype)
    overflowing = ordinary.clone()
    overflowing[:, 0] = logits(dtype, shape=(1, 1, H, W), seed=3)[:, 0]
    # beta that overflows map 0 (scale * big) but not the unit-scale map 1
    assert_overflows(overflowing[:, :1], big)
    upstream_p = torch.randn(1, 2, H, W, generator=g).to(dtype)
    upstream_z = torch.randn(1, 2, 2, generator=g).to(dtype)
    upstream_m = torch.randn(1, 1, H, W, generator=g).to(dtype)

    def run(t):
        out = {}
        with ops.use_backend(backend):
            for kind in ("scalar", "tensor"):
                beta = big if kind == "scalar" else torch.full((1, 2), big, dtype=acc_dtype(dtype), requires_grad=True)
                x = t.clone().requires_grad_()
                p = ops.spatial_softmax(x, beta)
                z, m = ops.landmark_attention(x, beta)
                out[kind, "phi"] = p[:, 1].detach()
                out[kind, "z"] = z[:, 1].detach()
                wrt = (x, beta) if kind == "tensor" else (x,)
                grads = torch.autograd.grad((p * upstream_p).sum(), wrt)
                out[kind, "softmax grad_t"] = grads[0][:, 1]
                if kind == "tensor":
                    out[kind, "softmax grad_beta"] = grads[1][:, 1]
                grads = torch.autograd.grad((z * upstream_z).sum() + (m * upstream_m).sum(), wrt)
                out[kind, "landmark grad_t"] = grads[0][:, 1]
                if kind == "tensor":
                    out[kind, "landmark grad_beta"] = grads[1][:, 1]
        return out

    with_overflow, without = run(overflowing), run(ordinary)
    for key, value in without.items():
        assert torch.isfinite(value).all(), key
        assert torch.equal(with_overflow[key], value), f"map 1's {key} changed next to an overflowing map"


@pytest.mark.parametrize("backend,dtype", cases([torch.float32, torch.bfloat16]))
def test_nan_and_infinite_maps_stay_nan(backend, dtype):
    scale, big = SETTINGS[dtype]
    t = logits(dtype, shape=(1, 7, H, W), seed=4)
    nan, inf = math.nan, math.inf
    t[0, 0, 1, 1] = nan                 # overflow and a NaN
    t[0, 1, 2, 2] = inf                 # a +inf logit, beta > 0: c = +inf
    t[0, 2] = -inf                      # every logit -inf, beta > 0
    t[0, 3, 0, 4] = -inf                # a -inf logit, beta < 0: c = -inf
    t[0, 4] = inf                       # every logit +inf, beta < 0
    t[0, 5, 3, 0] = inf                 # a +inf logit, beta < 0: c is the finite minimum, the +inf pixel 0
    beta = torch.tensor([[big, big, big, -big, -big, -big, big]], dtype=acc_dtype(dtype))
    nan_maps, finite_maps = [0, 1, 2, 3, 4], [5, 6]
    p_want = limit_phi(t, beta)
    assert torch.isnan(p_want[0, nan_maps]).all() and torch.isfinite(p_want[0, finite_maps]).all()
    with ops.use_backend(backend):
        p = ops.spatial_softmax(t, beta)
        z = ops.soft_argmax(t, beta)
    assert torch.isnan(p[0, nan_maps]).all(), "a NaN or infinite map is not all NaN"
    assert torch.isnan(z[0, nan_maps]).all()
    assert_near(p[0, finite_maps], p_want[0, finite_maps], eps(dtype), 0.0, "finite maps")
    assert_near(z[0, finite_maps], moments(p_want)[0, finite_maps], 2 * eps(dtype), 2 * eps(dtype), "finite z")


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------
def downstream(op: str, p: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, up: dict):
    """The loss as a function of Phi (float64), for the expected G = dloss/dPhi."""
    z, m = moments(p), p.sum(dim=1, keepdim=True)
    if op == "spatial_softmax":
        return (p * up["phi"]).sum()
    if op == "soft_argmax":
        return (z * up["z"]).sum()
    if op == "attention_mask":
        return (m * up["m"]).sum()
    if op == "landmark_attention":
        return (z * up["z"]).sum() + (m * up["m"]).sum()
    return (z * up["z"]).sum() + (reference.fuse(image, embedding, m, "F5") * up["f"]).sum()


def run_op(op: str, x, beta, image, embedding, up: dict):
    if op == "spatial_softmax":
        return (ops.spatial_softmax(x, beta) * up["phi"]).sum()
    if op == "soft_argmax":
        return (ops.soft_argmax(x, beta) * up["z"]).sum()
    if op == "attention_mask":
        return (ops.attention_mask(x, beta) * up["m"]).sum()
    if op == "landmark_attention":
        z, m = ops.landmark_attention(x, beta)
        return (z * up["z"]).sum() + (m * up["m"]).sum()
    z, f = ops.decafa_head(x, image, embedding, "F5", beta)
    return (z * up["z"]).sum() + (f * up["f"]).sum()


OPS = ("spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention", "decafa_head")


# float16 with ties is left out: its gradient, beta * g_s with |beta| > 5e33, is beyond float16's range
GRADIENT_CASES = [pytest.param(*case.values, ties, id=f"{case.id}-ties{ties}") for ties in (1, 2)
                  for case in cases([torch.float64, torch.float32, torch.bfloat16] + [torch.float16] * (ties == 1))]


@pytest.mark.parametrize("backend,dtype,ties", GRADIENT_CASES)
def test_gradients_are_the_limit_formula(backend, dtype, ties):
    t = logits(dtype, ties)
    image, embedding = companions(t)
    g = torch.Generator().manual_seed(5)
    up = {"phi": torch.randn(B, L, H, W, generator=g), "z": torch.randn(B, L, 2, generator=g),
          "m": torch.randn(B, 1, H, W, generator=g), "f": torch.randn(B, 6, H, W, generator=g)}
    up = {k: v.to(dtype) for k, v in up.items()}
    big = SETTINGS[dtype][1]
    acc = acc_dtype(dtype)
    # a per-map tensor beta of mixed signs, small enough that beta * G stays finite in the compute type
    beta = torch.tensor([[big, -big, 2 * big], [-2 * big, 3 * big, -3 * big]], dtype=acc)
    assert_overflows(t, beta)
    p_want = limit_phi(t, beta)
    rtol = 4 * eps(dtype)
    for op in OPS:
        x = t.clone().requires_grad_()
        b = beta.clone().requires_grad_()
        with ops.use_backend(backend):
            grad_t, grad_beta = torch.autograd.grad(run_op(op, x, b, image, embedding, up), (x, b))
        p_leaf = p_want.clone().requires_grad_()
        (big_g,) = torch.autograd.grad(
            downstream(op, p_leaf, image.double(), embedding.double(), {k: v.double() for k, v in up.items()}),
            p_leaf)
        g_s = p_want * (big_g - (p_want * big_g).sum(dim=(2, 3), keepdim=True))
        want_t = beta.double()[..., None, None] * g_s
        assert torch.isfinite(grad_t).all() and torch.isfinite(grad_beta).all(), op
        if ties == 1:
            assert (grad_t == 0).all(), f"{op}: the logits gradient of a one-hot limit is not exactly 0"
            assert (grad_beta == 0).all(), f"{op}: grad_beta of a one-hot limit is not exactly 0"
        else:
            assert (grad_t[p_want == 0] == 0).all(), f"{op}: the gradient off the ties is not exactly 0"
            assert_near(grad_t, want_t, rtol, rtol, f"{op} logits gradient")
            c = t.double().flatten(2).abs().amax(dim=-1)
            bound = 8 * eps(acc) * c * big_g.abs().flatten(2).amax(dim=-1)
            assert (grad_beta.double().abs() <= bound).all(), f"{op}: grad_beta {grad_beta} is not 0 (bound {bound})"


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not built")
def test_the_cpp_kernels_save_an_infinite_max_and_the_tie_count():
    t = logits(torch.float32, ties=2)
    phi, stats = torch.ops.decafa.spatial_softmax(t, 100.0, None)
    assert torch.equal(stats[..., 0], torch.full((B, L), math.inf))
    assert torch.equal(stats[..., 1], torch.full((B, L), 2.0))
    _, stats = torch.ops.decafa.spatial_softmax(t, -100.0, None)
    assert torch.equal(stats[..., 0], torch.full((B, L), math.inf))
