"""Every autograd path of every op, on the C++ backend and the reference: first and second order in float64
(gradcheck, gradgradcheck), forward mode (torch.func.jvp, torch.autograd.forward_ad), torch.func transforms
(grad, vjp, jacrev, jacfwd, vmap) against the reference, and a tensor beta (scalar, per map, per image and
map) with its gradient.

Tolerances: gradcheck's defaults in float64 (eps 1e-6, atol 1e-5, rtol 1e-3 on finite differences); transforms
against the reference in float64 at 1e-10 (both sides differentiate the same formula, summation order apart).
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from decafa_fast import ops, reference

MODES = ops.FUSION_MODES
BACKENDS = ["cpp", "reference"]
F64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(params=BACKENDS)
def backend(request):
    status = ops.backends()[request.param]
    if not status.startswith("available"):
        pytest.skip(f"backend {request.param!r}: {status}")
    with ops.use_backend(request.param):
        yield request.param


def inputs64(b=2, l=2, h=3, w=4, ci=1, c=2, seed=0):
    """float64 leaves (logits, image, embedding, mask) of shapes (b, l|ci|c|1, h, w)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, l, h, w), (b, ci, h, w), (b, c, h, w), (b, 1, h, w)]
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]


def per_map_beta(l=2):
    return (torch.rand(l, 1, dtype=torch.float64) + 0.5).requires_grad_()


# Each case: (function of (logits, image, embedding, mask, beta), whether it uses image/embedding/mask)
def _cases():
    cases = {
        "spatial_softmax": (lambda t, i, e, m, b: ops.spatial_softmax(t, b), False),
        "soft_argmax": (lambda t, i, e, m, b: ops.soft_argmax(t, b, False), False),
        "soft_argmax_normalized": (lambda t, i, e, m, b: ops.soft_argmax(t, b, True), False),
        "attention_mask": (lambda t, i, e, m, b: ops.attention_mask(t, b), False),
        "landmark_attention": (lambda t, i, e, m, b: ops.landmark_attention(t, b, True), False),
    }
    for mode in MODES:
        cases[f"fuse_{mode}"] = ((lambda mode: lambda t, i, e, m, b: ops.fuse(i, e, m, mode))(mode), True)
        cases[f"decafa_head_{mode}"] = (
            (lambda mode: lambda t, i, e, m, b: ops.decafa_head(t, i, e, mode, b, mode in ("F2", "F4")))(mode), True)
    return cases


CASES = _cases()


def _args(name, tensor_beta):
    t, i, e, m = inputs64(h=3, w=3)
    beta = per_map_beta() if tensor_beta else 1.3
    fn, uses_fusion_inputs = CASES[name]
    if name.startswith("fuse"):
        return (lambda i, e, m: fn(None, i, e, m, None)), (i, e, m)
    if name.startswith("decafa_head"):
        if tensor_beta:
            return (lambda t, i, e, b: fn(t, i, e, None, b)), (t, i, e, beta)
        return (lambda t, i, e: fn(t, i, e, None, beta)), (t, i, e)
    if tensor_beta:
        return (lambda t, b: fn(t, None, None, None, b)), (t, beta)
    return (lambda t: fn(t, None, None, None, beta)), (t,)


# --------------------------------------------------------------------------------------------------
# Reverse mode, first and second order
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor_beta", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_and_gradgradcheck(backend, name, tensor_beta):
    if tensor_beta and name.startswith("fuse"):
        pytest.skip("fuse takes no beta")
    fn, args = _args(name, tensor_beta)
    assert torch.autograd.gradcheck(fn, args, check_undefined_grad=True)
    # fast mode (random projections of the Jacobian) keeps the second-order check affordable on 2 cores
    assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)


def test_double_backward_matches_reference_in_a_gradient_penalty(backend):
    """A gradient penalty (create_graph=True, then backward) gives the reference's parameter gradients."""
    results = []
    for impl in (ops, reference):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(1, 3, 3, padding=1).double()
        x = torch.randn(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)
        z, f = impl.decafa_head(conv(x), x, conv(x), "F5", 0.9, True)
        out = (z ** 2).sum() + (f * f).mean()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        (gx.pow(2).sum()).backward()
        results.append([p.grad.clone() for p in conv.parameters()])
    for got, want in zip(*results):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, **F64)


# --------------------------------------------------------------------------------------------------
# Forward mode and torch.func
# --------------------------------------------------------------------------------------------------
def _head(impl, beta=0.9):
    return lambda t, i, e: impl.decafa_head(t, i, e, "F5", beta, True)


def test_jvp_matches_reference(backend):
    t, i, e, _ = (x.detach() for x in inputs64())
    tangents = tuple(torch.randn_like(x) for x in (t, i, e))
    out, tan = torch.func.jvp(_head(ops), (t, i, e), tangents)
    ref_out, ref_tan = torch.func.jvp(_head(reference), (t, i, e), tangents)
    for a, b in zip(out + tan, ref_out + ref_tan):
        torch.testing.assert_close(a, b, **F64)
    assert all(x.abs().max() > 0 for x in tan)


def test_forward_ad_matches_reference(backend):
    t, _, _, _ = (x.detach() for x in inputs64())
    tangent = torch.randn_like(t)
    results = []
    for impl in (ops, reference):
        with fwAD.dual_level():
            z, m = impl.landmark_attention(fwAD.make_dual(t, tangent), 1.1, True)
            phi = impl.spatial_softmax(fwAD.make_dual(t, tangent), 0.7)
            results.append([fwAD.unpack_dual(o).tangent for o in (z, m, phi)])
    for a, b in zip(*results):
        assert a is not None
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "jacfwd"])
def test_func_transforms_match_reference(backend, transform):
    t, i, e, _ = (x.detach() for x in inputs64())
    beta = torch.tensor([0.8, 1.3], dtype=torch.float64)

    def loss(impl):
        def f(t, i, e, b):
            z, fused = impl.decafa_head(t, i, e, "F4", b, False)
            return (z.sin().sum() + (fused * fused).sum()) if transform in ("grad", "vjp") else z
        return f

    def run(impl):
        f = loss(impl)
        if transform == "grad":
            return torch.func.grad(f, argnums=(0, 1, 2, 3))(t, i, e, beta)
        if transform == "vjp":
            _, pullback = torch.func.vjp(f, t, i, e, beta)
            return pullback(torch.tensor(1.0, dtype=torch.float64))
        jac = torch.func.jacrev if transform == "jacrev" else torch.func.jacfwd
        return jac(f, argnums=(0, 3))(t, i, e, beta)

    for a, b in zip(run(ops), run(reference)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, **F64)


def test_vmap_matches_reference(backend):
    t = torch.randn(4, 2, 3, 5, 6, dtype=torch.float64)  # vmapped over the first dim
    got = torch.func.vmap(lambda x: ops.landmark_attention(x, 0.7, True))(t)
    want = torch.func.vmap(lambda x: reference.landmark_attention(x, 0.7, True))(t)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **F64)
    per_sample = torch.func.vmap(torch.func.grad(lambda x: ops.soft_argmax(x, 1.2).pow(2).sum()))(t)
    ref = torch.func.vmap(torch.func.grad(lambda x: reference.soft_argmax(x, 1.2).pow(2).sum()))(t)
    torch.testing.assert_close(per_sample, ref, **F64)


def test_compile_fullgraph_with_tensor_beta():
    """The transform checks and the tensor beta trace without a graph break."""
    torch._dynamo.reset()
    t = torch.randn(2, 3, 5, 6)
    i, e = torch.rand(2, 1, 5, 6), torch.randn(2, 2, 5, 6)
    beta = torch.tensor([[0.5], [1.0], [2.0]], requires_grad=True)

    def f(t, i, e, beta):
        z, fused = ops.decafa_head(t, i, e, "F5", beta, True)
        return z.sum() + fused.mean() + ops.spatial_softmax(t, beta).max()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(t, i, e, beta)
    (g,) = torch.autograd.grad(out, beta)
    ref_out = f(t, i, e, beta)
    (ref_g,) = torch.autograd.grad(ref_out, beta)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(g, ref_g)


# --------------------------------------------------------------------------------------------------
# Tensor beta: every accepted shape, its values and its gradient
# --------------------------------------------------------------------------------------------------
B, L = 2, 3
BETA_SHAPES = {"scalar": (), "one": (1,), "L": (L,), "L1": (L, 1), "BL": (B, L), "BL1": (B, L, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", list(BETA_SHAPES))
def test_tensor_beta_values_and_gradient(backend, shape, dtype):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(B, L, 4, 5, generator=g, dtype=dtype)
    i, e = torch.rand(B, 1, 4, 5, generator=g, dtype=dtype), torch.randn(B, 2, 4, 5, generator=g, dtype=dtype)
    beta = (torch.rand(BETA_SHAPES[shape], generator=g, dtype=dtype) + 0.5)
    results = []
    for impl in (ops, reference):
        b = beta.clone().requires_grad_()
        z, f = impl.decafa_head(t, i, e, "F5", b, True)
        phi = impl.spatial_softmax(t, b)
        loss = (z * torch.linspace(-1, 1, z.numel(), dtype=dtype).reshape(z.shape)).sum() + f.pow(2).mean() \
            + phi.pow(3).sum()
        loss.backward()
        results.append((z, f, phi, b.grad))
    tol = F64 if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, **tol)
    assert results[1][3].abs().min() > 0 and results[0][3].shape == beta.shape


def test_per_map_beta_is_per_map(backend):
    """beta (L, 1) scales map l by beta[l]: the same as calling each map with its own float beta."""
    t = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    betas = [0.3, 1.0, 4.0]
    z = ops.soft_argmax(t, torch.tensor(betas, dtype=torch.float64)[:, None], True)
    for l, b in enumerate(betas):
        torch.testing.assert_close(z[:, l], ops.soft_argmax(t[:, l:l + 1], b, True)[:, 0], **F64)


def test_float_and_tensor_beta_agree(backend):
    t, i, e, _ = (x.detach() for x in inputs64())
    for out_f, out_t in zip(ops.decafa_head(t, i, e, "F3", 1.7, True),
                            ops.decafa_head(t, i, e, "F3", torch.tensor(1.7, dtype=torch.float64), True)):
        torch.testing.assert_close(out_f, out_t, rtol=0, atol=0)


def test_grad_beta_of_the_raw_ops_against_the_reference():
    """grad_beta of every backward op is d loss / d beta_map of the reference formulation."""
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    i, e = torch.rand(2, 1, 4, 5, dtype=torch.float64), torch.randn(2, 2, 4, 5, dtype=torch.float64)
    bm = (torch.rand(2, 3, dtype=torch.float64) + 0.5).requires_grad_()
    d = torch.ops.decafa
    phi, stats = d.spatial_softmax(t, 1.0, bm.detach())
    g_phi = torch.randn_like(phi)
    _, gb = d.spatial_softmax_backward(g_phi, t, stats, 1.0, bm.detach())
    (want,) = torch.autograd.grad((reference.spatial_softmax(t, bm) * g_phi).sum(), bm)
    torch.testing.assert_close(gb, want, **F64)

    z, m, stats = d.landmark_attention(t, 1.0, bm.detach(), True)
    gz, gm = torch.randn_like(z), torch.randn_like(m)
    _, gb = d.landmark_attention_backward(gz, gm, t, stats, 1.0, bm.detach(), True)
    rz, rm = reference.landmark_attention(t, bm, True)
    (want,) = torch.autograd.grad((rz * gz).sum() + (rm * gm).sum(), bm)
    torch.testing.assert_close(gb, want, **F64)

    z, f, m, stats = d.decafa_head(t, i, e, 5, 1.0, bm.detach(), False)
    gz, gf = torch.randn_like(z), torch.randn_like(f)
    _, _, _, gb = d.decafa_head_backward(gz, gf, t, i, e, m, stats, 5, 1.0, bm.detach(), False)
    rz, rf = reference.decafa_head(t, i, e, "F5", bm, False)
    (want,) = torch.autograd.grad((rz * gz).sum() + (rf * gf).sum(), bm)
    torch.testing.assert_close(gb, want, **F64)


@pytest.mark.parametrize("bad", [torch.ones(4), torch.ones(2, 3, 2), torch.ones(5, 3), torch.ones(1, 2, 3, 1)])
def test_bad_beta_shape_is_a_value_error(bad):
    t = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="beta"):
        ops.soft_argmax(t, bad)


def test_bad_beta_type_is_a_type_error():
    t = torch.randn(2, 3, 4, 5)
    with pytest.raises(TypeError, match="beta"):
        ops.soft_argmax(t, torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="beta"):
        ops.soft_argmax(t, "1.0")
