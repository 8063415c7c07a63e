"""Which torch device the application runs on: one helper shared by training, evaluation and prediction."""
from __future__ import annotations

import torch

from .errors import UserError

__all__ = ["pick_device"]


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """"auto" (or None): CUDA when available, else the CPU; otherwise the device named ("cpu", "cuda:1", ...).

    A name torch does not know, or a CUDA device on a machine without one, raises UserError saying so."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"unknown device {device!r} ({e}); use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: this torch sees no CUDA GPU; use --device cpu (or auto)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return chosen
