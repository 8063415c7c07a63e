"""Argument checks of every decafa_triton op (op contract v2): each failure raises RuntimeError naming the
argument and what was expected, so a raw `torch.ops.decafa_triton.*` call never launches a kernel on
arguments it would read out of bounds.

The kernels rely on: ranks and B/L/H/W/C agreement (they index by them), dtypes they can load (float16,
bfloat16, float32; stats and beta_map float32), one device (CUDA, or CPU under TRITON_INTERPRET=1), and
pixel-flat spatial dims (ops._flat copies a tensor that is not). Small tensors (stats, beta_map, grad_z)
are made contiguous by the ops, so their strides are not an assumption.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_HINT = "float16, bfloat16 or float32 (float64 runs on the cpp and reference backends)"


def _fail(message: str) -> None:
    raise RuntimeError(f"decafa_triton: {message}")


def tensor(name: str, t, rank: int, what: str, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a Tensor {what}, got {type(t).__name__}")
    if t.dim() != rank:
        _fail(f"{name} must have rank {rank} {what}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = _DTYPE_HINT if dtypes == SUPPORTED_DTYPES else " or ".join(str(d) for d in dtypes)
        _fail(f"{name} must be {allowed}, got {t.dtype}")


def logits(t) -> None:
    tensor("logits", t, 4, "of shape (B, L, H, W)")
    if t.shape[1] < 1 or t.shape[2] < 1 or t.shape[3] < 1:
        _fail(f"logits must have L >= 1, H >= 1 and W >= 1, got shape {tuple(t.shape)}")
    device("logits", t)


def device(name: str, t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under the interpreter."""
    want = "cpu" if INTERPRET else "cuda"
    if t.device.type != want:
        where = "CPU tensors (TRITON_INTERPRET=1)" if INTERPRET else "CUDA tensors"
        _fail(f"{name} is on {t.device}, but the Triton backend here runs on {where}")


def same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        _fail(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def companion(name: str, t, ref: torch.Tensor, ref_name: str, channels: int | None = None,
              same_dtype: bool = True) -> None:
    """A (B, C, H, W) tensor that must match `ref` in B, H, W and device (and dtype / channel count)."""
    tensor(name, t, 4, "of shape (B, C, H, W)")
    if t.shape[0] != ref.shape[0] or t.shape[2:] != ref.shape[2:]:
        _fail(f"{name} must match {ref_name} in batch and spatial size (B={ref.shape[0]}, H={ref.shape[2]}, "
              f"W={ref.shape[3]}), got shape {tuple(t.shape)}")
    if channels is not None and t.shape[1] != channels:
        _fail(f"{name} must have {channels} channel(s), got shape {tuple(t.shape)}")
    if same_dtype and t.dtype != ref.dtype:
        _fail(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    same_device(name, t, ref, ref_name)


def per_map(name: str, t, ref: torch.Tensor, last: int | None, dtypes=SUPPORTED_DTYPES) -> None:
    """A (B, L) tensor, or (B, L, last), for the B and L of the logits `ref`."""
    shape = (ref.shape[0], ref.shape[1]) + (() if last is None else (last,))
    tensor(name, t, len(shape), f"of shape {shape}", dtypes)
    if tuple(t.shape) != shape:
        _fail(f"{name} must have shape {shape} (B, L of logits{'' if last is None else ', ' + str(last)}), "
              f"got {tuple(t.shape)}")
    same_device(name, t, ref, "logits")


def stats(t, logits_: torch.Tensor) -> None:
    per_map("stats", t, logits_, 2, (torch.float32,))


def beta_map(t, logits_: torch.Tensor) -> None:
    if t is not None:
        per_map("beta_map", t, logits_, None, (torch.float32,))


def mode(m) -> int:
    if isinstance(m, torch.SymInt):  # triton_op infers `int` as SymInt; the fusion mode is always concrete
        m = int(m)
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 5:
        _fail(f"mode must be an int 1..5 (F1..F5), got {m!r}")
    return int(m)


def fused(name: str, t, image: torch.Tensor, channels: int) -> None:
    companion(name, t, image, "image", channels=channels, same_dtype=False)
