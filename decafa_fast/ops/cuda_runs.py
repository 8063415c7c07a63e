"""The runs of maps of the CUDA C++ per-map kernels (kernels/README.md, "Runs per batch element"): each batch
element's L maps are split into runs of consecutive maps, one thread block each. `runs()` is the forced count
(None: the kernels choose, ceil(2 * SMs / B), at most L); DECAFA_CUDA_RUNS, parsed by decafa_fast.settings
(a bad value warns once and keeps the kernels' choice), is passed in once, when decafa_fast.ops is imported;
`set_runs` changes it in this process (tests, benchmarks). The count only changes the order in which the
partial masks are added. Without the CUDA kernels in the extension there is nothing to set: `available()`.

`pixel_split()` / `set_pixel_split(n)` likewise force the channel groups of the forward's pixel kernel (None:
the launcher's choice, several at small batch so that its accesses stay 16-byte; 1: no split), for the
benchmarks to time both in one process; M and F are the same bits either way."""
from __future__ import annotations

import ctypes
import functools

from .. import settings
from . import extension


@functools.cache
def _library() -> ctypes.CDLL | None:
    if extension.extension_path is None:
        return None
    lib = ctypes.CDLL(extension.extension_path)  # the already loaded library: dlopen returns the same handle
    if not hasattr(lib, "decafa_cuda_set_runs"):  # built without CUDA
        return None
    lib.decafa_cuda_set_runs.argtypes = [ctypes.c_int]
    lib.decafa_cuda_set_runs.restype = ctypes.c_int
    lib.decafa_cuda_runs.restype = ctypes.c_int
    lib.decafa_cuda_set_pixel_split.argtypes = [ctypes.c_int]
    lib.decafa_cuda_set_pixel_split.restype = ctypes.c_int
    lib.decafa_cuda_pixel_split.restype = ctypes.c_int
    return lib


def _loaded(what: str) -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError(f"cuda_runs.{what}: the C++ extension has no CUDA kernels "
                           f"({extension.extension_error or 'built without CUDA'})")
    return lib


def available() -> bool:
    """Whether the loaded extension has the CUDA kernels."""
    return _library() is not None


def runs() -> int | None:
    """The forced runs of maps per batch element, or None (the kernels' own choice)."""
    n = _loaded("runs").decafa_cuda_runs()
    return n if n > 0 else None


def set_runs(n: int | None) -> None:
    """Forces n runs of maps per batch element (at most L are used), or None for the kernels' own choice."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= settings.CUDA_RUNS_MAX):
        raise ValueError(f"cuda_runs.set_runs: n must be None or an int from 1 to {settings.CUDA_RUNS_MAX}, "
                         f"got {n!r}")
    _loaded("set_runs").decafa_cuda_set_runs(0 if n is None else n)


PIXEL_SPLIT_MAX = 65535  # grid.y


def pixel_split() -> int | None:
    """The forced channel groups of the forward's pixel kernel, or None (the launcher's choice)."""
    n = _loaded("pixel_split").decafa_cuda_pixel_split()
    return n if n > 0 else None


def set_pixel_split(n: int | None) -> None:
    """Forces n channel groups (1: no split) in the forward's pixel kernel, or None for the launcher's choice."""
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= PIXEL_SPLIT_MAX):
        raise ValueError(f"cuda_runs.set_pixel_split: n must be None or an int from 1 to {PIXEL_SPLIT_MAX}, "
                         f"got {n!r}")
    _loaded("set_pixel_split").decafa_cuda_set_pixel_split(0 if n is None else n)


_from_environment = settings.cuda_runs()  # read (and a bad value reported) whether or not CUDA is built
if available():
    set_runs(_from_environment)
