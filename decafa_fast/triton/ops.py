"""decafa_triton::<op>: the Triton implementation of every schema in decafa_fast.ops._SCHEMAS.

Each op is a `torch.library.triton_op` whose body allocates the outputs and launches kernels through
`torch.library.wrap_triton`, so torch.compile(fullgraph=True) sees the kernels themselves. Autograd is
registered by decafa_fast.ops (`_register_autograd("decafa_triton")`) once this module imports.

Under TRITON_INTERPRET=1 (Triton's CPU interpreter, used by the tests here) `wrap_triton` returns the
interpreted function itself, which cannot be traced: FakeTensor tracing (opcheck, torch.compile) would run
the kernel on fake tensors and fail. There the ops are plain `torch.library.custom_op`s instead, opaque to
the compiler, with the shape-only fake kernels below. The kernel code and launches are identical.

Inputs may be float16, bfloat16 or float32 (float32 accumulation); contiguous or channels_last (any layout
whose H, W dims are "flat"; anything else is copied to contiguous). Outputs are contiguous. No atomics.
Note: `mode` is inferred as SymInt (torch.library infers Python int that way); values 1..5 as in _SCHEMAS.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
from torch.library import wrap_triton

from .fusion import fuse_bwd_kernel, mask_fuse_fwd_kernel
from .stats import map_backward_kernel, map_stats_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tuning (128 x 128 is the target case). A map is swept BLOCK pixels at a time per (b, l) program;
# the fusion kernels take BLOCK_P pixels x BLOCK_L maps / BLOCK_C channels per step.
STATS_MAX_BLOCK = 4096
FUSE_BLOCK_P = 512
FUSE_BLOCK_L = 8
FUSE_BLOCK_C = 8
# Maps larger than this take the row index by integer division instead of a float reciprocal (stats.py).
INT_DIV_ABOVE = 1 << 20


# --------------------------------------------------------------------------------------------------
# Helpers (plain Python on shapes / strides; traceable)
# --------------------------------------------------------------------------------------------------
def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the Triton backend supports float16, bfloat16 and float32 {name}, got {t.dtype}")


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(t or a contiguous copy, pixel stride) such that pixel p = row*W + col sits at p * stride."""
    h, w = t.shape[2], t.shape[3]
    if w == 1:
        return t, t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, t.stride(3)
    t = t.contiguous()
    return t, 1


def _coord_affine(n: int, normalized: bool) -> tuple[float, float]:
    """(scale, offset) mapping a pixel index 0..n-1 to the output coordinate."""
    if not normalized:
        return 1.0, 0.0
    if n == 1:
        return 0.0, -1.0
    return 2.0 / (n - 1), -1.0


def _stats_block(hw: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(hw), STATS_MAX_BLOCK)
    return block, (8 if block >= 2048 else 4)


def _fuse_blocks(hw: int, ci: int, c: int) -> dict:
    block_p = min(triton.next_power_of_2(hw), FUSE_BLOCK_P)
    return dict(
        BLOCK_P=block_p,
        BLOCK_L=FUSE_BLOCK_L,
        BLOCK_CI=min(triton.next_power_of_2(max(ci, 1)), FUSE_BLOCK_C),
        BLOCK_C=min(triton.next_power_of_2(max(c, 1)), FUSE_BLOCK_C),
        num_warps=4,
    )


def _segment_offsets(mode: int, ci: int, c: int) -> tuple[int, int, int, int, int]:
    """First output channel of (plain I, masked I, plain E, masked E) and the channel count, for F<mode>."""
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


def _launch_stats(logits: torch.Tensor, beta: float, normalized: bool, want_z: bool, want_phi: bool):
    """Run map_stats_kernel; returns (lse, z or None, phi or None)."""
    b, l, h, w = logits.shape
    lse = logits.new_empty((b, l), dtype=torch.float32)
    z = logits.new_empty((b, l, 2)) if want_z else None
    phi = logits.new_empty((b, l, h, w)) if want_phi else None
    if b == 0:
        return lse, z, phi
    t, s_tp = _flat(logits)
    xs, xo = _coord_affine(w, normalized)
    ys, yo = _coord_affine(h, normalized)
    block, warps = _stats_block(h * w)
    wrap_triton(map_stats_kernel)[(b * l,)](
        t, lse, z if want_z else lse, phi if want_phi else lse,
        l, w, h * w, 1.0 / w,
        t.stride(0), t.stride(1), s_tp,
        beta, xs, xo, ys, yo,
        BLOCK=block, WRITE_Z=want_z, WRITE_PHI=want_phi, INT_DIV=h * w > INT_DIV_ABOVE, num_warps=warps,
    )
    return lse, z, phi


def _launch_fuse_fwd(logits, lse, mask, image, embedding, mode: int, beta: float, write_mask: bool):
    """Run mask_fuse_fwd_kernel. M comes from (logits, lse) when logits is given, else from `mask`.

    Returns (fused or None, mask_out or None). `image`/`embedding` may be None for mode 0 (mask only).
    """
    src = logits if logits is not None else image
    b, h, w = src.shape[0], src.shape[2], src.shape[3]
    hw = h * w
    ci = image.shape[1] if image is not None else 0
    c = embedding.shape[1] if embedding is not None else 0
    if mode:
        ip, im, ep, em, cf = _segment_offsets(mode, ci, c)
    else:
        ip, im, ep, em, cf = 0, 0, 0, 0, 0
    fused = src.new_empty((b, cf, h, w)) if mode else None
    m_out = src.new_empty((b, 1, h, w)) if write_mask else None
    if b == 0:
        return fused, m_out
    if logits is not None:
        t, s_tp = _flat(logits)
        l, s_tb, s_tl = t.shape[1], t.stride(0), t.stride(1)
    else:
        t, s_tp, l, s_tb, s_tl = src, 0, 0, 0, 0
    if mask is not None:
        mk, s_mp = _flat(mask)
        s_mb = mk.stride(0)
    else:
        mk, s_mp, s_mb = src, 0, 0
    if image is not None:
        ii, s_ip = _flat(image)
        s_ib, s_ic = ii.stride(0), ii.stride(1)
    else:
        ii, s_ip, s_ib, s_ic = src, 0, 0, 0
    if embedding is not None:
        ee, s_ep = _flat(embedding)
        s_eb, s_ec = ee.stride(0), ee.stride(1)
    else:
        ee, s_ep, s_eb, s_ec = src, 0, 0, 0
    cfg = _fuse_blocks(hw, ci, c)
    n_tiles = triton.cdiv(hw, cfg["BLOCK_P"])
    wrap_triton(mask_fuse_fwd_kernel)[(b * n_tiles,)](
        t, lse if lse is not None else src, mk, ii, ee,
        fused if fused is not None else src, m_out if m_out is not None else src,
        l, hw, ci, c, n_tiles,
        s_tb, s_tl, s_tp,
        s_mb, s_mp,
        s_ib, s_ic, s_ip,
        s_eb, s_ec, s_ep,
        beta, ip, im, ep, em, cf,
        MODE=mode, FROM_LOGITS=logits is not None, WRITE_MASK=write_mask, **cfg,
    )
    return fused, m_out


def _launch_fuse_bwd(grad_fused, logits, lse, mask, image, embedding, mode: int, beta: float, gm_dtype):
    """Run fuse_bwd_kernel: returns (gI, gE, gM (B, 1, H, W) in gm_dtype)."""
    b, ci, h, w = image.shape
    c = embedding.shape[1]
    hw = h * w
    ip, im, ep, em, _ = _segment_offsets(mode, ci, c)
    has_i = mode >= 2
    has_e = mode == 1 or mode >= 4
    gi = image.new_empty(image.shape) if has_i else image.new_zeros(image.shape)
    ge = embedding.new_empty(embedding.shape) if has_e else embedding.new_zeros(embedding.shape)
    gm = image.new_empty((b, 1, h, w), dtype=gm_dtype) if mode >= 2 else image.new_zeros((b, 1, h, w), dtype=gm_dtype)
    if b == 0:
        return gi, ge, gm
    if logits is not None:
        t, s_tp = _flat(logits)
        l, s_tb, s_tl = t.shape[1], t.stride(0), t.stride(1)
        mk, s_mb, s_mp = image, 0, 0
    else:
        t, s_tp, l, s_tb, s_tl = image, 0, 0, 0, 0
        mk, s_mp = _flat(mask)
        s_mb = mk.stride(0)
    ii, s_ip = _flat(image)
    ee, s_ep = _flat(embedding)
    gf, s_fp = _flat(grad_fused)
    cfg = _fuse_blocks(hw, ci, c)
    n_tiles = triton.cdiv(hw, cfg["BLOCK_P"])
    wrap_triton(fuse_bwd_kernel)[(b * n_tiles,)](
        t, lse if lse is not None else image, mk, ii, ee, gf, gi, ge, gm,
        l, hw, ci, c, n_tiles,
        s_tb, s_tl, s_tp,
        s_mb, s_mp,
        ii.stride(0), ii.stride(1), s_ip,
        ee.stride(0), ee.stride(1), s_ep,
        gf.stride(0), gf.stride(1), s_fp,
        beta, ip, im, ep, em,
        MODE=mode, FROM_LOGITS=logits is not None, **cfg,
    )
    return gi, ge, gm


def _launch_map_backward(grad, grad_z, logits, lse, beta: float, normalized: bool, per_map: bool):
    """gT = beta*Phi*((G - sum G Phi) + gx (x - zx) + gy (y - zy)); G is `grad` ((B, L|1, H, W) or None)."""
    b, l, h, w = logits.shape
    has_g, has_gz = grad is not None, grad_z is not None
    if b == 0 or not (has_g or has_gz):
        return torch.zeros_like(logits, memory_format=torch.contiguous_format)
    gt = logits.new_empty(logits.shape)
    t, s_tp = _flat(logits)
    if has_g:
        g, s_gp = _flat(grad)
        s_gb, s_gl = g.stride(0), (g.stride(1) if per_map else 0)
    else:
        g, s_gp, s_gb, s_gl = t, 0, 0, 0
    if has_gz:
        gz = grad_z
        s_zb, s_zl, s_zc = gz.stride(0), gz.stride(1), gz.stride(2)
    else:
        gz, s_zb, s_zl, s_zc = t, 0, 0, 0
    xs, _ = _coord_affine(w, normalized)
    ys, _ = _coord_affine(h, normalized)
    block, warps = _stats_block(h * w)
    wrap_triton(map_backward_kernel)[(b * l,)](
        t, lse, g, gz, gt,
        l, w, h * w, 1.0 / w,
        t.stride(0), t.stride(1), s_tp,
        s_gb, s_gl, s_gp,
        s_zb, s_zl, s_zc,
        beta, xs, ys,
        BLOCK=block, HAS_G=has_g, HAS_GZ=has_gz, INT_DIV=h * w > INT_DIV_ABOVE, num_warps=warps,
    )
    return gt


def _lse32(lse: torch.Tensor) -> torch.Tensor:
    if lse.dtype != torch.float32:
        raise TypeError(f"lse must be float32 for the Triton backend, got {lse.dtype}")
    return lse.contiguous()


# --------------------------------------------------------------------------------------------------
# The ops (argument names and order exactly as in decafa_fast.ops._SCHEMAS)
# --------------------------------------------------------------------------------------------------
def spatial_softmax(logits: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (Phi (B, L, H, W), lse (B, L) float32)."""
    _check_dtype("logits", logits)
    lse, _, phi = _launch_stats(logits, beta, False, want_z=False, want_phi=True)
    return phi, lse


def spatial_softmax_backward(
    grad_phi: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, beta: float
) -> torch.Tensor:
    """gT = beta * Phi * (gPhi - sum_p gPhi Phi), (B, L, H, W)."""
    _check_dtype("logits", logits)
    return _launch_map_backward(grad_phi, None, logits, _lse32(lse), beta, False, per_map=True)


def soft_argmax(logits: torch.Tensor, beta: float, normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (z (B, L, 2) as (x, y), lse (B, L))."""
    _check_dtype("logits", logits)
    lse, z, _ = _launch_stats(logits, beta, normalized, want_z=True, want_phi=False)
    return z, lse


def attention_mask(logits: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (M (B, 1, H, W) = sum_l Phi_l, lse (B, L))."""
    _check_dtype("logits", logits)
    lse, _, _ = _launch_stats(logits, beta, False, want_z=False, want_phi=False)
    _, m = _launch_fuse_fwd(logits, lse, None, None, None, 0, beta, write_mask=True)
    return m, lse


def landmark_attention(
    logits: torch.Tensor, beta: float, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (z (B, L, 2), M (B, 1, H, W), lse (B, L))."""
    _check_dtype("logits", logits)
    lse, z, _ = _launch_stats(logits, beta, normalized, want_z=True, want_phi=False)
    _, m = _launch_fuse_fwd(logits, lse, None, None, None, 0, beta, write_mask=True)
    return z, m, lse


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
    return _launch_map_backward(grad_mask, grad_z, logits, _lse32(lse), beta, normalized, per_map=False)


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: int) -> torch.Tensor:
    """image (B, Ci, H, W), embedding (B, C, H, W), mask (B, 1, H, W) -> F<mode> (B, channels, H, W)."""
    _check_dtype("image", image)
    fused, _ = _launch_fuse_fwd(None, None, mask, image, embedding, int(mode), 0.0, write_mask=False)
    return fused


def fuse_backward(
    grad_fused: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gI, gE, gM) for fuse; gM is (B, 1, H, W) in the mask dtype."""
    _check_dtype("image", image)
    return _launch_fuse_bwd(grad_fused, None, None, mask, image, embedding, int(mode), 0.0, mask.dtype)


def decafa_head(
    logits: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mode: int, beta: float, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z (B, L, 2), F<mode> (B, channels, H, W), lse (B, L)); M and Phi never reach memory."""
    _check_dtype("logits", logits)
    lse, z, _ = _launch_stats(logits, beta, normalized, want_z=True, want_phi=False)
    fused, _ = _launch_fuse_fwd(logits, lse, None, image, embedding, int(mode), beta, write_mask=False)
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
    """(gT, gI, gE): gI, gE and a float32 gM per pixel tile (M recomputed), then gT per map."""
    _check_dtype("logits", logits)
    mode = int(mode)
    lse = _lse32(lse)
    if grad_fused is None:
        gi = torch.zeros_like(image, memory_format=torch.contiguous_format)
        ge = torch.zeros_like(embedding, memory_format=torch.contiguous_format)
        gm = None
    else:
        gi, ge, gm = _launch_fuse_bwd(grad_fused, logits, lse, None, image, embedding, mode, beta, torch.float32)
        if mode == 1:  # F1 = E has no masked segment: no gradient reaches the logits through M
            gm = None
    gt = _launch_map_backward(gm, grad_z, logits, lse, beta, normalized, per_map=False)
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
