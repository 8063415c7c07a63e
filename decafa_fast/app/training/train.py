"""`decafa-fast train`: train DeCaFA, on synthetic faces by default.

Several data sets with different markups are trained with alternating batches, as in the paper (on
synthetic data the training set is split into a 98-, a 68- and a 5-point annotated part). Adam with
polynomial learning-rate decay (power 0.9), random horizontal flips with index permutation, bf16 autocast
and channels_last on CUDA, optional torch.compile, checkpoints with exact --resume, a tqdm progress bar with
loss and NME, metrics in a CSV file. Multi-GPU / multi-node with DDP: launch with
`torchrun --nproc_per_node N -m decafa_fast.app.cli train ...` (gloo on CPU).

The flags map one to one onto `TrainConfig` (config.py); the loop is `Trainer` (trainer.py). The model
config defaults are the paper's (128 x 128, S = 4, widths 64-128-256); the command's default "--preset cpu"
shrinks it so that training finishes within minutes on a 2-core CPU: 32 x 32 faces, S = 2, widths
16-32-64, 1500 steps of 16, Adam 2e-3, beta 5, one thread, stopping at 9.5 minutes at the latest (resume
with --resume auto to finish). "--preset paper" keeps the paper's model and optimiser.

A resumed run takes every setting from its checkpoint; flags given on the command line override them, and
those that decide the weights (model, data, seed, batch size, learning rate; see config.RUN_DEFINING) must
equal the checkpoint's, or the run stops with one line naming the file and the setting.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..data.synthetic import ALL_MARKUPS
from . import distributed as D
from .batches import interleave
from .config import PRESETS, TrainConfig
from .resume import read_checkpoint_for_resume, resume_path
from .trainer import Trainer
from .validation import evaluate_model, mean_shape_nme

__all__ = ["PRESETS", "add_arguments", "config_from_args", "evaluate_model", "interleave", "mean_shape_nme", "run",
           "train"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train flags. Every default is None (or False for switches): an unset flag takes its value from the
    preset, or from the checkpoint when resuming."""
    g = p.add_argument_group("model (defaults come from --preset)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="size preset: cpu (default; minutes on a 2-core CPU), paper (the paper's model), tiny (tests)")
    g.add_argument("--stages", type=int, help="number of cascade stages S")
    g.add_argument("--image-size", type=int, help="input side in pixels")
    g.add_argument("--widths", help="U-Net widths, e.g. 64,128,256")
    g.add_argument("--embedding-channels", type=int, help="U-Net embedding channels")
    g.add_argument("--markups", help=f"comma-separated markups, finest first (default {','.join(ALL_MARKUPS)})")
    g.add_argument("--transfer", choices=("chained", "independent"), help="transfer layers (default chained)")
    g.add_argument("--fusion", choices=("F1", "F2", "F3", "F4", "F5"), help="stage fusion (default F5)")
    g.add_argument("--lambdas", help="increasing (default) | constant | decreasing | comma-separated weights")
    g.add_argument("--beta", type=float, help="softmax inverse temperature (paper 1; cpu preset 5)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, help="optimizer updates")
    t.add_argument("--batch-size", type=int, help="batch size per process")
    t.add_argument("--lr", type=float, help="Adam learning rate (paper preset 5e-4, cpu preset 2e-3)")
    t.add_argument("--poly-power", type=float, help="learning-rate decay (1 - step/steps)^power (default 0.9)")
    t.add_argument("--data", action="append", default=None,
                   help="training data set KIND:PATH (300w:, wflw:, celeba:, folder:, synthetic:N); repeat to "
                        "alternate batches between sets; default: synthetic faces split into 98/68/5-point parts")
    t.add_argument("--data-weights",
                   help="batches per turn for each training set in the alternation, e.g. 2,1,1 -> A B A C A B A C "
                        "(default: 2,1,1 for the synthetic 98/68/5 split, so the finest markup gets half the batches; "
                        "1 each for --data)")
    t.add_argument("--val-data", help="validation data spec (default: held-out synthetic faces)")
    t.add_argument("--train-size", type=int, help="number of synthetic training faces")
    t.add_argument("--val-size", type=int, help="number of synthetic validation faces")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    t.add_argument("--eval-every", type=int, help="validate every N steps (default 0: only at the end)")
    t.add_argument("--log-every", type=int, help="write a CSV row every N steps (default 25)")
    t.add_argument("--save-every", type=int, help="checkpoint every N steps (default 0: only at the end)")
    t.add_argument("--out", help="output folder: checkpoint.pt, metrics.csv, summary.json (default runs/train)")
    t.add_argument("--resume", help="checkpoint to resume from ('auto': OUT/checkpoint.pt if present)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that already holds one, replacing its checkpoint, metrics.csv "
                        "and summary.json (without it such a run is refused)")
    t.add_argument("--max-minutes", type=float,
                   help="stop early (and save) once this session has trained this long (cpu preset: 9.5)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    r.add_argument("--amp", choices=("auto", "bf16", "off"), help="bf16 autocast (auto: on CUDA)")
    r.add_argument("--channels-last", choices=("auto", "on", "off"),
                   help="channels_last memory format (auto: on CUDA only)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--threads", type=int, help="torch CPU threads (cpu preset: 1; others: torch's default)")
    r.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    r.add_argument("--save-rank-weights", action="store_true",
                   help="(testing DDP) every rank also writes its final weights to OUT/rank<R>.pt")


# flag destinations that are switches: set -> this config value
_SWITCHES = {"no_flip": ("flip", False), "no_progress": ("progress", False), "compile": ("compile", True),
             "save_rank_weights": ("save_rank_weights", True), "overwrite": ("overwrite", True)}


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config settings the command line sets (flags left out are absent)."""
    values = {}
    for dest, value in vars(args).items():
        if dest in _SWITCHES:
            if value:
                name, setting = _SWITCHES[dest]
                values[name] = setting
        elif value is not None and dest not in ("module", "handler", "command", "debug"):
            values[dest] = tuple(value) if dest == "data" else value
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of a command line: the preset with the given flags applied, or, when resuming, the
    checkpoint's config with them applied (so `--resume auto` alone continues a run as it was)."""
    settings = explicit_settings(args)
    settings.setdefault("out", TrainConfig.out)
    path = resume_path(settings.get("resume"), settings["out"])
    if path is None:
        return TrainConfig.from_preset(settings.pop("preset", "cpu"), **settings)
    _, saved = read_checkpoint_for_resume(path)
    return saved.replace(**settings)


def train(config: TrainConfig) -> dict:
    """Run training as `config` says (in this process; one rank of it under torchrun); returns the summary
    (also in OUT/summary.json)."""
    info = D.init_distributed(config.device)
    try:
        summary = Trainer(config, info).run()
        # every rank done with the group before any rank tears it down: a gloo rank torn down while its peer
        # still finishes (rank 0 validates and saves alone) was seen to abort in CI (SIGABRT, exit -6)
        D.barrier(info)
        return summary
    finally:
        D.cleanup_distributed()


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
