"""`TrainConfig`: every setting of a training run, typed and checked when it is built.

The `decafa-fast train` flags map one to one onto these fields (`--no-flip` sets flip=False, `--no-progress`
progress=False); `ablate` builds configs directly. A bad value raises `ConfigError` (a `UserError` and a
`ValueError`) with one line naming the setting and the value, e.g. "image_size must be an integer, got '32'".

Presets: the dataclass defaults are the "cpu" preset (the command's default); `TrainConfig.from_preset`
starts from another preset and applies overrides. "paper" keeps the paper's model and optimiser.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from ..data.synthetic import ALL_MARKUPS
from ..errors import UserError
from ..model import DeCaFAConfig

__all__ = ["MODEL_FIELDS", "PRESETS", "RUN_DEFINING", "ConfigError", "TrainConfig"]


class ConfigError(UserError, ValueError):
    """A training setting with a bad type or value."""


# Model + schedule presets. "cpu" is sized for the default run on a 2-core CPU (docs/app.md, "The model").
# The cpu preset's run is ~200x shorter than the paper's, so it uses a higher learning rate and a sharper
# softmax (beta = 5): with beta = 1 the per-landmark logits need many small Adam steps to grow large enough
# for a peaked spatial softmax, and the 98-point head (fed no amplifying transfer layer) lags far behind.
# It runs one CPU thread: on a small machine shared with other work, several OpenMP threads oversubscribe
# the cores and each step gets slower, not faster (compare the times that `decafa-fast train --threads 1`
# and `--threads 2` report at the end).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(image_size=32, stages=2, widths=(16, 32, 64), embedding_channels=16, beta=5.0, lr=2e-3,
                steps=1500, batch_size=16, train_size=3000, val_size=300, max_minutes=9.5, threads=1),
    "paper": dict(image_size=128, stages=4, widths=(64, 128, 256), embedding_channels=64, beta=1.0, lr=5e-4,
                  steps=400_000, batch_size=8, train_size=30_000, val_size=1000, max_minutes=None, threads=None),
    "tiny": dict(image_size=32, stages=1, widths=(8, 8, 8), embedding_channels=8, beta=1.0, lr=5e-4,
                 steps=4, batch_size=4, train_size=24, val_size=8, max_minutes=None, threads=None),
}

# The fields that make up DeCaFAConfig.
MODEL_FIELDS = ("stages", "image_size", "widths", "embedding_channels", "markups", "transfer", "fusion",
                "lambdas", "beta")
# The settings a resumed run must share with its checkpoint: they decide the weights step by step.
# (steps may grow, to train a finished run further; output, logging and runtime settings may change.)
RUN_DEFINING = ("preset",) + MODEL_FIELDS + ("batch_size", "lr", "poly_power", "data", "data_weights",
                                             "train_size", "seed", "flip")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults: the cpu preset, synthetic faces, output in runs/train."""

    preset: str = "cpu"  # the preset the defaults came from (reported in the log and the checkpoint)
    # model
    stages: int = 2
    image_size: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    embedding_channels: int = 16
    markups: tuple[str, ...] = ALL_MARKUPS  # finest first
    transfer: str = "chained"
    fusion: str = "F5"
    lambdas: str | tuple[float, ...] = "increasing"
    beta: float = 5.0
    # optimisation and data
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    poly_power: float = 0.9
    data: tuple[str, ...] = ()  # KIND:PATH specs whose batches alternate; () = synthetic faces per markup
    data_weights: tuple[int, ...] | None = None  # batches per turn of each set (None: 2,1,1... or 1 each)
    val_data: str | None = None
    train_size: int = 3000
    val_size: int = 300
    seed: int = 0
    flip: bool = True
    # schedule of side effects
    eval_every: int = 0
    log_every: int = 25
    save_every: int = 0
    out: str = "runs/train"
    resume: str | None = None  # a checkpoint path, or "auto": OUT/checkpoint.pt when it exists
    overwrite: bool = False  # a new run may replace the run already in OUT (else it is refused)
    max_minutes: float | None = 9.5
    # runtime
    device: str = "auto"
    amp: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    threads: int | None = 1
    workers: int = 0
    progress: bool = True
    save_rank_weights: bool = False  # (testing DDP) every rank writes its final weights to OUT/rank<R>.pt

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in _CHECKS:
                object.__setattr__(self, f.name, _CHECKS[f.name](f.name, getattr(self, f.name)))
        self._check_together()

    def _check_together(self) -> None:
        try:
            self.model_config()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        sets = len(self.data) if self.data else len(self.markups)
        if self.data_weights is not None and len(self.data_weights) != sets:
            raise ConfigError(f"data_weights needs one weight per training set ({sets}), "
                              f"got {list(self.data_weights)}")
        if not self.data and self.train_size < len(self.markups):
            raise ConfigError(f"train_size must be at least the number of markups ({len(self.markups)}), "
                              f"got {self.train_size}")

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides: Any) -> TrainConfig:
        """The preset's settings with `overrides` applied (unknown names raise ConfigError)."""
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return cls.from_dict({**PRESETS[preset], "preset": preset, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"a training config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {unknown}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain python values only (lists for tuples): JSON and torch.load(weights_only=True) safe."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}

    # ---- derived -----------------------------------------------------------------------------------
    def model_config(self) -> DeCaFAConfig:
        return DeCaFAConfig(stages=self.stages, markups=self.markups, transfer=self.transfer, fusion=self.fusion,
                            lambdas=self.lambdas, image_size=self.image_size,
                            embedding_channels=self.embedding_channels, widths=self.widths, beta=self.beta)

    def weights_per_set(self) -> tuple[int, ...]:
        """Batches per turn of each training set: the finest synthetic markup gets half the batches."""
        if self.data_weights is not None:
            return self.data_weights
        if self.data:
            return (1,) * len(self.data)
        return (2,) + (1,) * (len(self.markups) - 1)

    def differences(self, other: TrainConfig, names: tuple[str, ...] = RUN_DEFINING) -> list[tuple[str, str, str]]:
        """(name, this value, other value) as text for every setting in `names` that differs."""
        return [(n, _show(getattr(self, n)), _show(getattr(other, n)))
                for n in names if getattr(self, n) != getattr(other, n)]


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) if value else "(none)"
    return repr(value) if isinstance(value, str) else str(value)


# ---- per-field checks: each returns the normalised value or raises ConfigError naming the field ---------
def _integer(minimum: int, optional: bool = False):
    def check(name: str, value: Any) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        return value
    return check


def _number(positive: bool = True, optional: bool = False, minimum: float | None = None):
    def check(name: str, value: Any) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
            bound = "a positive number" if positive else f"a number >= {minimum}"
            raise ConfigError(f"{name} must be {bound}, got {value}")
        return value
    return check


def _choice(*choices: str):
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def _text(optional: bool):
    def check(name: str, value: Any) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        return value
    return check


def _sequence(item, optional: bool = False, allow_empty: bool = False):
    """A tuple of items from a list, a tuple or comma-separated text ("64,128,256")."""
    def check(name: str, value: Any) -> tuple | None:
        if value is None and optional:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if not value and not allow_empty:
            raise ConfigError(f"{name} must not be empty")
        return tuple(item(f"{name} item", v) for v in value)
    return check


def _lambdas(name: str, value: Any) -> str | tuple[float, ...]:
    if isinstance(value, str) and value in ("increasing", "constant", "decreasing"):
        return value
    try:
        return _sequence(_number_text)(name, value)
    except ConfigError:
        raise ConfigError(f"{name} must be increasing, constant, decreasing or a list of non-negative "
                          f"weights, got {value!r}") from None


def _parsed_item(parse, kind: str, check):
    """An item of a list given as text ("2,1,1") or as numbers: text parsed by `parse`, then `check`ed."""
    def item(name: str, value: Any):
        if isinstance(value, str):
            try:
                value = parse(value)
            except ValueError:
                raise ConfigError(f"{name.replace(' item', '')} must hold {kind}, got {value!r}") from None
        return check(name, value)
    return item


_integer_text = _parsed_item(int, "integers", _integer(1))
_number_text = _parsed_item(float, "numbers", _number(positive=False, minimum=0.0))


_CHECKS = {
    "preset": _choice(*PRESETS),
    "stages": _integer(1), "image_size": _integer(4), "widths": _sequence(_integer_text),
    "embedding_channels": _integer(1), "markups": _sequence(_text(False)),
    "transfer": _choice("chained", "independent"), "fusion": _choice("F1", "F2", "F3", "F4", "F5"),
    "lambdas": _lambdas, "beta": _number(),
    "steps": _integer(1), "batch_size": _integer(1), "lr": _number(),
    "poly_power": _number(positive=False, minimum=0.0),
    "data": _sequence(_text(False), allow_empty=True), "data_weights": _sequence(_integer_text, optional=True),
    "val_data": _text(optional=True), "train_size": _integer(1), "val_size": _integer(1), "seed": _integer(0),
    "flip": _flag, "eval_every": _integer(0), "log_every": _integer(1), "save_every": _integer(0),
    "out": _text(False), "resume": _text(optional=True), "overwrite": _flag, "max_minutes": _number(optional=True),
    "device": _choice("auto", "cpu", "cuda"), "amp": _choice("auto", "bf16", "off"),
    "channels_last": _choice("auto", "on", "off"), "compile": _flag, "threads": _integer(1, optional=True),
    "workers": _integer(0), "progress": _flag, "save_rank_weights": _flag,
}
