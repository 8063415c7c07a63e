"""The CPU kernels' output cache (csrc/cpu/output_cache.h): outputs of 1 MiB and more reuse blocks that
earlier outputs freed, so that a repeated call does not pay a page fault per page of a fresh allocation
(several times the cost of writing the bytes; bench/RESULTS.md records the measurement with its command).
At most `limit()` bytes of freed blocks are held (environment variable DECAFA_CPU_CACHE_MB, default 1024,
parsed by decafa_fast.settings and set here when decafa_fast.ops is imported; 0 turns the cache off; a bad
value warns and keeps the default); `empty()` gives them back to the system, like torch.cuda.empty_cache()
for a GPU."""
from __future__ import annotations

import ctypes
import functools

from .. import settings
from . import extension

MAX_BYTES = settings.SIZE_MAX  # the C side holds the limit in a size_t


@functools.cache
def _library() -> ctypes.CDLL:
    if extension.extension_path is None:
        raise RuntimeError(f"the C++ extension is not loaded: {extension.extension_error}")
    lib = ctypes.CDLL(extension.extension_path)  # the already loaded library: dlopen returns the same handle
    for name in ("cached_bytes", "live_bytes", "limit"):
        getattr(lib, f"decafa_cpu_cache_{name}").restype = ctypes.c_size_t
    lib.decafa_cpu_cache_set_limit.argtypes = [ctypes.c_size_t]
    lib.decafa_cpu_cache_set_limit.restype = ctypes.c_int
    lib.decafa_cpu_cache_empty.restype = ctypes.c_int
    return lib


def cached_bytes() -> int:
    """Bytes of freed output blocks the cache holds for reuse."""
    return _library().decafa_cpu_cache_cached_bytes()


def live_bytes() -> int:
    """Bytes of cache blocks held by live tensors."""
    return _library().decafa_cpu_cache_live_bytes()


def limit() -> int:
    """The most bytes of freed blocks the cache holds."""
    return _library().decafa_cpu_cache_limit()


def set_limit(nbytes: int) -> None:
    """Holds at most `nbytes` of freed blocks from now on (0: none, every large output is a fresh allocation);
    frees cached blocks beyond it."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or not 0 <= nbytes <= MAX_BYTES:
        raise ValueError(f"cpu_cache.set_limit: nbytes must be an int from 0 to {MAX_BYTES}, got {nbytes!r}")
    if _library().decafa_cpu_cache_set_limit(nbytes) != 0:
        raise RuntimeError("cpu_cache.set_limit: the C++ output cache could not take the new limit")


def empty() -> None:
    """Gives every cached (freed) block back to the system; blocks of live tensors are not affected."""
    if _library().decafa_cpu_cache_empty() != 0:
        raise RuntimeError("cpu_cache.empty: the C++ output cache could not free its blocks")


if extension.extension_path is not None:
    set_limit(settings.cpu_cache_mb() * settings.MIB)
