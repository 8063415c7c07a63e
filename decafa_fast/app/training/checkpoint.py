"""Checkpoints: model weights with their config, and for resuming, the whole training state, in one torch file.

Only tensors and plain python types are stored, so loading uses `torch.load(weights_only=True)` (no
arbitrary code runs when reading a file). A truncated or foreign file raises a ValueError naming it.
The write is atomic: the bytes go to `<name>.tmp`, which replaces the checkpoint only once complete; a
failed write (full disk, read-only folder) removes the temporary file and raises `CheckpointWriteError`
naming the path.

Version 2 adds the training state under "training" (the TrainConfig, every RNG, the data order position
and the log accumulators, see trainer.py); version 1 files still load for evaluation and prediction.
"""
from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..model import DeCaFA, DeCaFAConfig

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "write_atomically", "CheckpointWriteError",
           "FORMAT", "VERSION"]

FORMAT = "decafa-fast-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class CheckpointWriteError(UserError):
    """A checkpoint (or another run file) could not be written; the message names the path. `errno` is the
    operating system's error number (errno.ENOSPC for a full disk)."""

    def __init__(self, message: str, errno_number: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_number


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: DeCaFAConfig | dict,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int = 0,
    extra: dict | None = None,
    training: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file + rename, so a crash never leaves half a file).

    training: the state a resumed run needs beyond model, optimizer and scheduler (see trainer.py)."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict() if isinstance(config, DeCaFAConfig) else dict(config),
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "extra": dict(extra or {}),
        "training": training,
    }
    buffer = io.BytesIO()  # serialise first: a write error is then a plain OSError with its errno
    torch.save(state, buffer)
    return write_atomically(path, buffer.getbuffer(), what="checkpoint")


def write_atomically(path: str | os.PathLike, data: bytes | memoryview, what: str = "file") -> Path:
    """Write `data` to `path` through `<path>.tmp` and a rename; on failure remove the temporary file and
    raise CheckpointWriteError naming the path (disk full, read-only or missing folder, ...)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        reason = exc.strerror or str(exc)
        hint = "free some space or choose another --out" if exc.errno == errno.ENOSPC else \
            "check that the folder exists and is writable, or choose another --out"
        raise CheckpointWriteError(f"cannot write {what} {str(path)!r}: {reason}; {hint}", exc.errno) from exc
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`.

    Returns a dict with "config" (dict), "model" (state dict), "optimizer", "scheduler", "step", "extra" and,
    from version 2 on, "training" (the resume state; None when only weights were saved).
    Raises FileNotFoundError for a missing file and ValueError for a truncated, corrupt or foreign one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip / pickle / EOF errors from a damaged or non-torch file
        raise ValueError(
            f"{str(path)!r} is not a readable decafa-fast checkpoint (truncated or corrupt?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is a torch file but not a decafa-fast checkpoint (no {FORMAT!r} marker)")
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} has checkpoint version {state.get('version')!r}; this code reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("config", "model"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"{str(path)!r} lacks its {key!r} entry")
    return state


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DeCaFA, DeCaFAConfig]:
    """The DeCaFA model stored in a checkpoint (in eval mode) and its config."""
    state = load_checkpoint(path, map_location)
    try:
        config = DeCaFAConfig.from_dict(state["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{str(path)!r} holds an invalid model config: {exc}") from exc
    model = DeCaFA(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r}: weights do not match its config: {exc}") from exc
    model.to(map_location).eval()
    return model, config
