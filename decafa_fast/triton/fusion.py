"""Per-pixel-tile Triton kernels: the attention mask and the F1-F5 fusion, forward and backward.

One program per (b, tile of BLOCK_P pixels).
`mask_fuse_fwd_kernel`  M of the tile, either summed from the partial masks of the per-map pass
                        (FROM_PARTS: map_fwd_kernel's runs in index order, or with PIECES the pieces of
                        map_fwd_persistent_kernel in program order; a fixed order, so the same bits every
                        run, no atomics) or read from a mask tensor (the plain `fuse` op); writes M when
                        asked (the head saves it for its backward) and the fusion channels of F<MODE>.
`fuse_bwd_kernel`       from grad F, I, E and the saved M: grad I, grad E and grad M (the sum over the
                        masked segments of grad F * I or grad F * E).

Fusion segments, by MODE (1..5 = F1..F5; 0 = mask only), first channels from contract.layout.fusion_layout:
    F1 = [E]   F2 = [I*M]   F3 = [I, I*M]   F4 = [I, I*M, E*M]   F5 = [I, I*M, E, E*M]
Channels are processed as [BLOCK_C, BLOCK_P] tiles; every tensor is addressed through its own batch,
channel and pixel strides (64-bit), so channels_last E and F are read and written in place, vectorised along
whichever axis is contiguous. Data touched once (I, E, F, grad F) is loaded / stored with evict_first.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mask_fuse_fwd_kernel(
    part_ptr, m_ptr, i_ptr, e_ptr, f_ptr, m_out_ptr,
    HW, CI, C, n_tiles, n_runs, n_maps, L,
    s_mb, s_mp,
    s_ib, s_ic, s_ip,
    s_eb, s_ec, s_ep,
    s_fb, s_fc, s_fp,
    ip_off, im_off, ep_off, em_off,
    MODE: tl.constexpr, FROM_PARTS: tl.constexpr, WRITE_MASK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr, PIECES: tl.constexpr = False,
):
    pid = tl.program_id(0)
    b64 = (pid // n_tiles).to(tl.int64)
    p = (pid % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < HW
    p64 = p.to(tl.int64)

    if FROM_PARTS and PIECES:  # part (n_runs programs + B, HW) float32 of the persistent kernel: the pieces
        # of b are rows q + b for the programs q whose map ranges meet b's maps, added in program order
        x0 = b64 * L
        m = tl.zeros([BLOCK_P], tl.float32)
        for q in range(((x0 + 1) * n_runs - 1) // n_maps, ((x0 + L) * n_runs - 1) // n_maps + 1):
            m += tl.load(part_ptr + (q + b64) * HW + p64, mask=valid, other=0.0)
    elif FROM_PARTS:  # part (B, n_runs, HW) float32, summed in run order
        m = tl.zeros([BLOCK_P], tl.float32)
        for r in range(0, n_runs):
            m += tl.load(part_ptr + (b64 * n_runs + r) * HW + p64, mask=valid, other=0.0)
    else:
        m = tl.load(m_ptr + b64 * s_mb + p64 * s_mp, mask=valid, other=0.0).to(tl.float32)
    if WRITE_MASK:  # (B, 1, H, W) contiguous
        tl.store(m_out_ptr + b64 * HW + p64, m.to(m_out_ptr.dtype.element_ty), mask=valid)

    f_base = f_ptr + b64 * s_fb
    out_ty = f_ptr.dtype.element_ty
    if MODE >= 2:  # image segments: I*M always, plain I from F3 on
        i_base = i_ptr + b64 * s_ib
        for c0 in range(0, CI, BLOCK_CI):
            cs = (c0 + tl.arange(0, BLOCK_CI)).to(tl.int64)
            both = (cs < CI)[:, None] & valid[None, :]
            x = tl.load(i_base + cs[:, None] * s_ic + p64[None, :] * s_ip, mask=both, other=0.0,
                        eviction_policy="evict_first")
            if MODE >= 3:
                tl.store(f_base + (ip_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, x.to(out_ty), mask=both,
                         eviction_policy="evict_first")
            xm = x.to(tl.float32) * m[None, :]
            tl.store(f_base + (im_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, xm.to(out_ty), mask=both,
                     eviction_policy="evict_first")
    if MODE == 1 or MODE >= 4:  # embedding segments: plain E in F1 and F5, E*M from F4 on
        e_base = e_ptr + b64 * s_eb
        for c0 in range(0, C, BLOCK_C):
            cs = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            both = (cs < C)[:, None] & valid[None, :]
            x = tl.load(e_base + cs[:, None] * s_ec + p64[None, :] * s_ep, mask=both, other=0.0,
                        eviction_policy="evict_first")
            if MODE == 1 or MODE == 5:
                tl.store(f_base + (ep_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, x.to(out_ty), mask=both,
                         eviction_policy="evict_first")
            if MODE >= 4:
                xm = x.to(tl.float32) * m[None, :]
                tl.store(f_base + (em_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, xm.to(out_ty), mask=both,
                         eviction_policy="evict_first")


@triton.jit
def fuse_bwd_kernel(
    m_ptr, i_ptr, e_ptr, gf_ptr, gi_ptr, ge_ptr, gm_ptr,
    HW, CI, C, n_tiles,
    s_mb, s_mp,
    s_ib, s_ic, s_ip,
    s_eb, s_ec, s_ep,
    s_fb, s_fc, s_fp,
    ip_off, im_off, ep_off, em_off,
    MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gI (B, CI, HW), gE (B, C, HW) and gM (B, HW), all contiguous; the kernel writes the ones F<MODE>
    has (the wrapper zero-fills the others)."""
    pid = tl.program_id(0)
    b64 = (pid // n_tiles).to(tl.int64)
    p = (pid % n_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = p < HW
    p64 = p.to(tl.int64)

    if MODE >= 2:
        m = tl.load(m_ptr + b64 * s_mb + p64 * s_mp, mask=valid, other=0.0).to(tl.float32)
    gm = tl.zeros([BLOCK_P], tl.float32)
    gf_base = gf_ptr + b64 * s_fb

    if MODE >= 2:
        i_base = i_ptr + b64 * s_ib
        gi_base = gi_ptr + b64 * CI * HW
        for c0 in range(0, CI, BLOCK_CI):
            cs = (c0 + tl.arange(0, BLOCK_CI)).to(tl.int64)
            both = (cs < CI)[:, None] & valid[None, :]
            g_m = tl.load(gf_base + (im_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, mask=both, other=0.0,
                          eviction_policy="evict_first").to(tl.float32)
            x = tl.load(i_base + cs[:, None] * s_ic + p64[None, :] * s_ip, mask=both, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            gm += tl.sum(g_m * x, axis=0)
            g = g_m * m[None, :]
            if MODE >= 3:
                g += tl.load(gf_base + (ip_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, mask=both,
                             other=0.0, eviction_policy="evict_first").to(tl.float32)
            tl.store(gi_base + cs[:, None] * HW + p64[None, :], g.to(gi_ptr.dtype.element_ty), mask=both,
                     eviction_policy="evict_first")

    if MODE == 1 or MODE >= 4:
        e_base = e_ptr + b64 * s_eb
        ge_base = ge_ptr + b64 * C * HW
        for c0 in range(0, C, BLOCK_C):
            cs = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
            both = (cs < C)[:, None] & valid[None, :]
            g = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            if MODE >= 4:
                g_m = tl.load(gf_base + (em_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, mask=both,
                              other=0.0, eviction_policy="evict_first").to(tl.float32)
                x = tl.load(e_base + cs[:, None] * s_ec + p64[None, :] * s_ep, mask=both, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                gm += tl.sum(g_m * x, axis=0)
                g += g_m * m[None, :]
            if MODE == 1 or MODE == 5:
                g += tl.load(gf_base + (ep_off + cs)[:, None] * s_fc + p64[None, :] * s_fp, mask=both,
                             other=0.0, eviction_policy="evict_first").to(tl.float32)
            tl.store(ge_base + cs[:, None] * HW + p64[None, :], g.to(ge_ptr.dtype.element_ty), mask=both,
                     eviction_policy="evict_first")

    if MODE >= 2:
        tl.store(gm_ptr + b64 * HW + p64, gm.to(gm_ptr.dtype.element_ty), mask=valid)
