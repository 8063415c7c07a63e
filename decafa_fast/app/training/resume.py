"""Resuming a run: which checkpoint, whether it can be resumed, and the config it was trained with.

A checkpoint can be resumed when it holds a training state (version 2), its training config is valid, the
settings that decide the weights (config.RUN_DEFINING) equal the run's, and it has not reached the run's
--steps. Every refusal is a UserError naming the file and what to do.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..model.checkpoint import load_checkpoint
from .config import ConfigError, TrainConfig

__all__ = ["CHECKPOINT", "check_resumable", "read_checkpoint_for_resume", "resume_path"]

CHECKPOINT = "checkpoint.pt"


def resume_path(resume: str | None, out: str) -> Path | None:
    """The checkpoint to resume from: --resume PATH, or with "auto" OUT/checkpoint.pt when it exists."""
    if resume is None:
        return None
    if resume == "auto":
        path = Path(out) / CHECKPOINT
        return path if path.exists() else None
    return Path(resume)


def read_checkpoint_for_resume(path: Path) -> tuple[dict, TrainConfig]:
    """The checkpoint's state and the TrainConfig it was trained with; UserError naming `path` otherwise."""
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; check --resume (or use --resume auto to "
                        f"continue OUT/{CHECKPOINT} when present)")
    try:
        state = load_checkpoint(path)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    training = state.get("training")
    if not isinstance(training, dict) or not isinstance(training.get("config"), dict):
        raise UserError(f"{str(path)!r} holds model weights but no training state (an older decafa-fast or an "
                        f"export wrote it): it can be evaluated but not resumed; start a new run without --resume")
    try:
        saved = TrainConfig.from_dict(training["config"])
    except ConfigError as exc:
        raise UserError(f"{str(path)!r} holds an invalid training config: {exc}") from exc
    return state, saved


def check_resumable(path: Path, state: dict, saved: TrainConfig, config: TrainConfig) -> None:
    """Refuse a checkpoint of another configuration, or of a run that is already finished."""
    differences = saved.differences(config)
    if differences:
        was = ", ".join(f"{name}={old}" for name, old, _ in differences)
        now = ", ".join(f"{name}={new}" for name, _, new in differences)
        raise UserError(f"{str(path)!r} is a checkpoint of another configuration: it was trained with {was}, this "
                        f"run asks for {now}; resume with the checkpoint's settings, or start a new run in another "
                        f"--out without --resume")
    step = int(state["step"])
    if step >= config.steps:
        raise UserError(f"{str(path)!r} is a finished run: it reached step {step} and this run asks for "
                        f"{config.steps} steps; to train it further pass --steps larger than {step}, or start a new "
                        f"run in another --out without --resume")
