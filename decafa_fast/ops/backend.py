"""Backend selection: which backends this process has (`backends()`), the process default
(`set_backend`, `DECAFA_BACKEND`), a scoped choice for the calling thread (`use_backend`) and the concrete
backend for one call (`resolve`), including the measured Triton-vs-CUDA table that "auto" reads on a GPU.

The choice is made when an op's forward runs; its backward runs the same backend's kernels whatever the
thread that runs it has chosen."""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

from .. import autotable

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")

extension_error: str | None = None
extension_path: str | None = None  # the loaded decafa_fast._C library (cpu_cache reads its C entry points)
try:
    from .. import _C  # (loads the TORCH_LIBRARY(decafa) registrations)

    extension_path = _C.__file__
except ImportError:  # not built at install (build isolation hid torch): build on first use (decafa_fast/_build.py)
    from .. import _build

    try:
        extension_path = str(_build.load_or_build())
    except RuntimeError as exc:
        extension_error = str(exc)

# Triton runs on CUDA tensors, or on CPU tensors under its interpreter. Anywhere else importing it (seconds)
# would only slow every CPU process down, so it is not imported at all.
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1"
triton_error: str | None = None
if torch.cuda.is_available() or _TRITON_ON_CPU:
    try:
        from ..triton import ops as _triton_ops  # noqa: F401  (registers decafa_triton::*)
    except Exception as exc:  # noqa: BLE001 - ImportError, or triton present but unusable: reported, not raised
        triton_error = f"Triton backend unavailable: {type(exc).__name__}: {exc}"
else:
    triton_error = "no CUDA device is visible (set TRITON_INTERPRET=1 to run the interpreter on CPU)"


def _cuda_kernels_built() -> bool:
    return extension_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "decafa::decafa_head", "CUDA"
    )


def backends() -> dict[str, str]:
    """Each backend name mapped to "available" or the reason it is not."""
    return dict(_STATUS)


def _probe_backends() -> dict[str, str]:
    status = {"reference": "available"}
    status["cpp"] = "available" if extension_error is None else extension_error
    if extension_error is not None:
        status["cuda"] = extension_error
    elif not _cuda_kernels_built():
        status["cuda"] = "decafa_fast._C was built without CUDA (no CUDA toolkit or CPU-only torch at build time)"
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA device is visible"
    else:
        status["cuda"] = "available"
    if triton_error is not None:
        status["triton"] = triton_error
    else:
        on_cpu = _TRITON_ON_CPU and not torch.cuda.is_available()
        status["triton"] = "available" + (" (TRITON_INTERPRET=1: interpreter on CPU tensors)" if on_cpu else "")
    status["auto"] = "available"
    return status


# Probed once: availability does not change within a process, and resolve must stay cheap and traceable.
_STATUS = _probe_backends()
_backend = os.environ.get("DECAFA_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"DECAFA_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        reason = _STATUS[name]
        if not reason.startswith("available"):
            raise RuntimeError(f"backend {name!r} is not available: {reason}")


class _ThreadChoice(threading.local):
    """The backend chosen by `use_backend` in this thread; None defers to the process default. A
    threading.local (not a ContextVar) because torch.compile traces and guards its attributes."""

    def __init__(self) -> None:
        self.name: str | None = None


_thread_choice = _ThreadChoice()


def set_backend(name: str) -> None:
    """Set the process default backend: "auto", "triton", "cuda", "cpp" or "reference". A thread inside
    `use_backend` keeps its own choice until the block ends."""
    global _backend
    _check_name(name)
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """`with use_backend("reference"): ...` runs the block's ops on `name` in this thread only; other
    threads keep theirs. Blocks nest; the previous choice comes back when the block exits, also by an
    exception. Usable as a decorator too."""
    _check_name(name)
    previous = _thread_choice.name
    _thread_choice.name = name
    try:
        yield name
    finally:
        _thread_choice.name = previous


def get_backend() -> str:
    """The backend this thread's ops use: its `use_backend` choice, else the process default."""
    return _thread_choice.name or _backend


# Which GPU backend "auto" uses on CUDA where the measured table (below) has no answer: CUDA C++ first, the
# winner of every race measured so far (H200, bench/RESULTS.md).
AUTO_CUDA_PREFERENCE: list[str] = ["cuda", "triton"]
# GPU name -> the Triton-vs-CUDA races measured on it (decafa_fast/autotable.py): read once, no CUDA call.
_AUTO_TABLES: dict[str, autotable.Index] = autotable.load_index([autotable.SHIPPED, autotable.user_table_path()])
_GPU_NAMES: dict[int | None, str] = {}  # CUDA device index -> GPU model name
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def _auto_cuda(op: str, inputs: tuple[torch.Tensor, ...]) -> str:
    """The GPU backend for `op` on these CUDA inputs: the measured winner for this GPU, op, dtype, pass and
    nearest batch size when the table has one, else the first available in AUTO_CUDA_PREFERENCE."""
    available = [b for b in AUTO_CUDA_PREFERENCE if _STATUS[b] == "available"]
    if len(available) > 1 and _AUTO_TABLES and inputs:
        first = inputs[0]
        index = first.device.index
        if index not in _GPU_NAMES:
            _GPU_NAMES[index] = torch.cuda.get_device_properties(first.device).name
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        choice = autotable.choose(_AUTO_TABLES.get(_GPU_NAMES[index], {}), op, "fwd+bwd" if needs_grad else "fwd",
                                  _DTYPE_NAMES[first.dtype], first.shape[0])
        if choice in available:
            return choice
    return available[0] if available else "reference"


def resolve(device: torch.device, op: str = "", inputs: tuple[torch.Tensor, ...] = ()) -> str:
    """The concrete backend for `op` on `inputs` (all on `device`), from this thread's choice."""
    name = get_backend()
    if name == "auto":
        if device.type == "cuda":
            name = _auto_cuda(op, inputs)
        else:
            name = "cpp" if _STATUS["cpp"] == "available" else "reference"
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}; use 'cuda' or 'auto'")
    return name


def namespace(backend: str):
    return torch.ops.decafa_triton if backend == "triton" else torch.ops.decafa


def measured_gpus() -> list[str]:
    """The GPU models that the auto table (shipped or user cache) has measured races for."""
    return sorted(_AUTO_TABLES)
