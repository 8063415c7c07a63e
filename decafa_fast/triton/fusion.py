"""Per-pixel-tile Triton kernels: the attention mask and the F1-F5 fusion, forward and backward.

One program per (b, tile of BLOCK_P pixels). The mask of the tile is either recomputed from the logits and
the saved log-sum-exps, M_p = sum_l exp(beta*T_lp - lse_l) (FROM_LOGITS), or read from a mask tensor
(the plain `fuse` op). It stays in registers: the fused head never writes M or Phi to memory. Using the
saved float32 lse directly costs a relative error of about |beta*T| * 6e-8 in M (2e-6 at beta*T ~ 40).

Fusion segments, by MODE (1..5 = F1..F5; 0 = mask only):
    F1 = [E]   F2 = [I*M]   F3 = [I, I*M]   F4 = [I, I*M, E*M]   F5 = [I, I*M, E, E*M]
The wrapper passes each segment's first output channel (`ip_off` plain I, `im_off` masked I, `ep_off` plain E,
`em_off` masked E); the MODE tests below decide at compile time which segments exist. Channels are
processed BLOCK_C at a time as [BLOCK_C, BLOCK_P] tiles so that many loads are in flight per program.
Pixels use one stride per tensor (flat spatial dims; see stats.py). float32 accumulation, no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_mask(t_ptr, lse_ptr, b, p, valid, L, s_tb, s_tl, s_tp, beta,
               BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr):
    """M for the pixels p of batch b: sum over l of exp(beta*T - lse_l), float32, [BLOCK_P]."""
    base = t_ptr + b.to(tl.int64) * s_tb
    acc = tl.zeros([BLOCK_L, BLOCK_P], tl.float32)
    for l0 in range(0, L, BLOCK_L):
        ls = l0 + tl.arange(0, BLOCK_L)
        lv = ls < L
        lse = tl.load(lse_ptr + b.to(tl.int64) * L + ls, mask=lv, other=0.0)
        both = lv[:, None] & valid[None, :]
        t = tl.load(base + ls[:, None] * s_tl + p[None, :] * s_tp, mask=both, other=0.0).to(tl.float32)
        acc += tl.where(both, tl.exp(t * beta - lse[:, None]), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def mask_fuse_fwd_kernel(
    t_ptr, lse_ptr, m_ptr, i_ptr, e_ptr, f_ptr, m_out_ptr,
    b_start, b_step, L, HW, CI, C, n_tiles,
    s_tb, s_tl, s_tp,
    s_mb, s_mp,
    s_ib, s_ic, s_ip,
    s_eb, s_ec, s_ep,
    beta, ip_off, im_off, ep_off, em_off, CF,
    MODE: tl.constexpr, FROM_LOGITS: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = b_start + b_step * (pid // n_tiles)  # b_step = -1: backwards over the batch (see stats.py)
    p = (pid % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < HW

    if FROM_LOGITS:
        m = _tile_mask(t_ptr, lse_ptr, b, p, valid, L, s_tb, s_tl, s_tp, beta, BLOCK_L, BLOCK_P)
    else:
        m = tl.load(m_ptr + b.to(tl.int64) * s_mb + p * s_mp, mask=valid, other=0.0).to(tl.float32)
    if WRITE_MASK:
        tl.store(m_out_ptr + b.to(tl.int64) * HW + p, m.to(m_out_ptr.dtype.element_ty), mask=valid)

    f_base = f_ptr + b.to(tl.int64) * CF * HW
    out_ty = f_ptr.dtype.element_ty
    if MODE >= 2:  # image segments
        i_base = i_ptr + b.to(tl.int64) * s_ib
        for c0 in range(0, CI, BLOCK_CI):
            cs = c0 + tl.arange(0, BLOCK_CI)
            both = (cs < CI)[:, None] & valid[None, :]
            x = tl.load(i_base + cs[:, None] * s_ic + p[None, :] * s_ip, mask=both, other=0.0)
            if MODE >= 3:
                tl.store(f_base + (ip_off + cs)[:, None] * HW + p[None, :], x.to(out_ty), mask=both)
            xm = x.to(tl.float32) * m[None, :]
            tl.store(f_base + (im_off + cs)[:, None] * HW + p[None, :], xm.to(out_ty), mask=both)
    if MODE == 1 or MODE >= 4:  # embedding segments
        e_base = e_ptr + b.to(tl.int64) * s_eb
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            both = (cs < C)[:, None] & valid[None, :]
            x = tl.load(e_base + cs[:, None] * s_ec + p[None, :] * s_ep, mask=both, other=0.0)
            if MODE == 1 or MODE == 5:
                tl.store(f_base + (ep_off + cs)[:, None] * HW + p[None, :], x.to(out_ty), mask=both)
            if MODE >= 4:
                xm = x.to(tl.float32) * m[None, :]
                tl.store(f_base + (em_off + cs)[:, None] * HW + p[None, :], xm.to(out_ty), mask=both)


@triton.jit
def fuse_bwd_kernel(
    t_ptr, lse_ptr, m_ptr, i_ptr, e_ptr, gf_ptr, gi_ptr, ge_ptr, gm_ptr,
    b_start, b_step, L, HW, CI, C, n_tiles,
    s_tb, s_tl, s_tp,
    s_mb, s_mp,
    s_ib, s_ic, s_ip,
    s_eb, s_ec, s_ep,
    s_fb, s_fc, s_fp,
    beta, ip_off, im_off, ep_off, em_off,
    MODE: tl.constexpr, FROM_LOGITS: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gI, gE (contiguous, input dtype) and gM (contiguous (B, HW), float32 or the mask dtype).

    gI = sum of the image segments' grads (times M where masked), gE likewise; gM = sum over masked
    segments and channels of gF * source. The wrapper zero-fills whichever of gI / gE the mode lacks.
    """
    pid = tl.program_id(0)
    b = b_start + b_step * (pid // n_tiles)  # b_step = -1: backwards over the batch (see stats.py)
    p = (pid % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < HW

    if MODE >= 2:
        if FROM_LOGITS:
            m = _tile_mask(t_ptr, lse_ptr, b, p, valid, L, s_tb, s_tl, s_tp, beta, BLOCK_L, BLOCK_P)
        else:
            m = tl.load(m_ptr + b.to(tl.int64) * s_mb + p * s_mp, mask=valid, other=0.0).to(tl.float32)
    gm = tl.zeros([BLOCK_P], tl.float32)
    gf_base = gf_ptr + b.to(tl.int64) * s_fb

    if MODE >= 2:  # image segments: I*M always, plain I from F3 on
        i_base = i_ptr + b.to(tl.int64) * s_ib
        gi_base = gi_ptr + b.to(tl.int64) * CI * HW
        for c0 in range(0, CI, BLOCK_CI):
            cs = c0 + tl.arange(0, BLOCK_CI)
            both = (cs < CI)[:, None] & valid[None, :]
            g_m = tl.load(gf_base + (im_off + cs)[:, None] * s_fc + p[None, :] * s_fp, mask=both, other=0.0)
            g_m = g_m.to(tl.float32)
            x = tl.load(i_base + cs[:, None] * s_ic + p[None, :] * s_ip, mask=both, other=0.0).to(tl.float32)
            gm += tl.sum(g_m * x, axis=0)
            g = g_m * m[None, :]
            if MODE >= 3:
                g_p = tl.load(gf_base + (ip_off + cs)[:, None] * s_fc + p[None, :] * s_fp, mask=both, other=0.0)
                g += g_p.to(tl.float32)
            tl.store(gi_base + cs[:, None] * HW + p[None, :], g.to(gi_ptr.dtype.element_ty), mask=both)

    if MODE == 1 or MODE >= 4:  # embedding segments: plain E in F1 and F5, E*M in F4 and F5
        e_base = e_ptr + b.to(tl.int64) * s_eb
        ge_base = ge_ptr + b.to(tl.int64) * C * HW
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            both = (cs < C)[:, None] & valid[None, :]
            g = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            if MODE >= 4:
                g_m = tl.load(gf_base + (em_off + cs)[:, None] * s_fc + p[None, :] * s_fp, mask=both, other=0.0)
                g_m = g_m.to(tl.float32)
                x = tl.load(e_base + cs[:, None] * s_ec + p[None, :] * s_ep, mask=both, other=0.0).to(tl.float32)
                gm += tl.sum(g_m * x, axis=0)
                g += g_m * m[None, :]
            if MODE == 1 or MODE == 5:
                g_p = tl.load(gf_base + (ep_off + cs)[:, None] * s_fc + p[None, :] * s_fp, mask=both, other=0.0)
                g += g_p.to(tl.float32)
            tl.store(ge_base + cs[:, None] * HW + p[None, :], g.to(ge_ptr.dtype.element_ty), mask=both)

    if MODE >= 2:
        tl.store(gm_ptr + b.to(tl.int64) * HW + p, gm.to(gm_ptr.dtype.element_ty), mask=valid)
