"""decafa_triton::<op>: the Triton implementation of every op of decafa_fast.contract.table (op
contract v2). The op bodies below check their arguments (checks.py), allocate the outputs and launch the
kernels of stats.py and fusion.py; decafa_fast.ops registers autograd on top.

Registration: with a GPU, each op is a `torch.library.triton_op`, so torch.compile sees the kernels
themselves. triton_op infers its schema from the type hints of the body; tests/triton assert that the
inferred schema is SCHEMAS[name] (argument names, types, defaults, returns). Under TRITON_INTERPRET=1
(Triton's CPU interpreter, used by the tests here) the ops are plain `torch.library.custom_op`s defined from
the SCHEMAS strings and the kernels are called directly: `wrap_triton` cannot trace the interpreter's
function (torch 2.11 rejects its type outright). Both paths use the shared fakes of decafa_fast.contract.fakes.

Every launch runs under a device guard for the tensors' device (Triton launches on the *current* device).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import re
from dataclasses import dataclass

import torch
import triton
from torch.library import wrap_triton
from triton.runtime.errors import OutOfResources

from .. import settings
from .._torch_private import is_wrap_triton_enabled
from ..contract.layout import fused_memory_format, fusion_layout
from . import checks, tuning
from .checks import INTERPRET, SUPPORTED_DTYPES  # noqa: F401  (re-exported for tests and callers)
from .fusion import fuse_bwd_kernel, mask_fuse_fwd_kernel
from .persistent import map_bwd_persistent_kernel, map_fwd_persistent_kernel
from .stats import map_bwd_kernel, map_fwd_kernel

_TUNING_STAMPS = itertools.count(1)
# (major, minor) of the installed Triton: the per-run backward's tile orientation for interleaved T follows
# the layout this version gives strided loads (stats.map_bwd_kernel, COLS_FIRST)
_TRITON = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])


@dataclass
class Tuning:
    """Launch parameters (128 x 128, L = 98 is the tuned case); bench/head_floor.py sweeps them on a GPU.
    Change them by assigning attributes: each assignment stamps the instance anew, and the op plans are
    cached per stamp (ops._planned)."""

    map_block_max: int = 16384  # largest map (pixels, rounded up to a power of 2) held whole on chip
    map_chunk: int = 4096  # elements of a tile when a map is swept in chunks (large or channels_last maps)
    map_warps: int = 32  # most warps of a per-map program (a whole 128 x 128 map: 16 pixels a thread)
    # channels_last T: whole maps too (one read of T, one scalar load per value, maps r, r + n_runs, ... per
    # program so that programs share sectors), or False: swept in rows of consecutive maps (full sectors,
    # T read twice). Only a GPU can tell which is faster (stats.py docstring; bench/head_floor.py
    # --channels-last --sweep)
    interleaved_whole_maps: bool = True
    # runs of maps per batch item where the per-map pass writes partial masks (and the backward reads the
    # mask gradient once per run): each run costs 8 bytes per pixel (written, read back), against 4 (fp32)
    # or 2 (bf16) bytes per pixel per map of the logits; 4 runs = 64 programs per 16 batch items
    mask_runs: int = 4
    # ... more runs (down to one map each) until a per-map launch has this many programs (-1: one per SM, as
    # one 32-warp program fills an SM): small batches trade partial-mask bytes for parallelism; on a 132-SM
    # GPU, B >= 33 keeps mask_runs (the configuration tests/triton/test_traffic.py counts)
    map_min_programs: int = -1
    fuse_block_p: int = 256  # most pixels per (b, tile) program ...
    fuse_min_programs: int = -1  # ... halved (down to 32) until a launch has this many programs; -1: 4 per SM
    fuse_block_c: int = 8  # channels per step of the fusion
    fuse_warps: int = 4
    int_div_above: int = 1 << 20  # larger maps take rows by integer division (see stats._row_col)
    # per-map kernels: "persistent" (persistent.py: a fixed number of programs over balanced ranges of maps,
    # the next map's loads in flight behind the current map's reductions) or "runs" (stats.py: one program
    # per (b, run of maps)). channels_last T and maps swept in chunks always take "runs".
    map_kernel: str = "persistent"
    # programs of a persistent launch (at most B * L): 0 = map_programs_per_sm per SM on a GPU, and B *
    # mask_runs elsewhere (the interpreter: per-batch-item pieces, so the bytes stay linear in B)
    map_programs: int = 0
    map_programs_per_sm: int = 1  # one 32-warp program of 64 registers a thread fills an SM's registers
    map_stages: int = 2  # num_stages of the persistent map loop: >= 2 prefetches the next map (cp.async)

    def __setattr__(self, name, value):
        # a stamp unique across instances: a plan made under one state of one instance is never served to
        # another state or instance (vars(t).update(saved) restores the saved state's stamp with it)
        object.__setattr__(self, name, value)
        object.__setattr__(self, "_stamp", next(_TUNING_STAMPS))


TUNING = Tuning()


# --------------------------------------------------------------------------------------------------
# Launch plumbing
# --------------------------------------------------------------------------------------------------
# triton.cdiv / next_power_of_2 are constexpr-function wrappers (microseconds a call on the host): the op
# bodies use these instead, with the same results
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _tuning_key() -> tuple:
    """The launch parameters' current values: part of every cached configuration's key, so that a change of
    TUNING (a sweep, a test) is never served a stale configuration."""
    return tuple(vars(TUNING).values())


def _launch(kernel, grid: tuple, *args, **meta) -> None:
    """Launches `kernel` on `grid` (the caller holds the device guard). tests/triton/test_traffic.py wraps
    this to attribute the interpreter's loads and stores to kernels."""
    if INTERPRET or not is_wrap_triton_enabled():  # eager: the kernel itself (no tracing wrapper per call)
        kernel[grid](*args, **meta)
    else:
        wrap_triton(kernel)[grid](*args, **meta)


_NO_GUARD = contextlib.nullcontext()
_CONTIGUOUS = torch.contiguous_format
_layout = functools.lru_cache(maxsize=256)(fusion_layout)  # a table built per call otherwise
_TABLE_APPLIED = False


def _apply_tuning_table(device: torch.device) -> None:
    """The tuning table's entry for this GPU model (tuning.py), once per process, on the first CUDA call."""
    global _TABLE_APPLIED
    _TABLE_APPLIED = True  # tried once: a bad table warns once, then the built-in parameters serve
    try:
        tuning.apply_for_device(TUNING, torch.cuda.get_device_name(device))
    except (OSError, ValueError) as exc:  # a DECAFA_TRITON_TUNING file that is missing or not a table
        settings.warn(f"Triton tuning table not applied: {exc}; using the built-in launch parameters")


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device for the launch (no switch,
    and no context manager of torch's, when it already is: the common case, a few microseconds a call)."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def _flat(t: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, batch stride, channel stride, pixel stride) of a (B, C, H, W) tensor whose pixel
    p = row*W + col sits at p * (pixel stride): contiguous, channels_last and expanded tensors are used in
    place, anything else is copied to contiguous. None gives (dummy, 0, 0, 0): never read."""
    if t is None:
        return dummy, 0, 0, 0
    strides = _flat_strides(t.shape, t.stride())
    if strides is not None:
        return (t, *strides)
    t = t.contiguous()
    return t, t.stride(0), t.stride(1), 1


def _coord_affine(n: int, normalized: bool) -> tuple[float, float]:
    """(scale, offset) mapping a pixel index 0..n-1 to the output coordinate; a one-pixel axis normalises
    to 0, its centre (as kornia)."""
    if not normalized:
        return 1.0, 0.0
    if n == 1:
        return 0.0, 0.0
    return 2.0 / (n - 1), -1.0


def _runs(l: int, want: int) -> tuple[int, int]:
    """(n_runs, run_len): L maps split into at most `want` runs of consecutive maps."""
    run_len = _cdiv(l, max(1, min(want, l)))
    return _cdiv(l, run_len), run_len


def _mask_runs(b: int, l: int, device: torch.device) -> tuple[int, int]:
    """(n_runs, run_len) of the per-map passes that write partial masks or read a shared grad M."""
    target = TUNING.map_min_programs
    if target < 0:
        target = _sm_count(device.index or 0) if device.type == "cuda" else 0
    return _runs(l, max(TUNING.mask_runs, _cdiv(target, max(b, 1))))


def _interleaved(t: tuple) -> bool:
    """The maps of a _flat tuple are interleaved pixel by pixel (channels_last with L > 1)."""
    _, _, s_l, s_p = t
    return s_p != 1 and s_l == 1


def _one_chunk(h: int, w: int, interleaved: bool) -> bool:
    """Whether the per-map kernels hold each map whole, one at a time (one read of T): its [H, W] tile (each
    rounded up to a power of 2) fits map_block_max, and, for interleaved maps, interleaved_whole_maps."""
    fits = _pow2(h) * _pow2(w) <= TUNING.map_block_max
    return fits and (TUNING.interleaved_whole_maps or not interleaved)


def _plain_runs(t: tuple, l: int, h: int, w: int) -> tuple[int, int]:
    """(n_runs, run_len) of a per-map pass with no partial mask or shared gradient: one map per program, or,
    for swept interleaved (channels_last) maps, rows of up to 32 consecutive maps."""
    interleaved = _interleaved(t)
    return _runs(l, l if _one_chunk(h, w, interleaved) or not interleaved else _cdiv(l, 32))


def _map_cfg(h: int, w: int, run_len: int, pixel_stride: int, interleaved: bool) -> dict:
    return _map_cfg_cached(h, w, run_len, pixel_stride, interleaved, _tuning_key())


@functools.lru_cache(maxsize=1024)
def _map_cfg_cached(h: int, w: int, run_len: int, pixel_stride: int, interleaved: bool, _key: tuple) -> dict:
    """Tile shape of the per-map kernels: a whole map (_one_chunk), else maps swept in pixel chunks, rows
    of up to 32 consecutive maps at a time for an interleaved (channels_last) layout. Whole interleaved maps
    take their pixel stride as a constant (T_PIX; one compilation per L)."""
    bh, bw = _pow2(h), _pow2(w)
    if _one_chunk(h, w, interleaved):
        cfg = dict(BLOCK_L=1, BLOCK_P=1, BLOCK_H=bh, BLOCK_W=bw, ONE_CHUNK=True, FULL=bh == h and bw == w,
                   INTERLEAVED=interleaved,
                   T_PIX=pixel_stride if interleaved else 0)
        elements = bh * bw
    else:
        block_l = min(_pow2(run_len), 32) if interleaved else 1
        block_p = max(16, min(_pow2(h * w), TUNING.map_chunk // block_l))
        cfg = dict(BLOCK_L=block_l, BLOCK_P=block_p, BLOCK_H=1, BLOCK_W=1, ONE_CHUNK=False, FULL=False,
                   INTERLEAVED=False,
                   T_PIX=0)
        elements = block_l * block_p
    return dict(cfg, PAIRWISE=INTERPRET, COLS_FIRST=cfg["INTERLEAVED"] and _TRITON < (3, 9),
                num_warps=max(4, min(TUNING.map_warps, elements // 512)))


def _wide(hw: int, pixel_stride: int) -> bool:
    """Whether pixel offsets within one map, (HW - 1) * stride, need 64 bits."""
    return (hw - 1) * abs(pixel_stride) >= 2**31


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _fuse_cfg(hw: int, ci: int, c: int, nb: int, device: torch.device, channels_last: bool) -> dict:
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 0
    return _fuse_cfg_cached(hw, ci, c, nb, sms, channels_last, _tuning_key())


@functools.lru_cache(maxsize=1024)
def _fuse_cfg_cached(hw: int, ci: int, c: int, nb: int, sms: int, channels_last: bool, _key: tuple) -> dict:
    """Block sizes of the per-(b, tile) kernels. Small launches get narrower pixel tiles so that every SM has
    work, and taller channel tiles by as much; channels_last tensors take all channels of a pixel at once
    (their contiguous axis) up to 64."""
    block_p = min(_pow2(hw), TUNING.fuse_block_p)
    target = TUNING.fuse_min_programs
    if target < 0:
        target = 4 * sms
    while block_p > 32 and nb * _cdiv(hw, block_p) < target:
        block_p //= 2
    grow = max(1, TUNING.fuse_block_p // block_p)
    block_c = TUNING.fuse_block_c * grow
    if channels_last:  # whole pixels (up to 64 channels) per step, the tile kept at block_p x block_c elements
        while block_c < 64 and block_p > 16:
            block_c, block_p = 2 * block_c, block_p // 2
    return dict(
        BLOCK_P=block_p,
        BLOCK_CI=min(_pow2(max(ci, 1)), block_c),
        BLOCK_C=min(_pow2(max(c, 1)), block_c),
        num_warps=TUNING.fuse_warps,
    )


def _persistent(t: tuple, h: int, w: int) -> bool:
    """Whether the per-map passes take the persistent kernels: TUNING.map_kernel, whole maps, T not
    interleaved (channels_last keeps the per-run kernels and their sector-sharing map order)."""
    return TUNING.map_kernel == "persistent" and not _interleaved(t) and _one_chunk(h, w, False)


def _map_programs(b: int, l: int, device: torch.device) -> int:
    """Programs of a persistent per-map launch over the B*L maps."""
    n = TUNING.map_programs
    if n <= 0:
        if device.type == "cuda":
            n = TUNING.map_programs_per_sm * _sm_count(device.index or 0)
        else:
            n = b * TUNING.mask_runs
    return max(1, min(n, b * l))


def _persistent_cfg(h: int, w: int) -> dict:
    return _persistent_cfg_cached(h, w, _tuning_key())


@functools.lru_cache(maxsize=256)
def _persistent_cfg_cached(h: int, w: int, _key: tuple) -> dict:
    bh, bw = _pow2(h), _pow2(w)
    return dict(BLOCK_H=bh, BLOCK_W=bw, FULL=bh == h and bw == w, STAGES=TUNING.map_stages, PAIRWISE=INTERPRET,
                num_warps=max(4, min(TUNING.map_warps, bh * bw // 512)))


def _persistent_plan(shape, t: tuple, device: torch.device, normalized: bool):
    """(n_progs, coordinate affines (xs, xo, ys, yo), constexprs) of a persistent per-map launch over logits
    of this shape, strides and device, or None when the per-run kernels take it (_persistent): cached, so a
    call computes none of it again."""
    try:
        return _persistent_plan_cached(*shape, *t[1:], device, normalized, _tuning_key())
    except TypeError:  # symbolic sizes while tracing: not cacheable
        return _persistent_plan_cached.__wrapped__(*shape, *t[1:], device, normalized, _tuning_key())


@functools.lru_cache(maxsize=1024)
def _persistent_plan_cached(b: int, l: int, h: int, w: int, s_tb: int, s_tl: int, s_tp: int, device: torch.device,
                            normalized: bool, _key: tuple):
    if not (b and _persistent((None, s_tb, s_tl, s_tp), h, w)):
        return None
    return (_map_programs(b, l, device), (*_coord_affine(w, normalized), *_coord_affine(h, normalized)),
            dict(PIX64=_wide(h * w, s_tp), **_persistent_cfg(h, w)))


def _flat_strides(shape, stride) -> tuple[int, int, int] | None:
    """(batch, channel, pixel) strides of a (B, C, H, W) tensor of this shape and strides whose pixel
    p = row*W + col sits at p * (pixel stride), or None when it is not pixel-flat (_flat copies it)."""
    _, _, h, w = shape
    sb, sc, sh, sw = stride
    if w == 1:
        return sb, sc, sh
    if h == 1 or sh == w * sw:
        return sb, sc, sw
    return None


# A launch spec: (persistent, kernel, grid, ints before beta, floats after beta, constexprs, part shape, parts).
# The op bodies pass the tensors and beta; everything else depends only on shapes, strides, device, flags and
# TUNING, so the planned op bodies cache it.
def _map_fwd_spec(shape, t_strides: tuple, device: torch.device, normalized: bool, want_z: bool, want_phi: bool,
                  want_mask: bool, has_beta_map: bool) -> tuple:
    """The per-map forward launch; its part (partial masks, float32) is (n_progs + B, H*W) from the persistent
    kernel, parts = (n_progs, True, L), or (B, n_runs, H*W) from the per-run one, parts = (n_runs, False, L)."""
    b, l, h, w = shape
    s_tb, s_tl, s_tp = t_strides
    t = (None, s_tb, s_tl, s_tp)
    flags = dict(HAS_BETA_MAP=has_beta_map, WRITE_Z=want_z, WRITE_PHI=want_phi, WRITE_PART=want_mask)
    plan = _persistent_plan(shape, t, device, normalized)
    if plan is not None:
        n_progs, affines, cfg = plan
        return (True, map_fwd_persistent_kernel, (n_progs,), (l, w, h * w, b * l, n_progs, s_tb, s_tl, s_tp),
                affines, dict(flags, **cfg), (n_progs + b, h * w) if want_mask else None, (n_progs, True, l))
    if want_mask:
        n_runs, run_len = _mask_runs(b, l, device)
    else:
        n_runs, run_len = _plain_runs(t, l, h, w)
    return (False, map_fwd_kernel, (b * n_runs,), (l, w, h * w, 1.0 / w, n_runs, run_len, s_tb, s_tl, s_tp),
            (*_coord_affine(w, normalized), *_coord_affine(h, normalized)),
            dict(flags, INT_DIV=h * w > TUNING.int_div_above, PIX64=_wide(h * w, s_tp),
                 **_map_cfg(h, w, run_len, s_tp, _interleaved(t))),
            (b, n_runs, h * w) if want_mask else None, (n_runs, False, l))


def _map_bwd_spec(shape, t_strides: tuple, device: torch.device, normalized: bool, g_strides: tuple | None,
                  g_per_map: bool, has_gz: bool, has_beta_map: bool) -> tuple:
    """The per-map backward launch; g_strides: (batch, map, pixel) strides of G, None without G."""
    b, l, h, w = shape
    s_tb, s_tl, s_tp = t_strides
    t = (None, s_tb, s_tl, s_tp)
    s_gb, s_gl, s_gp = g_strides if g_strides is not None else (0, 0, 0)
    g_ints = (s_gb, s_gl if g_per_map else 0, s_gp)
    flags = dict(HAS_BETA_MAP=has_beta_map, HAS_G=g_strides is not None, G_PER_MAP=g_per_map, HAS_GZ=has_gz)
    plan = _persistent_plan(shape, t, device, normalized)
    if plan is not None:
        n_progs, (xs, _, ys, _), cfg = plan
        return (True, map_bwd_persistent_kernel, (n_progs,),
                (l, w, h * w, b * l, n_progs, s_tb, s_tl, s_tp, *g_ints), (xs, ys), dict(flags, **cfg), None, None)
    if g_strides is not None and not g_per_map:  # read the shared G once per run
        n_runs, run_len = _mask_runs(b, l, device)
    else:
        n_runs, run_len = _plain_runs(t, l, h, w)
    return (False, map_bwd_kernel, (b * n_runs,),
            (l, w, h * w, 1.0 / w, n_runs, run_len, s_tb, s_tl, s_tp, *g_ints),
            (_coord_affine(w, normalized)[0], _coord_affine(h, normalized)[0]),
            dict(flags, INT_DIV=h * w > TUNING.int_div_above, PIX64=_wide(h * w, s_tp),
                 **_map_cfg(h, w, run_len, s_tp, _interleaved(t))),
            None, None)


def _launch_map(spec: tuple, tensors: tuple, beta: float) -> None:
    """A per-map launch of `spec` on `tensors` (the kernel's pointer arguments, in order). A persistent launch
    on a GPU with too little shared memory for the prefetched map (e.g. 100 KiB on sm_86 against 128 KiB for
    the float32 softmax backward) gets the kernel without prefetch instead."""
    persistent, kernel, grid, ints, floats, meta, _, _ = spec
    try:
        _launch(kernel, grid, *tensors, *ints, beta, *floats, **meta)
    except OutOfResources:
        if not persistent or meta.get("STAGES", 1) <= 1:
            raise
        _launch(kernel, grid, *tensors, *ints, beta, *floats, **dict(meta, STAGES=1))


def _mask_fuse_spec(parts: tuple, from_parts: bool, m_strides: tuple | None, i_shape_strides: tuple | None,
                    e_shape_strides: tuple | None, f_strides: tuple | None, write_mask: bool, b: int, hw: int,
                    mode: int, device: torch.device) -> tuple:
    """(grid, ints, constexprs) of mask_fuse_fwd_kernel: M from the partial masks (from_parts; parts =
    (n_runs, pieces, L), see _map_fwd_spec) or from a mask of strides m_strides (batch, -, pixel); I and E
    as (channels, flat strides) or None; F's flat strides or None."""
    n_runs, pieces, l = parts
    _, s_mb, _, s_mp = (None, *m_strides) if m_strides is not None else (None, 0, 0, 0)
    ci, (s_ib, s_ic, s_ip) = i_shape_strides or (0, (0, 0, 0))
    c, (s_eb, s_ec, s_ep) = e_shape_strides or (0, (0, 0, 0))
    s_fb, s_fc, s_fp = f_strides or (0, 0, 0)
    lay = _layout(mode, ci, c)
    cfg = _fuse_cfg(hw, ci, c, b, device, f_strides is not None and s_fc == 1 and s_fp != 1)
    n_tiles = _cdiv(hw, cfg["BLOCK_P"])
    return ((b * n_tiles,),
            (hw, ci, c, n_tiles, n_runs, b * l, l,
             s_mb, s_mp,
             s_ib, s_ic, s_ip,
             s_eb, s_ec, s_ep,
             s_fb, s_fc, s_fp,
             lay.image, lay.image_mask, lay.embedding, lay.embedding_mask),
            dict(MODE=mode, FROM_PARTS=from_parts, WRITE_MASK=write_mask, PIECES=pieces, **cfg))


def _run_mask_fuse(part, parts: tuple, m: tuple | None, i: tuple | None, e: tuple | None, fused, m_out,
                   b: int, hw: int, mode: int, device: torch.device) -> None:
    """mask_fuse_fwd_kernel: M from the partial masks (part given; parts = (n_runs, pieces, L), see
    _map_fwd_spec) or from m; writes m_out / fused if given."""
    dummy = part if part is not None else m[0]
    ff = _flat(fused, dummy)
    grid, ints, meta = _mask_fuse_spec(
        parts, part is not None, None if m is None else m[1:], None if i is None else (i[0].shape[1], i[1:]),
        None if e is None else (e[0].shape[1], e[1:]), None if fused is None else ff[1:], m_out is not None,
        b, hw, mode, device)
    _launch(mask_fuse_fwd_kernel, grid,
            part if part is not None else dummy, (m or (dummy,))[0], (i or (dummy,))[0], (e or (dummy,))[0], ff[0],
            m_out if m_out is not None else dummy, *ints, **meta)


def _fuse_bwd_spec(gf_strides: tuple, m_strides: tuple, i_strides: tuple, e_strides: tuple, ci: int, c: int,
                   b: int, hw: int, mode: int, device: torch.device) -> tuple:
    """(grid, ints, constexprs) of fuse_bwd_kernel, from the flat (batch, channel, pixel) strides."""
    s_mb, _, s_mp = m_strides
    s_ib, s_ic, s_ip = i_strides
    s_eb, s_ec, s_ep = e_strides
    s_fb, s_fc, s_fp = gf_strides
    lay = _layout(mode, ci, c)
    cfg = _fuse_cfg(hw, ci, c, b, device, s_fc == 1 and s_fp != 1)
    n_tiles = _cdiv(hw, cfg["BLOCK_P"])
    return ((b * n_tiles,),
            (hw, ci, c, n_tiles,
             s_mb, s_mp,
             s_ib, s_ic, s_ip,
             s_eb, s_ec, s_ep,
             s_fb, s_fc, s_fp,
             lay.image, lay.image_mask, lay.embedding, lay.embedding_mask),
            dict(MODE=mode, **cfg))


def _run_fuse_bwd(gf: tuple, m: tuple, i: tuple, e: tuple, gi, ge, gm, b: int, hw: int, mode: int) -> None:
    grid, ints, meta = _fuse_bwd_spec(gf[1:], m[1:], i[1:], e[1:], i[0].shape[1], e[0].shape[1], b, hw, mode,
                                      gf[0].device)
    _launch(fuse_bwd_kernel, grid, m[0], i[0], e[0], gf[0], gi, ge, gm, *ints, **meta)


# --------------------------------------------------------------------------------------------------
# Shared pieces of the op bodies
# --------------------------------------------------------------------------------------------------
def _new_stats(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((*logits.shape[:2], 2), dtype=torch.float32)


def _new_z(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((*logits.shape[:2], 2))


def _new_mask(logits: torch.Tensor) -> torch.Tensor:
    b, _, h, w = logits.shape
    return logits.new_empty((b, 1, h, w))


def _zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t, memory_format=_CONTIGUOUS)


def _empty(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of t's shape, dtype and device (empty_like: half the host time of new_empty)."""
    return torch.empty_like(t, memory_format=_CONTIGUOUS)


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _check_logits_and_beta(logits: torch.Tensor, beta_map: torch.Tensor | None) -> None:
    checks.logits(logits)
    checks.beta_map(beta_map, logits)
    if not _TABLE_APPLIED and logits.device.type == "cuda":  # before any launch parameter is read
        _apply_tuning_table(logits.device)


def _forward_maps(logits: torch.Tensor, beta: float, beta_map: torch.Tensor | None, normalized: bool,
                  want_z: bool, want_phi: bool, want_mask: bool):
    """(z, phi, part, parts, stats): the per-map pass (part and parts as _map_fwd_spec)."""
    b = logits.shape[0]
    t = _flat(logits, logits)
    spec = _map_fwd_spec(logits.shape, t[1:], logits.device, normalized, want_z, want_phi, want_mask,
                         beta_map is not None)
    stats = _new_stats(logits)
    z = _new_z(logits) if want_z else None
    phi = _empty(logits) if want_phi else None
    part = logits.new_empty(spec[6], dtype=torch.float32) if want_mask else None
    if b:
        tt = t[0]
        # absent outputs get the (read-only) logits or stats as a never-used pointer
        with _device_guard(logits):
            _launch_map(spec, (tt, stats if beta_map is None else beta_map.contiguous(), stats,
                               tt if z is None else z, tt if phi is None else phi, stats if part is None else part),
                        beta)
    return z, phi, part, spec[7], stats


def _backward_maps(logits: torch.Tensor, stats: torch.Tensor, beta: float, beta_map: torch.Tensor | None,
                   g: torch.Tensor | None, g_per_map: bool, grad_z: torch.Tensor | None, normalized: bool):
    """(grad_logits, grad_beta) from G (per map, or (B, 1, H, W) / (B, H*W) shared by the maps) and grad_z."""
    b, l, h, w = logits.shape
    gbeta = logits.new_empty((b, l), dtype=torch.float32)
    if g is None and grad_z is None:
        return _zeros(logits), gbeta.zero_()
    gt = _empty(logits)
    if not b:
        return gt, gbeta
    t = _flat(logits, logits)
    gp = None
    if g is not None:
        gp = _flat(g, logits) if g.dim() == 4 else (g, g.stride(0), 0, g.stride(1))
    spec = _map_bwd_spec(logits.shape, t[1:], logits.device, normalized, None if gp is None else gp[1:], g_per_map,
                         grad_z is not None, beta_map is not None)
    stats = stats.contiguous()
    with _device_guard(logits):
        _launch_map(spec, (t[0], stats if beta_map is None else beta_map.contiguous(), stats,
                           t[0] if gp is None else gp[0], stats if grad_z is None else grad_z.contiguous(), gt, gbeta),
                    beta)
    return gt, gbeta


def _check_grad_z(grad_z, logits: torch.Tensor) -> None:
    if grad_z is not None:
        checks.per_map("grad_z", grad_z, logits, 2)


_CHECKED: dict = {}


def _checked(checker, *args):
    """checker(*args) (the argument checks of an op, raising on a bad call), run once per combination of what
    it reads: each tensor's shape, dtype and device, the other arguments with their types. A combination
    seen before returns checker's result without running it again (a few microseconds an op call). A key
    that cannot be hashed (symbolic sizes while tracing) runs the checks every time."""
    key = (checker, *[(a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a) for a in args])
    try:
        return _CHECKED[key]
    except KeyError:
        pass
    except TypeError:
        return checker(*args)
    result = checker(*args)
    if len(_CHECKED) >= 4096:  # many shapes: start again rather than grow without bound
        _CHECKED.clear()
    _CHECKED[key] = result
    return result


def _check_maps_fwd(logits, beta_map) -> None:
    _check_logits_and_beta(logits, beta_map)


def _check_softmax_bwd(grad_phi, logits, stats, beta_map) -> None:
    _check_logits_and_beta(logits, beta_map)
    checks.stats(stats, logits)
    checks.companion("grad_phi", grad_phi, logits, "logits", channels=logits.shape[1], same_dtype=False)


def _check_landmark_bwd(grad_z, grad_mask, logits, stats, beta_map) -> None:
    _check_logits_and_beta(logits, beta_map)
    checks.stats(stats, logits)
    _check_grad_z(grad_z, logits)
    if grad_mask is not None:
        checks.companion("grad_mask", grad_mask, logits, "logits", channels=1, same_dtype=False)


def _check_fuse(image, embedding, mask, mode) -> int:
    checks.tensor("image", image, 4, "of shape (B, Ci, H, W)")
    return _check_fusion_inputs(image, embedding, mask, mode, image, "image")


def _check_fuse_bwd(grad_fused, image, embedding, mask, mode) -> int:
    mode = _check_fuse(image, embedding, mask, mode)
    checks.fused("grad_fused", grad_fused, image, _layout(mode, image.shape[1], embedding.shape[1]).channels)
    return mode


def _check_head(logits, image, embedding, mode, beta_map) -> int:
    _check_logits_and_beta(logits, beta_map)
    return _check_fusion_inputs(image, embedding, None, mode, logits, "logits")


def _check_head_bwd(grad_z, grad_fused, logits, image, embedding, mask, stats, mode, beta_map) -> int:
    _check_logits_and_beta(logits, beta_map)
    mode = _check_fusion_inputs(image, embedding, mask, mode, logits, "logits")
    checks.stats(stats, logits)
    _check_grad_z(grad_z, logits)
    if grad_fused is not None:
        checks.fused("grad_fused", grad_fused, image, _layout(mode, image.shape[1], embedding.shape[1]).channels)
    return mode


# --------------------------------------------------------------------------------------------------
# Planned op bodies: what a call computes besides its outputs' storage and the launches (argument checks,
# launch specs, output shapes, memory formats) depends only on the arguments' metadata and TUNING, so it is
# computed once per combination (a plan) and looked up by one key: a few microseconds an op call at small
# batch sizes. A combination the plans do not cover (B = 0, tensors to copy, absent gradients) or a key
# that cannot be hashed (symbolic sizes while tracing) takes the general path, which checks and computes
# everything per call.
# --------------------------------------------------------------------------------------------------
_PLANS: dict = {}
_F32 = torch.float32


def _planned(key: tuple, builder, *args):
    """builder(*args) (the plan of an op call, or None for the general path; raises on a bad call), once per
    key."""
    try:
        return _PLANS[key]
    except KeyError:
        pass
    except TypeError:
        return None
    plan = builder(*args)
    if len(_PLANS) >= 4096:  # many shapes: start again rather than grow without bound
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _plan_maps_fwd(logits, beta_map, normalized, want_z, want_phi, want_mask):
    """(map spec, (B, L, 2), part shape, mask_fuse spec, mask shape) of spatial_softmax, soft_argmax,
    attention_mask, landmark_attention."""
    _checked(_check_maps_fwd, logits, beta_map)
    b, l, h, w = logits.shape
    strides = _flat_strides(logits.shape, logits.stride())
    if not b or strides is None:
        return None
    spec = _map_fwd_spec(logits.shape, strides, logits.device, normalized, want_z, want_phi, want_mask,
                         beta_map is not None)
    fuse = None
    if want_mask:
        fuse = _mask_fuse_spec(spec[7], True, None, None, None, None, True, b, h * w, 0, logits.device)
    return spec, (b, l, 2), spec[6], fuse, (b, 1, h, w)


def _maps_fwd(name: str, logits, beta, beta_map, normalized, want_z, want_phi, want_mask):
    """(z, phi, M, stats) of a planned forward op (None where not wanted), or None: take the general path."""
    dtype, device = logits.dtype, logits.device
    plan = _planned((name, logits.shape, logits.stride(), dtype, device,
                     None if beta_map is None else (beta_map.shape, beta_map.dtype, beta_map.device), normalized,
                     TUNING._stamp),
                    _plan_maps_fwd, logits, beta_map, normalized, want_z, want_phi, want_mask)
    if plan is None:
        return None
    spec, n_shape, part_shape, fuse, m_shape = plan
    stats = torch.empty(*n_shape, dtype=_F32, device=device)
    z = torch.empty(*n_shape, dtype=dtype, device=device) if want_z else None
    phi = torch.empty_like(logits, memory_format=_CONTIGUOUS) if want_phi else None
    part = m = None
    if want_mask:
        part = torch.empty(*part_shape, dtype=_F32, device=device)
        m = torch.empty(*m_shape, dtype=dtype, device=device)
    with _device_guard(logits):
        _launch_map(spec, (logits, stats if beta_map is None else beta_map.contiguous(), stats,
                           logits if z is None else z, logits if phi is None else phi,
                           stats if part is None else part), beta)
        if want_mask:
            grid, ints, meta = fuse
            _launch(mask_fuse_fwd_kernel, grid, part, part, part, part, part, m, *ints, **meta)
    return z, phi, m, stats


def _plan_maps_bwd(g, g_per_map, grad_z, logits, stats, beta_map, normalized, checker, check_args):
    """(map spec) of spatial_softmax_backward, landmark_attention_backward."""
    checker(*check_args)
    strides = _flat_strides(logits.shape, logits.stride())
    g_strides = None if g is None else _flat_strides(g.shape, g.stride())
    if not logits.shape[0] or strides is None or (g is not None and g_strides is None) \
            or (g is None and grad_z is None):
        return None
    return _map_bwd_spec(logits.shape, strides, logits.device, normalized, g_strides, g_per_map, grad_z is not None,
                         beta_map is not None)


def _maps_bwd(spec, g, grad_z, logits, stats, beta, beta_map):
    gt = torch.empty_like(logits, memory_format=_CONTIGUOUS)
    shape = logits.shape
    gbeta = torch.empty(shape[0], shape[1], dtype=_F32, device=logits.device)
    stats = stats.contiguous()
    with _device_guard(logits):
        _launch_map(spec, (logits, stats if beta_map is None else beta_map.contiguous(), stats,
                           logits if g is None else g, stats if grad_z is None else grad_z.contiguous(), gt, gbeta),
                    beta)
    return gt, gbeta


def _meta(t):
    """The key of an optional tensor whose strides do not matter (made contiguous where read)."""
    return None if t is None else (t.shape, t.dtype, t.device)


def _plan_fuse(image, embedding, mask, mode):
    """(fused shape, memory format, mask_fuse spec) of fuse."""
    mode = _checked(_check_fuse, image, embedding, mask, mode)
    b, ci, h, w = image.shape
    c = embedding.shape[1]
    i_s, e_s, m_s = (_flat_strides(t.shape, t.stride()) for t in (image, embedding, mask))
    if not (b and h * w) or i_s is None or e_s is None or m_s is None:
        return None
    f_shape, fmt, f_s = _fused_out(b, mode, ci, c, h, w, embedding)
    return f_shape, fmt, _mask_fuse_spec((0, False, 1), False, m_s, (ci, i_s), (c, e_s), f_s, False, b, h * w, mode,
                                         image.device)


def _fused_out(b, mode, ci, c, h, w, embedding):
    """(shape, memory format, flat strides) of F<mode>."""
    ch = _layout(mode, ci, c).channels
    fmt = fused_memory_format(embedding)
    if fmt == torch.channels_last:
        return (b, ch, h, w), fmt, (h * w * ch, 1, ch)
    return (b, ch, h, w), fmt, (ch * h * w, h * w, 1)


def _plan_fuse_bwd(grad_fused, image, embedding, mask, mode):
    """(mode, fuse_bwd spec) of fuse_backward."""
    mode = _checked(_check_fuse_bwd, grad_fused, image, embedding, mask, mode)
    b, ci, h, w = image.shape
    s = [_flat_strides(t.shape, t.stride()) for t in (grad_fused, mask, image, embedding)]
    if not (b and h * w) or None in s:
        return None
    return mode, _fuse_bwd_spec(*s, ci, embedding.shape[1], b, h * w, mode, image.device)


def _plan_head(logits, image, embedding, mode, beta_map, normalized):
    """(map spec, (B, L, 2), part shape, mask shape, fused shape, memory format, mask_fuse spec) of
    decafa_head."""
    mode = _checked(_check_head, logits, image, embedding, mode, beta_map)
    b, l, h, w = logits.shape
    ci, c = image.shape[1], embedding.shape[1]
    t_s, i_s, e_s = (_flat_strides(t.shape, t.stride()) for t in (logits, image, embedding))
    if not b or t_s is None or i_s is None or e_s is None:
        return None
    spec = _map_fwd_spec(logits.shape, t_s, logits.device, normalized, True, False, True, beta_map is not None)
    f_shape, fmt, f_s = _fused_out(b, mode, ci, c, h, w, embedding)
    fuse = _mask_fuse_spec(spec[7], True, None, (ci, i_s), (c, e_s), f_s, True, b, h * w, mode, logits.device)
    return spec, (b, l, 2), spec[6], (b, 1, h, w), f_shape, fmt, fuse


def _plan_head_bwd(grad_z, grad_fused, logits, image, embedding, mask, stats, mode, beta_map, normalized):
    """(mode, fuse_bwd spec, map bwd spec) of decafa_head_backward."""
    mode = _checked(_check_head_bwd, grad_z, grad_fused, logits, image, embedding, mask, stats, mode, beta_map)
    b, _, h, w = logits.shape
    ci, c = image.shape[1], embedding.shape[1]
    if grad_fused is None or not b or (mode == 1 and grad_z is None):
        return None
    s = [_flat_strides(t.shape, t.stride()) for t in (grad_fused, mask, image, embedding, logits)]
    if None in s:
        return None
    hw = h * w
    fuse = _fuse_bwd_spec(*s[:4], ci, c, b, hw, mode, logits.device)
    # grad M (B, H*W) float32, shared by the maps; F1 = E has no masked segment: nothing reaches T through M
    maps = _map_bwd_spec(logits.shape, s[4], logits.device, normalized, (hw, 0, 1) if mode >= 2 else None, False,
                         grad_z is not None, beta_map is not None)
    return mode, fuse, maps


# --------------------------------------------------------------------------------------------------
# The ops (argument names, order and types exactly as decafa_fast.contract.schemas.SCHEMAS)
# --------------------------------------------------------------------------------------------------
def spatial_softmax(
    logits: torch.Tensor, beta: float, beta_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (Phi (B, L, H, W) contiguous, stats (B, L, 2) float32)."""
    out = _maps_fwd("spatial_softmax", logits, beta, beta_map, False, False, True, False)
    if out is not None:
        return out[1], out[3]
    _checked(_check_maps_fwd, logits, beta_map)
    _, phi, _, _, stats = _forward_maps(logits, beta, beta_map, False, False, True, False)
    return phi, stats


def spatial_softmax_backward(
    grad_phi: torch.Tensor, logits: torch.Tensor, stats: torch.Tensor, beta: float, beta_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logits (B, L, H, W), grad_beta (B, L) float32)."""
    spec = _planned(("spatial_softmax_backward", grad_phi.shape, grad_phi.stride(), grad_phi.dtype, grad_phi.device,
                     logits.shape, logits.stride(), logits.dtype, logits.device, _meta(stats), _meta(beta_map),
                     TUNING._stamp),
                    _plan_maps_bwd, grad_phi, True, None, logits, stats, beta_map, False, _checked,
                    (_check_softmax_bwd, grad_phi, logits, stats, beta_map))
    if spec is not None:
        return _maps_bwd(spec, grad_phi, None, logits, stats, beta, beta_map)
    _checked(_check_softmax_bwd, grad_phi, logits, stats, beta_map)
    return _backward_maps(logits, stats, beta, beta_map, grad_phi, True, None, False)


def soft_argmax(
    logits: torch.Tensor, beta: float, beta_map: torch.Tensor | None, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (z (B, L, 2) as (x, y), stats (B, L, 2))."""
    out = _maps_fwd("soft_argmax", logits, beta, beta_map, normalized, True, False, False)
    if out is not None:
        return out[0], out[3]
    _checked(_check_maps_fwd, logits, beta_map)
    z, _, _, _, stats = _forward_maps(logits, beta, beta_map, normalized, True, False, False)
    return z, stats


def _mask_from_parts(logits: torch.Tensor, part: torch.Tensor, parts: tuple) -> torch.Tensor:
    m = _new_mask(logits)
    b, _, h, w = logits.shape
    if b:
        with _device_guard(logits):
            _run_mask_fuse(part, parts, None, None, None, None, m, b, h * w, 0, logits.device)
    return m


def attention_mask(
    logits: torch.Tensor, beta: float, beta_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (M (B, 1, H, W) = sum_l Phi_l, stats (B, L, 2))."""
    out = _maps_fwd("attention_mask", logits, beta, beta_map, False, False, False, True)
    if out is not None:
        return out[2], out[3]
    _checked(_check_maps_fwd, logits, beta_map)
    _, _, part, parts, stats = _forward_maps(logits, beta, beta_map, False, False, False, True)
    return _mask_from_parts(logits, part, parts), stats


def landmark_attention(
    logits: torch.Tensor, beta: float, beta_map: torch.Tensor | None, normalized: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (B, L, H, W) -> (z (B, L, 2), M (B, 1, H, W), stats (B, L, 2))."""
    out = _maps_fwd("landmark_attention", logits, beta, beta_map, normalized, True, False, True)
    if out is not None:
        return out[0], out[2], out[3]
    _checked(_check_maps_fwd, logits, beta_map)
    z, _, part, parts, stats = _forward_maps(logits, beta, beta_map, normalized, True, False, True)
    return z, _mask_from_parts(logits, part, parts), stats


def landmark_attention_backward(
    grad_z: torch.Tensor | None,
    grad_mask: torch.Tensor | None,
    logits: torch.Tensor,
    stats: torch.Tensor,
    beta: float,
    beta_map: torch.Tensor | None,
    normalized: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_logits, grad_beta) from grad_z (B, L, 2) and grad_mask (B, 1, H, W); None counts as zero."""
    spec = _planned(("landmark_attention_backward", _meta(grad_z),
                     None if grad_mask is None else (grad_mask.shape, grad_mask.stride(), grad_mask.dtype,
                                                     grad_mask.device),
                     logits.shape, logits.stride(), logits.dtype, logits.device, _meta(stats), _meta(beta_map),
                     normalized, TUNING._stamp),
                    _plan_maps_bwd, grad_mask, False, grad_z, logits, stats, beta_map, normalized, _checked,
                    (_check_landmark_bwd, grad_z, grad_mask, logits, stats, beta_map))
    if spec is not None:
        return _maps_bwd(spec, grad_mask, grad_z, logits, stats, beta, beta_map)
    _checked(_check_landmark_bwd, grad_z, grad_mask, logits, stats, beta_map)
    return _backward_maps(logits, stats, beta, beta_map, grad_mask, False, grad_z, normalized)


def _check_fusion_inputs(image, embedding, mask, mode_, ref: torch.Tensor, ref_name: str) -> int:
    if not _TABLE_APPLIED and ref.device.type == "cuda":
        _apply_tuning_table(ref.device)
    mode_ = checks.mode(mode_)
    checks.companion("image", image, ref, ref_name)
    checks.device("image", image)
    checks.companion("embedding", embedding, ref, ref_name)
    if mask is not None:
        checks.companion("mask", mask, ref, ref_name, channels=1, same_dtype=False)
    return mode_


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: int) -> torch.Tensor:
    """image (B, Ci, H, W), embedding (B, C, H, W), mask (B, 1, H, W) -> F<mode> in E's memory format."""
    device = image.device
    plan = _planned(("fuse", image.shape, image.stride(), image.dtype, device, embedding.shape, embedding.stride(),
                     embedding.dtype, embedding.device, mask.shape, mask.stride(), mask.dtype, mask.device,
                     type(mode), mode, TUNING._stamp),
                    _plan_fuse, image, embedding, mask, mode)
    if plan is not None:
        f_shape, fmt, (grid, ints, meta) = plan
        fused = torch.empty(*f_shape, dtype=image.dtype, device=device, memory_format=fmt)
        with _device_guard(image):
            _launch(mask_fuse_fwd_kernel, grid, mask, mask, image, embedding, fused, mask, *ints, **meta)
        return fused
    mode = _checked(_check_fuse, image, embedding, mask, mode)
    b, ci, h, w = image.shape
    fused = torch.empty((b, _layout(mode, ci, embedding.shape[1]).channels, h, w), dtype=image.dtype,
                        device=image.device, memory_format=fused_memory_format(embedding))
    if b and h * w:  # no pixels: an empty fusion
        with _device_guard(image):
            _run_mask_fuse(None, (0, False, 1), _flat(mask, image), _flat(image, image), _flat(embedding, image),
                           fused, None, b, h * w, mode, image.device)
    return fused


def _fuse_grads(grad_fused: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor,
                mode: int, gm: torch.Tensor):
    """gI, gE (contiguous; zeros where F<mode> lacks the segment) and gM written into `gm` (zeros for F1)."""
    b, _, h, w = image.shape
    gi = _empty(image) if mode >= 2 else _zeros(image)
    ge = _empty(embedding) if mode == 1 or mode >= 4 else _zeros(embedding)
    if mode == 1:
        gm.zero_()
    if b and h * w:
        with _device_guard(image):
            _run_fuse_bwd(_flat(grad_fused, image), _flat(mask, image), _flat(image, image), _flat(embedding, image),
                          gi, ge, gm, b, h * w, mode)
    return gi, ge


def fuse_backward(
    grad_fused: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_image, grad_embedding, grad_mask (B, 1, H, W) in the mask dtype), all contiguous."""
    plan = _planned(("fuse_backward", grad_fused.shape, grad_fused.stride(), grad_fused.dtype, grad_fused.device,
                     image.shape, image.stride(), image.dtype, image.device, embedding.shape, embedding.stride(),
                     embedding.dtype, embedding.device, mask.shape, mask.stride(), mask.dtype, mask.device,
                     type(mode), mode, TUNING._stamp),
                    _plan_fuse_bwd, grad_fused, image, embedding, mask, mode)
    if plan is not None:
        mode, (grid, ints, meta) = plan
        gm = _empty(mask)
        gi = _empty(image) if mode >= 2 else _zeros(image)
        ge = _empty(embedding) if mode == 1 or mode >= 4 else _zeros(embedding)
        if mode == 1:
            gm.zero_()
        with _device_guard(image):
            _launch(fuse_bwd_kernel, grid, mask, image, embedding, grad_fused, gi, ge, gm, *ints, **meta)
        return gi, ge, gm
    mode = _checked(_check_fuse_bwd, grad_fused, image, embedding, mask, mode)
    gm = _empty(mask)
    gi, ge = _fuse_grads(grad_fused, image, embedding, mask, mode, gm)
    return gi, ge, gm


def decafa_head(
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mode: int,
    beta: float,
    beta_map: torch.Tensor | None,
    normalized: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z (B, L, 2), F<mode> (B, channels, H, W) in E's memory format, M (B, 1, H, W), stats (B, L, 2)).

    Two launches: map_fwd_kernel reads T once (stats, z, partial masks per run of maps), then
    mask_fuse_fwd_kernel sums the partials in a fixed order, writes M and reads I, E once to write F."""
    dtype, device = logits.dtype, logits.device
    plan = _planned(("decafa_head", logits.shape, logits.stride(), dtype, device, image.shape, image.stride(),
                     image.dtype, image.device, embedding.shape, embedding.stride(), embedding.dtype, embedding.device,
                     _meta(beta_map), type(mode), mode, normalized, TUNING._stamp),
                    _plan_head, logits, image, embedding, mode, beta_map, normalized)
    if plan is not None:
        spec, n_shape, part_shape, m_shape, f_shape, fmt, (grid, ints, meta) = plan
        stats = torch.empty(*n_shape, dtype=_F32, device=device)
        z = torch.empty(*n_shape, dtype=dtype, device=device)
        part = torch.empty(*part_shape, dtype=_F32, device=device)
        m = torch.empty(*m_shape, dtype=dtype, device=device)
        fused = torch.empty(*f_shape, dtype=dtype, device=device, memory_format=fmt)
        with _device_guard(logits):
            _launch_map(spec, (logits, stats if beta_map is None else beta_map.contiguous(), stats, z, logits, part),
                        beta)
            _launch(mask_fuse_fwd_kernel, grid, part, part, image, embedding, fused, m, *ints, **meta)
        return z, fused, m, stats
    mode = _checked(_check_head, logits, image, embedding, mode, beta_map)
    b, _, h, w = logits.shape
    z, _, part, parts, stats = _forward_maps(logits, beta, beta_map, normalized, True, False, True)
    m = _new_mask(logits)
    fused = torch.empty((b, _layout(mode, image.shape[1], embedding.shape[1]).channels, h, w),
                        dtype=logits.dtype, device=logits.device, memory_format=fused_memory_format(embedding))
    if b:
        with _device_guard(logits):
            _run_mask_fuse(part, parts, None, _flat(image, logits), _flat(embedding, logits), fused, m, b, h * w,
                           mode, logits.device)
    return z, fused, m, stats


def decafa_head_backward(
    grad_z: torch.Tensor | None,
    grad_fused: torch.Tensor | None,
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mask: torch.Tensor,
    stats: torch.Tensor,
    mode: int,
    beta: float,
    beta_map: torch.Tensor | None,
    normalized: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_logits, grad_image, grad_embedding, grad_beta). A pixel-tiled pass over grad F, I, E and the
    saved M gives grad I, grad E and a float32 grad M; a per-map pass over T (grad M read once per run of
    maps) gives grad T and grad beta. T is not read for M."""
    shape, device = logits.shape, logits.device
    plan = _planned(("decafa_head_backward",
                     None if grad_z is None else (grad_z.shape, grad_z.dtype, grad_z.device),
                     None if grad_fused is None else (grad_fused.shape, grad_fused.stride(), grad_fused.dtype,
                                                      grad_fused.device),
                     shape, logits.stride(), logits.dtype, device, image.shape, image.stride(),
                     image.dtype, image.device, embedding.shape, embedding.stride(), embedding.dtype, embedding.device,
                     mask.shape, mask.stride(), mask.dtype, mask.device, stats.shape, stats.dtype, stats.device,
                     None if beta_map is None else (beta_map.shape, beta_map.dtype, beta_map.device), type(mode),
                     mode, normalized, TUNING._stamp),
                    _plan_head_bwd, grad_z, grad_fused, logits, image, embedding, mask, stats, mode, beta_map,
                    normalized)
    if plan is not None:
        mode, (grid, ints, meta), spec = plan
        gm = torch.empty(shape[0], shape[2] * shape[3], dtype=_F32, device=device)
        gi = torch.empty_like(image, memory_format=_CONTIGUOUS) if mode >= 2 else _zeros(image)
        ge = torch.empty_like(embedding, memory_format=_CONTIGUOUS) if mode == 1 or mode >= 4 else _zeros(embedding)
        if mode == 1:
            gm.zero_()
        gt = torch.empty_like(logits, memory_format=_CONTIGUOUS)
        gbeta = torch.empty(shape[0], shape[1], dtype=_F32, device=device)
        stats = stats.contiguous()
        with _device_guard(logits):
            _launch(fuse_bwd_kernel, grid, mask, image, embedding, grad_fused, gi, ge, gm, *ints, **meta)
            _launch_map(spec, (logits, stats if beta_map is None else beta_map.contiguous(), stats,
                               gm if mode >= 2 else logits, stats if grad_z is None else grad_z.contiguous(), gt,
                               gbeta), beta)
        return gt, gi, ge, gbeta
    mode = _checked(_check_head_bwd, grad_z, grad_fused, logits, image, embedding, mask, stats, mode, beta_map)
    b, _, h, w = logits.shape
    if grad_fused is None:
        gt, gbeta = _backward_maps(logits, stats, beta, beta_map, None, False, grad_z, normalized)
        return gt, _zeros(image), _zeros(embedding), gbeta
    gm = logits.new_empty((b, h * w), dtype=torch.float32)
    gi, ge = _fuse_grads(grad_fused, image, embedding, mask, mode, gm)
    # F1 = E has no masked segment: nothing reaches the logits through M
    gt, gbeta = _backward_maps(logits, stats, beta, beta_map, gm if mode >= 2 else None, False, grad_z, normalized)
    return gt, gi, ge, gbeta


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------
def _bodies() -> dict:
    """The body of each op of the table: the function of this module named after it."""
    from ..contract.table import OPS

    missing = [op.name for op in OPS if not callable(globals().get(op.name))]
    if missing:
        raise RuntimeError(f"decafa_triton has no body for {missing}: define a function of that name here")
    return {op.name: globals()[op.name] for op in OPS}


IMPLS = _bodies()


def _register() -> dict:
    from ..contract.fakes import FAKES
    from ..contract.schemas import SCHEMAS

    ops = {}
    for name, fn in IMPLS.items():
        qualname = f"decafa_triton::{name}"
        if INTERPRET:
            op = torch.library.custom_op(qualname, fn, mutates_args=(), schema=SCHEMAS[name])
        else:  # schema inferred from the type hints: test_triton_contract checks it against SCHEMAS
            op = torch.library.triton_op(qualname, fn, mutates_args=())
        op.register_fake(FAKES[name])
        ops[name] = op
    return ops


OPS = _register()
