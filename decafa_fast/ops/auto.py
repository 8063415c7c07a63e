"""What the "auto" backend runs on a CUDA device: the measured winner of the Triton-vs-CUDA races for this
GPU, op, dtype, pass and batch size (decafa_fast/autotable.py), else the first available backend in
AUTO_CUDA_PREFERENCE. The tables are read once, at import, with no CUDA call."""
from __future__ import annotations

import torch

from .. import autotable, settings
from . import status

# Where the measured table has no answer: CUDA C++ first, the winner of the races in bench/RESULTS.md.
AUTO_CUDA_PREFERENCE: list[str] = ["cuda", "triton"]
# GPU name -> the races measured on it (the shipped table, then the user's, which wins per GPU)
TABLES: dict[str, autotable.Index] = autotable.load_index([autotable.SHIPPED, settings.auto_table_path()])
GPU_NAMES: dict[int | None, str] = {}  # CUDA device index -> GPU model name
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def auto_cuda(op: str, inputs: tuple[torch.Tensor, ...]) -> str:
    """The GPU backend for `op` on these CUDA inputs: the measured winner for this GPU, op, dtype, pass and
    nearest batch size when the table has one, else the first available in AUTO_CUDA_PREFERENCE."""
    available = [b for b in AUTO_CUDA_PREFERENCE if status.STATUS[b] == "available"]
    if len(available) > 1 and TABLES and inputs:
        first = inputs[0]
        index = first.device.index
        if index not in GPU_NAMES:
            GPU_NAMES[index] = torch.cuda.get_device_properties(first.device).name
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        choice = autotable.choose(TABLES.get(GPU_NAMES[index], {}), op, "fwd+bwd" if needs_grad else "fwd",
                                  _DTYPE_NAMES[first.dtype], first.shape[0])
        if choice in available:
            return choice
    return available[0] if available else "reference"


def measured_gpus() -> list[str]:
    """The GPU models that the auto table (shipped or user cache) has measured races for."""
    return sorted(TABLES)
