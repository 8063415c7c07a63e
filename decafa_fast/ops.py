"""Public drop-in ops: spatial softmax, soft-argmax, attention mask, F1-F5 fusion and the fused DeCaFA head.

Each public function validates its arguments, picks a backend and calls one custom op. The custom ops
share one set of schemas across backends (see `_SCHEMAS`):

    decafa::<op>          C++ (csrc/), CPU kernels always, CUDA kernels when built with CUDA
    decafa_triton::<op>   Triton (decafa_fast/triton/), registered with torch.library.triton_op

Forward ops also return the per-map log-sum-exp `lse` (B, L) of beta*T (float32; float64 for float64 T); backward ops take it and
recompute Phi = exp(beta*T - lse) instead of storing Phi. Autograd and fake (meta) kernels are registered
here for every namespace, so every backend works under autograd, torch.compile(fullgraph=True) and opcheck.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import torch

from . import autotable, reference

__all__ = [
    "spatial_softmax",
    "soft_argmax",
    "attention_mask",
    "landmark_attention",
    "fuse",
    "decafa_head",
    "set_backend",
    "get_backend",
    "backends",
    "BACKENDS",
]

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")
FUSION_MODES = reference.FUSION_MODES
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The schemas every compiled backend implements (C++ declares them in csrc/ops.cpp, Triton through the
# type hints of its triton_op functions). `mode` is the fusion number 1..5.
_SCHEMAS = {
    "spatial_softmax": "(Tensor logits, float beta) -> (Tensor phi, Tensor lse)",
    "spatial_softmax_backward": "(Tensor grad_phi, Tensor logits, Tensor lse, float beta) -> Tensor",
    "soft_argmax": "(Tensor logits, float beta, bool normalized) -> (Tensor z, Tensor lse)",
    "attention_mask": "(Tensor logits, float beta) -> (Tensor mask, Tensor lse)",
    "landmark_attention": "(Tensor logits, float beta, bool normalized) -> (Tensor z, Tensor mask, Tensor lse)",
    "landmark_attention_backward": (
        "(Tensor? grad_z, Tensor? grad_mask, Tensor logits, Tensor lse, float beta, bool normalized) -> Tensor"
    ),
    "fuse": "(Tensor image, Tensor embedding, Tensor mask, int mode) -> Tensor",
    "fuse_backward": (
        "(Tensor grad_fused, Tensor image, Tensor embedding, Tensor mask, int mode) -> (Tensor, Tensor, Tensor)"
    ),
    "decafa_head": (
        "(Tensor logits, Tensor image, Tensor embedding, int mode, float beta, bool normalized)"
        " -> (Tensor z, Tensor fused, Tensor lse)"
    ),
    "decafa_head_backward": (
        "(Tensor? grad_z, Tensor? grad_fused, Tensor logits, Tensor image, Tensor embedding, Tensor lse,"
        " int mode, float beta, bool normalized) -> (Tensor, Tensor, Tensor)"
    ),
}


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
_extension_error: str | None = None
try:
    from . import _C  # noqa: F401  (loads the TORCH_LIBRARY(decafa) registrations)
except ImportError as exc:  # pragma: no cover - only without a built extension
    _extension_error = f"the C++ extension decafa_fast._C is not built ({exc}); run `pip install --no-build-isolation -e .`"

# Triton runs on CUDA tensors, or on CPU tensors under its interpreter. Anywhere else importing it (seconds)
# would only slow every CPU process down, so it is not imported at all.
_TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1"
_triton_error: str | None = None
if torch.cuda.is_available() or _TRITON_ON_CPU:
    try:
        from .triton import ops as _triton_ops  # noqa: F401  (registers decafa_triton::*)
    except Exception as exc:  # ImportError, or triton present but unusable
        _triton_error = f"Triton backend unavailable: {type(exc).__name__}: {exc}"
else:
    _triton_error = "no CUDA device is visible (set TRITON_INTERPRET=1 to run the interpreter on CPU)"


def _cuda_kernels_built() -> bool:
    return _extension_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "decafa::decafa_head", "CUDA"
    )


def backends() -> dict[str, str]:
    """Each backend name mapped to "available" or the reason it is not."""
    return dict(_STATUS)


def _probe_backends() -> dict[str, str]:
    status = {"reference": "available"}
    status["cpp"] = "available" if _extension_error is None else _extension_error
    if _extension_error is not None:
        status["cuda"] = _extension_error
    elif not _cuda_kernels_built():
        status["cuda"] = "decafa_fast._C was built without CUDA (no CUDA toolkit or CPU-only torch at build time)"
    elif not torch.cuda.is_available():
        status["cuda"] = "no CUDA device is visible"
    else:
        status["cuda"] = "available"
    if _triton_error is not None:
        status["triton"] = _triton_error
    else:
        on_cpu = _TRITON_ON_CPU and not torch.cuda.is_available()
        status["triton"] = "available" + (" (TRITON_INTERPRET=1: interpreter on CPU tensors)" if on_cpu else "")
    status["auto"] = "available"
    return status


# Probed once: availability does not change within a process, and _resolve must stay cheap and traceable.
_STATUS = _probe_backends()
_backend = os.environ.get("DECAFA_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"DECAFA_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def set_backend(name: str) -> None:
    """Select the backend used by every op: "auto", "triton", "cuda", "cpp" or "reference"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        reason = _STATUS[name]
        if not reason.startswith("available"):
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
    _backend = name


def get_backend() -> str:
    return _backend


# Which GPU backend "auto" uses on CUDA where the measured table (below) has no answer.
AUTO_CUDA_PREFERENCE: list[str] = ["triton", "cuda"]
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


def _resolve(device: torch.device, op: str = "", inputs: tuple[torch.Tensor, ...] = ()) -> str:
    """The concrete backend for `op` on `inputs` (all on `device`)."""
    name = _backend
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


def _namespace(backend: str):
    return torch.ops.decafa_triton if backend == "triton" else torch.ops.decafa


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, rank: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {what}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_logits(logits) -> None:
    _check_tensor("logits", logits, 4, "of shape (B, L, H, W)")
    if logits.shape[2] < 1 or logits.shape[3] < 1:
        raise ValueError(f"logits must have H >= 1 and W >= 1, got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one landmark map (L >= 1), got shape {tuple(logits.shape)}")


def _check_beta(beta) -> float:
    if isinstance(beta, torch.Tensor) or not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise TypeError(f"beta must be a Python float, got {type(beta).__name__}")
    beta = float(beta)
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta}")
    return beta


def _check_mode(mode) -> int:
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    return FUSION_MODES.index(mode) + 1


def _check_companion(name: str, t, ref: torch.Tensor, ref_name: str, channels: int | None = None) -> None:
    """`t` must match `ref` in B, H, W, dtype and device (and in channel count when given)."""
    _check_tensor(name, t, 4, "of shape (B, C, H, W)")
    if t.shape[0] != ref.shape[0] or t.shape[2:] != ref.shape[2:]:
        raise ValueError(
            f"{name} must match {ref_name} in batch and spatial size (B={ref.shape[0]}, H={ref.shape[2]}, "
            f"W={ref.shape[3]}), got shape {tuple(t.shape)}"
        )
    if channels is not None and t.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def _check_backend_dtype(backend: str, t: torch.Tensor) -> None:
    if t.dtype == torch.float64 and t.device.type != "cpu" and backend != "reference":
        raise TypeError(f"float64 is supported on CPU and by the reference backend only, got {t.device} tensors")


def _prepare_logits(op: str, logits, beta, **companions) -> tuple[str, float]:
    """Validates the logits and beta shared by every logits op, and the image and embedding that go with
    them (keyword: name=tensor); returns the backend to run `op` and beta."""
    _check_logits(logits)
    beta = _check_beta(beta)
    for name, t in companions.items():
        _check_companion(name, t, logits, "logits")
    backend = _resolve(logits.device, op, (logits, *companions.values()))
    _check_backend_dtype(backend, logits)
    return backend, beta


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------
def spatial_softmax(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. (1): softmax of beta * logits over the H*W pixels of each map.

    logits (B, L, H, W) -> Phi (B, L, H, W), same dtype. NaN in a map gives NaN over that map.
    """
    backend, beta = _prepare_logits("spatial_softmax", logits, beta)
    if backend == "reference":
        return reference.spatial_softmax(logits, beta)
    phi, _ = _namespace(backend).spatial_softmax(logits, beta)
    return phi


def soft_argmax(logits: torch.Tensor, beta: float = 1.0, normalized: bool = False) -> torch.Tensor:
    """Eqs. (1)+(2): soft-argmax of each map as (x, y), x the column and y the row.

    logits (B, L, H, W) -> z (B, L, 2), same dtype; pixels 0..W-1 / 0..H-1, or [-1, 1] when normalized.
    """
    backend, beta = _prepare_logits("soft_argmax", logits, beta)
    if backend == "reference":
        return reference.soft_argmax(logits, beta, bool(normalized))
    z, _ = _namespace(backend).soft_argmax(logits, beta, bool(normalized))
    return z


def attention_mask(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The summed attention mask M = sum over l of Phi_l: logits (B, L, H, W) -> M (B, 1, H, W)."""
    backend, beta = _prepare_logits("attention_mask", logits, beta)
    if backend == "reference":
        return reference.attention_mask(logits, beta)
    m, _ = _namespace(backend).attention_mask(logits, beta)
    return m


def landmark_attention(
    logits: torch.Tensor, beta: float = 1.0, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax and summed mask in one pass: logits (B, L, H, W) -> (z (B, L, 2), M (B, 1, H, W))."""
    backend, beta = _prepare_logits("landmark_attention", logits, beta)
    if backend == "reference":
        return reference.landmark_attention(logits, beta, bool(normalized))
    z, m, _ = _namespace(backend).landmark_attention(logits, beta, bool(normalized))
    return z, m


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: str = "F5") -> torch.Tensor:
    """Eqs. (4)-(8): F1 = E; F2 = I*M; F3 = I‖I*M; F4 = I‖I*M‖E*M; F5 = I‖I*M‖E‖E*M (channel concat).

    image (B, Ci, H, W), embedding (B, C, H, W), mask (B, 1, H, W) -> (B, channels(mode), H, W).
    """
    _check_tensor("image", image, 4, "of shape (B, Ci, H, W)")
    mode_id = _check_mode(mode)
    _check_companion("embedding", embedding, image, "image")
    _check_companion("mask", mask, image, "image", channels=1)
    backend = _resolve(image.device, "fuse", (image, embedding, mask))
    _check_backend_dtype(backend, image)
    if backend == "reference":
        return reference.fuse(image, embedding, mask, mode)
    return _namespace(backend).fuse(image, embedding, mask, mode_id)


def decafa_head(
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mode: str = "F5",
    beta: float = 1.0,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused landmark-attention head: softmax + moments + mask + fusion in one op.

    logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W), all of one dtype and device
    -> (z (B, L, 2), fused (B, channels(mode), H, W)). Equals
    `z, M = landmark_attention(logits); fuse(image, embedding, M, mode)` without materialising M or Phi.
    """
    mode_id = _check_mode(mode)
    backend, beta = _prepare_logits("decafa_head", logits, beta, image=image, embedding=embedding)
    if backend == "reference":
        return reference.decafa_head(logits, image, embedding, mode, beta, bool(normalized))
    z, fused, _ = _namespace(backend).decafa_head(logits, image, embedding, mode_id, beta, bool(normalized))
    return z, fused


# --------------------------------------------------------------------------------------------------
# Fake (meta) kernels and autograd, registered for every compiled namespace
# --------------------------------------------------------------------------------------------------
def _fused_channels(mode: int, image: torch.Tensor, embedding: torch.Tensor) -> int:
    return reference.fused_channels(FUSION_MODES[mode - 1], image.shape[1], embedding.shape[1])


def lse_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _lse_like(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:2], dtype=lse_dtype(logits.dtype))


def _z_like(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((*logits.shape[:2], 2))


def _mask_like(logits: torch.Tensor) -> torch.Tensor:
    b, _, h, w = logits.shape
    return logits.new_empty((b, 1, h, w))


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)


_FAKES: dict[str, Callable] = {
    "spatial_softmax": lambda logits, beta: (_contiguous_like(logits), _lse_like(logits)),
    "spatial_softmax_backward": lambda grad_phi, logits, lse, beta: _contiguous_like(logits),
    "soft_argmax": lambda logits, beta, normalized: (_z_like(logits), _lse_like(logits)),
    "attention_mask": lambda logits, beta: (_mask_like(logits), _lse_like(logits)),
    "landmark_attention": lambda logits, beta, normalized: (
        _z_like(logits),
        _mask_like(logits),
        _lse_like(logits),
    ),
    "landmark_attention_backward": lambda grad_z, grad_mask, logits, lse, beta, normalized: _contiguous_like(logits),
    "fuse": lambda image, embedding, mask, mode: image.new_empty(
        (image.shape[0], _fused_channels(mode, image, embedding), *image.shape[2:])
    ),
    "fuse_backward": lambda grad_fused, image, embedding, mask, mode: (
        _contiguous_like(image),
        _contiguous_like(embedding),
        _contiguous_like(mask),
    ),
    "decafa_head": lambda logits, image, embedding, mode, beta, normalized: (
        _z_like(logits),
        logits.new_empty((logits.shape[0], _fused_channels(mode, image, embedding), *logits.shape[2:])),
        _lse_like(logits),
    ),
    "decafa_head_backward": lambda grad_z, grad_fused, logits, image, embedding, lse, mode, beta, normalized: (
        _contiguous_like(logits),
        _contiguous_like(image),
        _contiguous_like(embedding),
    ),
}


def _register_autograd(ns_name: str) -> None:
    ns = getattr(torch.ops, ns_name)
    lib = f"{ns_name}::"

    # spatial_softmax ---------------------------------------------------------------------------
    def softmax_setup(ctx, inputs, output):
        logits, beta = inputs
        ctx.beta = beta
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, output[1])

    def softmax_backward(ctx, grad_phi, _grad_lse):
        logits, lse = ctx.saved_tensors
        return ns.spatial_softmax_backward(grad_phi, logits, lse, ctx.beta), None

    torch.library.register_autograd(lib + "spatial_softmax", softmax_backward, setup_context=softmax_setup)

    # soft_argmax / attention_mask / landmark_attention share one backward --------------------------
    def stats_setup(ctx, inputs, output):
        logits, beta = inputs[0], inputs[1]
        ctx.beta = beta
        ctx.normalized = inputs[2] if len(inputs) > 2 else False
        lse = output[-1]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, lse)

    def _stats_grad(ctx, grad_z, grad_mask):
        logits, lse = ctx.saved_tensors
        return ns.landmark_attention_backward(grad_z, grad_mask, logits, lse, ctx.beta, ctx.normalized)

    def soft_argmax_backward(ctx, grad_z, _grad_lse):
        return _stats_grad(ctx, grad_z, None), None, None

    def attention_mask_backward(ctx, grad_mask, _grad_lse):
        return _stats_grad(ctx, None, grad_mask), None

    def landmark_attention_backward(ctx, grad_z, grad_mask, _grad_lse):
        return _stats_grad(ctx, grad_z, grad_mask), None, None

    torch.library.register_autograd(lib + "soft_argmax", soft_argmax_backward, setup_context=stats_setup)
    torch.library.register_autograd(lib + "attention_mask", attention_mask_backward, setup_context=stats_setup)
    torch.library.register_autograd(
        lib + "landmark_attention", landmark_attention_backward, setup_context=stats_setup
    )

    # fuse -------------------------------------------------------------------------------------------
    def fuse_setup(ctx, inputs, output):
        image, embedding, mask, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(image, embedding, mask)

    def fuse_backward(ctx, grad_fused):
        image, embedding, mask = ctx.saved_tensors
        gi, ge, gm = ns.fuse_backward(grad_fused, image, embedding, mask, ctx.mode)
        return gi, ge, gm, None

    torch.library.register_autograd(lib + "fuse", fuse_backward, setup_context=fuse_setup)

    # decafa_head ------------------------------------------------------------------------------------
    def head_setup(ctx, inputs, output):
        logits, image, embedding, mode, beta, normalized = inputs
        ctx.mode, ctx.beta, ctx.normalized = mode, beta, normalized
        lse = output[2]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, image, embedding, lse)

    def head_backward(ctx, grad_z, grad_fused, _grad_lse):
        logits, image, embedding, lse = ctx.saved_tensors
        gt, gi, ge = ns.decafa_head_backward(
            grad_z, grad_fused, logits, image, embedding, lse, ctx.mode, ctx.beta, ctx.normalized
        )
        return gt, gi, ge, None, None, None

    torch.library.register_autograd(lib + "decafa_head", head_backward, setup_context=head_setup)


def _register_fakes(ns_name: str) -> None:
    for op, fake in _FAKES.items():
        torch.library.register_fake(f"{ns_name}::{op}", fake)


if _extension_error is None:
    _register_fakes("decafa")
    _register_autograd("decafa")
if _triton_error is None:
    _register_autograd("decafa_triton")
