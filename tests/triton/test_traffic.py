"""Global-memory traffic of the Triton head, counted under the interpreter (no GPU needed).

Every masked tl.load / tl.store of every kernel launched by a call is intercepted in Triton's interpreter
(InterpreterBuilder.create_masked_load / create_masked_store; unmasked ones go through them too) and its
active lanes are counted: bytes = active lanes x element size. Kernels are told apart by wrapping
decafa_fast.triton.ops._launch. The floor is the bytes that must move:
    forward            read T, I, E once; write z, F once
    forward + backward the forward floor + read grad F, grad z, T, I, E and the saved M and stats once;
                       write grad T, grad I, grad E once
Shape: the paper's (L = 98, 128 x 128, C = 64, Ci = 1, F5) at B = 1. Every kernel's traffic is a sum of
per-batch-item terms (test_traffic_is_linear_in_b checks it on a small shape), so the ratios are those of
any B, B = 64 included. bench/RESULTS.md quotes the numbers this prints (pytest -s).

The same hook checks 64-bit addressing (test_offsets_are_64_bit): with the wide path forced, every pointer
offset a kernel computes is int64.
"""
import collections
import contextlib
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

tops = pytest.importorskip("decafa_fast.triton.ops")
if not tops.INTERPRET:
    pytest.skip("the traffic counter hooks Triton's interpreter (TRITON_INTERPRET=1)", allow_module_level=True)
from triton.runtime import interpreter  # noqa: E402

from decafa_fast.triton.probe import interpreter_bfloat16_problem  # noqa: E402

NS = torch.ops.decafa_triton
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
FWD_LIMIT, TOTAL_LIMIT = 1.10, 1.15


class Traffic:
    """Bytes loaded and stored per kernel name, and the int32 pointer offsets seen."""

    def __init__(self):
        self.loads = collections.Counter()
        self.stores = collections.Counter()
        self.narrow_offsets = []
        self.kernel = "?"

    def total(self, kernels=None):
        names = set(self.loads) | set(self.stores) if kernels is None else kernels
        return sum(self.loads[k] + self.stores[k] for k in names)


@contextlib.contextmanager
def counting():
    builder = type(interpreter.interpreter_builder)
    orig_load, orig_store, orig_addptr = builder.create_masked_load, builder.create_masked_store, builder.create_addptr
    orig_launch = tops._launch
    traffic = Traffic()

    def nbytes(ptrs, mask):
        lanes = np.count_nonzero(np.broadcast_to(mask.data, ptrs.data.shape))
        return int(lanes) * max(1, ptrs.get_element_ty().primitive_bitwidth // 8)

    def load(self, ptrs, mask, other, *args, **kwargs):
        traffic.loads[traffic.kernel] += nbytes(ptrs, mask)
        return orig_load(self, ptrs, mask, other, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        traffic.stores[traffic.kernel] += nbytes(ptrs, mask)
        return orig_store(self, ptrs, value, mask, *args, **kwargs)

    def addptr(self, ptr, offset):
        if offset.data.dtype != np.int64 and np.unique(offset.data).size > 1:
            traffic.narrow_offsets.append((traffic.kernel, str(offset.data.dtype), offset.data.shape))
        return orig_addptr(self, ptr, offset)

    def launch(kernel, grid, *args, **meta):
        traffic.kernel = getattr(kernel, "__name__", None) or kernel.fn.__name__
        try:
            return orig_launch(kernel, grid, *args, **meta)
        finally:
            traffic.kernel = "?"

    builder.create_masked_load, builder.create_masked_store, builder.create_addptr = load, store, addptr
    tops._launch = launch
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store, builder.create_addptr = (
            orig_load, orig_store, orig_addptr)
        tops._launch = orig_launch


def _dtype_for(requested):
    """bfloat16 where the interpreter has it; float16 (same bytes per element) where it does not."""
    if requested == torch.bfloat16:
        problem = interpreter_bfloat16_problem()
        if problem is not None:
            print(f"counting float16 instead of bfloat16 (same element size): {problem}")
            return torch.float16
    return requested


@pytest.fixture(autouse=True)
def big_pixel_tiles(monkeypatch):
    """Fewer, larger pixel tiles: the interpreter runs programs one after another, and the bytes do not depend
    on the tiling (each active lane is counted once whatever the tile). The runs of maps, which do change the
    bytes (partial masks), keep their default."""
    monkeypatch.setattr(tops.TUNING, "fuse_block_p", 4096)
    monkeypatch.setattr(tops.TUNING, "fuse_block_c", 16)


def _head_traffic(b, l, h, w, ci, c, mode, dtype, channels_last=False):
    """(forward Traffic, backward Traffic, floors dict) of one decafa_head call and its backward."""
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t, i, e = (torch.randn(s, generator=g).to(dtype).contiguous(memory_format=fmt)
               for s in ((b, l, h, w), (b, ci, h, w), (b, c, h, w)))
    with counting() as fwd:
        z, f, m, stats = NS.decafa_head(t, i, e, mode, 1.0, None, False)
    gz = torch.randn(z.shape, generator=g).to(dtype)
    gf = torch.randn(f.shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    with counting() as bwd:
        NS.decafa_head_backward(gz, gf, t, i, e, m, stats, mode, 1.0, None, False)
    size = t.element_size()
    fwd_floor = size * (t.numel() + i.numel() + e.numel() + z.numel() + f.numel())
    bwd_floor = size * (gf.numel() + gz.numel() + t.numel() + i.numel() + e.numel() + m.numel()  # reads
                        + t.numel() + i.numel() + e.numel()) + stats.numel() * stats.element_size()  # writes
    return fwd, bwd, dict(forward=fwd_floor, total=fwd_floor + bwd_floor)


def _report(dtype, fwd, bwd, floors):
    lines = [f"{dtype}: B = 1, L = 98, 128 x 128, Ci = 1, C = 64, F5 (bytes per batch item)"]
    for label, traffic in (("forward", fwd), ("backward", bwd)):
        for k in sorted(set(traffic.loads) | set(traffic.stores)):
            lines.append(f"  {label:8} {k:22} loads {traffic.loads[k]:>11,}  stores {traffic.stores[k]:>11,}")
    lines.append(f"  forward {fwd.total():,} / floor {floors['forward']:,} = {fwd.total() / floors['forward']:.4f}")
    both = fwd.total() + bwd.total()
    lines.append(f"  forward+backward {both:,} / floor {floors['total']:,} = {both / floors['total']:.4f}")
    print("\n".join(lines))


MAP_KERNELS = {"persistent": ("map_fwd_persistent_kernel", "map_bwd_persistent_kernel"),
               "runs": ("map_fwd_kernel", "map_bwd_kernel")}


@pytest.mark.slow
@pytest.mark.parametrize("map_kernel", list(MAP_KERNELS))
@pytest.mark.parametrize("requested", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_head_traffic_at_the_paper_shape(monkeypatch, requested, map_kernel):
    """Both per-map kernel families (TUNING.map_kernel) at the paper shape; the persistent one with its
    interpreter default of B * mask_runs programs (4 pieces per batch item, as the 4 runs)."""
    monkeypatch.setattr(tops.TUNING, "map_kernel", map_kernel)
    fwd_name, bwd_name = MAP_KERNELS[map_kernel]
    dtype = _dtype_for(requested)
    fwd, bwd, floors = _head_traffic(1, 98, 128, 128, 1, 64, 5, dtype)
    _report(dtype, fwd, bwd, floors)
    assert set(fwd.loads) == {fwd_name, "mask_fuse_fwd_kernel"}, "forward: two kernels"
    assert set(bwd.loads) == {"fuse_bwd_kernel", bwd_name}, "backward: two kernels"
    size = torch.empty(0, dtype=dtype).element_size()
    t_bytes = 98 * 128 * 128 * size
    # T is read exactly once in the forward (by the per-map kernel) and once in the backward
    assert fwd.loads[fwd_name] < t_bytes * 1.001
    assert fwd.loads["mask_fuse_fwd_kernel"] < (4 * 98 * 2 + 65 * size) * 128 * 128  # partials, I and E
    assert bwd.loads[bwd_name] < t_bytes + 4 * 4 * 128 * 128 + 4096  # T once, grad M once per run / piece
    assert fwd.total() <= FWD_LIMIT * floors["forward"]
    assert fwd.total() + bwd.total() <= TOTAL_LIMIT * floors["total"]


@pytest.mark.slow
@pytest.mark.parametrize("requested", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_channels_last_head_traffic_at_the_paper_shape(requested):
    """channels_last T, I, E at the paper shape: every kernel loads and stores exactly the bytes of the NCHW
    call (T read once per pass, whole maps; I, E, F in place), so the same floor limits hold."""
    dtype = _dtype_for(requested)
    fwd, bwd, floors = _head_traffic(1, 98, 128, 128, 1, 64, 5, dtype, channels_last=True)
    _report(dtype, fwd, bwd, floors)
    tops.TUNING.map_kernel = "runs"  # channels_last T takes the per-run kernels: compare with the same
    try:
        nchw_fwd, nchw_bwd, nchw_floors = _head_traffic(1, 98, 128, 128, 1, 64, 5, dtype)
    finally:
        tops.TUNING.map_kernel = "persistent"
    assert floors == nchw_floors
    for traffic, nchw in ((fwd, nchw_fwd), (bwd, nchw_bwd)):
        assert traffic.loads == nchw.loads and traffic.stores == nchw.stores
    assert fwd.total() <= FWD_LIMIT * floors["forward"]
    assert fwd.total() + bwd.total() <= TOTAL_LIMIT * floors["total"]


def test_offsets_are_64_bit(monkeypatch):
    """Every pointer offset is int64, except the pixel offsets inside one map, which stay int32 only while
    (H*W - 1) * pixel stride < 2**31 (ops._wide; then no product can wrap): forcing the wide path leaves no
    int32 offset in any kernel (issue 12 item 10)."""
    assert not tops._wide(128 * 128, 1) and not tops._wide(2**31 // 98, 98)
    assert tops._wide(2**31 // 98 + 2, 98) and tops._wide(2**31 + 1, 1)
    monkeypatch.setattr(tops, "_wide", lambda hw, stride: True)
    for map_kernel, channels_last in (("persistent", False), ("runs", False), ("persistent", True)):
        monkeypatch.setattr(tops.TUNING, "map_kernel", map_kernel)
        fwd, bwd, _ = _head_traffic(2, 5, 8, 8, 1, 3, 5, torch.float32, channels_last=channels_last)
        assert not fwd.narrow_offsets and not bwd.narrow_offsets, (fwd.narrow_offsets, bwd.narrow_offsets)


@pytest.mark.parametrize("map_kernel", list(MAP_KERNELS))
def test_traffic_is_linear_in_b(monkeypatch, map_kernel):
    """Every kernel's bytes are a per-batch-item sum: B = 2 moves exactly twice the bytes of B = 1, so the
    ratios above hold at any B (the persistent kernels with their interpreter default, B * mask_runs
    programs)."""
    monkeypatch.setattr(tops.TUNING, "map_kernel", map_kernel)
    one = _head_traffic(1, 7, 16, 16, 1, 8, 5, torch.float32)
    two = _head_traffic(2, 7, 16, 16, 1, 8, 5, torch.float32)
    for a, b in zip(one[:2], two[:2]):
        assert {k: 2 * v for k, v in a.loads.items()} == dict(b.loads)
        assert {k: 2 * v for k, v in a.stores.items()} == dict(b.stores)


@pytest.mark.parametrize("whole_maps", [True, False], ids=["whole_maps", "swept"])
def test_channels_last_traffic(monkeypatch, whole_maps):
    """channels_last T and E are read in place (no copy kernel, no torch copy of T or E). Whole maps (the
    default) read T once per pass; with TUNING.interleaved_whole_maps off, rows of maps are swept twice."""
    monkeypatch.setattr(tops.TUNING, "interleaved_whole_maps", whole_maps)
    fwd, bwd, floors = _head_traffic(1, 16, 32, 32, 1, 8, 5, torch.float32, channels_last=True)
    assert "map_fwd_kernel" in fwd.loads and "map_bwd_kernel" in bwd.loads  # the per-run kernels
    t_bytes = 16 * 32 * 32 * 4
    reads = 1 if whole_maps else 2
    assert reads * t_bytes <= fwd.loads["map_fwd_kernel"] <= reads * t_bytes * 1.001
    assert reads * t_bytes <= bwd.loads["map_bwd_kernel"] <= reads * t_bytes + 2 * 4 * 32 * 32 * 4 + 4096
