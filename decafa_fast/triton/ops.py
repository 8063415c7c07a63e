"""decafa_triton::<op>: the Triton implementation of every schema in decafa_fast.ops.schemas.SCHEMAS.

Each op is a `torch.library.triton_op` whose body allocates the outputs and launches kernels through
`torch.library.wrap_triton`, so torch.compile(fullgraph=True) sees the kernels themselves. Autograd is
registered by decafa_fast.ops (`register_autograd("decafa_triton")` in ops/autograd.py) once this module imports.

Under TRITON_INTERPRET=1 (Triton's CPU interpreter, used by the tests here) `wrap_triton` returns the
interpreted function itself, which cannot be traced: FakeTensor tracing (opcheck, torch.compile) would run
the kernel on fake tensors and fail ("Attempted to set the storage of a tensor on device meta ..."). There
the ops are plain `torch.library.custom_op`s instead, opaque to the compiler, with the shape-only fake
kernels below. The kernels and their launches are the same.

Inputs may be float16, bfloat16 or float32 (float32 accumulation; float64 raises TypeError); contiguous,
channels_last, or any layout whose H, W dims are "flat" (others are copied to contiguous). Outputs are
contiguous. No atomics. `mode` is inferred as SymInt (torch.library infers a Python int that way).

Two-pass ops (mask / fusion after the per-map statistics, and their backward) read the logits twice. They
run over the batch in chunks of about `TUNING.chunk_bytes` of logits, and the second pass of a chunk walks
its batch elements backwards: it starts on the logits the first pass read last, which are still in L2.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from .fusion import fuse_bwd_kernel, mask_fuse_fwd_kernel
from .stats import map_backward_kernel, map_stats_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Tuning:
    """Launch parameters (128 x 128 is the tuned case); bench/head_floor.py sweeps them on a GPU."""

    stats_block: int = 4096  # most pixels a per-(b, l) program takes per step
    stats_warps: int = 8
    fuse_block_p: int = 256  # most pixels per (b, tile) program ...
    fuse_min_programs: int = -1  # ... halved (down to 32) until a launch has this many programs; -1: 4 per SM
    fuse_block_l: int = 8  # maps per step of the mask sum
    fuse_block_c: int = 8  # channels per step of the fusion
    fuse_warps: int = 4
    # logits per chunk of the two-pass ops (0 = the whole batch at once). Small chunks keep more of the
    # logits in L2 for the second pass but cost two launches each (~10-20 us of Python per launch in eager
    # mode); 64 MiB = 10 batch elements at 98 x 128 x 128 float32, 20 in bfloat16.
    chunk_bytes: int = 64 << 20
    int_div_above: int = 1 << 20  # larger maps take rows by integer division (see stats._row_col)


TUNING = Tuning()


# --------------------------------------------------------------------------------------------------
# Helpers (plain Python on shapes and strides, so they trace)
# --------------------------------------------------------------------------------------------------
def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton backend supports float16, bfloat16 and float32 {name}, got {t.dtype}")


def _lse32(lse: torch.Tensor) -> torch.Tensor:
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 for the Triton backend, got {lse.dtype}")
    return lse.contiguous()


def _prep(t: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, batch stride, channel stride, pixel stride) of a (B, C, H, W) tensor whose pixel
    p = row*W + col sits at p * (pixel stride); copied to contiguous when no such stride exists.
    None gives (dummy, 0, 0, 0): the kernel never reads it."""
    if t is None:
        return dummy, 0, 0, 0
    h, w = t.shape[2], t.shape[3]
    if w == 1:
        sp = t.stride(2)
    elif h == 1 or t.stride(2) == w * t.stride(3):
        sp = t.stride(3)
    else:
        t = t.contiguous()
        sp = 1
    return t, t.stride(0), t.stride(1), sp


def _coord_affine(n: int, normalized: bool) -> tuple[float, float]:
    """(scale, offset) mapping a pixel index 0..n-1 to the output coordinate."""
    if not normalized:
        return 1.0, 0.0
    if n == 1:
        return 0.0, -1.0
    return 2.0 / (n - 1), -1.0


def _segment_offsets(mode: int, ci: int, c: int) -> tuple[int, int, int, int, int]:
    """First output channel of (plain I, masked I, plain E, masked E) and the channel count of F<mode>."""
    table = {
        1: (0, 0, 0, 0, c),
        2: (0, 0, 0, 0, ci),
        3: (0, ci, 0, 0, 2 * ci),
        4: (0, ci, 0, 2 * ci, 2 * ci + c),
        5: (0, ci, 2 * ci, 2 * ci + c, 2 * ci + 2 * c),
    }
    if mode not in table:
        raise ValueError(f"mode must be 1..5 (F1..F5), got {mode}")
    return table[mode]


def _chunks(logits: torch.Tensor) -> list[tuple[int, int]]:
    """(first batch index, count) of each chunk of about TUNING.chunk_bytes of logits."""
    b = logits.shape[0]
    per_b = logits[0].numel() * logits.element_size() if b else 1
    n = b if TUNING.chunk_bytes <= 0 else max(1, TUNING.chunk_bytes // per_b)
    return [(b0, min(n, b - b0)) for b0 in range(0, b, n)]


def _stats_cfg(hw: int) -> dict:
    return dict(BLOCK=min(triton.next_power_of_2(hw), TUNING.stats_block), num_warps=TUNING.stats_warps)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fuse_cfg(hw: int, l: int, ci: int, c: int, nb: int, device: torch.device) -> dict:
    """Block sizes of the per-(b, tile) kernels. Small launches (few batch elements) get narrower pixel
    tiles so that every SM has work, and the tiles grow in maps / channels by as much, so that each loop
    step still loads about fuse_block_p x fuse_block_l (or _c) elements and the loops stay short."""
    block_p = min(triton.next_power_of_2(hw), TUNING.fuse_block_p)
    target = TUNING.fuse_min_programs
    if target < 0:
        target = 4 * _sm_count(device.index or 0) if device.type == "cuda" else 0
    while block_p > 32 and nb * triton.cdiv(hw, block_p) < target:
        block_p //= 2
    grow = max(1, TUNING.fuse_block_p // block_p)
    return dict(
        BLOCK_P=block_p,
        BLOCK_L=min(triton.next_power_of_2(max(l, 1)), TUNING.fuse_block_l * grow),
        BLOCK_CI=min(triton.next_power_of_2(max(ci, 1)), TUNING.fuse_block_c * grow),
        BLOCK_C=min(triton.next_power_of_2(max(c, 1)), TUNING.fuse_block_c * grow),
        num_warps=TUNING.fuse_warps,
    )


# --------------------------------------------------------------------------------------------------
# Launches over batch elements b0 .. b0+nb-1 (inputs prepared by _prep, outputs contiguous)
# --------------------------------------------------------------------------------------------------
def _walk(b0: int, nb: int, reverse: bool) -> tuple[int, int]:
    """(b_start, b_step) of a launch over b0 .. b0+nb-1. The second pass of a two-pass op walks the batch
    backwards, so that it starts on the batch elements whose logits the first pass read last (still in L2)."""
    return (b0 + nb - 1, -1) if reverse else (b0, 1)


def _run_stats(t, lse, z, phi, shape, beta: float, normalized: bool, b0: int, nb: int, reverse=False) -> None:
    """map_stats_kernel: lse, and z / Phi when given (else None)."""
    _, l, h, w = shape
    tt, s_tb, s_tl, s_tp = t
    xs, xo = _coord_affine(w, normalized)
    ys, yo = _coord_affine(h, normalized)
    # absent outputs are given the (read-only) logits as a never-used pointer: an output tensor there would
    # alias a written argument, which torch.compile's kernel mutation analysis is better spared
    wrap_triton(map_stats_kernel)[(nb * l,)](
        tt, lse, z if z is not None else tt, phi if phi is not None else tt,
        *_walk(b0, nb, reverse), l, w, h * w, 1.0 / w,
        s_tb, s_tl, s_tp,
        beta, xs, xo, ys, yo,
        WRITE_Z=z is not None, WRITE_PHI=phi is not None, INT_DIV=h * w > TUNING.int_div_above,
        **_stats_cfg(h * w),
    )


def _run_fuse_fwd(t, lse, m, i, e, fused, m_out, shape, mode: int, beta: float, b0: int, nb: int,
                  reverse=False) -> None:
    """mask_fuse_fwd_kernel: M from (t, lse) when lse is given, else from m; writes fused / m_out if given.
    t, m, i, e are _prep tuples or None (not read)."""
    _, l, h, w = shape
    dummy = next(x[0] for x in (t, m, i, e) if x is not None)  # an input: never read, never written
    tt, s_tb, s_tl, s_tp = t or (dummy, 0, 0, 0)
    mm, s_mb, _, s_mp = m or (dummy, 0, 0, 0)
    ii, s_ib, s_ic, s_ip = i or (dummy, 0, 0, 0)
    ee, s_eb, s_ec, s_ep = e or (dummy, 0, 0, 0)
    ci = ii.shape[1] if i is not None else 0
    c = ee.shape[1] if e is not None else 0
    ip, im, ep, em, cf = _segment_offsets(mode, ci, c) if mode else (0, 0, 0, 0, 0)
    cfg = _fuse_cfg(h * w, l, ci, c, nb, tt.device)
    n_tiles = triton.cdiv(h * w, cfg["BLOCK_P"])
    wrap_triton(mask_fuse_fwd_kernel)[(nb * n_tiles,)](
        tt, lse if lse is not None else tt, mm, ii, ee,
        fused if fused is not None else tt, m_out if m_out is not None else tt,
        *_walk(b0, nb, reverse), l, h * w, ci, c, n_tiles,
        s_tb, s_tl, s_tp,
        s_mb, s_mp,
        s_ib, s_ic, s_ip,
        s_eb, s_ec, s_ep,
        beta, ip, im, ep, em, cf,
        MODE=mode, FROM_LOGITS=lse is not None, WRITE_MASK=m_out is not None, **cfg,
    )


def _run_fuse_bwd(gf, t, lse, m, i, e, gi, ge, gm, shape, mode: int, beta: float, b0: int, nb: int,
                  reverse=False) -> None:
    """fuse_bwd_kernel: gI, gE, gM (the kernel writes only the ones F<mode> has); t or m may be None."""
    _, l, h, w = shape
    tt, s_tb, s_tl, s_tp = t or (gf[0], 0, 0, 0)
    mm, s_mb, _, s_mp = m or (gf[0], 0, 0, 0)
    ii, s_ib, s_ic, s_ip = i
    ee, s_eb, s_ec, s_ep = e
    gg, s_fb, s_fc, s_fp = gf
    ci, c = ii.shape[1], ee.shape[1]
    ip, im, ep, em, _ = _segment_offsets(mode, ci, c)
    cfg = _fuse_cfg(h * w, l, ci, c, nb, gg.device)
    n_tiles = triton.cdiv(h * w, cfg["BLOCK_P"])
    wrap_triton(fuse_bwd_kernel)[(nb * n_tiles,)](
        tt, lse if lse is not None else tt, mm, ii, ee, gg, gi, ge, gm,
        *_walk(b0, nb, reverse), l, h * w, ci, c, n_tiles,
        s_tb, s_tl, s_tp,
        s_mb, s_mp,
        s_ib, s_ic, s_ip,
        s_eb, s_ec, s_ep,
        s_fb, s_fc, s_fp,
        beta, ip, im, ep, em,
        MODE=mode, FROM_LOGITS=lse is not None, **cfg,
    )


def _run_map_backward(t, lse, g, per_map: bool, gz, gt, shape, beta: float, normalized: bool, b0: int, nb: int,
                      reverse=False):
    """map_backward_kernel: gT = beta*Phi*((G - sum G Phi) + gx (x - zx) + gy (y - zy)); G, gz may be None."""
    _, l, h, w = shape
    tt, s_tb, s_tl, s_tp = t
    gg, s_gb, s_gl, s_gp = g if g is not None else (tt, 0, 0, 0)
    if not per_map:
        s_gl = 0  # the mask gradient (B, 1, H, W) is shared by the L maps
    if gz is not None:
        zz, s_zb, s_zl, s_zc = gz, gz.stride(0), gz.stride(1), gz.stride(2)
    else:
        zz, s_zb, s_zl, s_zc = tt, 0, 0, 0
    xs, _ = _coord_affine(w, normalized)
    ys, _ = _coord_affine(h, normalized)
    wrap_triton(map_backward_kernel)[(nb * l,)](
        tt, lse, gg, zz, gt,
        *_walk(b0, nb, reverse), l, w, h * w, 1.0 / w,
        s_tb, s_tl, s_tp,
        s_gb, s_gl, s_gp,
        s_zb, s_zl, s_zc,
        beta, xs, ys,
        HAS_G=g is not None, HAS_GZ=gz is not None, INT_DIV=h * w > TUNING.int_div_above,
        **_stats_cfg(h * w),
    )


def _new_lse(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:2], dtype=torch.float32)


def _new_mask(logits: torch.Tensor) -> torch.Tensor:
    b, _, h, w = logits.shape
    return logits.new_empty((b, 1, h, w))


def _zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# The ops (argument names and order exactly as in decafa_fast.ops.schemas.SCHEMAS)
# --------------------------------------------------------------------------------------------------
def spatial_softmax(logits: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (Phi (B, L, H, W), lse (B, L) float32)."""
    _check_dtype("logits", logits)
    phi, lse = logits.new_empty(logits.shape), _new_lse(logits)
    if logits.shape[0]:
        t = _prep(logits, logits)
        _run_stats(t, lse, None, phi, logits.shape, beta, False, 0, logits.shape[0])
    return phi, lse


def spatial_softmax_backward(
    grad_phi: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, beta: float
) -> torch.Tensor:
    """gT = beta * Phi * (gPhi - sum_p gPhi Phi), (B, L, H, W)."""
    _check_dtype("logits", logits)
    gt = logits.new_empty(logits.shape)
    if logits.shape[0]:
        t = _prep(logits, logits)
        g = _prep(grad_phi, logits)
        _run_map_backward(t, _lse32(lse), g, True, None, gt, logits.shape, beta, False, 0, logits.shape[0])
    return gt


def soft_argmax(logits: torch.Tensor, beta: float, normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (z (B, L, 2) as (x, y), lse (B, L))."""
    _check_dtype("logits", logits)
    z, lse = logits.new_empty((*logits.shape[:2], 2)), _new_lse(logits)
    if logits.shape[0]:
        t = _prep(logits, logits)
        _run_stats(t, lse, z, None, logits.shape, beta, normalized, 0, logits.shape[0])
    return z, lse


def _mask_and_stats(logits: torch.Tensor, beta: float, normalized: bool, want_z: bool):
    z = logits.new_empty((*logits.shape[:2], 2)) if want_z else None
    m, lse = _new_mask(logits), _new_lse(logits)
    t = _prep(logits, logits)
    for b0, nb in _chunks(logits):
        _run_stats(t, lse, z, None, logits.shape, beta, normalized, b0, nb)
        _run_fuse_fwd(t, lse, None, None, None, None, m, logits.shape, 0, beta, b0, nb, reverse=True)
    return z, m, lse


def attention_mask(logits: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (M (B, 1, H, W) = sum_l Phi_l, lse (B, L))."""
    _check_dtype("logits", logits)
    _, m, lse = _mask_and_stats(logits, beta, False, want_z=False)
    return m, lse


def landmark_attention(
    logits: torch.Tensor, beta: float, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (z (B, L, 2), M (B, 1, H, W), lse (B, L))."""
    _check_dtype("logits", logits)
    return _mask_and_stats(logits, beta, normalized, want_z=True)


def landmark_attention_backward(
    grad_z: Optional[torch.Tensor],
    grad_mask: Optional[torch.Tensor],
    logits: torch.Tensor,
    lse: torch.Tensor,
    beta: float,
    normalized: bool,
) -> torch.Tensor:
    """gT (B, L, H, W) from grad_z (B, L, 2) and grad_mask (B, 1, H, W); a None grad counts as zero."""
    _check_dtype("logits", logits)
    if logits.shape[0] == 0 or (grad_z is None and grad_mask is None):
        return _zeros(logits)
    gt = logits.new_empty(logits.shape)
    t = _prep(logits, logits)
    g = _prep(grad_mask, logits) if grad_mask is not None else None
    _run_map_backward(t, _lse32(lse), g, False, grad_z, gt, logits.shape, beta, normalized, 0, logits.shape[0])
    return gt


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: int) -> torch.Tensor:
    """image (B, Ci, H, W), embedding (B, C, H, W), mask (B, 1, H, W) -> F<mode> (B, channels, H, W)."""
    _check_dtype("image", image)
    mode = int(mode)
    b, ci, h, w = image.shape
    cf = _segment_offsets(mode, ci, embedding.shape[1])[4]
    fused = image.new_empty((b, cf, h, w))
    if b:
        i, e, m = _prep(image, image), _prep(embedding, image), _prep(mask, image)
        _run_fuse_fwd(None, None, m, i, e, fused, None, (b, 0, h, w), mode, 0.0, 0, b)
    return fused


def fuse_backward(
    grad_fused: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gI, gE, gM) for fuse; gM is (B, 1, H, W) in the mask dtype."""
    _check_dtype("image", image)
    mode = int(mode)
    gi, ge, gm = _fuse_grad_buffers(image, embedding, mode, mask.dtype)
    b, _, h, w = image.shape
    if b:
        i, e, m, g = _prep(image, image), _prep(embedding, image), _prep(mask, image), _prep(grad_fused, image)
        _run_fuse_bwd(g, None, None, m, i, e, gi, ge, gm, (b, 0, h, w), mode, 0.0, 0, b)
    return gi, ge, gm


def _fuse_grad_buffers(image: torch.Tensor, embedding: torch.Tensor, mode: int, gm_dtype: torch.dtype):
    """gI, gE, gM buffers: empty where F<mode> has a segment that the kernel writes, zeros elsewhere."""
    b, _, h, w = image.shape
    gi = image.new_empty(image.shape) if mode >= 2 else _zeros(image)
    ge = embedding.new_empty(embedding.shape) if mode == 1 or mode >= 4 else _zeros(embedding)
    gm = image.new_empty((b, 1, h, w), dtype=gm_dtype)
    if mode == 1:
        gm = gm.zero_()
    return gi, ge, gm


def decafa_head(
    logits: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mode: int, beta: float, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z (B, L, 2), F<mode> (B, channels, H, W), lse (B, L)); M and Phi never reach memory."""
    _check_dtype("logits", logits)
    mode = int(mode)
    b, _, h, w = logits.shape
    cf = _segment_offsets(mode, image.shape[1], embedding.shape[1])[4]
    z, fused, lse = logits.new_empty((*logits.shape[:2], 2)), logits.new_empty((b, cf, h, w)), _new_lse(logits)
    t, i, e = _prep(logits, logits), _prep(image, logits), _prep(embedding, logits)
    for b0, nb in _chunks(logits):
        _run_stats(t, lse, z, None, logits.shape, beta, normalized, b0, nb)
        _run_fuse_fwd(t, lse, None, i, e, fused, None, logits.shape, mode, beta, b0, nb, reverse=True)
    return z, fused, lse


def decafa_head_backward(
    grad_z: Optional[torch.Tensor],
    grad_fused: Optional[torch.Tensor],
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    lse: torch.Tensor,
    mode: int,
    beta: float,
    normalized: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gT, gI, gE): per pixel tile gI, gE and a float32 gM (M recomputed), then gT per map."""
    _check_dtype("logits", logits)
    mode = int(mode)
    lse = _lse32(lse)
    if grad_fused is None:
        gt = landmark_attention_backward(grad_z, None, logits, lse, beta, normalized)
        return gt, _zeros(image), _zeros(embedding)
    gi, ge, gm = _fuse_grad_buffers(image, embedding, mode, torch.float32)
    if logits.shape[0] == 0:
        return _zeros(logits), gi, ge
    has_gm = mode >= 2  # F1 = E has no masked segment: nothing reaches the logits through M
    has_gt = grad_z is not None or has_gm
    gt = logits.new_empty(logits.shape) if has_gt else _zeros(logits)
    t, i, e, g = _prep(logits, logits), _prep(image, logits), _prep(embedding, logits), _prep(grad_fused, logits)
    gmp = (gm, gm.stride(0), 0, 1) if has_gm else None
    for b0, nb in _chunks(logits):
        _run_fuse_bwd(g, t, lse, None, i, e, gi, ge, gm, logits.shape, mode, beta, b0, nb)
        if has_gt:
            _run_map_backward(t, lse, gmp, False, grad_z, gt, logits.shape, beta, normalized, b0, nb, reverse=True)
    return gt, gi, ge


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------
def _fake_fused(image: torch.Tensor, embedding: torch.Tensor, mode: int) -> torch.Tensor:
    cf = _segment_offsets(int(mode), image.shape[1], embedding.shape[1])[4]
    return image.new_empty((image.shape[0], cf, *image.shape[2:]))


def _lse_fake(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape[:2], dtype=torch.float32)


# Shape-only fake kernels, used only under the interpreter (triton_op traces the real body otherwise).
_FAKES = {
    "spatial_softmax": lambda logits, beta: (logits.new_empty(logits.shape), _lse_fake(logits)),
    "spatial_softmax_backward": lambda grad_phi, logits, lse, beta: logits.new_empty(logits.shape),
    "soft_argmax": lambda logits, beta, normalized: (logits.new_empty((*logits.shape[:2], 2)), _lse_fake(logits)),
    "attention_mask": lambda logits, beta: (
        logits.new_empty((logits.shape[0], 1, *logits.shape[2:])),
        _lse_fake(logits),
    ),
    "landmark_attention": lambda logits, beta, normalized: (
        logits.new_empty((*logits.shape[:2], 2)),
        logits.new_empty((logits.shape[0], 1, *logits.shape[2:])),
        _lse_fake(logits),
    ),
    "landmark_attention_backward": lambda grad_z, grad_mask, logits, lse, beta, normalized: logits.new_empty(
        logits.shape
    ),
    "fuse": lambda image, embedding, mask, mode: _fake_fused(image, embedding, mode),
    "fuse_backward": lambda grad_fused, image, embedding, mask, mode: (
        image.new_empty(image.shape),
        embedding.new_empty(embedding.shape),
        mask.new_empty(mask.shape),
    ),
    "decafa_head": lambda logits, image, embedding, mode, beta, normalized: (
        logits.new_empty((*logits.shape[:2], 2)),
        _fake_fused(image, embedding, mode),
        _lse_fake(logits),
    ),
    "decafa_head_backward": lambda grad_z, grad_fused, logits, image, embedding, lse, mode, beta, normalized: (
        logits.new_empty(logits.shape),
        image.new_empty(image.shape),
        embedding.new_empty(embedding.shape),
    ),
}

_IMPLS = {
    "spatial_softmax": spatial_softmax,
    "spatial_softmax_backward": spatial_softmax_backward,
    "soft_argmax": soft_argmax,
    "attention_mask": attention_mask,
    "landmark_attention": landmark_attention,
    "landmark_attention_backward": landmark_attention_backward,
    "fuse": fuse,
    "fuse_backward": fuse_backward,
    "decafa_head": decafa_head,
    "decafa_head_backward": decafa_head_backward,
}


def _register() -> dict:
    ops = {}
    for name, fn in _IMPLS.items():
        qualname = f"decafa_triton::{name}"
        if INTERPRET:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(_FAKES[name])
        else:
            op = torch.library.triton_op(qualname, fn, mutates_args=())
        ops[name] = op
    return ops


OPS = _register()
