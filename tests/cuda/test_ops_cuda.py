"""The CUDA C++ backend (decafa::* CUDA kernels from kernels/) against decafa_fast.reference: values and
gradients of every op in float32 / float16 / bfloat16 over shapes that take each kernel path (scalar and
16-byte vector loads, maps held on chip and streamed, one pixel, empty batch), every fusion mode, one-sided
gradients, channels_last inputs (F in the embedding's memory format), the runs of maps, per-map beta and its
gradient, float32 at extreme magnitudes, determinism, -inf / NaN logits, argument checks of the raw ops, the
device guard, dtype errors and torch.compile. Skipped, with the reason, where no GPU or no CUDA build of the
extension is present.

Tolerances: tests/harness.py's CUDA_FAST_MATH profile (atol scaled by the reference's largest magnitude):
float32 rtol 1e-4 / atol 1e-5 (the kernels use fast-math exp), float16 1e-2, bfloat16 2e-2, values and
gradients alike. The reference runs in float64 and is rounded to the tested dtype.
"""
from __future__ import annotations

import pytest
import torch

from decafa_fast import ops, reference
from decafa_fast.contract.layout import FUSION_MODES
from harness import CUDA_FAST_MATH, all_ops, grad_or_zeros, make_inputs

_STATUS = ops.backends()["cuda"]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _STATUS.startswith("available"), reason=f"CUDA backend: {_STATUS}"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = FUSION_MODES
# (B, L, H, W): odd H*W (scalar path), one pixel, empty batch, one row, H*W % 8 == 0 (vector path for every
# dtype), the tuned 128 x 128 with L = 98 at a small batch, and a map too big to stage in shared memory
SHAPES = [(2, 3, 7, 9), (1, 1, 1, 1), (0, 2, 5, 5), (3, 5, 1, 6), (2, 7, 16, 24), (2, 98, 128, 128),
          (1, 2, 190, 190)]


@pytest.fixture(autouse=True)
def cuda_backend():
    before = ops.get_backend()
    ops.set_backend("cuda")
    yield
    ops.set_backend(before)


def weights_like(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fixed, non-uniform float64 weight per output element (the upstream gradient)."""
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).cuda() for k, v in outputs.items()}


def loss(outputs, weights) -> torch.Tensor:
    return sum((weights[k] * v.double()).sum() for k, v in outputs.items())


def compare(dtype, shape, mode, beta, normalized, ci=1, c=3):
    leaves = [t.requires_grad_() for t in make_inputs(*shape, ci=ci, c=c, dtype=dtype, device="cuda")]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    got = all_ops(ops, *leaves, mode, beta, normalized)
    want = all_ops(reference, *ref_leaves, mode, beta, normalized)
    what = f"{dtype} {shape} {mode} beta={beta} normalized={normalized}"
    for key, ref in want.items():
        assert got[key].dtype == dtype and got[key].shape == ref.shape, f"{what} {key}"
        assert got[key].is_contiguous(), f"{what} {key} not contiguous"
        CUDA_FAST_MATH.assert_close(got[key], ref.to(dtype), dtype, what=f"{what} {key}")
    if shape[0] == 0:
        return
    weights = weights_like(want)
    loss(got, weights).backward()
    loss(want, weights).backward()
    for name, leaf, ref_leaf in zip(("logits", "image", "embedding"), leaves, ref_leaves):
        assert leaf.grad is not None and leaf.grad.dtype == dtype, f"{what} grad {name}"
        CUDA_FAST_MATH.assert_close(leaf.grad, grad_or_zeros(ref_leaf), dtype, grad=True, what=f"{what} grad {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_gradients(dtype, shape):
    for i, mode in enumerate(MODES):
        normalized = i % 2 == 1
        compare(dtype, shape, mode, beta=(1.3, 0.7, -0.5, 2.0, 1.0)[i], normalized=normalized, ci=1 + i % 3, c=3)


@pytest.mark.parametrize("mode", MODES)
def test_one_sided_gradients(mode):
    """grad_fused = None (loss on z only) and grad_z = None (loss on the fusion only) in the head backward."""
    for which in ("z", "fused"):
        leaves = [t.requires_grad_() for t in make_inputs(2, 4, 9, 12, ci=2, c=3, device="cuda", seed=1)]
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        for impl, args in ((ops, leaves), (reference, ref_leaves)):
            z, fused = impl.decafa_head(*args, mode, 1.1, True)
            out = z if which == "z" else fused
            w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device="cuda").reshape(out.shape)
            (w * out.double()).sum().backward()
        for name, leaf, ref_leaf in zip(("logits", "image", "embedding"), leaves, ref_leaves):
            CUDA_FAST_MATH.assert_close(grad_or_zeros(leaf), grad_or_zeros(ref_leaf), torch.float32, grad=True,
                                        what=f"{mode} loss on {which}: grad {name}")


def test_softmax_and_attention_one_sided():
    """landmark_attention with a loss on z only and on the mask only; spatial_softmax backward."""
    logits = make_inputs(3, 5, 10, 13, device="cuda", seed=2)[0]
    for pick in (0, 1):
        t = logits.clone().requires_grad_()
        r = logits.double().clone().requires_grad_()
        for impl, x in ((ops, t), (reference, r)):
            out = impl.landmark_attention(x, 0.9, False)[pick]
            (torch.cos(out.double())).sum().backward()
        CUDA_FAST_MATH.assert_close(t.grad, r.grad, torch.float32, grad=True, what=f"landmark_attention output {pick}")


def test_channels_last_and_strided_inputs():
    """channels_last logits and embeddings are read in place; F comes back in the embedding's memory format,
    the backward op's gradients contiguous (op contract v2, fakes.py). A leaf's .grad is another matter: torch's
    AccumulateGrad copies a gradient into the leaf's own strides (its layout contract, the same on every
    backend), so the .grad of a channels_last leaf is channels_last."""
    leaves = [t.requires_grad_() for t in make_inputs(2, 6, 12, 16, ci=3, c=4, device="cuda", seed=3)]
    cl = [t.detach().to(memory_format=torch.channels_last).requires_grad_() for t in leaves]
    results = []
    for inputs in (leaves, cl):
        z, fused = ops.decafa_head(*inputs, "F5", 1.0, False)
        (z.sum() * 0.1 + (fused * torch.arange(fused.shape[1], device="cuda").view(1, -1, 1, 1)).sum()).backward()
        results.append((z, fused, [t.grad for t in inputs]))
    (z, fused, grads), (z_cl, fused_cl, grads_cl) = results
    assert fused.is_contiguous() and fused_cl.is_contiguous(memory_format=torch.channels_last)
    assert not fused_cl.is_contiguous()
    CUDA_FAST_MATH.assert_close(z_cl, z, torch.float32, what="channels_last z")
    CUDA_FAST_MATH.assert_close(fused_cl, fused, torch.float32, what="channels_last fused")
    for g, g_cl, leaf in zip(grads, grads_cl, cl):
        assert g_cl.stride() == leaf.stride(), "AccumulateGrad gives a leaf's .grad the leaf's strides"
        CUDA_FAST_MATH.assert_close(g_cl, g, torch.float32, grad=True, what="channels_last gradient")
    logits, image, embedding = (t.detach() for t in cl)
    z, fused, mask, stats = torch.ops.decafa.decafa_head(logits, image, embedding, 5, 1.0, None, False)
    assert fused.is_contiguous(memory_format=torch.channels_last) and mask.is_contiguous()
    # the upstream gradients of the loss above
    grad_z = torch.full_like(z, 0.1)
    grad_fused = torch.ones_like(fused) * torch.arange(fused.shape[1], device="cuda").view(1, -1, 1, 1)
    raw = torch.ops.decafa.decafa_head_backward(grad_z, grad_fused, logits, image, embedding, mask, stats, 5, 1.0,
                                                None, False)
    for name, g, g_cl in zip(("logits", "image", "embedding"), raw, grads_cl):
        assert g.is_contiguous(), f"raw decafa_head_backward: grad {name} is not contiguous"
        CUDA_FAST_MATH.assert_close(g, g_cl, torch.float32, grad=True, what=f"raw channels_last grad {name}")
    wide = torch.randn(2, 6, 12, 32, device="cuda")[..., ::2]  # non-contiguous view
    CUDA_FAST_MATH.assert_close(ops.soft_argmax(wide), reference.soft_argmax(wide.double()), torch.float32,
                                what="strided logits")


@pytest.mark.parametrize("runs", [1, 3, 98])
def test_runs_of_maps_do_not_change_results(runs):
    """The runs of maps (DECAFA_CUDA_RUNS at import, ops.cuda_runs.set_runs in process) only change how the maps
    of a batch element are grouped into blocks (and so the order in which the partial masks are summed): equal
    up to rounding."""
    leaves = [t.requires_grad_() for t in make_inputs(5, 6, 16, 16, device="cuda", seed=4)]

    def run():
        for t in leaves:
            t.grad = None
        z, fused = ops.decafa_head(*leaves, "F4", 1.2, True)
        ((z.float() * 0.3).sum() + (fused.float() * torch.arange(fused.numel(), device="cuda").reshape(
            fused.shape).remainder(7)).sum()).backward()
        return [z, fused] + [t.grad.clone() for t in leaves]

    from decafa_fast.ops import cuda_runs

    saved = cuda_runs.runs()
    try:
        cuda_runs.set_runs(None)
        default = run()
        cuda_runs.set_runs(runs)
        assert cuda_runs.runs() == runs
        other = run()
    finally:
        cuda_runs.set_runs(saved)
    for a, b in zip(default, other):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_per_map_beta_and_its_gradient():
    leaves = [t.requires_grad_() for t in make_inputs(3, 5, 9, 11, ci=2, c=3, device="cuda", seed=9)]
    beta = (0.5 + torch.rand(5, 1, device="cuda")).requires_grad_()  # kornia's (L, 1) temperature shape
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_beta = beta.detach().double().requires_grad_()
    for impl, args, b in ((ops, leaves, beta), (reference, ref_leaves, ref_beta)):
        z, fused = impl.decafa_head(*args, "F5", b, True)
        (torch.sin(z.double()).sum() + (fused.double() ** 2).sum()).backward()
    CUDA_FAST_MATH.assert_close(beta.grad, ref_beta.grad, torch.float32, grad=True, what="grad beta")
    for name, leaf, ref_leaf in zip(("logits", "image", "embedding"), leaves, ref_leaves):
        CUDA_FAST_MATH.assert_close(leaf.grad, ref_leaf.grad, torch.float32, grad=True, what=f"grad {name}")


@pytest.mark.parametrize("magnitude", [1e4, 1e10, 1e30])
def test_float32_exact_at_large_magnitudes(magnitude):
    """Phi, M and F normalised by the sum of the shifted exponentials: float32 relative error <= 1e-6 against
    float64 for |beta T| up to 1e30 (exp(s - lse) loses everything there)."""
    logits, image, embedding = make_inputs(2, 3, 8, 8, device="cuda", seed=10)
    logits = logits / logits.abs().amax() * magnitude
    phi = ops.spatial_softmax(logits)
    want = reference.spatial_softmax(logits.double())
    assert float((phi.double() - want).norm() / want.norm()) <= 1e-6
    _, fused = ops.decafa_head(logits, image, embedding, "F5")
    _, want_f = reference.decafa_head(logits.double(), image.double(), embedding.double(), "F5")
    assert float((fused.double() - want_f).norm() / want_f.norm()) <= 1e-6


def test_one_pixel_axis_normalized_is_centre():
    z = ops.soft_argmax(torch.randn(2, 3, 1, 5, device="cuda"), 1.0, True)
    assert torch.all(z[..., 1] == 0)
    z = ops.soft_argmax(torch.randn(2, 3, 4, 1, device="cuda"), 1.0, True)
    assert torch.all(z[..., 0] == 0)


def test_raw_ops_check_their_arguments():
    logits, image, embedding = make_inputs(2, 3, 6, 7, ci=1, c=2, device="cuda", seed=11)
    head = torch.ops.decafa.decafa_head
    with pytest.raises(RuntimeError, match="embedding"):
        head(logits, image, embedding[:1], 5, 1.0, None, False)
    with pytest.raises(RuntimeError, match="beta_map"):
        head(logits, image, embedding, 5, 1.0, torch.ones(2, 4, device="cuda"), False)
    z, fused, mask, stats = head(logits, image, embedding, 5, 1.0, None, False)
    backward = torch.ops.decafa.decafa_head_backward
    with pytest.raises(RuntimeError, match="stats"):
        backward(z, fused, logits, image, embedding, mask, stats[:, :2], 5, 1.0, None, False)
    with pytest.raises(RuntimeError, match="grad_fused"):
        backward(z, fused[:, :3], logits, image, embedding, mask, stats, 5, 1.0, None, False)
    with pytest.raises(RuntimeError, match="mask"):
        backward(z, fused, logits, image, embedding, mask[..., :3], stats, 5, 1.0, None, False)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.decafa.fuse(image, embedding, torch.ones(2, 2, 6, 7, device="cuda"), 5)
    with pytest.raises(RuntimeError, match="grad_phi"):
        torch.ops.decafa.spatial_softmax_backward(logits[:1], logits, stats, 1.0, None)
    with pytest.raises(RuntimeError, match="image"):
        head(logits, image.cpu(), embedding, 5, 1.0, None, False)
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.decafa.soft_argmax(logits[:, :, :, :0], 1.0, None, False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_runs_on_the_tensors_device():
    logits, image, embedding = make_inputs(2, 3, 8, 8, device="cuda:1", seed=12)
    with torch.cuda.device(0):
        z, fused = ops.decafa_head(logits, image, embedding)
    assert z.device == fused.device == torch.device("cuda:1")
    want = reference.decafa_head(logits.double(), image.double(), embedding.double())
    CUDA_FAST_MATH.assert_close(fused, want[1].float(), torch.float32, what="fused on cuda:1")


def test_deterministic():
    leaves = [t.requires_grad_() for t in make_inputs(3, 98, 64, 64, c=8, device="cuda", seed=5)]
    results = []
    for _ in range(2):
        for t in leaves:
            t.grad = None
        z, fused = ops.decafa_head(*leaves, "F5", 1.0, True)
        (z.sum() * 0.1 + (fused * fused).sum()).backward()
        results.append([z, fused] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_infinite_and_nan_logits():
    logits = make_inputs(2, 3, 8, 8, device="cuda", seed=6)[0]
    logits[0, 1, :4] = float("-inf")  # half of a map masked out: still a proper softmax over the rest
    logits[1, 2, 3, 5] = float("nan")
    z = ops.soft_argmax(logits, 1.0, False)
    want = reference.soft_argmax(logits.double(), 1.0, False)
    ok = torch.ones(2, 3, dtype=torch.bool)
    ok[1, 2] = False
    CUDA_FAST_MATH.assert_close(z[ok], want[ok], torch.float32, what="finite maps")
    assert torch.isnan(z[1, 2]).all(), "a NaN logit must give a NaN soft-argmax for its map"
    phi = ops.spatial_softmax(logits)
    assert torch.all(phi[0, 1, :4] == 0)
    CUDA_FAST_MATH.assert_close(phi[0, 1], reference.spatial_softmax(logits.double())[0, 1], torch.float32,
                                what="masked map")


def test_float64_rejected_with_a_clear_error():
    logits, image, embedding = (t.double() for t in make_inputs(1, 2, 4, 4, device="cuda"))
    with pytest.raises(TypeError, match="float64"):
        ops.decafa_head(logits, image, embedding)
    with pytest.raises((TypeError, RuntimeError), match="float32, float16 or bfloat16"):
        torch.ops.decafa.decafa_head(logits, image, embedding, 5, 1.0, None, False)


def test_stats_mask_and_shapes():
    logits, image, embedding = make_inputs(2, 4, 6, 10, ci=1, c=2, dtype=torch.float16, device="cuda")
    z, fused, mask, stats = torch.ops.decafa.decafa_head(logits, image, embedding, 5, 1.5, None, False)
    assert stats.dtype == torch.float32 and stats.shape == (2, 4, 2)
    s = 1.5 * logits.double().flatten(2)
    mx = s.amax(-1)
    CUDA_FAST_MATH.assert_close(stats[..., 0], mx, torch.float32, what="stats max")
    CUDA_FAST_MATH.assert_close(stats[..., 1], torch.exp(s - mx[..., None]).sum(-1), torch.float32, what="stats sum")
    want_mask = reference.attention_mask(logits.double(), 1.5)
    CUDA_FAST_MATH.assert_close(mask, want_mask.half(), torch.float16, what="mask")
    assert fused.shape == (2, 6, 6, 10) and z.shape == (2, 4, 2) and mask.shape == (2, 1, 6, 10)


def test_torch_compile_fullgraph():
    logits, image, embedding = make_inputs(2, 5, 16, 16, device="cuda", seed=8)

    def head(t, i, e):
        z, f = ops.decafa_head(t, i, e, "F5", 1.0, True)
        return z * 2, f.sum(1)

    compiled = torch.compile(head, fullgraph=True)
    for a, b in zip(compiled(logits, image, embedding), head(logits, image, embedding)):
        CUDA_FAST_MATH.assert_close(a, b, torch.float32, what="compiled")
