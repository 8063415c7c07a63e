"""The op contract on the C++ backend: float32 exact at any magnitude of beta*T, the raw torch.ops.decafa.*
entry points reject mismatched arguments with a RuntimeError (a quick in-process check; the subprocess fuzz
test is tests/ops/test_raw_ops_fuzz.py), the head returns M and stats, F in E's memory format, and results that
do not depend on the thread count."""
from __future__ import annotations

import pytest
import torch

from decafa_fast import ops, reference
from decafa_fast.contract.table import OPS_BY_NAME

pytestmark = pytest.mark.skipif(not ops.backends()["cpp"].startswith("available"), reason=ops.backends()["cpp"])
D = torch.ops.decafa


# --------------------------------------------------------------------------------------------------
# float32 at large |beta * T|: Phi = exp(s - max) / sum, never exp(s - lse)
# --------------------------------------------------------------------------------------------------
def _large_logits(magnitude: float) -> torch.Tensor:
    """Maps whose values share a large offset (+-magnitude) and differ by O(1): where a log-sum-exp of that
    magnitude loses the differences in float32. Beta is 1, so beta*T is the float32 logits themselves."""
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2, 3, 5, 6, generator=g) * 2
    sign = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
    return (sign * magnitude + spread).float()


def _extreme_maps() -> torch.Tensor:
    """Maps of +-1e38 (the float32 limit is 3.4e38), one of them constant."""
    g = torch.Generator().manual_seed(1)
    t = torch.where(torch.rand(2, 3, 5, 6, generator=g) < 0.5, -1e38, 1e38)
    t[0, 0] = 1e38
    t[1, 2] = -1e38
    return t.float()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("magnitude", [1e4, 1e6, 1e7, 1e30, "1e38 maps"])
def test_float32_exact_at_any_magnitude(magnitude):
    t = _extreme_maps() if magnitude == "1e38 maps" else _large_logits(magnitude)
    g = torch.Generator().manual_seed(2)
    i, e = torch.rand(2, 1, 5, 6, generator=g), torch.randn(2, 2, 5, 6, generator=g)
    with ops.use_backend("cpp"):
        phi = ops.spatial_softmax(t)
        mask = ops.attention_mask(t)
        _, fused = ops.decafa_head(t, i, e, "F5")
    want_phi = reference.spatial_softmax(t.double())
    want_mask = reference.attention_mask(t.double())
    _, want_fused = reference.decafa_head(t.double(), i.double(), e.double(), "F5")
    assert torch.isfinite(phi).all() and torch.isfinite(fused).all()
    assert _relative_error(phi, want_phi) <= 1e-6
    assert _relative_error(mask, want_mask) <= 1e-6
    assert _relative_error(fused, want_fused) <= 1e-6


def test_stats_are_max_and_sum_of_shifted_exponentials():
    t = _large_logits(1e6)
    bm = torch.rand(2, 3) + 0.5
    for beta, beta_map in ((1.0, None), (1.0, bm)):
        _, stats = D.spatial_softmax(t, beta, beta_map)
        # s = beta * T rounded to float32 as the contract says; the max and the sum are then exact to float32
        s = (t.flatten(2) * (1.0 if beta_map is None else bm[..., None])).double()
        top = s.max(-1).values
        assert stats.shape == (2, 3, 2) and stats.dtype == torch.float32
        torch.testing.assert_close(stats[..., 0].double(), top, rtol=1e-7, atol=0)
        torch.testing.assert_close(stats[..., 1].double(), (s - top[..., None]).exp().sum(-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 4e-6), (torch.bfloat16, 1.2e-4)])
@pytest.mark.parametrize("spread", [3.0, 87.0])
def test_16_bit_logits_exp_within_its_stated_error(dtype, rtol, spread):
    """16-bit logits take a shorter exp in the CPU kernels (vexp.h kExpBounds: 7e-6 relative for
    float16, 1.1e-4 for bfloat16); the float32 sum of the shifted exponentials shows its error, against
    float64 on the same 16-bit values."""
    g = torch.Generator().manual_seed(0)
    t = (-spread * torch.rand(4, 3, 32, 32, generator=g)).to(dtype)
    _, stats = D.spatial_softmax(t, 1.0, None)
    s = t.double().flatten(2)
    want = (s - s.max(-1, keepdim=True).values).exp().sum(-1)
    err = ((stats[..., 1].double() - want).abs() / want).max().item()
    assert err <= rtol  # measured: 9e-7 (float16), 5e-5 (bfloat16); float32 logits 2.5e-7


# --------------------------------------------------------------------------------------------------
# The head returns M and the stats; F follows E's memory format
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_head_returns_mask_and_stats(dtype):
    t = torch.randn(2, 3, 5, 6).to(dtype)
    i, e = torch.rand(2, 1, 5, 6).to(dtype), torch.randn(2, 2, 5, 6).to(dtype)
    z, f, m, stats = D.decafa_head(t, i, e, 5, 0.8, None, True)
    _, m_ref, stats_ref = D.landmark_attention(t, 0.8, None, True)
    assert m.dtype == dtype and m.shape == (2, 1, 5, 6) and m.is_contiguous()
    torch.testing.assert_close(m, m_ref, rtol=0, atol=0)
    torch.testing.assert_close(stats, stats_ref, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 3])
def test_head_mask_without_fusion_channels(batch):
    # F1 of an embedding with no channels: F is empty, but M (summed per pixel tile of the fusion pass on the
    # CPU) must still be the whole mask
    t = torch.randn(batch, 7, 5, 6)
    z, f, m, stats = D.decafa_head(t, torch.rand(batch, 1, 5, 6), torch.randn(batch, 0, 5, 6), 1, 1.0, None, False)
    _, m_ref, _ = D.landmark_attention(t, 1.0, None, False)
    assert f.shape == (batch, 0, 5, 6)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=0)
    torch.testing.assert_close(m, reference.attention_mask(t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("width", [7, 1024, 1025])
def test_cpu_sweeps_of_narrow_and_wide_maps(width):
    """The CPU sweeps add a map's values per column for maps up to 1024 pixels wide (kColumnSumsMax) and per
    row beyond: both give the float64 reference's z, M, Phi, F and gradients (temperature per map
    included), in float64 to 1e-10 and in float32 to 2e-5 of each output's largest value."""
    g = torch.Generator().manual_seed(width)
    t = (3 * torch.randn(2, 3, 3, width, generator=g, dtype=torch.float64)).requires_grad_()
    beta = (torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    i, e = torch.rand(2, 1, 3, width, dtype=torch.float64), torch.randn(2, 2, 3, width, dtype=torch.float64)

    def outputs(backend, dtype):
        before = ops.get_backend()
        ops.set_backend(backend)
        try:
            z, m = ops.landmark_attention(t.to(dtype), beta.to(dtype))
            phi = ops.spatial_softmax(t.to(dtype), beta.to(dtype))
            zh, f = ops.decafa_head(t.to(dtype), i.to(dtype), e.to(dtype), beta=beta.to(dtype))
            w = torch.linspace(-1, 1, 12, dtype=dtype).view(2, 3, 2)
            loss = (z * w).sum() + (m * e[:, :1].to(dtype)).sum() + (phi * t.detach().cos().to(dtype)).sum()
            loss = loss + (f * f.detach()).sum() + (zh * w).sum()
            return (z, m, phi, zh, f) + torch.autograd.grad(loss, (t, beta))
        finally:
            ops.set_backend(before)

    want = outputs("reference", torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        for ours, ref in zip(outputs("cpp", dtype), want):
            torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("width", [6, 7, 128])
@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_cpu_bfloat16_soft_argmax_by_column_pairs(width, beta):
    """bfloat16 logits of an even width take the sweep that reads two columns per load (map_math.h
    exp_rows_bf16_pairs), odd widths the other: both give the float64 soft-argmax of the same bfloat16
    values to within a bfloat16 rounding of z, with and without a temperature, at 1 and 2 threads alike."""
    g = torch.Generator().manual_seed(width)
    t = (3 * torch.randn(2, 5, 9, width, generator=g)).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        z1, stats1 = D.soft_argmax(t, beta, None, False)
        torch.set_num_threads(2)
        z2, stats2 = D.soft_argmax(t, beta, None, False)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(z1, z2) and torch.equal(stats1, stats2)
    want = reference.soft_argmax(t.double(), beta)
    torch.testing.assert_close(z1.double(), want, rtol=8e-3, atol=1e-2)
    s = beta * t.double().flatten(2)
    top = s.max(-1).values
    torch.testing.assert_close(stats1[..., 1].double(), (s - top[..., None]).exp().sum(-1), rtol=2e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_16_bit_max_in_integer_order(dtype):
    """The CPU max sweep of 16-bit logits compares their bits as int16 (map_math.h max_of_16_bit) when beta
    is positive: the saved max must be the float max of s = beta * T (NaN skipped, as the float sweep does)
    for maps of positive, negative and mixed signs, signed zeros, infinities and NaN of either sign, under
    per-map temperatures of either sign."""
    info = torch.finfo(dtype)

    def from_bits(*bits):
        return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(dtype)

    quiet_nan = 0x7FC1 if dtype == torch.bfloat16 else 0x7E01  # with a payload
    g = torch.Generator().manual_seed(3)
    maps = [v.to(dtype) for v in (
        3 * torch.randn(12, generator=g),             # mixed signs
        -torch.rand(12, generator=g) - 0.5,          # all negative
        torch.rand(12, generator=g) + 0.5,           # all positive
        torch.tensor([-0.0] * 6 + [-1.0] * 6),       # -0 is the largest
        torch.tensor([0.0] * 6 + [-0.0] * 6),        # zeros of both signs
        torch.tensor([-float("inf")] * 12),          # nothing above -inf
        torch.tensor([float("inf")] + [1.0] * 11),   # +inf
        torch.tensor([info.max, -info.max] * 6),     # the extremes
    )]
    for v in maps[:3]:  # one NaN of either sign among them
        for nan in (quiet_nan, quiet_nan | 0x8000):
            w = v.clone()
            w[5] = from_bits(nan)[0]
            maps.append(w)
    maps.append(from_bits(*[(quiet_nan | 0x8000) + k for k in range(12)]))  # only negative NaN
    t = torch.stack(maps).view(1, -1, 3, 4)
    assert torch.isnan(t[0, -1]).all() and (t[0, -1].view(torch.int16) < 0).all()  # every value a negative NaN
    L = t.shape[1]
    for beta_map in (torch.ones(1, L), torch.full((1, L), 0.7), torch.full((1, L), -0.5),
                     torch.linspace(-2, 2, L).view(1, L)):
        _, stats = D.spatial_softmax(t, 1.0, beta_map)
        s = beta_map[..., None] * t.float().flatten(2)  # float32, as the contract rounds s
        want = torch.where(torch.isnan(s), torch.tensor(-float("inf")), s).amax(-1)
        assert torch.equal(stats[..., 0], want), (beta_map, stats[..., 0], want)


@pytest.mark.parametrize("mode", [1, 3, 5])
def test_fused_in_embedding_memory_format(mode):
    t = torch.randn(2, 3, 5, 6)
    i, e = torch.rand(2, 1, 5, 6), torch.randn(2, 4, 5, 6)
    e_cl, m = e.contiguous(memory_format=torch.channels_last), torch.rand(2, 1, 5, 6)
    for op in (lambda emb: D.decafa_head(t, i, emb, mode, 1.0, None, False)[1],
               lambda emb: D.fuse(i, emb, m, mode)):
        f, f_cl = op(e), op(e_cl)
        assert f.is_contiguous()
        assert f_cl.is_contiguous(memory_format=torch.channels_last) and not f_cl.is_contiguous()
        torch.testing.assert_close(f, f_cl, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Raw ops: mismatched arguments raise RuntimeError naming the argument (never a crash or a wrong read)
# --------------------------------------------------------------------------------------------------
def _raw_calls():
    t, i, e = torch.randn(2, 3, 5, 6), torch.rand(2, 1, 5, 6), torch.randn(2, 2, 5, 6)
    m, gz = torch.rand(2, 1, 5, 6), torch.randn(2, 3, 2)
    stats = D.spatial_softmax(t, 1.0, None)[1]
    gf5 = torch.randn(2, 6, 5, 6)
    return {
        "softmax logits rank": (lambda: D.spatial_softmax(t[0], 1.0, None), "logits"),
        "softmax int logits": (lambda: D.spatial_softmax(t.long(), 1.0, None), "logits"),
        "softmax empty map": (lambda: D.spatial_softmax(t[:, :, :0], 1.0, None), "logits"),
        "softmax beta_map shape": (lambda: D.spatial_softmax(t, 1.0, torch.ones(3, 2)), "beta_map"),
        "softmax beta_map dtype": (lambda: D.spatial_softmax(t, 1.0, torch.ones(2, 3, dtype=torch.float64)),
                                   "beta_map"),
        "softmax backward grad shape": (lambda: D.spatial_softmax_backward(torch.randn(2, 3, 5, 5), t, stats, 1.0,
                                                                           None), "grad_phi"),
        "softmax backward stats shape": (lambda: D.spatial_softmax_backward(torch.randn_like(t), t, stats[:1], 1.0,
                                                                            None), "stats"),
        "softmax backward lse-shaped stats": (lambda: D.spatial_softmax_backward(torch.randn_like(t), t,
                                                                                 stats[..., 0], 1.0, None), "stats"),
        "attention backward grad_z": (lambda: D.landmark_attention_backward(gz[:, :2], None, t, stats, 1.0, None,
                                                                            False), "grad_z"),
        "attention backward grad_mask": (lambda: D.landmark_attention_backward(None, m[..., :3], t, stats, 1.0, None,
                                                                               False), "grad_mask"),
        "attention backward stats dtype": (lambda: D.landmark_attention_backward(gz, None, t, stats.double(), 1.0,
                                                                                 None, False), "stats"),
        "fuse batch": (lambda: D.fuse(i, e[:1], m, 5), "embedding"),
        "fuse spatial": (lambda: D.fuse(i, e, m[..., :4], 5), "mask"),
        "fuse mask channels": (lambda: D.fuse(i, e, torch.rand(2, 2, 5, 6), 5), "mask"),
        "fuse dtype": (lambda: D.fuse(i, e.double(), m, 5), "embedding"),
        "fuse mode": (lambda: D.fuse(i, e, m, 7), "mode"),
        "fuse backward grad channels": (lambda: D.fuse_backward(gf5[:, :5], i, e, m, 5), "grad_fused"),
        "head image spatial": (lambda: D.decafa_head(t, i[..., :5], e, 5, 1.0, None, False), "image"),
        "head embedding batch": (lambda: D.decafa_head(t, i, e[:1], 5, 1.0, None, False), "embedding"),
        "head beta_map": (lambda: D.decafa_head(t, i, e, 5, 1.0, torch.ones(2, 4), False), "beta_map"),
        "head backward grad_fused": (lambda: D.decafa_head_backward(gz, gf5[:, :4], t, i, e, m, stats, 5, 1.0, None,
                                                                    False), "grad_fused"),
        "head backward mask": (lambda: D.decafa_head_backward(gz, gf5, t, i, e, m[:1], stats, 5, 1.0, None, False),
                               "mask"),
        "head backward stats": (lambda: D.decafa_head_backward(gz, gf5, t, i, e, m, stats[:, :2], 5, 1.0, None,
                                                               False), "stats"),
        "head backward grad_z": (lambda: D.decafa_head_backward(gz[:1], gf5, t, i, e, m, stats, 5, 1.0, None, False),
                                 "grad_z"),
    }


RAW = _raw_calls()


@pytest.mark.parametrize("case", list(RAW))
def test_raw_op_rejects_mismatched_arguments(case):
    """The message names the op, then the argument (csrc/common/checks.h: "<op>: <argument> ...")."""
    call, argument = RAW[case]
    op = next(name for name in call.__code__.co_names if name in OPS_BY_NAME)
    with pytest.raises(RuntimeError, match=rf"\b{op}: {argument}\b"):
        call()


# --------------------------------------------------------------------------------------------------
# Determinism across thread counts (no atomics; the mask's summation order depends on the shape only)
# --------------------------------------------------------------------------------------------------
def test_bitwise_identical_across_thread_counts():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3, 17, 33, 35, generator=g)
    i, e = torch.rand(3, 1, 33, 35, generator=g), torch.randn(3, 5, 33, 35, generator=g)
    bm = torch.rand(3, 17, generator=g) + 0.5
    gz, gf = torch.randn(3, 17, 2, generator=g), torch.randn(3, 12, 33, 35, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            z, f, m, stats = D.decafa_head(t, i, e, 5, 1.0, bm, True)
            grads = D.decafa_head_backward(gz, gf, t, i, e, m, stats, 5, 1.0, bm, True)
            results.append((z, f, m, stats, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# Raw ops under forward-mode AD: a clear error naming the public op (never a dropped tangent)
# --------------------------------------------------------------------------------------------------
def test_raw_op_forward_ad_raises_naming_the_alternative():
    import torch.autograd.forward_ad as fwAD

    t = torch.randn(1, 2, 3, 4)
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="decafa_fast.ops.soft_argmax"):
        D.soft_argmax(fwAD.make_dual(t, torch.randn_like(t)), 1.0, None, False)
    with pytest.raises(RuntimeError, match="decafa_fast.ops.decafa_head"):
        i, e = torch.rand(1, 1, 3, 4), torch.randn(1, 2, 3, 4)
        torch.func.jvp(lambda x: D.decafa_head(x, i, e, 5, 1.0, None, False)[1], (t,), (torch.randn_like(t),))
