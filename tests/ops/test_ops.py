"""Every public op, on every compiled backend available here, against decafa_fast.reference.

Tolerances: tests/harness.py's ROUNDED_REFERENCE profile (float32 rtol 1e-5 with atol 1e-5 of the
reference's largest magnitude; float16 1e-2; bfloat16 2e-2; values and gradients alike). Both sides accumulate
in float32 and the reference is rounded to the tested dtype, so the differences left are summation order and
the final rounding to the output dtype.
"""
from __future__ import annotations

import pytest
import torch

from conftest import backend_device, interpreted
from decafa_fast import ops, reference
from harness import ROUNDED_REFERENCE, all_ops, grad_or_zeros, make_inputs, opcheck_args, weighted_loss

MODES = ops.FUSION_MODES


def dtypes_for(backend: str) -> list[torch.dtype]:
    if interpreted(backend):  # the Triton interpreter has no bfloat16
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def sizes_for(backend: str) -> list[tuple[int, int, int, int]]:
    """(B, L, H, W): odd sizes, a single pixel, an empty batch; the tuned 128 x 128 where it is cheap."""
    small = [(2, 3, 7, 9), (1, 1, 1, 1), (0, 2, 5, 5), (3, 5, 1, 6)]
    if interpreted(backend):
        return small + [(1, 2, 16, 16)]
    return small + [(2, 98, 33, 31), (1, 5, 128, 128), (1, 2, 130, 129)]


# --------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalized", [False, True])
def test_values_and_gradients_match_reference(backend, normalized):
    device = backend_device(backend)
    for dtype in dtypes_for(backend):
        for b, l, h, w in sizes_for(backend):
            mode = MODES[(b + l + h + w) % len(MODES)]
            beta = 0.7 if normalized else 1.3
            inputs = make_inputs(b, l, h, w, dtype=dtype, device=device)
            leaves = [t.clone().requires_grad_() for t in inputs]
            ref_leaves = [t.clone().float().requires_grad_() for t in inputs]
            got = all_ops(ops, *leaves, mode, beta, normalized)
            want = all_ops(reference, *ref_leaves, mode, beta, normalized)
            what = f"{backend} {dtype} {(b, l, h, w)} {mode}"
            for key in want:
                assert got[key].dtype == dtype, f"{what} {key} dtype"
                assert got[key].shape == want[key].shape, f"{what} {key} shape"
                ROUNDED_REFERENCE.assert_close(got[key], want[key].to(dtype), dtype, what=f"{what} {key}")
            if b == 0:
                continue
            weighted_loss(got).backward()
            weighted_loss(want).backward()
            for name, leaf, ref_leaf in zip(("logits", "image", "embedding"), leaves, ref_leaves):
                assert leaf.grad is not None and leaf.grad.dtype == dtype
                ROUNDED_REFERENCE.assert_close(leaf.grad, grad_or_zeros(ref_leaf).to(dtype), dtype, grad=True,
                                               what=f"{what} grad {name}")


@pytest.mark.parametrize("used", ["z", "fused"])
@pytest.mark.parametrize("mode", ["F1", "F5"])
def test_head_gradients_when_one_output_is_used(backend, used, mode):
    """The head's backward gets None for the unused output (F1 has no masked channel at all)."""
    device = backend_device(backend)
    inputs = make_inputs(2, 5, 9, 11, ci=2, c=3, device=device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    for impl, xs in ((ops, leaves), (reference, ref_leaves)):
        z, fused = impl.decafa_head(*xs, mode, 1.3, False)
        out = z if used == "z" else fused
        w = torch.linspace(-1, 2, out.numel(), device=device).reshape(out.shape)
        (w * out).sum().backward()
    for name, leaf, ref_leaf in zip(("logits", "image", "embedding"), leaves, ref_leaves):
        ROUNDED_REFERENCE.assert_close(grad_or_zeros(leaf), grad_or_zeros(ref_leaf), torch.float32, grad=True,
                                       what=f"{backend} {mode} loss on {used}: grad {name}")


def test_float32_gradients_tight(backend):
    """fp32 gradients of each op alone match the reference to 1e-5 (relative to the gradient's scale)."""
    device = backend_device(backend)
    logits, image, embedding = make_inputs(2, 4, 9, 11, c=2, device=device, seed=3)
    mask = torch.rand(2, 1, 9, 11, device=device)
    cases = {
        "spatial_softmax": (lambda t: (t.spatial_softmax(logits_, 1.1),), "logits"),
        "soft_argmax": (lambda t: (t.soft_argmax(logits_, 1.1, True),), "logits"),
        "attention_mask": (lambda t: (t.attention_mask(logits_, 1.1),), "logits"),
        "landmark_attention": (lambda t: t.landmark_attention(logits_, 1.1, False), "logits"),
    }
    for name, (fn, _) in cases.items():
        grads = []
        for impl in (ops, reference):
            logits_ = logits.clone().requires_grad_()
            weighted_loss(dict(enumerate(fn(impl)))).backward()
            grads.append(logits_.grad)
        ROUNDED_REFERENCE.assert_close(grads[0], grads[1], torch.float32, grad=True, what=name)
    for mode in MODES:
        grads = []
        for impl in (ops, reference):
            leaves = [t.clone().requires_grad_() for t in (logits, image, embedding, mask)]
            out = {"head": impl.decafa_head(*leaves[:3], mode, 0.9, True), "fuse": impl.fuse(*leaves[1:], mode)}
            weighted_loss({"z": out["head"][0], "f": out["head"][1], "g": out["fuse"]}).backward()
            grads.append([grad_or_zeros(leaf) for leaf in leaves])
        for name, g, r in zip(("logits", "image", "embedding", "mask"), *grads):
            ROUNDED_REFERENCE.assert_close(g, r, torch.float32, grad=True, what=f"{mode} grad {name}")


# --------------------------------------------------------------------------------------------------
# float64 gradcheck (C++ backend on CPU)
# --------------------------------------------------------------------------------------------------
GRADCHECK_OPS = {
    "spatial_softmax": lambda t, i, e, m: ops.spatial_softmax(t, 1.3),
    "soft_argmax": lambda t, i, e, m: ops.soft_argmax(t, 0.8, False),
    "soft_argmax_normalized": lambda t, i, e, m: ops.soft_argmax(t, 0.8, True),
    "attention_mask": lambda t, i, e, m: ops.attention_mask(t, 1.7),
    "landmark_attention": lambda t, i, e, m: ops.landmark_attention(t, 1.0, True),
    **{f"fuse_{mode}": (lambda mode: lambda t, i, e, m: ops.fuse(i, e, m, mode))(mode) for mode in MODES},
    **{
        f"decafa_head_{mode}": (lambda mode: lambda t, i, e, m: ops.decafa_head(t, i, e, mode, 1.2, mode == "F3"))(mode)
        for mode in MODES
    },
}


@pytest.mark.parametrize("name", list(GRADCHECK_OPS))
def test_gradcheck_float64(name):
    ops.set_backend("cpp")
    try:
        g = torch.Generator().manual_seed(1)
        shapes = [(2, 3, 4, 5), (2, 2, 4, 5), (2, 3, 4, 5), (2, 1, 4, 5)]
        inputs = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
        fn = GRADCHECK_OPS[name]
        assert torch.autograd.gradcheck(fn, inputs, check_undefined_grad=True)
    finally:
        ops.set_backend("auto")


# --------------------------------------------------------------------------------------------------
# opcheck: schema, fake kernels, autograd registration, AOT dispatch
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_map_beta", [False, True])
@pytest.mark.parametrize("op_name", list(ops.SCHEMAS))
def test_opcheck(backend, op_name, per_map_beta):
    namespace = torch.ops.decafa_triton if backend == "triton" else torch.ops.decafa
    args = opcheck_args(backend_device(backend), per_map_beta=per_map_beta)[op_name]
    if not op_name.endswith("backward"):  # the inputs, beta_map included, require grad
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype.is_floating_point
                     and a.dim() in (2, 4) else a for a in args)
    torch.library.opcheck(getattr(namespace, op_name).default, args)


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------
class TinyHead(torch.nn.Module):
    """conv -> logits and embedding -> the fused head -> a second conv on the fusion."""

    def __init__(self, landmarks=3, channels=4, mode="F5"):
        super().__init__()
        self.embed = torch.nn.Conv2d(1, channels, 3, padding=1)
        self.transfer = torch.nn.Conv2d(channels, landmarks, 1)
        fused = ops.reference.fused_channels(mode, 1, channels)
        self.after = torch.nn.Conv2d(fused, landmarks, 1)
        self.mode = mode

    def forward(self, image):
        e = self.embed(image)
        z, f = ops.decafa_head(self.transfer(e), image, e, self.mode)
        z2 = ops.soft_argmax(self.after(f), normalized=True)
        m = ops.attention_mask(self.after(f))
        return z.sum() + z2.sum() + m.mean() + ops.spatial_softmax(f[:, :2]).sum()


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler):
    if compiler == "inductor" and ops.get_backend() != "auto":
        pytest.skip("inductor case runs on the default backend only")
    torch.manual_seed(0)
    model = TinyHead()
    image = torch.rand(2, 1, 12, 10)
    eager_loss = model(image)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    loss = compiled(image)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Layouts, determinism, special inputs
# --------------------------------------------------------------------------------------------------
def test_bfloat16_outputs_round_to_nearest_even_like_torch(backend):
    """F2 = I * M is exact in float32 for bfloat16 inputs, so the stored output must equal torch's rounding bit
    for bit: ties to even, overflow to inf, NaN stays NaN (the CPU store is a hand-written branch-free form)."""
    if interpreted(backend):
        pytest.skip("the Triton interpreter has no bfloat16")
    device = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    image = (torch.randn(1, 1, 256, 400, generator=g) * 4).to(torch.bfloat16)
    mask = (torch.randn(1, 1, 256, 400, generator=g) * 4).to(torch.bfloat16)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.3895e38, -3.3895e38, 1e-40])
    image[0, 0, 0, : special.numel()] = special.to(torch.bfloat16)
    mask[0, 0, 0, : special.numel()] = 2.0  # doubling the largest bfloat16 overflows to inf
    mask[0, 0, 1, :3] = float("nan")
    fused = ops.fuse(image.to(device), torch.zeros_like(image).to(device), mask.to(device), "F2").cpu()
    expected = (image.float() * mask.float()).to(torch.bfloat16)
    ties = ((image.float() * mask.float()).view(torch.int32) & 0xFFFF) == 0x8000
    assert ties.sum() > 50  # the rounding of exact ties is exercised
    same = (fused.view(torch.int16) == expected.view(torch.int16)) | (fused.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} bfloat16 values differ from torch's rounding"


def test_channels_last_inputs(backend):
    device = backend_device(backend)
    t, i, e = make_inputs(2, 4, 6, 7, c=3, device=device)
    want = ops.decafa_head(t, i, e, "F5")
    cl = [x.to(memory_format=torch.channels_last) for x in (t, i, e)]
    assert cl[0].is_contiguous(memory_format=torch.channels_last) and not cl[0].is_contiguous()
    got = ops.decafa_head(*cl, "F5")
    # cpp reads both layouts in one summation order: bitwise equal. Triton's channels_last per-map kernel
    # walks the interleaved maps in another order, so z may differ in its last float32 bit (1 ulp of 4.0).
    tol = {"rtol": 0, "atol": 0} if backend != "triton" else {"rtol": 1e-6, "atol": 1e-6}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    torch.testing.assert_close(ops.soft_argmax(cl[0]), want[0], **tol)


def test_bitwise_deterministic(backend):
    device = backend_device(backend)
    leaves1 = [x.requires_grad_() for x in make_inputs(2, 6, 11, 13, device=device)]
    leaves2 = [x.detach().clone().requires_grad_() for x in leaves1]
    out1 = ops.decafa_head(*leaves1, "F5")
    out2 = ops.decafa_head(*leaves2, "F5")
    for a, b in zip(out1, out2):
        assert torch.equal(a, b)
    weighted_loss(dict(enumerate(out1))).backward()
    weighted_loss(dict(enumerate(out2))).backward()
    for a, b in zip(leaves1, leaves2):
        assert torch.equal(a.grad, b.grad)


def test_one_hot_soft_argmax_is_the_peak(backend):
    """A sharp peak at row r, column c gives (c, r); normalized gives 2 c / (W - 1) - 1."""
    device = backend_device(backend)
    logits = torch.full((1, 2, 5, 8), -1e4, device=device)
    logits[0, 0, 1, 6] = 0.0
    logits[0, 1, 4, 0] = 0.0
    assert ops.soft_argmax(logits).tolist() == [[[6.0, 1.0], [0.0, 4.0]]]
    normed = ops.soft_argmax(logits, normalized=True).cpu()
    torch.testing.assert_close(normed, torch.tensor([[[2 * 6 / 7 - 1, 2 * 1 / 4 - 1], [-1.0, 1.0]]]))


def test_single_pixel_and_empty_batch(backend):
    device = backend_device(backend)
    t, i, e = make_inputs(3, 2, 1, 1, device=device)
    z, f = ops.decafa_head(t, i, e, "F5")
    assert z.abs().max().item() == 0  # the only pixel is (0, 0)
    # a one-pixel axis is its own centre, 0 (as kornia 0.9)
    torch.testing.assert_close(ops.soft_argmax(t, normalized=True).cpu(), torch.full((3, 2, 2), 0.0))
    torch.testing.assert_close(ops.attention_mask(t).cpu(), torch.full((3, 1, 1, 1), 2.0))
    t0, i0, e0 = make_inputs(0, 2, 4, 4, device=device)
    z0, f0 = ops.decafa_head(t0.requires_grad_(), i0.requires_grad_(), e0.requires_grad_(), "F5")
    assert z0.shape == (0, 2, 2) and f0.shape == (0, 8, 4, 4)
    (z0.sum() + f0.sum()).backward()
    assert t0.grad.shape == t0.shape and i0.grad.shape == i0.shape and e0.grad.shape == e0.shape
    m0 = torch.rand(0, 1, 4, 4, device=device).requires_grad_()
    ops.fuse(i0, e0, m0, "F5").sum().backward()
    assert m0.grad.shape == m0.shape


@pytest.mark.parametrize("nan_bits", [0x7FC00000, 0x7FC001FF, 0x7F800001, 0xFFC00003],
                         ids=["quiet", "payload", "signaling", "negative"])
def test_nan_logits_poison_only_their_map(backend, nan_bits):
    """Documented: NaN in a map gives NaN for that map's z and Phi (as torch.softmax does), and NaN in the
    mask wherever that map contributes; other maps and images are untouched. Any NaN: a payload in the low
    mantissa bits once turned into a finite value in the CPU exp's exponent arithmetic."""
    device = backend_device(backend)
    t, i, e = make_inputs(2, 3, 4, 5, device=device)
    nan = torch.tensor([nan_bits], dtype=torch.int64).to(torch.int32).view(torch.float32).to(device)
    assert torch.isnan(nan).all()
    t[0, 1, 2, 3] = nan.to(t.dtype)[0]
    z, f = ops.decafa_head(t, i, e, "F5")
    phi = ops.spatial_softmax(t)
    assert torch.isnan(z[0, 1]).all() and torch.isnan(phi[0, 1]).all()
    assert not torch.isnan(z[0, [0, 2]]).any() and not torch.isnan(z[1]).any()
    assert not torch.isnan(f[1]).any() and not torch.isnan(phi[1]).any()
    assert torch.isnan(f[0, 1]).all()  # I * M with M poisoned


# --------------------------------------------------------------------------------------------------
# kornia parity
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_kornia_parity(backend, normalized, temperature):
    kornia = pytest.importorskip("kornia")
    from decafa_fast.nn import SpatialSoftArgmax2d

    device = backend_device(backend)
    heat = make_inputs(2, 5, 9, 12, device=device)[0]
    ours_in, theirs_in = heat.clone().requires_grad_(), heat.clone().requires_grad_()
    ours = SpatialSoftArgmax2d(temperature, normalized)(ours_in)
    theirs = kornia.geometry.subpix.spatial_soft_argmax2d(theirs_in, torch.tensor(temperature), normalized)
    ROUNDED_REFERENCE.assert_close(ours, theirs, torch.float32, what="values")
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    ROUNDED_REFERENCE.assert_close(ours_in.grad, theirs_in.grad, torch.float32, grad=True, what="gradients")
