"""Per-map Triton kernels: one program per (b, l) landmark map.

`map_stats_kernel`    forward: max, log-sum-exp and first moments of beta*T over the H*W pixels in one read of
                      the map (online max with rescaling when the map is larger than BLOCK); optionally writes
                      Phi itself (spatial_softmax) in a second sweep, which re-reads the map from cache.
`map_backward_kernel` backward: recomputes Phi = exp(beta*T - lse) (renormalised); sweep 1 gives
                      s = sum G*Phi and the expected coordinates, sweep 2 writes gT = beta*Phi*((G - s) + gx (x - zx) + gy (y - zy)).
                      G is a per-map gradient (grad of Phi) or a per-batch one broadcast over l (grad of the
                      mask: its l-stride is 0).

Pixels are addressed as p = row*W + col in 0..H*W-1 with a single pixel stride (`s_tp`): the wrapper
guarantees the spatial dims are "flat" (contiguous and channels_last both are). Coordinates are
accumulated as raw column/row indices and mapped to the output convention with `off + scale * index`.
All arithmetic is float32; nothing here uses atomics, so results are bitwise reproducible.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_col(p, W, inv_w, INT_DIV: tl.constexpr):
    """Row and column (float32) of flat pixel indices p. A float reciprocal replaces the integer division
    (many instructions per element on the GPU); it is exact while H*W <= 2**20 (checked for every W), else INT_DIV is set."""
    if INT_DIV:
        row = p // W
    else:
        row = ((p.to(tl.float32) + 0.5) * inv_w).to(tl.int32)
    return row.to(tl.float32), (p - row * W).to(tl.float32)


@triton.jit
def map_stats_kernel(
    t_ptr, lse_ptr, z_ptr, phi_ptr,
    b_start, b_step, L, W, HW, inv_w,
    s_tb, s_tl, s_tp,
    beta, x_scale, x_off, y_scale, y_off,
    BLOCK: tl.constexpr, WRITE_Z: tl.constexpr, WRITE_PHI: tl.constexpr, INT_DIV: tl.constexpr,
):
    # program q handles map l = q % L of batch element b = b_start + b_step * (q // L) (b_step = -1 walks the
    # batch backwards: it starts where the previous launch ended, on data still in L2); lse, z and phi are
    # contiguous over (b, l)
    b = b_start + b_step * (tl.program_id(0) // L)
    l = tl.program_id(0) % L
    pid = b.to(tl.int64) * L + l
    base = t_ptr + b.to(tl.int64) * s_tb + l.to(tl.int64) * s_tl
    offs = tl.arange(0, BLOCK)

    # Online softmax over chunks of the map: a scalar running max m; the lane accumulators are rescaled by
    # exp(m_old - m_new) when a chunk raises it (one exp per pixel; a single chunk at 128 x 128 and below
    # BLOCK, where this is the plain max-then-sum).
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s = tl.zeros([BLOCK], tl.float32)
    sx = tl.zeros([BLOCK], tl.float32)
    sy = tl.zeros([BLOCK], tl.float32)
    for start in range(0, HW, BLOCK):
        p = start + offs
        valid = p < HW
        t = tl.load(base + p * s_tp, mask=valid, other=0.0).to(tl.float32)
        a = tl.where(valid, t * beta, float("-inf"))
        m_new = tl.maximum(m, tl.max(a, axis=0))
        # the where() guards keep -inf - -inf (nothing finite seen yet) from turning into NaN
        alpha = tl.where(m_new == m, 1.0, tl.exp(m - m_new))
        e = tl.where(a == float("-inf"), 0.0, tl.exp(a - m_new))
        s = s * alpha + e
        if WRITE_Z:
            row, col = _row_col(p, W, inv_w, INT_DIV)
            sx = sx * alpha + e * col
            sy = sy * alpha + e * row
        m = m_new

    total = tl.sum(s, axis=0)
    lse = m + tl.log(total)
    tl.store(lse_ptr + pid, lse)
    if WRITE_Z:
        zx = x_off + x_scale * (tl.sum(sx, axis=0) / total)
        zy = y_off + y_scale * (tl.sum(sy, axis=0) / total)
        tl.store(z_ptr + 2 * pid, zx.to(z_ptr.dtype.element_ty))
        tl.store(z_ptr + 2 * pid + 1, zy.to(z_ptr.dtype.element_ty))
    if WRITE_PHI:
        out = phi_ptr + pid * HW
        for start in range(0, HW, BLOCK):
            p = start + offs
            valid = p < HW
            t = tl.load(base + p * s_tp, mask=valid, other=0.0).to(tl.float32)
            phi = tl.exp(t * beta - lse)
            tl.store(out + p, phi.to(phi_ptr.dtype.element_ty), mask=valid)


@triton.jit
def map_backward_kernel(
    t_ptr, lse_ptr, g_ptr, gz_ptr, gt_ptr,
    b_start, b_step, L, W, HW, inv_w,
    s_tb, s_tl, s_tp,
    s_gb, s_gl, s_gp,
    s_zb, s_zl, s_zc,
    beta, x_scale, y_scale,
    BLOCK: tl.constexpr, HAS_G: tl.constexpr, HAS_GZ: tl.constexpr, INT_DIV: tl.constexpr,
):
    b = b_start + b_step * (tl.program_id(0) // L)  # as in map_stats_kernel
    l = tl.program_id(0) % L
    pid = b.to(tl.int64) * L + l
    base = t_ptr + b.to(tl.int64) * s_tb + l.to(tl.int64) * s_tl
    g_base = g_ptr + b.to(tl.int64) * s_gb + l.to(tl.int64) * s_gl
    offs = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + pid)

    # Sweep 1: s = sum G*Phi and the expected raw column / row under Phi. exp(beta*T - lse) carries the
    # rounding error of lse (~|beta*T| * 6e-8, common to the whole map); dividing by the recomputed sum n
    # cancels it, as the reference's softmax normalises exactly.
    acc_n = tl.zeros([BLOCK], tl.float32)
    acc_s = tl.zeros([BLOCK], tl.float32)
    acc_x = tl.zeros([BLOCK], tl.float32)
    acc_y = tl.zeros([BLOCK], tl.float32)
    for start in range(0, HW, BLOCK):
        p = start + offs
        valid = p < HW
        t = tl.load(base + p * s_tp, mask=valid, other=0.0).to(tl.float32)
        phi = tl.where(valid, tl.exp(t * beta - lse), 0.0)
        acc_n += phi
        if HAS_G:
            g = tl.load(g_base + p * s_gp, mask=valid, other=0.0).to(tl.float32)
            acc_s += phi * g
        if HAS_GZ:
            row, col = _row_col(p, W, inv_w, INT_DIV)
            acc_x += phi * col
            acc_y += phi * row
    inv_n = 1.0 / tl.sum(acc_n, axis=0)
    s = tl.sum(acc_s, axis=0) * inv_n
    ex = tl.sum(acc_x, axis=0) * inv_n
    ey = tl.sum(acc_y, axis=0) * inv_n
    gx = 0.0
    gy = 0.0
    if HAS_GZ:
        # d z_n / d index = scale, so the raw-index form of gx (x_n - zx_n) is (gx * scale) (x - ex)
        zbase = gz_ptr + b.to(tl.int64) * s_zb + l.to(tl.int64) * s_zl
        gx = tl.load(zbase).to(tl.float32) * x_scale
        gy = tl.load(zbase + s_zc).to(tl.float32) * y_scale

    # Sweep 2: gT (the map is still in L1/L2 from sweep 1).
    out = gt_ptr + pid * HW
    for start in range(0, HW, BLOCK):
        p = start + offs
        valid = p < HW
        t = tl.load(base + p * s_tp, mask=valid, other=0.0).to(tl.float32)
        phi = tl.exp(t * beta - lse) * inv_n
        term = tl.zeros([BLOCK], tl.float32)
        if HAS_G:
            g = tl.load(g_base + p * s_gp, mask=valid, other=0.0).to(tl.float32)
            term += g - s
        if HAS_GZ:
            row, col = _row_col(p, W, inv_w, INT_DIV)
            term += gx * (col - ex) + gy * (row - ey)
        tl.store(out + p, (beta * phi * term).to(gt_ptr.dtype.element_ty), mask=valid)
