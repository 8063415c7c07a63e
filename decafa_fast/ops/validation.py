"""Argument checks of the public ops: each error names the argument and what was expected. The rank and the
dimensions of each tensor argument come from the op table (decafa_fast.contract.table.TENSOR_ARGS)."""
from __future__ import annotations

import math

import torch

from .. import reference
from ..contract.layout import FUSION_MODES
from ..contract.table import TENSOR_ARGS
from .backend import resolve

__all__ = ["FUSION_MODES", "check_backend_dtype", "check_beta", "check_companion", "check_logits", "check_mode",
           "check_tensor", "prepare_logits"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT64_MAX = torch.finfo(torch.float64).max


def check_tensor(name: str, t) -> None:
    """A floating-point tensor of the rank of `name` in the op table (its error words the table's shape)."""
    rank, what = TENSOR_ARGS[name].rank, TENSOR_ARGS[name].what
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {what}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_logits(logits) -> None:
    check_tensor("logits", logits)
    if logits.shape[2] < 1 or logits.shape[3] < 1:
        raise ValueError(f"logits must have H >= 1 and W >= 1, got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one landmark map (L >= 1), got shape {tuple(logits.shape)}")


def check_beta(beta, logits: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """beta as the ops take it: (float beta, None) for a Python number, (1.0, beta_map) for a tensor, with
    beta_map its (B, L) expansion (contiguous, accumulation dtype, on the logits' device; differentiable)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float, torch.Tensor)):
        raise TypeError(f"beta must be a Python number or a tensor broadcastable to (B, L), got {type(beta).__name__}")
    if not isinstance(beta, torch.Tensor):
        # The kernels compute beta * T in float32 (float64 for float64 logits): a beta that type cannot hold
        # would turn every map into NaN.
        limit = FLOAT64_MAX if logits.dtype == torch.float64 else FLOAT32_MAX
        try:
            value = float(beta)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value) or abs(value) > limit:
            shown = f"{value:g}" if isinstance(beta, float) or math.isfinite(value) else \
                f"an integer of {beta.bit_length()} bits"
            dtype = "float64" if logits.dtype == torch.float64 else "float32"
            raise ValueError(f"beta must be finite and representable in {dtype} (|beta| <= {limit:.4g}), got {shown}")
        return value, None
    if not beta.is_floating_point():
        raise TypeError(f"beta must be a floating-point tensor, got {beta.dtype}")
    if beta.device != logits.device:
        if beta.dim() != 0:
            raise ValueError(f"beta is on {beta.device} but logits are on {logits.device}; put them on one device")
        beta = beta.to(logits.device)
    b, l = logits.shape[:2]
    beta_map = reference.expand_beta(beta, b, l)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return 1.0, beta_map.to(acc).contiguous()


def check_mode(mode) -> int:
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    return FUSION_MODES.index(mode) + 1


_DIM_WORDS = {"B": "batch", "L": "maps", "H": "spatial size", "W": "spatial size"}


def check_companion(name: str, t, ref: torch.Tensor, ref_name: str) -> None:
    """`t` must have the dimensions the op table gives `name`: those named as in `ref_name` equal to `ref`'s,
    the fixed ones (the mask's one channel) as written; and `ref`'s dtype and device."""
    check_tensor(name, t)
    dims, ref_dims = TENSOR_ARGS[name].dims, TENSOR_ARGS[ref_name].dims
    shared = [i for i, d in enumerate(dims) if not d.isdigit() and i < len(ref_dims) and ref_dims[i] == d]
    if any(t.shape[i] != ref.shape[i] for i in shared):
        words = " and ".join(dict.fromkeys(_DIM_WORDS.get(dims[i], dims[i]) for i in shared))
        sizes = ", ".join(f"{dims[i]}={ref.shape[i]}" for i in shared)
        raise ValueError(f"{name} must match {ref_name} in {words} ({sizes}), got shape {tuple(t.shape)}")
    for i, d in enumerate(dims):
        if d.isdigit() and t.shape[i] != int(d):
            size = f"{d} channel(s)" if i == 1 else f"size {d} in dimension {i}"
            raise ValueError(f"{name} must have {size} {TENSOR_ARGS[name].what}, got shape {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def check_backend_dtype(backend: str, t: torch.Tensor) -> None:
    if t.dtype == torch.float64 and t.device.type != "cpu" and backend != "reference":
        raise TypeError(f"float64 is supported on CPU and by the reference backend only, got {t.device} tensors")


def prepare_logits(op: str, logits, beta, **companions) -> tuple[str, float, torch.Tensor | None]:
    """Validates the logits and beta shared by every logits op, and the image and embedding that go with
    them (keyword: name=tensor); returns the backend to run `op`, the float beta and the beta_map (None for
    a Python number; see check_beta)."""
    check_logits(logits)
    beta, beta_map = check_beta(beta, logits)
    for name, t in companions.items():
        check_companion(name, t, logits, "logits")
    backend = resolve(logits.device, op, (logits, *companions.values()))
    check_backend_dtype(backend, logits)
    return backend, beta, beta_map


def reference_beta(beta: float, beta_map: torch.Tensor | None) -> float | torch.Tensor:
    """The beta the reference formulation takes: the (B, L) map when there is one, else the number."""
    return beta if beta_map is None else beta_map
