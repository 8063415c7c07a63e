"""The CPU kernels' output cache (csrc/cpu/output_cache.h, decafa_fast.ops.cpu_cache): a large output reuses
the block a freed one left, the limit bounds what is held, empty() gives it back, the profiler still sees the
allocations, and DECAFA_CPU_CACHE_MB configures it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from decafa_fast import ops, reference
from decafa_fast.ops import cpu_cache

pytestmark = pytest.mark.skipif(ops.backends()["cpp"] != "available", reason="the C++ extension is not built")

MIB = 1 << 20


@pytest.fixture
def fresh_cache():
    """An empty cache with the default limit, restored afterwards."""
    before = cpu_cache.limit()
    cpu_cache.empty()
    yield
    cpu_cache.set_limit(before)
    cpu_cache.empty()


def logits(batch: int = 2) -> torch.Tensor:  # 2 x 98 x 64 x 64 float32: 3 MiB
    return torch.randn(batch, 98, 64, 64, generator=torch.Generator().manual_seed(0))


def test_a_freed_output_block_is_reused_and_the_result_is_right(fresh_cache):
    t = logits()
    phi = ops.spatial_softmax(t)
    assert cpu_cache.live_bytes() >= phi.numel() * 4
    address = phi.data_ptr()
    del phi
    assert cpu_cache.cached_bytes() >= t.numel() * 4 and cpu_cache.live_bytes() == 0
    t2 = logits() * 3
    phi2 = ops.spatial_softmax(t2)
    assert phi2.data_ptr() == address  # the same block, with none of the old values left
    torch.testing.assert_close(phi2, reference.spatial_softmax(t2), rtol=1e-5, atol=1e-7)


def test_small_outputs_bypass_the_cache(fresh_cache):
    z = ops.soft_argmax(logits(1))
    assert z.numel() * 4 < MIB and cpu_cache.live_bytes() == 0


def test_the_limit_bounds_the_held_blocks_and_empty_frees_them(fresh_cache):
    t = logits()
    cpu_cache.set_limit(0)
    phi = ops.spatial_softmax(t)
    del phi
    assert cpu_cache.cached_bytes() == 0
    cpu_cache.set_limit(64 * MIB)
    outputs = [ops.spatial_softmax(t) for _ in range(3)]
    del outputs
    assert 0 < cpu_cache.cached_bytes() <= 64 * MIB
    cpu_cache.set_limit(2 * MIB)  # below one block: everything held is freed
    assert cpu_cache.cached_bytes() == 0
    cpu_cache.set_limit(64 * MIB)
    del_me = ops.spatial_softmax(t)
    del del_me
    assert cpu_cache.cached_bytes() > 0
    cpu_cache.empty()
    assert cpu_cache.cached_bytes() == 0 and cpu_cache.limit() == 64 * MIB
    for bad in (-1, 2**64, 1.5, True):  # 2**64 once wrapped to 0 through ctypes' size_t
        with pytest.raises(ValueError, match=r"nbytes must be an int from 0 to \d+"):
            cpu_cache.set_limit(bad)
    assert cpu_cache.limit() == 64 * MIB
    cpu_cache.set_limit(cpu_cache.MAX_BYTES)  # the largest a size_t holds: taken as it is
    assert cpu_cache.limit() == cpu_cache.MAX_BYTES == 2**64 - 1


def test_cached_outputs_resize_and_survive_their_producer(fresh_cache):
    phi = ops.spatial_softmax(logits())
    expected = phi.clone()
    phi.resize_(phi.numel() * 2)  # the storage grows through the cache's allocator
    torch.testing.assert_close(phi[: expected.numel()].view_as(expected), expected)


def test_the_profiler_sees_cached_allocations(fresh_cache):
    t = logits()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        phi = ops.spatial_softmax(t)
        del phi
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert allocated >= t.numel() * 4


@pytest.mark.parametrize("value, limit", [("0", 0), ("12", 12 * MIB), ("lots", 1024 * MIB)])
def test_the_environment_sets_the_limit(value, limit):
    """A value that is not a whole number of MiB warns in one line and keeps the default (it once aborted the
    process with a C++ exception; tests/ops/test_settings.py has the other bad values)."""
    code = ("import torch; from decafa_fast import ops; from decafa_fast.ops import cpu_cache\n"
            "ops.spatial_softmax(torch.randn(2, 98, 64, 64)); print('limit', cpu_cache.limit())")
    env = dict(os.environ, DECAFA_CPU_CACHE_MB=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["limit", str(limit)], out.stdout + out.stderr
    warned = [line for line in out.stderr.splitlines() if "DECAFA_CPU_CACHE_MB" in line]
    assert len(warned) == (value == "lots"), out.stderr


def _child_softmax(queue) -> None:
    # one thread, as DataLoader's workers do: GNU OpenMP's thread pool does not survive a fork (torch's own
    # parallel ops hang in a forked child as ours would)
    torch.set_num_threads(1)
    t = logits()
    before = cpu_cache.live_bytes()
    phi = ops.spatial_softmax(t)
    queue.put((cpu_cache.live_bytes() > before,
               torch.allclose(phi, reference.spatial_softmax(t), rtol=1e-5, atol=1e-7)))


def test_a_forked_child_allocates_through_the_cache(fresh_cache):
    import multiprocessing

    held = ops.spatial_softmax(logits())  # the parent holds a cached block across the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_softmax, args=(queue,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0 and queue.get(timeout=5) == (True, True)
    del held
