"""The settings the op library and its builds read from the environment, parsed here.

| variable | allowed | default | read by |
|---|---|---|---|
| DECAFA_BACKEND | auto, triton, cuda, cpp, reference | auto | ops, at import (the process default) |
| DECAFA_CPU_CACHE_MB | a whole number of MiB, 0 to SIZE_MAX / 2**20 | 1024 | ops, at import (the CPU output cache) |
| DECAFA_AUTO_TABLE | a file path | $XDG_CACHE_HOME/decafa_fast/auto_table.json | ops, at import; `bench` writes it |
| DECAFA_EXTENSIONS_DIR | a folder | $XDG_CACHE_HOME/decafa_fast/extensions | the first-use build |
| DECAFA_FIRST_USE_BUILD | 1/0 (true/false, yes/no, on/off) | 1 | the first-use build |
| DECAFA_BUILD_VERBOSE | as above | 0 | the first-use build |
| FORCE_CUDA | as above: 1 builds the CUDA kernels, 0 never does | detected | setup.py and the first-use build |
| DECAFA_CUDA_RUNS | a whole number, 1 to 2**31 - 1 | the kernels' own choice | ops, at import (`ops/cuda_runs.py`) |
| TRITON_INTERPRET | 1 turns Triton's interpreter on | 0 | ops, at import (Triton reads it itself) |

Two more are read by the compiled kernels themselves: DECAFA_CPU_ISA (avx512, avx2, baseline, auto; read
once by csrc/cpu/isa.cpp, a bad value warns in one line on stderr) and DECAFA_CUDA_MAPS (ring selects the ring
kernels, anything else the default ones; read once by kernels/ring.cu) and DECAFA_CUDA_PDL (1 launches the
forward's pixel kernel as a programmatic dependent launch on sm_90 and later; read once by kernels/head.cu).
Read elsewhere, by their own modules: DECAFA_TRITON_TUNING (decafa_fast/triton/tuning.py: another Triton
tuning table, or off) and DECAFA_DEBUG (the CLI: full tracebacks).

An empty variable counts as unset. A value that is not allowed gives one `SettingWarning` naming the
variable, the value and what is allowed, and the default is used: none of these settings is worth stopping
a process for. The warning is one line (no source line below it) and comes once per variable and value.

Standard library only: setup.py and decafa_fast/_build.py load this module without torch or the package.
"""
from __future__ import annotations

import ctypes
import os
import re
import warnings
from pathlib import Path

__all__ = ["BACKEND_NAMES", "SettingWarning", "auto_table_path", "warn", "backend", "build_verbose", "cpu_cache_mb",
           "cuda_runs", "extensions_dir", "first_use_build", "force_cuda", "triton_interpret"]

BACKEND_NAMES = ("auto", "triton", "cuda", "cpp", "reference")
MIB = 1 << 20
SIZE_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1  # the C++ cache limit is a size_t of bytes
CPU_CACHE_MB_DEFAULT = 1024
CPU_CACHE_MB_MAX = SIZE_MAX // MIB
CUDA_RUNS_MAX = 2**31 - 1  # an int in the kernels

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_WHOLE = re.compile(r"[0-9]+")


class SettingWarning(RuntimeWarning):
    """A setting had a value that is not allowed; its default is used instead."""


_warned: set[str] = set()


def warn(message: str) -> None:
    """A SettingWarning of one line (no source line below it), once per message."""
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn_explicit(message, SettingWarning, filename="decafa_fast settings", lineno=0, module=__name__)


def _bad(name: str, value: str, allowed: str, default: str) -> None:
    warn(f"{name}={value!r} is not allowed ({allowed}); using {default}")


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value


def _whole(name: str, low: int, high: int, what: str, default: str) -> int | None:
    """The variable as a whole number in [low, high]; None when unset; None with a warning when not allowed."""
    value = _raw(name)
    if value is None:
        return None
    text = value.strip()
    if _WHOLE.fullmatch(text) and low <= int(text) <= high:
        return int(text)
    _bad(name, value, f"{what} from {low} to {high}", default)
    return None


def _flag(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    _bad(name, value, "1 or 0 (true/false, yes/no, on/off)", f"the default {int(default)}")
    return default


def _cache_home() -> Path:
    return Path(_raw("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"))


def backend() -> str:
    """DECAFA_BACKEND: the process default backend."""
    value = _raw("DECAFA_BACKEND")
    if value is None:
        return "auto"
    name = value.strip().lower()
    if name in BACKEND_NAMES:
        return name
    _bad("DECAFA_BACKEND", value, "one of " + ", ".join(BACKEND_NAMES), "'auto'")
    return "auto"


def cpu_cache_mb() -> int:
    """DECAFA_CPU_CACHE_MB: the most MiB of freed output blocks the CPU kernels keep (0: none)."""
    mb = _whole("DECAFA_CPU_CACHE_MB", 0, CPU_CACHE_MB_MAX, "a whole number of MiB",
                f"the default {CPU_CACHE_MB_DEFAULT}")
    return CPU_CACHE_MB_DEFAULT if mb is None else mb


def cuda_runs() -> int | None:
    """DECAFA_CUDA_RUNS: the number of runs of maps the CUDA per-map kernels split L into (None: their own)."""
    return _whole("DECAFA_CUDA_RUNS", 1, CUDA_RUNS_MAX, "a whole number", "the kernels' own choice")


def auto_table_path() -> Path:
    """DECAFA_AUTO_TABLE: the user's table of measured Triton-vs-CUDA races (decafa_fast/autotable.py)."""
    value = _raw("DECAFA_AUTO_TABLE")
    return Path(value) if value is not None else _cache_home() / "decafa_fast" / "auto_table.json"


def extensions_dir() -> Path:
    """DECAFA_EXTENSIONS_DIR: where first-use builds of the C++ extension are kept."""
    value = _raw("DECAFA_EXTENSIONS_DIR")
    return Path(value) if value is not None else _cache_home() / "decafa_fast" / "extensions"


def first_use_build() -> bool:
    """DECAFA_FIRST_USE_BUILD: whether a missing C++ extension is compiled on first import."""
    return _flag("DECAFA_FIRST_USE_BUILD", True)


def build_verbose() -> bool:
    """DECAFA_BUILD_VERBOSE: show the compiler's output during the first-use build."""
    return _flag("DECAFA_BUILD_VERBOSE", False)


def force_cuda() -> bool | None:
    """FORCE_CUDA: True (1) builds the CUDA kernels even where no CUDA toolkit is detected, False (0) never
    builds them (a CPU-only build beside a toolkit), None (unset, or a bad value) leaves it to detection."""
    value = _raw("FORCE_CUDA")
    if value is None:
        return None
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    _bad("FORCE_CUDA", value, "1 or 0 (true/false, yes/no, on/off)", "detection")
    return None


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton runs its interpreter on CPU tensors (decafa_fast.triton checks the same)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
