"""Persistent per-map Triton kernels: a fixed number of programs, each over a balanced range of maps.

The B*L maps, flattened as row = b*L + l, are cut into `n_progs` contiguous ranges whose sizes differ by at
most one map: program p takes rows [p*N // P, (p+1)*N // P) (N = B*L maps, P = n_progs programs, P <= N).
A range may cross batch items (pieces, one per batch item). It is one pipelined loop over the range's
maps (`tl.range(..., num_stages=STAGES)`; the batch item of each map is computed from its row, as a loop
per batch item would keep its loop invariants live across the inner loop and spill): with STAGES >= 2 the
next map's tile is copied to shared memory (cp.async on sm_80+) while the current one is reduced, so the
loads of a program overlap its reductions instead of alternating with them.

`map_fwd_persistent_kernel`  per map: the max of s = beta_l T (one reduction), then the sum of exp(s - max)
                             (without z: one more reduction) or, for z, that sum and its first moments
                             along x and y: per row within a warp (two quantities of one tl.reduce), then
                             three of one tl.reduce across rows; Phi when asked; the piece's partial mask
                             sum_l Phi_l (float32, written once per piece, under a scalar branch).
`map_bwd_persistent_kernel`  per map: Phi = exp(a) / sum, a = beta_l T - max, from the saved stats (one
                             exp per logit), g = G + grad_z . coordinates (formed per element), and the
                             three sums of the gradient, sum Phi g, sum a Phi g and sum a Phi, in one
                             tl.reduce; grad T = beta_l Phi (g - sum Phi g), grad beta = (sum a Phi g -
                             sum Phi g sum a Phi) / beta_l (a / beta_l = T - T at the max; T is dead once a
                             is formed). Maps with |beta_l| < 2**-40 (0 included) take grad beta from a
                             sweep after the map loop (stats._small_beta, _gbeta_map).
PAIRWISE (set under the interpreter) takes the same sums with one tl.sum each (_sums3).
Both kernels end with a loop over the program's maps that fixes those whose beta T overflowed (the stored
max is +-inf): their limit Phi = [T == c] / k, z and the piece's partial mask (forward), grad T and grad beta
= 0 (backward); the rule is in stats.py's docstring. The map loop itself is unchanged by it.

Partial masks: the piece of program p in batch item b is partial row p + b of a (P + B, H*W) float32 tensor
(the pieces in flattened order have strictly increasing p + b, so rows are unique; a row whose program
and batch boundaries coincide is skipped and never written). `mask_fuse_fwd_kernel` (PIECES) adds the
pieces of batch item b in program order, p from prog_of(b*L) to prog_of(b*L + L - 1), with
prog_of(x) = ((x + 1) P - 1) // N the program whose range holds row x: a fixed order, no atomics.
The mask gradient of a batch item (shared by its maps) is loaded once per piece and held on chip.

Scope: whole maps up to TUNING.map_block_max pixels held in one [BLOCK_H, BLOCK_W] tile, T with one pixel
stride per map (contiguous layouts). channels_last T and maps swept in chunks keep the per-run kernels of
stats.py (ops._persistent decides). All arithmetic is float32 whatever the dtype; float arguments are
cast to float32 on entry (torch.compile passes them as fp64; stats.py's docstring).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .stats import (
    _add2,
    _add3,
    _flat,
    _gbeta_map,
    _limit_bwd_map,
    _limit_fwd_map,
    _map_beta,
    _overflowed,
    _part_from_stats,
    _saved_overflow,
    _small_beta,
    _sums3,
)


@triton.jit
def _range_of(pid, n_maps, n_progs):
    """(first row, number of rows) of program pid's balanced range."""
    start = (pid.to(tl.int64) * n_maps) // n_progs
    stop = ((pid.to(tl.int64) + 1) * n_maps) // n_progs
    return start, (stop - start).to(tl.int32)


@triton.jit
def _whole_tile(W, HW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PIX64: tl.constexpr, FULL: tl.constexpr):
    rr = tl.arange(0, BLOCK_H)
    cc = tl.arange(0, BLOCK_W)
    if FULL:  # the map fills the tile: a constant mask, folded away, and constant pixel offsets (W = BLOCK_W)
        pv = tl.full([BLOCK_H, BLOCK_W], 1, tl.int1)
        p = rr[:, None] * BLOCK_W + cc[None, :]
    else:
        pv = (rr < HW // W)[:, None] & (cc < W)[None, :]
        p = rr[:, None] * W + cc[None, :]  # < HW <= map_block_max: int32 is exact
    if PIX64:  # (HW - 1) * s_tp may pass 2**31
        p = p.to(tl.int64)
    return rr, cc, pv, p


@triton.jit
def map_fwd_persistent_kernel(
    t_ptr, beta_ptr, stats_ptr, z_ptr, phi_ptr, part_ptr,
    L, W, HW, n_maps, n_progs,
    s_tb, s_tl, s_tp,
    beta, x_scale, x_off, y_scale, y_off,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, FULL: tl.constexpr, STAGES: tl.constexpr, PIX64: tl.constexpr,
    PAIRWISE: tl.constexpr,
    HAS_BETA_MAP: tl.constexpr, WRITE_Z: tl.constexpr, WRITE_PHI: tl.constexpr, WRITE_PART: tl.constexpr,
):
    # stats (B, L, 2), z (B, L, 2), phi (B, L, HW) and part (n_progs + B, HW) are contiguous
    beta = tl.cast(beta, tl.float32)
    x_scale, x_off = tl.cast(x_scale, tl.float32), tl.cast(x_off, tl.float32)
    y_scale, y_off = tl.cast(y_scale, tl.float32), tl.cast(y_off, tl.float32)
    pid = tl.program_id(0)
    start, n = _range_of(pid, n_maps, n_progs)
    rr, cc, pv, p = _whole_tile(W, HW, BLOCK_H, BLOCK_W, PIX64, FULL)
    col = cc.to(tl.float32)[None, :]
    row = rr.to(tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    # one loop over the range (a loop per batch item would keep its invariants live across the inner loop)
    for k in tl.range(0, n, num_stages=STAGES):
        row_id = start + k
        b64 = row_id // L
        l64 = row_id - b64 * L
        beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
        t = tl.load((t_ptr + (b64 * s_tb + l64 * s_tl)) + p * s_tp, mask=pv, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        s = tl.where(pv, t * beta_l, float("-inf"))
        mx = tl.max(_flat(s, BLOCK_H, BLOCK_W), axis=0)
        e = tl.where(pv, tl.exp(s - mx), 0.0)
        if WRITE_Z:
            # per row (within a warp) first, then across rows: fewer live tiles than three whole-tile sums
            if PAIRWISE:
                ey, ex = tl.sum(e, axis=1), tl.sum(e * col, axis=1)
                total, sx, sy = tl.sum(ey, axis=0), tl.sum(ex, axis=0), tl.sum(ey * row, axis=0)
            else:
                ey, ex = tl.reduce((e, e * col), 1, _add2)
                total, sx, sy = tl.reduce((ey, ex, ey * row), 0, _add3)
        else:  # the same order of additions as the z path, so that every op saves the same stats bits
            total = tl.sum(tl.sum(e, axis=1), axis=0)
        tl.store(stats_ptr + 2 * row_id, mx)
        tl.store(stats_ptr + 2 * row_id + 1, total)
        inv = 1.0 / total
        if WRITE_Z:
            tl.store(z_ptr + 2 * row_id, (x_off + x_scale * (sx * inv)).to(z_ptr.dtype.element_ty))
            tl.store(z_ptr + 2 * row_id + 1, (y_off + y_scale * (sy * inv)).to(z_ptr.dtype.element_ty))
        phi = e * inv
        if WRITE_PHI:
            tl.store((phi_ptr + row_id * HW) + p, phi.to(phi_ptr.dtype.element_ty), mask=pv,
                     eviction_policy="evict_first")
        if WRITE_PART:  # the piece ends with its batch item's last map or the range: flush its partial mask
            acc += phi
            if (l64 == L - 1) | (k == n - 1):
                tl.store((part_ptr + (pid + b64) * HW) + p, acc, mask=pv)
                acc = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    # maps whose beta T overflowed (a max of +-inf): the loop above stored NaN for them (and in their piece's
    # partial mask); their limit is written here, after every store above (the loop itself is unchanged)
    tl.debug_barrier()
    for k in range(0, n):
        row_id = start + k
        if _overflowed(tl.load(stats_ptr + 2 * row_id)):
            b64 = row_id // L
            l64 = row_id - b64 * L
            beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
            _limit_fwd_map(t_ptr + (b64 * s_tb + l64 * s_tl), s_tp, beta_l, stats_ptr + 2 * row_id, z_ptr + 2 * row_id,
                           phi_ptr + row_id * HW, HW, W, x_scale, x_off, y_scale, y_off, WRITE_Z, WRITE_PHI, BLOCK_W)
            if WRITE_PART:  # the piece of batch item b64: rows [max(start, b64 L), min(start + n, b64 L + L))
                tl.debug_barrier()  # the count just stored is read back by every thread
                _part_from_stats(t_ptr + b64 * s_tb, s_tl, s_tp, beta_ptr, beta, stats_ptr, b64 * L,
                                 tl.maximum(start - b64 * L, 0), tl.minimum(start + n - b64 * L, L), 1, HW,
                                 part_ptr + (pid + b64) * HW, HAS_BETA_MAP, BLOCK_W)


@triton.jit
def map_bwd_persistent_kernel(
    t_ptr, beta_ptr, stats_ptr, g_ptr, gz_ptr, gt_ptr, gbeta_ptr,
    L, W, HW, n_maps, n_progs,
    s_tb, s_tl, s_tp,
    s_gb, s_gl, s_gp,
    beta, x_scale, y_scale,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, FULL: tl.constexpr, STAGES: tl.constexpr, PIX64: tl.constexpr,
    PAIRWISE: tl.constexpr,
    HAS_BETA_MAP: tl.constexpr, HAS_G: tl.constexpr, G_PER_MAP: tl.constexpr, HAS_GZ: tl.constexpr,
):
    # gz (B, L, 2), stats (B, L, 2), gt (B, L, HW) and gbeta (B, L) are contiguous; G is read with its strides
    beta = tl.cast(beta, tl.float32)
    x_scale, y_scale = tl.cast(x_scale, tl.float32), tl.cast(y_scale, tl.float32)
    pid = tl.program_id(0)
    start, n = _range_of(pid, n_maps, n_progs)
    rr, cc, pv, p = _whole_tile(W, HW, BLOCK_H, BLOCK_W, PIX64, FULL)
    col = cc.to(tl.float32)[None, :]
    row = rr.to(tl.float32)[:, None]
    gt_ty = gt_ptr.dtype.element_ty
    g_shared = tl.zeros([BLOCK_H, BLOCK_W], tl.float32)
    start32 = start.to(tl.int32)  # < B L: int32 row arithmetic, 64 bits only in the offsets
    for k in tl.range(0, n, num_stages=STAGES):
        row_id = start32 + k
        b32 = row_id // L
        l32 = row_id - b32 * L
        b64 = b32.to(tl.int64)
        l64 = l32.to(tl.int64)
        if HAS_G and not G_PER_MAP:  # the mask gradient: loaded when a piece starts, used by all its maps
            if (l32 == 0) | (k == 0):
                g_shared = tl.load((g_ptr + b64 * s_gb) + p.to(tl.int64) * s_gp, mask=pv, other=0.0).to(tl.float32)
        beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
        mx = tl.load(stats_ptr + 2 * row_id)
        inv = 1.0 / tl.load(stats_ptr + 2 * row_id + 1)
        t = tl.load((t_ptr + (b64 * s_tb + l64 * s_tl)) + p * s_tp, mask=pv, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        a = t * beta_l - mx  # t is dead from here: its centred value is a / beta_l (grad beta)
        phi = tl.where(pv, tl.exp(a) * inv, 0.0)  # the one exp of each logit
        g = g_shared
        if HAS_G and G_PER_MAP:
            g = tl.load((g_ptr + (b64 * s_gb + l64 * s_gl)) + p.to(tl.int64) * s_gp, mask=pv, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
        # grad beta = sum_p T_p g_s,p: as sum_p g_s,p = 0, T is centred on its value at the max first, as
        # a = beta (T - T_max) (the sums below are beta times theirs; divided by beta once, at the store)
        up = tl.where(pv, a, 0.0) * phi
        if HAS_GZ:  # g_phi = g + gx col + gy row (no offsets: a per-map constant cancels), formed per element
            # in the sums and again, written differently, in the store, so that no g_phi tile stays live
            gx = tl.load(gz_ptr + 2 * row_id).to(tl.float32) * x_scale
            gy = tl.load(gz_ptr + 2 * row_id + 1).to(tl.float32) * y_scale
            cx = gx * col
            ry = gy * row
            g_phi = (g + cx) + ry
            mean, gbeta, sum_up = _sums3(phi * g_phi, up * g_phi, up, BLOCK_H, BLOCK_W, PAIRWISE)
            gs = phi * ((g - mean) + cx + ry)
        else:
            mean, gbeta, sum_up = _sums3(phi * g, up * g, up, BLOCK_H, BLOCK_W, PAIRWISE)
            gs = phi * (g - mean)
        tl.store((gt_ptr + row_id.to(tl.int64) * HW) + p, (beta_l * gs).to(gt_ty), mask=pv,
                 eviction_policy="evict_first")
        # beta 0 divides by 1 (no inf / NaN made): its grad beta is written by the fix-up loop below
        tl.store(gbeta_ptr + row_id, (gbeta - mean * sum_up) / tl.where(beta_l != 0.0, beta_l, 1.0))
    # maps whose beta T overflowed (saved stats (+-inf, k)): the loop above stored NaN for them; their
    # gradient is the limit's, recomputed here after every store above (the loop itself is unchanged). Maps
    # of a small |beta| (_small_beta, 0 included) get their grad beta here, without the loop's division.
    tl.debug_barrier()
    for k in range(0, n):
        row_id = start32 + k
        mx = tl.load(stats_ptr + 2 * row_id)
        total = tl.load(stats_ptr + 2 * row_id + 1)
        beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
        ovf = _saved_overflow(mx, total)
        if ovf | _small_beta(beta_l):
            b64 = (row_id // L).to(tl.int64)
            l64 = (row_id % L).to(tl.int64)
            gx = 0.0
            gy = 0.0
            if HAS_GZ:
                gx = tl.load(gz_ptr + 2 * row_id).to(tl.float32) * x_scale
                gy = tl.load(gz_ptr + 2 * row_id + 1).to(tl.float32) * y_scale
            g_map = g_ptr + b64 * s_gb
            if G_PER_MAP:
                g_map += l64 * s_gl
            t_map = t_ptr + (b64 * s_tb + l64 * s_tl)
            if ovf:
                _limit_bwd_map(t_map, s_tp, g_map, s_gp, gx, gy, beta_l, total, HW, W,
                               gt_ptr + row_id.to(tl.int64) * HW, HAS_G, HAS_GZ, BLOCK_W)
                tl.store(gbeta_ptr + row_id, 0.0)
            else:
                tl.store(gbeta_ptr + row_id, _gbeta_map(t_map, s_tp, g_map, s_gp, gx, gy, beta_l, mx, total, HW, W,
                                                        HAS_G, HAS_GZ, BLOCK_W))
