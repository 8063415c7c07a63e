"""Importing the Triton backend (decafa_fast.triton, which registers the decafa_triton:: ops) where it can
run: on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1). Anywhere else
importing Triton (seconds) would only slow every CPU process down, so it is not imported at all.
`triton_error` says why the backend is unavailable, in one line."""
from __future__ import annotations

import torch

from .. import settings

TRITON_ON_CPU = settings.triton_interpret()
triton_error: str | None = None
if torch.cuda.is_available() or TRITON_ON_CPU:
    try:
        from ..triton import ops as _triton_ops  # noqa: F401  (registers decafa_triton::*)
    except Exception as exc:  # noqa: BLE001 - ImportError, or triton present but unusable: reported, not raised
        triton_error = f"Triton backend unavailable: {type(exc).__name__}: {exc}"
else:
    triton_error = "no CUDA device is visible (set TRITON_INTERPRET=1 to run the interpreter on CPU)"
