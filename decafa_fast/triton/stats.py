"""Per-map Triton kernels: one program per (b, run of maps).

`map_fwd_kernel`  forward. For each map of its run: max and sum of exp(s - max) of s = beta_l * T (the
                  stats), the soft-argmax z, optionally Phi = exp(s - max) / sum (spatial_softmax), and the
                  run's partial mask sum_{l in run} Phi_l (one (H*W) row of float32 per run).
`map_bwd_kernel`  backward. Phi from T and the saved stats; g_phi = G + grad_z . coordinates, where G is a
                  gradient of Phi per map (spatial_softmax) or one per batch item shared by every map (the
                  gradient of the mask, held on chip for the whole run); then g_s = Phi (g_phi - sum Phi
                  g_phi), grad T = beta_l g_s and grad beta_l = sum_p T_p g_s,p.

Two shapes of program, picked by the wrapper (constexpr ONE_CHUNK):
- ONE_CHUNK: a whole map fits one [BLOCK_H, BLOCK_W] tile (128 x 128 and below), loaded once per map; the
  stats, z, Phi and the gradients all come from registers: T is read exactly once. The reductions are
  those of the persistent kernels (persistent.py): forward, the max, then the sum and the x / y moments
  per row and across rows; backward, the three sums of the gradient in one tl.reduce, T centred as
  (beta T - max) / beta (small betas fixed after the map loop, _small_beta). Coordinates are broadcast
  row / column vectors, not per-pixel registers. Interleaved maps take a [BLOCK_W, BLOCK_H] tile in the
  backward on Triton < 3.9 (COLS_FIRST: the layout that Triton version gives the strided loads of T).
- otherwise (larger maps, or channels_last logits with TUNING.interleaved_whole_maps off): sweep 1 walks
  the pixels in chunks of a [BLOCK_L maps, BLOCK_P pixels] tile with an online max (rescaling the running
  sums when a chunk raises it); sweep 2 walks them again for Phi, the partial mask and the gradients. Rows
  of BLOCK_L consecutive maps are read whole (full sectors of channels_last); the second sweep re-reads
  the run's maps.

channels_last T (INTERLEAVED, maps L elements apart, a 32-byte sector holding 8 (float32) or 16 (bfloat16)
consecutive maps of one pixel) takes the ONE_CHUNK path too, so T is read once per pass as for NCHW: one
scalar load per value at the constexpr pixel stride T_PIX. A lane's sector is then used by the other maps
of that pixel; were those the next maps of the same program, the sector would have to survive in L2 while
every program in flight reads a whole map (one 32-warp program per SM: 132 x 512 KiB of sectors on an
H100, 66 MB, more than its 50 MB L2), and DRAM would move up to 8x / 16x T's bytes. So an interleaved
program takes maps r, r + n_runs, r + 2 n_runs, ... (not a run of consecutive maps): at each step the
n_runs programs of a batch item, started together and doing the same work, read n_runs adjacent maps of
every pixel, so one step of all programs in flight touches 66 / n_runs MB of sectors (17 MB with the 4
runs of a large batch), and a sector is used up within 2 (float32) or 4 (bfloat16) such steps. The
partial mask of a program is then the sum over its maps, whichever they are (pass 2 adds the partials in
program order: still a fixed order). Holding k adjacent maps per program instead would need k maps in
registers (no explicit shared memory in Triton; the head kernels already spend the 64 registers a thread
has at 32 warps on one map beside the partial mask or the mask gradient). Whether the sectors are shared
as planned is for a GPU to measure (bench/head_floor.py --channels-last, with and without
TUNING.interleaved_whole_maps).

Pixels are p = row*W + col with one pixel stride (`s_tp`; contiguous and channels_last both qualify) and
64-bit offsets (int32 only for a pixel index inside one map, while PIX64 says (HW - 1) * stride < 2**31).
All arithmetic is float32; no atomics, so results are bitwise reproducible. The float arguments (beta,
inv_w, the coordinate scales and offsets) are cast to float32 on entry: Triton's JIT passes a Python float
as fp32, but torch.compile (inductor compiling a triton_op's kernels) passes it as fp64, and an fp64 scalar
would promote every product with it, and the loop-carried accumulators, to float64 (a compile error on
Triton 3.6, "Loop-carried variable acc ... re-assigned to fp64"). compile_check --float-args fp64 checks it.
Phi is normalised by the sum of the shifted exponentials, never by exp(max - log-sum-exp), so float32
stays exact for any magnitude of beta*T.

A map whose beta*T overflows float32 (its max is +-inf) gets the limit of softmax(beta T): P = [T == c] / k,
c = max T (beta > 0) or min T (beta < 0), k the pixels equal to c; NaN when c is not finite or the map
holds a NaN. Its saved stats are (+-inf, k), and the backward, recognising them (a non-finite max beside a
finite sum), uses that P: grad T = beta P (g - sum P g), grad beta = 0 (T = c wherever P > 0). The
whole-map kernels leave their map loop as it was and fix such maps in a loop after it (one scalar test of
the stored max per map; the overflow maps are read again there, in sweeps of BLOCK_W pixels, so no second
whole-map tile is live); the chunked path tests each block of maps after its statistics (_any).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _flat(x, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """A [BLOCK_H, BLOCK_W] tile as one vector, so that a whole-map sum is one reduction instead of a row
    reduction then a column one. The reshape relabels the registers (compile_check shows the same shared
    memory and barriers as an order-free reshape); tl.reduce over a tuple with axis=None would do the same
    but fails under the interpreter (Triton 3.9)."""
    return tl.reshape(x, [BLOCK_H * BLOCK_W])


@triton.jit
def _sums3(a, b, c, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PAIRWISE: tl.constexpr):
    """Whole-tile sums of three tiles: one tl.reduce (one reduction round on the GPU), or with PAIRWISE three
    tl.sum, for the interpreter, whose tl.reduce with a combine function adds the elements one after
    another (a float32 error growing with the map size, and a Python loop per element)."""
    if PAIRWISE:
        return tl.sum(_flat(a, BLOCK_H, BLOCK_W), 0), tl.sum(_flat(b, BLOCK_H, BLOCK_W), 0), \
            tl.sum(_flat(c, BLOCK_H, BLOCK_W), 0)
    else:
        return tl.reduce((_flat(a, BLOCK_H, BLOCK_W), _flat(b, BLOCK_H, BLOCK_W), _flat(c, BLOCK_H, BLOCK_W)), 0,
                         _add3)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _row_sums(e, col, AXIS: tl.constexpr, PAIRWISE: tl.constexpr):
    """Per map row, the sums of e and e * col over the columns (tile axis AXIS)."""
    if PAIRWISE:
        return tl.sum(e, axis=AXIS), tl.sum(e * col, axis=AXIS)
    else:
        return tl.reduce((e, e * col), AXIS, _add2)


@triton.jit
def _row_col(p, W, inv_w, INT_DIV: tl.constexpr):
    """Row and column (float32) of flat pixel indices p. A float reciprocal replaces the integer division
    (many instructions per element on the GPU); it is exact while H*W <= 2**20, else INT_DIV is set."""
    if INT_DIV:
        row = p // W
    else:
        row = ((p.to(tl.float32) + 0.5) * inv_w).to(tl.int32)
    return row.to(tl.float32), (p - row * W).to(tl.float32)


@triton.jit
def _run_bounds(r, run_len, L):
    l_first = r * run_len
    return l_first, tl.minimum(l_first + run_len, L)


@triton.jit
def _whole_map_order(r, run_len, n_runs, L, INTERLEAVED: tl.constexpr):
    """(first, stop, step) of the maps a whole-map program takes in turn: its run of consecutive maps, or,
    for interleaved (channels_last) T, maps r, r + n_runs, ...: the n_runs programs of a batch item then
    read adjacent maps of every pixel at the same time and share its sectors (module docstring)."""
    if INTERLEAVED:
        return r, L, n_runs
    else:
        l_first, l_end = _run_bounds(r, run_len, L)
        return l_first, l_end, 1


@triton.jit
def _map_tile(W, HW, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, FULL: tl.constexpr, TRANSPOSED: tl.constexpr):
    """(row, col, mask, pixel index) of a whole-map tile: row and col broadcastable index tiles, the tile
    [BLOCK_H, BLOCK_W], or with TRANSPOSED [BLOCK_W, BLOCK_H]. A map that fills it (FULL) takes a constant
    mask and constant pixel offsets (W = BLOCK_W)."""
    rr = tl.arange(0, BLOCK_H)
    cc = tl.arange(0, BLOCK_W)
    if TRANSPOSED:
        r2 = rr[None, :]
        c2 = cc[:, None]
    else:
        r2 = rr[:, None]
        c2 = cc[None, :]
    if FULL:
        p = r2 * BLOCK_W + c2
        pv = tl.full(p.shape, 1, tl.int1)
    else:
        p = r2 * W + c2  # < HW <= map_block_max: int32 is exact
        pv = (r2 < HW // W) & (c2 < W)
    return r2, c2, pv, p


@triton.jit
def _map_ptrs(t_base, l, s_tl, r2, c2, p, W, s_tp, PIX64: tl.constexpr, INTERLEAVED: tl.constexpr,
              T_PIX: tl.constexpr, FULL: tl.constexpr, BLOCK_W: tl.constexpr):
    """Pointers to the pixels of map l of a batch item (t_base); r2, c2: broadcastable row and column index
    tiles. Interleaved: the pixel stride is the constexpr T_PIX (L for channels_last), so a thread's pixels
    of one row sit at constant offsets from one register; without PIX64 the map's offset l s_tl (s_tl = 1)
    is added to the int32 row offsets inside the loop, so that no tile of per-pixel offsets is
    loop-invariant: hoisted out of the map loop, 16 such 64-bit offsets a thread would cost 32 registers."""
    if INTERLEAVED:
        w = W
        if FULL:  # W = BLOCK_W: constant row offsets
            w = BLOCK_W
        if PIX64:
            r2, c2 = r2.to(tl.int64), c2.to(tl.int64)
            return ((t_base + tl.cast(l, tl.int64) * s_tl) + r2 * (w * T_PIX)) + c2 * T_PIX
        return t_base + ((l * s_tl + r2 * (w * T_PIX)) + c2 * T_PIX)
    else:
        return (t_base + tl.cast(l, tl.int64) * s_tl) + p * s_tp


@triton.jit
def _betas(beta_ptr, b64, ls, lv, L, beta, BLOCK_L: tl.constexpr, HAS_BETA_MAP: tl.constexpr):
    """beta of each map in ls: beta_map[b, l] when given, else the float beta."""
    if HAS_BETA_MAP:
        return tl.load(beta_ptr + b64 * L + ls, mask=lv, other=1.0)
    else:
        return tl.zeros([BLOCK_L], tl.float32) + beta


# --- maps whose beta * T overflows float32 (a per-map max of +-inf) ---------------------------------------
# Such a map is the limit of softmax(beta T) as the product grows: P = [T == c] / k, c = max T for beta > 0,
# min T for beta < 0, k the number of pixels equal to c; NaN when c is not finite or the map holds a NaN.
# The kernels branch on the per-map max (a scalar test), so the normal path does no extra per-logit work.
# The saved stats of such a map are (+-inf, k); the backward recognises it by a non-finite max beside a
# finite sum and recomputes c (one more reduction over that map).


@triton.jit
def _overflowed(mx):
    """Whether the max of beta * T of a map is +-inf (only the limit gives that map)."""
    return tl.abs(mx) == float("inf")


@triton.jit
def _saved_overflow(mx, total):
    """Whether saved stats (max, sum) are those of an overflow map: a non-finite max, a finite count."""
    return (tl.abs(mx) == float("inf")) & (tl.abs(total) < float("inf"))


@triton.jit
def _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP: tl.constexpr):
    """The map's temperature: its entry of the per-map tensor, or the number."""
    if HAS_BETA_MAP:
        return tl.load(beta_ptr + row_id)
    return beta



@triton.jit
def _sign(beta_l):
    """+1 / -1 by the sign of beta: c = max T for beta > 0 is sign * max(sign * T), exactly."""
    return tl.where(beta_l > 0, 1.0, -1.0)


@triton.jit
def _chunk_max(t_map, s_tp, sgn, HW, BLOCK_F: tl.constexpr):
    """(max of sign(beta) T over a map, number of NaN pixels), in sweeps of BLOCK_F pixels."""
    offs = tl.arange(0, BLOCK_F)
    m = tl.full([BLOCK_F], float("-inf"), tl.float32)
    nans = tl.zeros([BLOCK_F], tl.int32)
    for p0 in range(0, HW, BLOCK_F):
        p = p0 + offs
        x = tl.load(t_map + p.to(tl.int64) * s_tp, mask=p < HW, other=0.0).to(tl.float32) * sgn
        m = tl.maximum(m, tl.where(p < HW, x, float("-inf")))
        nans += (x != x).to(tl.int32)
    return tl.max(m, axis=0), tl.sum(nans, axis=0)


@triton.jit
def _limit_fwd_map(t_map, s_tp, beta_l, stats_row, z_row, phi_row, HW, W, x_scale, x_off, y_scale, y_off,
                   WRITE_Z: tl.constexpr, WRITE_PHI: tl.constexpr, BLOCK_F: tl.constexpr):
    """The sum (k), z and Phi of a map whose max of beta T is +-inf (the max already stored), in sweeps of
    BLOCK_F pixels: P = [T == c] / k, or NaN when c is not finite or the map holds a NaN."""
    offs = tl.arange(0, BLOCK_F)
    sgn = _sign(beta_l)
    m, nans = _chunk_max(t_map, s_tp, sgn, HW, BLOCK_F)
    k = tl.zeros([BLOCK_F], tl.float32)
    sx = tl.zeros([BLOCK_F], tl.float32)
    sy = tl.zeros([BLOCK_F], tl.float32)
    for p0 in range(0, HW, BLOCK_F):
        p = p0 + offs
        x = tl.load(t_map + p.to(tl.int64) * s_tp, mask=p < HW, other=0.0).to(tl.float32) * sgn
        hit = ((p < HW) & (x == m)).to(tl.float32)
        row = p // W
        k += hit
        sx += hit * (p - row * W).to(tl.float32)
        sy += hit * row.to(tl.float32)
    total = tl.where((tl.abs(m) < float("inf")) & (nans == 0), tl.sum(k, axis=0), float("nan"))
    tl.store(stats_row + 1, total)
    inv = 1.0 / total
    if WRITE_Z:
        tl.store(z_row, (x_off + x_scale * (tl.sum(sx, axis=0) * inv)).to(z_row.dtype.element_ty))
        tl.store(z_row + 1, (y_off + y_scale * (tl.sum(sy, axis=0) * inv)).to(z_row.dtype.element_ty))
    if WRITE_PHI:
        for p0 in range(0, HW, BLOCK_F):
            p = p0 + offs
            x = tl.load(t_map + p.to(tl.int64) * s_tp, mask=p < HW, other=0.0).to(tl.float32) * sgn
            tl.store(phi_row + p, (tl.where(x == m, 1.0, 0.0) * inv).to(phi_row.dtype.element_ty), mask=p < HW)


@triton.jit
def _part_from_stats(t_b, s_tl, s_tp, beta_ptr, beta, stats_ptr, row0, l_lo, l_hi, l_step, HW, part_row,
                     HAS_BETA_MAP: tl.constexpr, BLOCK_F: tl.constexpr):
    """A partial mask written again: sum of Phi over maps l_lo, l_lo + l_step, ... < l_hi (rows row0 + l) from
    their stored stats, in the order and with the arithmetic of the map loops (bit for bit their sum when no
    map overflows), the partial row itself the accumulator, in sweeps of BLOCK_F pixels."""
    offs = tl.arange(0, BLOCK_F)
    for l in range(l_lo, l_hi, l_step):
        row_id = row0 + l
        beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
        mx = tl.load(stats_ptr + 2 * row_id)
        inv = 1.0 / tl.load(stats_ptr + 2 * row_id + 1)
        t_map = t_b + tl.cast(l, tl.int64) * s_tl
        m = 0.0
        if _overflowed(mx):
            m, _ = _chunk_max(t_map, s_tp, _sign(beta_l), HW, BLOCK_F)
        for p0 in range(0, HW, BLOCK_F):
            p = p0 + offs
            pv = p < HW
            t = tl.load(t_map + p.to(tl.int64) * s_tp, mask=pv, other=0.0).to(tl.float32)
            if _overflowed(mx):
                phi = tl.where(pv, tl.where(t * _sign(beta_l) == m, 1.0, 0.0) * inv, 0.0)  # NaN map: NaN
            else:
                phi = tl.where(pv, tl.exp(t * beta_l - mx), 0.0) * inv
            acc = tl.where(l == l_lo, 0.0, tl.load(part_row + p, mask=pv, other=0.0))
            tl.store(part_row + p, acc + phi, mask=pv)
        # a pixel's sum is stored by one thread but read back by every thread holding it (the chunk is
        # replicated across warps): the next map's loads after this map's stores
        tl.debug_barrier()


@triton.jit
def _limit_bwd_map(t_map, s_tp, g_map, s_gp, gx, gy, beta_l, total, HW, W, gt_map,
                   HAS_G: tl.constexpr, HAS_GZ: tl.constexpr, BLOCK_F: tl.constexpr):
    """grad T of a map with saved overflow stats (+-inf, k): beta g_s, g_s = P (g - sum P g), P = [T == c] / k,
    g = G + gx col + gy row, in three sweeps of BLOCK_F pixels (c, the mean, the store), so that this rare
    path holds no whole-map tile. g is recomputed alike in the last two sweeps: a single peak's g_s is
    exactly 0."""
    offs = tl.arange(0, BLOCK_F)
    sgn = _sign(beta_l)
    m, _ = _chunk_max(t_map, s_tp, sgn, HW, BLOCK_F)
    inv = 1.0 / total
    mean = tl.zeros([BLOCK_F], tl.float32)
    for p0 in range(0, HW, BLOCK_F):
        p = p0 + offs
        phi, g = _limit_phi_g(t_map, s_tp, g_map, s_gp, gx, gy, sgn, m, inv, p, HW, W, HAS_G, HAS_GZ)
        mean += phi * g
    mean = tl.sum(mean, axis=0)
    for p0 in range(0, HW, BLOCK_F):
        p = p0 + offs
        phi, g = _limit_phi_g(t_map, s_tp, g_map, s_gp, gx, gy, sgn, m, inv, p, HW, W, HAS_G, HAS_GZ)
        tl.store(gt_map + p, (beta_l * (phi * (g - mean))).to(gt_map.dtype.element_ty), mask=p < HW)


@triton.jit
def _limit_phi_g(t_map, s_tp, g_map, s_gp, gx, gy, sgn, m, inv, p, HW, W, HAS_G: tl.constexpr, HAS_GZ: tl.constexpr):
    pv = p < HW
    x = tl.load(t_map + p.to(tl.int64) * s_tp, mask=pv, other=0.0).to(tl.float32) * sgn
    phi = tl.where(pv & (x == m), inv, 0.0)
    return phi, _g_chunk(g_map, s_gp, gx, gy, p, pv, W, HAS_G, HAS_GZ)


@triton.jit
def _g_chunk(g_map, s_gp, gx, gy, p, pv, W, HAS_G: tl.constexpr, HAS_GZ: tl.constexpr):
    """g_phi = G + gx col + gy row at the pixels p of a chunk (0 outside pv)."""
    g = tl.zeros(p.shape, tl.float32)
    if HAS_G:
        g = tl.load(g_map + p.to(tl.int64) * s_gp, mask=pv, other=0.0).to(tl.float32)
    if HAS_GZ:
        row = p // W
        g = g + gx * (p - row * W).to(tl.float32) + gy * row.to(tl.float32)
    return tl.where(pv, g, 0.0)


@triton.jit
def _small_beta(beta_l):
    """Whether a map's |beta| is below 2**-40 (0 included): the whole-map backward loops take T - T_max as
    (beta T - max) / beta, T being dead once the exp's argument is formed (no second tile of the map live
    beside Phi: no spill), which is float32-exact while that argument is a normal float. Smaller betas would
    lose T in it (all of it at 0, where the division gives NaN): those maps get grad beta from _gbeta_map."""
    return tl.abs(beta_l) < 9.094947017729282e-13


@triton.jit
def _gbeta_map(t_map, s_tp, g_map, s_gp, gx, gy, beta_l, mx, total, HW, W,
               HAS_G: tl.constexpr, HAS_GZ: tl.constexpr, BLOCK_F: tl.constexpr):
    """grad beta = sum (T - T_max) Phi (g - sum Phi g) of a map from its saved (finite) stats, with
    T_max = max / beta (0 for beta = 0), in one sweep of BLOCK_F pixels (three sums): the small-beta maps of
    the whole-map backward loops (_small_beta), fixed after the loop like the overflow maps."""
    offs = tl.arange(0, BLOCK_F)
    inv = 1.0 / total
    t_max = tl.where(beta_l != 0.0, mx / beta_l, 0.0)
    s_pg = tl.zeros([BLOCK_F], tl.float32)
    s_ug = tl.zeros([BLOCK_F], tl.float32)
    s_u = tl.zeros([BLOCK_F], tl.float32)
    for p0 in range(0, HW, BLOCK_F):
        p = p0 + offs
        pv = p < HW
        t = tl.load(t_map + p.to(tl.int64) * s_tp, mask=pv, other=0.0).to(tl.float32)
        phi = tl.where(pv, tl.exp(t * beta_l - mx) * inv, 0.0)
        g = _g_chunk(g_map, s_gp, gx, gy, p, pv, W, HAS_G, HAS_GZ)
        up = tl.where(pv, t - t_max, 0.0) * phi
        s_pg += phi * g
        s_ug += up * g
        s_u += up
    return tl.sum(s_ug, axis=0) - tl.sum(s_pg, axis=0) * tl.sum(s_u, axis=0)


@triton.jit
def _tile_max(x):
    return tl.max(tl.max(x, axis=1), axis=0)


@triton.jit
def _chunked_c(t_base, ls, lv, s_tl, s_tp, HW, beta_l, BLOCK_P: tl.constexpr):
    """sign * c of each map of a [BLOCK_L] block (maps not in lv: -inf), swept in chunks of BLOCK_P pixels."""
    offs = tl.arange(0, BLOCK_P)
    sgn = _sign(beta_l)
    cs = tl.zeros_like(beta_l) + float("-inf")
    for p0 in range(0, HW, BLOCK_P):
        p = (p0 + offs).to(tl.int64)
        both = lv[:, None] & (p < HW)[None, :]
        t = tl.load(t_base + ls.to(tl.int64)[:, None] * s_tl + p[None, :] * s_tp, mask=both, other=0.0)
        cs = tl.maximum(cs, tl.max(tl.where(both, t.to(tl.float32) * sgn[:, None], float("-inf")), axis=1))
    return cs


@triton.jit
def _chunked_limit_stats(t_base, ls, ovf, s_tl, s_tp, HW, W, inv_w, beta_l,
                         BLOCK_P: tl.constexpr, WRITE_Z: tl.constexpr, INT_DIV: tl.constexpr):
    """(k, sum of x, sum of y) of the limit weights of the maps in ovf, swept in chunks (k NaN for a NaN map
    or a non-finite c)."""
    offs = tl.arange(0, BLOCK_P)
    cs = _chunked_c(t_base, ls, ovf, s_tl, s_tp, HW, beta_l, BLOCK_P)
    sgn = _sign(beta_l)
    k = tl.zeros_like(beta_l)
    sx = tl.zeros_like(beta_l)
    sy = tl.zeros_like(beta_l)
    for p0 in range(0, HW, BLOCK_P):
        p = (p0 + offs).to(tl.int64)
        both = ovf[:, None] & (p < HW)[None, :]
        ts = tl.load(t_base + ls.to(tl.int64)[:, None] * s_tl + p[None, :] * s_tp, mask=both,
                     other=0.0).to(tl.float32) * sgn[:, None]
        e = tl.where(both & (ts == cs[:, None]), 1.0, tl.where(both & (ts != ts), float("nan"), 0.0))
        k += tl.sum(e, axis=1)
        if WRITE_Z:
            row, col = _row_col(p, W, inv_w, INT_DIV)
            sx += tl.sum(e * col[None, :], axis=1)
            sy += tl.sum(e * row[None, :], axis=1)
    k = tl.where(tl.abs(cs) < float("inf"), k, float("nan"))
    return k, sx, sy


@triton.jit
def _any(x):
    """Whether any element of a boolean vector is set (a scalar, for a branch of the whole program)."""
    return tl.max(x.to(tl.int32), axis=0) > 0


@triton.jit
def map_fwd_kernel(
    t_ptr, beta_ptr, stats_ptr, z_ptr, phi_ptr, part_ptr,
    L, W, HW, inv_w, n_runs, run_len,
    s_tb, s_tl, s_tp,
    beta, x_scale, x_off, y_scale, y_off,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ONE_CHUNK: tl.constexpr, FULL: tl.constexpr, INTERLEAVED: tl.constexpr, T_PIX: tl.constexpr, PIX64: tl.constexpr,
    HAS_BETA_MAP: tl.constexpr,
    WRITE_Z: tl.constexpr, WRITE_PHI: tl.constexpr, WRITE_PART: tl.constexpr, INT_DIV: tl.constexpr,
    PAIRWISE: tl.constexpr, COLS_FIRST: tl.constexpr,
):
    # stats (B, L, 2), z (B, L, 2), phi (B, L, HW) and part (B, n_runs, HW) are contiguous
    beta, inv_w = tl.cast(beta, tl.float32), tl.cast(inv_w, tl.float32)  # fp64 under torch.compile (docstring)
    x_scale, x_off = tl.cast(x_scale, tl.float32), tl.cast(x_off, tl.float32)
    y_scale, y_off = tl.cast(y_scale, tl.float32), tl.cast(y_off, tl.float32)
    b64 = (tl.program_id(0) // n_runs).to(tl.int64)
    r = tl.program_id(0) % n_runs
    l_first, l_end = _run_bounds(r, run_len, L)
    t_base = t_ptr + b64 * s_tb
    rows = tl.arange(0, BLOCK_L)
    offs = tl.arange(0, BLOCK_P)

    if ONE_CHUNK:
        # the whole map as a [BLOCK_H, BLOCK_W] tile ([BLOCK_W, BLOCK_H] with COLS_FIRST, as map_bwd_kernel):
        # coordinates are broadcast row / column vectors (few registers)
        rr = tl.arange(0, BLOCK_H)
        r2, c2, pv, p = _map_tile(W, HW, BLOCK_H, BLOCK_W, FULL, COLS_FIRST)
        if PIX64:  # (HW - 1) * s_tp may pass 2**31
            p = p.to(tl.int64)
        acc = tl.zeros(p.shape, tl.float32)
        l_start, l_stop, l_step = _whole_map_order(r, run_len, n_runs, L, INTERLEAVED)
        for l in range(l_start, l_stop, l_step):
            row_id = (tl.program_id(0) // n_runs) * L + l  # int32 (< B L): 64 bits only in the offsets
            beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
            t = tl.load(_map_ptrs(t_base, l, s_tl, r2, c2, p, W, s_tp, PIX64, INTERLEAVED, T_PIX, FULL, BLOCK_W),
                        mask=pv, other=0.0, eviction_policy="evict_first").to(tl.float32)
            # the max on sign(beta) T, so that a map whose beta T overflows needs no second reduction
            s = tl.where(pv, t * beta_l, float("-inf"))
            mx = tl.max(_flat(s, BLOCK_H, BLOCK_W), axis=0)
            e = tl.where(pv, tl.exp(s - mx), 0.0)
            if WRITE_Z:  # as the persistent kernel: per row (the column axis first), then the three across rows
                if COLS_FIRST:
                    ey, ex = _row_sums(e, c2.to(tl.float32), 0, PAIRWISE)
                else:
                    ey, ex = _row_sums(e, c2.to(tl.float32), 1, PAIRWISE)
                if PAIRWISE:
                    total, sx, sy = tl.sum(ey, axis=0), tl.sum(ex, axis=0), tl.sum(ey * rr.to(tl.float32), axis=0)
                else:
                    total, sx, sy = tl.reduce((ey, ex, ey * rr.to(tl.float32)), 0, _add3)
            else:  # the same order of additions as the z path
                if COLS_FIRST:
                    total = tl.sum(tl.sum(e, axis=0), axis=0)
                else:
                    total = tl.sum(tl.sum(e, axis=1), axis=0)
            tl.store(stats_ptr + 2 * row_id, mx)
            tl.store(stats_ptr + 2 * row_id + 1, total)
            inv = 1.0 / total
            if WRITE_Z:
                tl.store(z_ptr + 2 * row_id, (x_off + x_scale * (sx * inv)).to(z_ptr.dtype.element_ty))
                tl.store(z_ptr + 2 * row_id + 1, (y_off + y_scale * (sy * inv)).to(z_ptr.dtype.element_ty))
            phi = e * inv
            if WRITE_PHI:
                tl.store((phi_ptr + row_id.to(tl.int64) * HW) + p, phi.to(phi_ptr.dtype.element_ty), mask=pv,
                         eviction_policy="evict_first")
            if WRITE_PART:
                acc += phi
        if WRITE_PART:
            tl.store((part_ptr + (b64 * n_runs + r) * HW) + p, acc, mask=pv)
        # maps whose beta T overflowed (a max of +-inf): the loop above stored NaN for them (and in the run's
        # partial mask); their limit is written here, after every store above (the loop itself is unchanged)
        tl.debug_barrier()
        pix = s_tp
        if INTERLEAVED:
            pix = T_PIX
        for l in range(l_start, l_stop, l_step):
            row_id = b64 * L + l
            if _overflowed(tl.load(stats_ptr + 2 * row_id)):
                beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
                _limit_fwd_map(t_base + tl.cast(l, tl.int64) * s_tl, pix, beta_l, stats_ptr + 2 * row_id,
                               z_ptr + 2 * row_id, phi_ptr + row_id * HW, HW, W, x_scale, x_off, y_scale, y_off,
                               WRITE_Z, WRITE_PHI, BLOCK_W)
                if WRITE_PART:
                    tl.debug_barrier()  # the count just stored is read back by every thread
                    _part_from_stats(t_base, s_tl, pix, beta_ptr, beta, stats_ptr, b64 * L, l_start, l_stop, l_step,
                                     HW, part_ptr + (b64 * n_runs + r) * HW, HAS_BETA_MAP, BLOCK_W)
    else:
        # sweep 1: online statistics, BLOCK_L maps at a time
        for l0 in range(l_first, l_end, BLOCK_L):
            ls = l0 + rows
            lv = ls < l_end
            beta_l = _betas(beta_ptr, b64, ls, lv, L, beta, BLOCK_L, HAS_BETA_MAP)
            m = tl.full([BLOCK_L], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_L], tl.float32)
            sx = tl.zeros([BLOCK_L], tl.float32)
            sy = tl.zeros([BLOCK_L], tl.float32)
            for p0 in range(0, HW, BLOCK_P):
                p = (p0 + offs).to(tl.int64)
                both = lv[:, None] & (p < HW)[None, :]
                t = tl.load(t_base + ls.to(tl.int64)[:, None] * s_tl + p[None, :] * s_tp,
                            mask=both, other=0.0).to(tl.float32)
                s = tl.where(both, t * beta_l[:, None], float("-inf"))
                m_new = tl.maximum(m, tl.max(s, axis=1))
                # the where() guards keep -inf - -inf (nothing finite seen yet) from turning into NaN
                alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
                e = tl.where(s == float("-inf"), 0.0, tl.exp(s - m_new[:, None]))
                total = total * alpha + tl.sum(e, axis=1)
                if WRITE_Z:
                    row, col = _row_col(p, W, inv_w, INT_DIV)
                    sx = sx * alpha + tl.sum(e * col[None, :], axis=1)
                    sy = sy * alpha + tl.sum(e * row[None, :], axis=1)
                m = m_new
            ovf = lv & _overflowed(m)
            if _any(ovf):  # beta * T overflows in some map: its limit weights instead
                k, kx, ky = _chunked_limit_stats(t_base, ls, ovf, s_tl, s_tp, HW, W, inv_w, beta_l, BLOCK_P,
                                                 WRITE_Z, INT_DIV)
                total = tl.where(ovf, k, total)
                sx = tl.where(ovf, kx, sx)
                sy = tl.where(ovf, ky, sy)
            row_id = b64 * L + ls
            tl.store(stats_ptr + 2 * row_id, m, mask=lv)
            tl.store(stats_ptr + 2 * row_id + 1, total, mask=lv)
            if WRITE_Z:
                zx = x_off + x_scale * (sx / total)
                zy = y_off + y_scale * (sy / total)
                tl.store(z_ptr + 2 * row_id, zx.to(z_ptr.dtype.element_ty), mask=lv)
                tl.store(z_ptr + 2 * row_id + 1, zy.to(z_ptr.dtype.element_ty), mask=lv)
        if WRITE_PHI or WRITE_PART:
            tl.debug_barrier()  # the stats stored above are read back below by other threads
            # sweep 2: Phi and the partial mask, chunk by chunk
            for p0 in range(0, HW, BLOCK_P):
                p = (p0 + offs).to(tl.int64)
                pv = p < HW
                acc = tl.zeros([BLOCK_P], tl.float32)
                for l0 in range(l_first, l_end, BLOCK_L):
                    ls = l0 + rows
                    lv = ls < l_end
                    both = lv[:, None] & pv[None, :]
                    beta_l = _betas(beta_ptr, b64, ls, lv, L, beta, BLOCK_L, HAS_BETA_MAP)
                    row_id = b64 * L + ls
                    mx = tl.load(stats_ptr + 2 * row_id, mask=lv, other=0.0)
                    total = tl.load(stats_ptr + 2 * row_id + 1, mask=lv, other=1.0)
                    inv = 1.0 / total
                    t = tl.load(t_base + ls.to(tl.int64)[:, None] * s_tl + p[None, :] * s_tp,
                                mask=both, other=0.0).to(tl.float32)
                    ovf = lv & _saved_overflow(mx, total)
                    if _any(ovf):  # c of the block's maps again (the overflow maps alone pay the sweep)
                        cs = _chunked_c(t_base, ls, ovf, s_tl, s_tp, HW, beta_l, BLOCK_P)
                        phi = _phi_chunk(t, beta_l, mx, inv, both, cs, ovf, True)
                    else:
                        phi = _phi_chunk(t, beta_l, mx, inv, both, mx, ovf, False)
                    if WRITE_PHI:
                        tl.store(phi_ptr + row_id[:, None] * HW + p[None, :], phi.to(phi_ptr.dtype.element_ty),
                                 mask=both, eviction_policy="evict_first")
                    if WRITE_PART:
                        acc += tl.sum(phi, axis=0)
                if WRITE_PART:
                    tl.store(part_ptr + (b64 * n_runs + r) * HW + p, acc, mask=pv)


@triton.jit
def _grad_phi_tile(g_ptr, g_shared, gz_ptr, b64, ls, lv, p, both, L, W, inv_w, s_gb, s_gl, s_gp,
                   x_scale, y_scale,
                   BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, HAS_G: tl.constexpr, G_PER_MAP: tl.constexpr,
                   HAS_GZ: tl.constexpr, INT_DIV: tl.constexpr):
    """g_phi of a [BLOCK_L, BLOCK_P] tile up to a per-map constant (which the softmax backward cancels):
    G + (grad_zx * x_scale) col + (grad_zy * y_scale) row."""
    g = tl.zeros([BLOCK_L, BLOCK_P], tl.float32)
    if HAS_G:
        if G_PER_MAP:
            g += tl.load(g_ptr + b64 * s_gb + ls.to(tl.int64)[:, None] * s_gl + p[None, :] * s_gp,
                         mask=both, other=0.0, eviction_policy="evict_first").to(tl.float32)
        else:
            g += g_shared[None, :]
    if HAS_GZ:
        row, col = _row_col(p, W, inv_w, INT_DIV)
        zrow = gz_ptr + 2 * (b64 * L + ls)
        gx = tl.load(zrow, mask=lv, other=0.0).to(tl.float32) * x_scale
        gy = tl.load(zrow + 1, mask=lv, other=0.0).to(tl.float32) * y_scale
        g += gx[:, None] * col[None, :] + gy[:, None] * row[None, :]
    return g


@triton.jit
def map_bwd_kernel(
    t_ptr, beta_ptr, stats_ptr, g_ptr, gz_ptr, gt_ptr, gbeta_ptr,
    L, W, HW, inv_w, n_runs, run_len,
    s_tb, s_tl, s_tp,
    s_gb, s_gl, s_gp,
    beta, x_scale, y_scale,
    BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ONE_CHUNK: tl.constexpr, FULL: tl.constexpr, INTERLEAVED: tl.constexpr, T_PIX: tl.constexpr, PIX64: tl.constexpr,
    HAS_BETA_MAP: tl.constexpr,
    HAS_G: tl.constexpr, G_PER_MAP: tl.constexpr, HAS_GZ: tl.constexpr, INT_DIV: tl.constexpr,
    PAIRWISE: tl.constexpr, COLS_FIRST: tl.constexpr,
):
    # gz (B, L, 2), stats (B, L, 2), gt (B, L, HW) and gbeta (B, L) are contiguous; G is read with its strides
    beta, inv_w = tl.cast(beta, tl.float32), tl.cast(inv_w, tl.float32)  # fp64 under torch.compile (docstring)
    x_scale, y_scale = tl.cast(x_scale, tl.float32), tl.cast(y_scale, tl.float32)
    b64 = (tl.program_id(0) // n_runs).to(tl.int64)
    r = tl.program_id(0) % n_runs
    l_first, l_end = _run_bounds(r, run_len, L)
    t_base = t_ptr + b64 * s_tb
    rows = tl.arange(0, BLOCK_L)
    gt_ty = gt_ptr.dtype.element_ty

    if ONE_CHUNK:  # the whole map as one tile, as in map_fwd_kernel
        # COLS_FIRST (interleaved T where Triton orders the layout of a load without contiguity dimension 0
        # first: 3.6, not 3.9): the tile [BLOCK_W, BLOCK_H], so that the strided loads of T get the layout
        # of the contiguous grad T store: no layout conversion per map (shared memory, barriers and
        # loop-invariant shared addresses: 3.6 184-200 bytes of stack)
        r2, c2, pv, p = _map_tile(W, HW, BLOCK_H, BLOCK_W, FULL, COLS_FIRST)
        if PIX64:  # (HW - 1) * s_tp may pass 2**31
            p = p.to(tl.int64)
        g_shared = tl.zeros(p.shape, tl.float32)
        if HAS_G and not G_PER_MAP:  # the mask gradient: read once per run, used by every map of it
            g_shared = tl.load((g_ptr + b64 * s_gb) + p.to(tl.int64) * s_gp, mask=pv, other=0.0).to(tl.float32)
        l_start, l_stop, l_step = _whole_map_order(r, run_len, n_runs, L, INTERLEAVED)
        for l in range(l_start, l_stop, l_step):
            row_id = (tl.program_id(0) // n_runs) * L + l  # int32 (< B L): 64 bits only in the offsets
            beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
            mx = tl.load(stats_ptr + 2 * row_id)
            inv = 1.0 / tl.load(stats_ptr + 2 * row_id + 1)
            t = tl.load(_map_ptrs(t_base, l, s_tl, r2, c2, p, W, s_tp, PIX64, INTERLEAVED, T_PIX, FULL, BLOCK_W),
                        mask=pv, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            a = t * beta_l - mx  # t is dead from here: its centred value is a / beta_l (grad beta)
            phi = tl.where(pv, tl.exp(a) * inv, 0.0)
            g = g_shared
            if HAS_G and G_PER_MAP:
                g_map = g_ptr + b64 * s_gb + tl.cast(l, tl.int64) * s_gl
                g = tl.load(g_map + p.to(tl.int64) * s_gp, mask=pv, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
            # grad beta = sum_p T_p g_s,p with g_s = Phi (g_phi - mean): as sum_p g_s,p = 0, T may be centred
            # on its value at the max, and the sum split into one pass of reductions (only Phi and G stay
            # live for the store): sum u Phi g_phi - mean sum u Phi, u = T - T_max = a / beta_l
            up = tl.where(pv, a, 0.0) * phi  # beta (T - T_max) Phi: the sums below are beta times theirs
            if HAS_GZ:  # g_phi = g + gx col + gy row (a per-map constant cancels), formed per element in the
                # sums and again, written differently, in the store: no g_phi tile live across the reduction
                gx = tl.load(gz_ptr + 2 * row_id).to(tl.float32) * x_scale
                gy = tl.load(gz_ptr + 2 * row_id + 1).to(tl.float32) * y_scale
                cx = gx * c2.to(tl.float32)
                ry = gy * r2.to(tl.float32)
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
        # gradient is the limit's, recomputed here after every store above (the loop itself is unchanged).
        # Maps of a small |beta| (_small_beta, 0 included) get their grad beta here, without the division.
        tl.debug_barrier()
        for l in range(l_start, l_stop, l_step):
            row_id = b64 * L + l
            mx = tl.load(stats_ptr + 2 * row_id)
            total = tl.load(stats_ptr + 2 * row_id + 1)
            beta_l = _map_beta(beta_ptr, beta, row_id, HAS_BETA_MAP)
            ovf = _saved_overflow(mx, total)
            if ovf | _small_beta(beta_l):
                gx = 0.0
                gy = 0.0
                if HAS_GZ:
                    gx = tl.load(gz_ptr + 2 * row_id).to(tl.float32) * x_scale
                    gy = tl.load(gz_ptr + 2 * row_id + 1).to(tl.float32) * y_scale
                g_map = g_ptr + b64 * s_gb
                if G_PER_MAP:
                    g_map += tl.cast(l, tl.int64) * s_gl
                pix = s_tp
                if INTERLEAVED:
                    pix = T_PIX
                t_map = t_base + tl.cast(l, tl.int64) * s_tl
                if ovf:
                    _limit_bwd_map(t_map, pix, g_map, s_gp, gx, gy, beta_l, total, HW, W, gt_ptr + row_id * HW,
                                   HAS_G, HAS_GZ, BLOCK_W)
                    tl.store(gbeta_ptr + row_id, 0.0)
                else:
                    tl.store(gbeta_ptr + row_id, _gbeta_map(t_map, pix, g_map, s_gp, gx, gy, beta_l, mx, total, HW, W,
                                                            HAS_G, HAS_GZ, BLOCK_W))
    else:
        for l0 in range(l_first, l_end, BLOCK_L):
            ls = l0 + rows
            lv = ls < l_end
            beta_l = _betas(beta_ptr, b64, ls, lv, L, beta, BLOCK_L, HAS_BETA_MAP)
            row_id = b64 * L + ls
            mx = tl.load(stats_ptr + 2 * row_id, mask=lv, other=0.0)
            total = tl.load(stats_ptr + 2 * row_id + 1, mask=lv, other=1.0)
            ovf = lv & _saved_overflow(mx, total)
            if _any(ovf):  # a map of the block overflows: its c first, then the sweeps with its limit Phi
                cs = _chunked_c(t_base, ls, ovf, s_tl, s_tp, HW, beta_l, BLOCK_P)
                _bwd_block(t_base, g_ptr, gz_ptr, gt_ptr, gbeta_ptr, b64, ls, lv, row_id, beta_l, mx, 1.0 / total,
                           cs, ovf, L, W, HW, inv_w, s_tl, s_tp, s_gb, s_gl, s_gp, x_scale, y_scale,
                           BLOCK_L, BLOCK_P, HAS_G, G_PER_MAP, HAS_GZ, INT_DIV, True)
            else:
                _bwd_block(t_base, g_ptr, gz_ptr, gt_ptr, gbeta_ptr, b64, ls, lv, row_id, beta_l, mx, 1.0 / total,
                           mx, ovf, L, W, HW, inv_w, s_tl, s_tp, s_gb, s_gl, s_gp, x_scale, y_scale,
                           BLOCK_L, BLOCK_P, HAS_G, G_PER_MAP, HAS_GZ, INT_DIV, False)


@triton.jit
def _phi_chunk(t, beta_l, mx, inv, both, cs, ovf, OVF: tl.constexpr):
    """Phi of a [BLOCK_L, BLOCK_P] chunk from the saved stats; with OVF, the limit Phi for the maps in ovf
    (cs = sign * c of each map, _chunked_c)."""
    phi = tl.where(both, tl.exp(t * beta_l[:, None] - mx[:, None]) * inv[:, None], 0.0)
    if OVF:
        lim = tl.where(both & (t * _sign(beta_l)[:, None] == cs[:, None]), inv[:, None], 0.0)
        phi = tl.where(ovf[:, None], lim, phi)
    return phi


@triton.jit
def _bwd_block(t_base, g_ptr, gz_ptr, gt_ptr, gbeta_ptr, b64, ls, lv, row_id, beta_l, mx, inv, cs, ovf,
               L, W, HW, inv_w, s_tl, s_tp, s_gb, s_gl, s_gp, x_scale, y_scale,
               BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, HAS_G: tl.constexpr, G_PER_MAP: tl.constexpr,
               HAS_GZ: tl.constexpr, INT_DIV: tl.constexpr, OVF: tl.constexpr):
    """grad T and grad beta of a block of BLOCK_L maps swept in chunks (map_bwd_kernel); OVF: some maps of
    the block overflow (ovf), whose grad beta sum (T - c) g_s is exactly 0 (T = c wherever g_s != 0)."""
    offs = tl.arange(0, BLOCK_P)
    gt_ty = gt_ptr.dtype.element_ty
    g_shared = tl.zeros([BLOCK_P], tl.float32)
    # sweep 1: sum_p Phi g_phi
    mean = tl.zeros([BLOCK_L], tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = (p0 + offs).to(tl.int64)
        pv = p < HW
        both = lv[:, None] & pv[None, :]
        if HAS_G and not G_PER_MAP:
            g_shared = tl.load(g_ptr + b64 * s_gb + p * s_gp, mask=pv, other=0.0)
            g_shared = g_shared.to(tl.float32)
        t = tl.load(t_base + ls.to(tl.int64)[:, None] * s_tl + p[None, :] * s_tp,
                    mask=both, other=0.0).to(tl.float32)
        phi = _phi_chunk(t, beta_l, mx, inv, both, cs, ovf, OVF)
        g = _grad_phi_tile(g_ptr, g_shared, gz_ptr, b64, ls, lv, p, both, L, W, inv_w, s_gb, s_gl, s_gp,
                           x_scale, y_scale, BLOCK_L, BLOCK_P, HAS_G, G_PER_MAP, HAS_GZ, INT_DIV)
        mean += tl.sum(phi * g, axis=1)
    # sweep 2: grad T and grad beta
    gbeta = tl.zeros([BLOCK_L], tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = (p0 + offs).to(tl.int64)
        pv = p < HW
        both = lv[:, None] & pv[None, :]
        if HAS_G and not G_PER_MAP:
            g_shared = tl.load(g_ptr + b64 * s_gb + p * s_gp, mask=pv, other=0.0)
            g_shared = g_shared.to(tl.float32)
        t = tl.load(t_base + ls.to(tl.int64)[:, None] * s_tl + p[None, :] * s_tp,
                    mask=both, other=0.0).to(tl.float32)
        phi = _phi_chunk(t, beta_l, mx, inv, both, cs, ovf, OVF)
        g = _grad_phi_tile(g_ptr, g_shared, gz_ptr, b64, ls, lv, p, both, L, W, inv_w, s_gb, s_gl, s_gp,
                           x_scale, y_scale, BLOCK_L, BLOCK_P, HAS_G, G_PER_MAP, HAS_GZ, INT_DIV)
        gs = phi * (g - mean[:, None])
        tl.store(gt_ptr + row_id[:, None] * HW + p[None, :], (beta_l[:, None] * gs).to(gt_ty), mask=both,
                 eviction_policy="evict_first")
        if OVF:
            gbeta += tl.sum(tl.where(ovf[:, None], 0.0, tl.where(both, t * gs, 0.0)), axis=1)
        else:
            gbeta += tl.sum(tl.where(both, t * gs, 0.0), axis=1)
    tl.store(gbeta_ptr + row_id, gbeta, mask=lv)
