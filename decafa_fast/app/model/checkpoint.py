"""Checkpoints: model weights with their config, and for resuming, the whole training state, in one torch file.

Only tensors and plain python types are stored, so loading uses `torch.load(weights_only=True)` (no
arbitrary code runs when reading a file). The write is atomic (`files.write_atomically`).

Integrity: the state carries "checksum", the sha256 of its content (every key, plain value and tensor
bytes, in order; see `content_checksum`). It is stored inside the state as text, so it survives
torch.save / torch.load(weights_only=True), and it does not depend on how torch lays out the file. Loading
recomputes it: a file damaged after it was written (a flipped byte in a tensor record or in data.pkl) is
refused with one line naming it. Files of versions 1 and 2 predate the checksum: they load with an
`UnverifiedCheckpointWarning`; a version 3 file without a checksum is refused.

A file that is not a checkpoint (a folder, an image, a text file, a damaged or foreign torch file) raises
a ValueError (FileNotFoundError when missing) naming the file and what it is.

Version 2 added the training state under "training" (the TrainConfig, every RNG, the data order position
and the log accumulators, see training/trainer.py); version 3 the checksum. Version 1 files still load for
evaluation and prediction.
"""
from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import write_atomically
from .decafa import DeCaFA, DeCaFAConfig

__all__ = ["CHECKSUM", "FORMAT", "VERSION", "UnverifiedCheckpointWarning", "content_checksum", "load_checkpoint",
           "load_model", "save_checkpoint"]

FORMAT = "decafa-fast-checkpoint"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CHECKSUM = "checksum"  # the state's key holding "sha256:<hex digest of the rest>"
_FIRST_CHECKSUMMED_VERSION = 3


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before checkpoints carried a checksum: its content cannot be verified."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


# ---- checksum -----------------------------------------------------------------------------------------
def _feed(h: Any, value: Any) -> None:
    """Hash `value` with its type and structure, so that no two different states feed the same bytes."""
    if value is None:
        h.update(b"N")
    elif isinstance(value, bool):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        h.update(b"I%d;" % value)
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))  # the exact bits, NaN payloads included
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data) + data)
    elif isinstance(value, bytes):
        h.update(b"Y%d:" % len(value) + value)
    elif isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"T{t.dtype}:{tuple(value.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"D%d:" % len(value))
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update((b"L" if isinstance(value, list) else b"U") + b"%d:" % len(value))
        for item in value:
            _feed(h, item)
    else:
        raise TypeError(f"a checkpoint holds tensors and plain python values only, got {type(value).__name__}")


def content_checksum(state: dict) -> str:
    """"sha256:<hex>" of everything in `state` but its checksum entry: keys, values and tensor bytes in order,
    with their types, dtypes and shapes. The same before torch.save and after torch.load."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM})
    return "sha256:" + h.hexdigest()


# ---- save -----------------------------------------------------------------------------------------------
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
    """Write a checkpoint atomically (temporary file + rename, so a crash never leaves half a file), with the
    checksum of its content.

    training: the state a resumed run needs beyond model, optimizer and scheduler (see training/trainer.py)."""
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
    state[CHECKSUM] = content_checksum(state)
    buffer = io.BytesIO()  # serialise first: a write error is then a plain OSError with its errno
    torch.save(state, buffer)
    return write_atomically(path, buffer.getbuffer(), what="checkpoint")


# ---- load -----------------------------------------------------------------------------------------------
_MAGIC = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
          (b"\x7fELF", "a program or library")]
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # zip file; legacy pickle


def _what_file(path: Path, head: bytes) -> str | None:
    """What a file that is not a torch file is ("a PNG image", "a text file", ...); None: maybe a torch file."""
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(_TORCH_MAGIC):
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return "not a torch file (unknown content)"
    return "a text file"


def _load_error(path: Path, error: Exception) -> str:
    """The one line for a torch file that torch.load refused (without torch's advice to load it unsafely)."""
    text = str(error)
    if "weights_only" in text or "Unsupported global" in text or "Weights only load failed" in text:
        return (f"{str(path)!r} is a torch file holding python objects other than tensors and plain values (a "
                f"whole pickled model?), not a decafa-fast checkpoint; decafa-fast reads only files that run no code")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return f"{str(path)!r} is not a readable decafa-fast checkpoint (truncated or corrupt): {reason}"


def _to_device(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _verify(path: Path, state: dict) -> None:
    stored = state.get(CHECKSUM)
    if stored is None:
        if state["version"] >= _FIRST_CHECKSUMMED_VERSION:
            raise ValueError(f"{str(path)!r} is damaged or was edited: checkpoint version {state['version']} carries "
                             f"a checksum and this file has none")
        warnings.warn(f"{str(path)!r} has no checksum (checkpoint version {state['version']}, written before "
                      f"checkpoints carried one): its content cannot be verified", UnverifiedCheckpointWarning,
                      stacklevel=3)
        return
    if not isinstance(stored, str) or not stored.startswith("sha256:"):
        raise ValueError(f"{str(path)!r} is damaged: its checksum entry is not a sha256 digest")
    try:
        actual = content_checksum(state)
    except TypeError as exc:
        raise ValueError(f"{str(path)!r} is damaged: {exc}") from exc
    if actual != stored:
        raise ValueError(f"{str(path)!r} is corrupt: its content does not match the checksum stored in it (the file "
                         f"changed after it was written); use another copy or train again")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint` and verify its checksum.

    Returns a dict with "config" (dict), "model" (state dict), "optimizer", "scheduler", "step", "extra",
    from version 2 on "training" (the resume state; None when only weights were saved) and from version 3 on
    "checksum". Raises FileNotFoundError for a missing file and ValueError (one line naming the file) for a
    folder, a file that is not a checkpoint, or a truncated, corrupt or foreign one.
    """
    path = Path(path)
    if path.is_dir():
        inside = path / "checkpoint.pt"
        hint = f"; did you mean {str(inside)!r}?" if inside.is_file() else "; name the checkpoint file itself"
        raise ValueError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file{hint}")
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read: {exc.strerror or exc}") from exc
    what = _what_file(path, head)
    if what is not None:
        raise ValueError(f"{str(path)!r} is not a readable decafa-fast checkpoint: it is {what}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip / pickle / EOF errors from a damaged or non-torch file
        raise ValueError(_load_error(path, exc)) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is a torch file but not a decafa-fast checkpoint (no {FORMAT!r} marker)")
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{str(path)!r} has checkpoint version {state.get('version')!r}; this code reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    _verify(path, state)
    for key in ("config", "model"):
        if not isinstance(state.get(key), dict):
            raise ValueError(f"{str(path)!r} lacks its {key!r} entry")
    if torch.device(map_location) != torch.device("cpu"):
        state = _to_device(state, map_location)
    return state


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[DeCaFA, DeCaFAConfig]:
    """The DeCaFA model stored in a checkpoint (in eval mode) and its config."""
    state = load_checkpoint(path)
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
