"""Which backends this process has: probed once at import (availability does not change within a process,
and the backend resolution that reads it must stay cheap and traceable)."""
from __future__ import annotations

import torch

from .._torch_private import has_kernel
from .extension import extension_error
from .triton_import import TRITON_ON_CPU, triton_error


def cuda_kernels_built() -> bool:
    return extension_error is None and has_kernel("decafa::decafa_head", "CUDA")


def probe() -> dict[str, str]:
    """Each backend name mapped to "available" (with a note in parentheses) or the reason it is not."""
    status = {"reference": "available"}
    status["cpp"] = "available" if extension_error is None else extension_error
    if extension_error is not None:
        status["cuda"] = extension_error
    elif not cuda_kernels_built():
        status["cuda"] = "decafa_fast._C was built without CUDA (no CUDA toolkit or CPU-only torch at build time)"
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA device is visible"
    else:
        status["cuda"] = "available"
    if triton_error is not None:
        status["triton"] = triton_error
    else:
        on_cpu = TRITON_ON_CPU and not torch.cuda.is_available()
        status["triton"] = "available" + (" (TRITON_INTERPRET=1: interpreter on CPU tensors)" if on_cpu else "")
    status["auto"] = "available"
    return status


STATUS: dict[str, str] = probe()


def backends() -> dict[str, str]:
    """Each backend name mapped to "available" or the reason it is not."""
    return dict(STATUS)


def available(name: str) -> bool:
    return STATUS[name].startswith("available")
