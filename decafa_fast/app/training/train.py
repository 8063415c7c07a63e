"""`decafa-fast train`: train DeCaFA, on synthetic faces by default.

Several data sets with different markups are trained with alternating batches, as in the paper (on
synthetic data the training set is split into a 98-, a 68- and a 5-point annotated part). Adam with
polynomial learning-rate decay (power 0.9), random horizontal flips with index permutation, bf16 autocast
and channels_last on CUDA, optional torch.compile, checkpoints (config, model, optimizer, scheduler, step)
with --resume, a tqdm progress bar with loss and NME, metrics in a CSV file. Multi-GPU / multi-node with
DDP: launch with `torchrun --nproc_per_node N -m decafa_fast.app.cli train ...` (gloo on CPU).

The model config defaults are the paper's (128 x 128, S = 4, widths 64-128-256); the command's default
"--preset cpu" shrinks it so that training finishes within minutes on a 2-core CPU: 32 x 32 faces, S = 2,
widths 16-32-64, 1500 steps of 16, Adam 2e-3, beta 5, one thread, stopping at 9.5 minutes at the latest.
Measured on the shared 2-core development machine: 9 min 10 s wall (6.8 min of CPU), validation NME
(98 points) 5.08% against 21.61% for the mean shape. "--preset paper" keeps the paper's model and optimiser.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import distributed as D
from .checkpoint import load_checkpoint, save_checkpoint
from ..data.markups import derive_from_wflw98
from ..data.synthetic import ALL_MARKUPS, SyntheticFaces, collate_faces
from ..data.transforms import hflip_batch
from ..evaluation.metrics import nme
from ..model import DeCaFA, DeCaFAConfig, count_parameters, decafa_loss

__all__ = ["add_arguments", "run", "PRESETS", "evaluate_model", "mean_shape_nme", "build_config", "train"]

# Model + schedule presets. "cpu" is sized for the default run on a 2-core CPU (see README for timings).
# The cpu preset's run is ~200x shorter than the paper's, so it uses a higher learning rate and a sharper
# softmax (beta = 5): with beta = 1 the per-landmark logits need many small Adam steps to grow large enough
# for a peaked spatial softmax, and the 98-point head (fed no amplifying transfer layer) lags far behind.
# It runs one CPU thread: on a 2-core machine shared with anything else, two OpenMP threads were measured
# 3-10x slower per step than one (oversubscription), and one thread alone needs ~0.22 s per step.
PRESETS: dict[str, dict] = {
    "cpu": dict(image_size=32, stages=2, widths=(16, 32, 64), embedding_channels=16, beta=5.0, lr=2e-3,
                steps=1500, batch_size=16, train_size=3000, val_size=300, max_minutes=9.5, threads=1),
    "paper": dict(image_size=128, stages=4, widths=(64, 128, 256), embedding_channels=64, beta=1.0, lr=5e-4,
                  steps=400_000, batch_size=8, train_size=30_000, val_size=1000),
    "tiny": dict(image_size=32, stages=1, widths=(8, 8, 8), embedding_channels=8, beta=1.0, lr=5e-4,
                 steps=4, batch_size=4, train_size=24, val_size=8),
}


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _lambdas(text: str):
    if text in ("increasing", "constant", "decreasing"):
        return text
    return tuple(float(v) for v in text.split(","))


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults come from --preset)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="size preset: cpu (default; minutes on a 2-core CPU), paper (the paper's model), tiny (tests)")
    g.add_argument("--stages", type=int, help="number of cascade stages S")
    g.add_argument("--image-size", type=int, help="input side in pixels")
    g.add_argument("--widths", type=_int_list, help="U-Net widths, e.g. 64,128,256")
    g.add_argument("--embedding-channels", type=int, help="U-Net embedding channels")
    g.add_argument("--markups", default=",".join(ALL_MARKUPS), help="comma-separated markups, finest first")
    g.add_argument("--transfer", choices=("chained", "independent"), default="chained")
    g.add_argument("--fusion", choices=("F1", "F2", "F3", "F4", "F5"), default="F5")
    g.add_argument("--lambdas", type=_lambdas, default="increasing",
                   help="increasing | constant | decreasing | comma-separated weights")
    g.add_argument("--beta", type=float, help="softmax inverse temperature (paper 1; cpu preset 5)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, help="optimizer updates")
    t.add_argument("--batch-size", type=int, help="batch size per process")
    t.add_argument("--lr", type=float, help="Adam learning rate (paper preset 5e-4, cpu preset 2e-3)")
    t.add_argument("--poly-power", type=float, default=0.9, help="learning-rate decay (1 - step/steps)^power")
    t.add_argument("--data", action="append", default=None,
                   help="training data set KIND:PATH (300w:, wflw:, celeba:, folder:, synthetic:N); repeat to "
                        "alternate batches between sets; default: synthetic faces split into 98/68/5-point parts")
    t.add_argument("--data-weights", type=_int_list, default=None,
                   help="batches per turn for each training set in the alternation, e.g. 2,1,1 -> A B A C A B A C "
                        "(default: 2,1,1 for the synthetic 98/68/5 split, so the finest markup gets half the batches; "
                        "1 each for --data)")
    t.add_argument("--val-data", default=None, help="validation data spec (default: held-out synthetic faces)")
    t.add_argument("--train-size", type=int, help="number of synthetic training faces")
    t.add_argument("--val-size", type=int, help="number of synthetic validation faces")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    t.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: only at the end)")
    t.add_argument("--log-every", type=int, default=25, help="write a CSV row every N steps")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    t.add_argument("--out", default="runs/train", help="output folder: checkpoint.pt, metrics.csv, summary.json")
    t.add_argument("--resume", default=None, help="checkpoint to resume from ('auto': OUT/checkpoint.pt if present)")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="stop early (and save) once training has run this long (cpu preset: 9.5)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast (auto: on CUDA)")
    r.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="channels_last memory format (auto: on CUDA only)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (cpu preset: 1; others: torch's default)")
    r.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    r.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    r.add_argument("--save-rank-weights", action="store_true",
                   help="(testing DDP) every rank also writes its final weights to OUT/rank<R>.pt")


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset arguments from the preset."""
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def build_config(args: argparse.Namespace) -> DeCaFAConfig:
    return DeCaFAConfig(
        stages=args.stages,
        markups=tuple(m.strip() for m in args.markups.split(",") if m.strip()),
        transfer=args.transfer,
        fusion=args.fusion,
        lambdas=args.lambdas,
        image_size=args.image_size,
        embedding_channels=args.embedding_channels,
        widths=tuple(args.widths),
        beta=args.beta,
    )


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def build_train_sets(args: argparse.Namespace, config: DeCaFAConfig) -> list[tuple[str, Dataset]]:
    """(name, dataset) pairs whose batches alternate. Synthetic default: one part per markup."""
    if args.data:
        from ..data.real import build_dataset

        return [(spec, build_dataset(spec, "train", config.image_size, config.markups, augment=True, seed=args.seed))
                for spec in args.data]
    sets = []
    per = max(1, args.train_size // len(config.markups))
    for k, markup in enumerate(config.markups):
        ds = SyntheticFaces(per, size=config.image_size, seed=args.seed * 1000 + 1 + k,
                            markups=config.markups, annotate=(markup,))
        sets.append((f"synthetic-{markup}", ds))
    return sets


def build_val_set(args: argparse.Namespace, config: DeCaFAConfig) -> Dataset:
    if args.val_data:
        from ..data.real import build_dataset

        return build_dataset(args.val_data, "test", config.image_size, config.markups, seed=args.seed)
    # a seed range never used for training
    return SyntheticFaces(args.val_size, size=config.image_size, seed=args.seed * 1000 + 999, markups=config.markups)


def _batches(dataset: Dataset, batch_size: int, seed: int, info: D.DistInfo, workers: int):
    """An endless iterator of collated batches (reshuffled every epoch, sharded over ranks)."""
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=True
    ) if info.enabled else None
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        collate_fn=collate_faces, drop_last=len(dataset) >= batch_size * info.world_size,
                        num_workers=workers, generator=generator, persistent_workers=workers > 0)
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            yield batch
        epoch += 1


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, markups: tuple[str, ...], device: torch.device,
                   batch_size: int = 32, autocast: bool = False, channels_last: bool = False) -> dict[str, np.ndarray]:
    """Per-sample inter-ocular NME of the last stage for every markup annotated in `dataset`:
    {markup: (N_k,)}. Also "<markup>@stage<i>" for the finest markup at every stage."""
    was_training = model.training
    model.eval()
    errors: dict[str, list[np.ndarray]] = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_faces)
    for batch in loader:
        images = batch["image"].to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = model(images)
        for k, name in enumerate(markups):
            if name not in batch["valid"]:
                continue
            ok = batch["valid"][name]
            if not bool(ok.any()):
                continue
            target = batch["landmarks"][name][ok]
            stages = range(len(outputs)) if k == 0 else [len(outputs) - 1]
            for i in stages:
                key = name if i == len(outputs) - 1 else f"{name}@stage{i + 1}"
                pred = outputs[i][k].float().cpu()[ok]
                errors.setdefault(key, []).append(nme(pred, target, name).numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in errors.items()}


def mean_shape_nme(train_sets: list[tuple[str, Dataset]], val_set: Dataset, markup: str = "wflw98",
                   count: int = 300) -> float | None:
    """NME (mean over the validation set) of always predicting the mean training shape of `markup`."""
    shapes = []
    for _, ds in train_sets:
        for i in range(min(count, len(ds))):
            s = ds[i]
            if markup in s["landmarks"]:
                shapes.append(s["landmarks"][markup].numpy())
    if not shapes:
        # e.g. synthetic parts annotated with other markups: derive the shape from their 98 points
        for _, ds in train_sets:
            if isinstance(ds, SyntheticFaces):
                shapes += [derive_from_wflw98(ds.raw(i)[1], markup) for i in range(min(count, len(ds)))]
    if not shapes:
        return None
    mean = np.mean(shapes, axis=0)
    targets = [val_set[i]["landmarks"][markup].numpy() for i in range(len(val_set))
               if markup in val_set[i]["landmarks"]]
    if not targets:
        return None
    targets = np.stack(targets)
    return float(np.nanmean(nme(np.broadcast_to(mean, targets.shape).copy(), targets, markup)))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _interleave(weights: tuple[int, ...]) -> list[int]:
    """One turn of the alternation, data set k appearing weights[k] times, spread out by smooth weighted
    round robin: (2, 1, 1) -> [0, 1, 2, 0]; (1, 1, 1) -> [0, 1, 2]."""
    total, current, cycle = sum(weights), [0] * len(weights), []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights)]
        k = max(range(len(weights)), key=lambda i: current[i])
        current[k] -= total
        cycle.append(k)
    return cycle


def _poly(total: int, power: float):
    return lambda step: max(0.0, 1.0 - step / max(1, total)) ** power


def _batch_nme(outputs, batch, markups) -> float:
    """Mean inter-ocular NME of the last stage over the annotated markups of a batch."""
    values = []
    for k, name in enumerate(markups):
        ok = batch["valid"].get(name)
        if ok is None or not bool(ok.any()):
            continue
        pred = outputs[-1][k].detach().float().cpu()[ok.cpu()]
        values.append(nme(pred, batch["landmarks"][name].detach().float().cpu()[ok.cpu()], name))
    if not values:
        return float("nan")
    return float(torch.cat(values).nanmean())


def _average_buffers(model: nn.Module, info: D.DistInfo) -> None:
    """Make BatchNorm statistics equal on every rank: DDP syncs them only at the start of each forward, so
    after the last step each rank holds its own. Float buffers are averaged, integer ones taken from rank 0."""
    for buf in model.buffers():
        if buf.is_floating_point():
            torch.distributed.all_reduce(buf)
            buf.div_(info.world_size)
        else:
            torch.distributed.broadcast(buf, src=0)


def train(args: argparse.Namespace) -> dict:
    """Run training as configured by the parsed `args`; returns the summary (also in OUT/summary.json)."""
    args = _resolve(args)
    info = D.init_distributed(args.device)
    try:
        return _train(args, info)
    finally:
        D.cleanup_distributed()


def _train(args: argparse.Namespace, info: D.DistInfo) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = info.device
    out = Path(args.out)
    say = print if info.is_main else (lambda *a, **k: None)

    resume_path = None
    if args.resume:
        resume_path = out / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
        if args.resume == "auto" and not resume_path.exists():
            resume_path = None
    state = load_checkpoint(resume_path) if resume_path is not None else None
    config = DeCaFAConfig.from_dict(state["config"]) if state else build_config(args)

    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = DeCaFA(config)
    if state:
        model.load_state_dict(state["model"])
    n_params = count_parameters(model)
    amp = device.type == "cuda" if args.amp == "auto" else args.amp == "bf16"
    channels_last = device.type == "cuda" if args.channels_last == "auto" else args.channels_last == "on"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly(args.steps, args.poly_power))
    start = 0
    if state:
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start = int(state["step"])
        # the schedule may have a new length (--steps): restart it from the resumed step
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _poly(args.steps, args.poly_power),
                                                      last_epoch=start - 1) if start > 0 else scheduler

    train_sets = build_train_sets(args, config)
    val_set = build_val_set(args, config)
    say(f"decafa-fast train: preset {args.preset}: {config.stages} stage(s), {config.image_size}x{config.image_size}, "
        f"widths {list(config.widths)}, embedding {config.embedding_channels}, {config.fusion}, {config.transfer}, "
        f"lambdas {config.stage_lambdas()}, {n_params / 1e6:.2f}M parameters")
    say(f"  {args.steps} steps x batch {args.batch_size} x {info.world_size} process(es), lr {args.lr} poly "
        f"{args.poly_power}, data: {', '.join(f'{n} ({len(d)})' for n, d in train_sets)}; val {len(val_set)} faces; "
        f"device {device}, bf16 {'on' if amp else 'off'}, channels_last {'on' if channels_last else 'off'}"
        + (f", resuming at step {start} from {resume_path}" if state else ""))

    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)

    weights = args.data_weights or ((2,) + (1,) * (len(train_sets) - 1) if not args.data else (1,) * len(train_sets))
    if len(weights) != len(train_sets) or min(weights) < 1:
        raise ValueError(f"--data-weights needs {len(train_sets)} positive integers, got {list(weights)}")
    cycle = _interleave(weights)
    iterators = [_batches(ds, args.batch_size, args.seed + 7919 * k, info, args.workers)
                 for k, (_, ds) in enumerate(train_sets)]
    flip_gen = torch.Generator().manual_seed(args.seed * 31 + info.rank)
    lambdas = config.stage_lambdas()
    scale = 1.0 / config.image_size  # loss in image units: the same magnitude at any resolution

    csv_file = None
    writer = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "metrics.csv"
        new = not (state and csv_path.exists())
        csv_file = open(csv_path, "w" if new else "a", newline="")
        writer = csv.writer(csv_file)
        if new:
            writer.writerow(["step", "elapsed_s", "lr", "loss", "train_nme", "data"]
                            + [f"val_nme_{m}" for m in config.markups])

    def save(step: int, extra: dict) -> None:
        if info.is_main:
            save_checkpoint(out / "checkpoint.pt", model, config, optimizer, scheduler, step, extra)

    def validate() -> dict[str, float]:
        errs = evaluate_model(model, val_set, config.markups, device, autocast=amp, channels_last=channels_last)
        return {k: float(np.nanmean(v)) for k, v in errs.items()}

    progress = None
    if info.is_main and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    run_loss, run_nme, run_n = 0.0, 0.0, 0
    step = start
    stopped_early = False
    val: dict[str, float] = {}
    model.train()
    while step < args.steps:
        k = cycle[step % len(cycle)]  # alternate between the data sets
        batch = next(iterators[k])
        images = batch["image"]
        targets, valid = batch["landmarks"], batch["valid"]
        if not args.no_flip:
            flags = torch.rand(images.shape[0], generator=flip_gen) < 0.5
            images, targets = hflip_batch(images, targets, flags)
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {n: v.to(device) for n, v in targets.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = net(images)
        loss = decafa_loss(outputs, targets, valid, config.markups, lambdas, scale=scale)
        if info.enabled:
            # keep every output in the graph so DDP sees a gradient (maybe zero) for every parameter
            loss = loss + 0.0 * sum(z.float().sum() for stage in outputs for z in stage)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; try a lower --lr")
        batch_nme = _batch_nme(outputs, batch if args.no_flip else {**batch, "landmarks": targets}, config.markups)
        run_loss += loss_value
        run_nme += batch_nme if math.isfinite(batch_nme) else 0.0
        run_n += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{run_loss / run_n:.4f}", nme=f"{run_nme / run_n:.4f}", refresh=False)
        elapsed = time.perf_counter() - t0
        out_of_time = args.max_minutes is not None and elapsed > args.max_minutes * 60 and step < args.steps
        out_of_time = bool(D.broadcast_object(out_of_time, info))
        # periodic validation; the final one follows the loop (after the ranks' BN statistics are averaged)
        is_eval = bool(args.eval_every) and step % args.eval_every == 0 and step < args.steps and not out_of_time
        if is_eval and info.is_main:
            val = validate()
        if writer is not None and (step % args.log_every == 0 or is_eval) and step < args.steps and not out_of_time:
            writer.writerow([step, f"{elapsed:.1f}", f"{scheduler.get_last_lr()[0]:.3g}", f"{run_loss / run_n:.5f}",
                             f"{run_nme / run_n:.5f}", train_sets[k][0]]
                            + [f"{val[m]:.5f}" if is_eval and m in val else "" for m in config.markups])
            csv_file.flush()
            run_loss, run_nme, run_n = 0.0, 0.0, 0
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save(step, {"val_nme": val})
        if out_of_time:
            stopped_early = True
            say(f"\nstopping early at step {step}: --max-minutes {args.max_minutes} reached")
            break
    if progress is not None:
        progress.close()
    elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    if info.enabled:
        _average_buffers(model, info)

    summary: dict = {}
    if info.is_main:
        val = validate()
        writer.writerow([step, f"{elapsed:.1f}", f"{scheduler.get_last_lr()[0]:.3g}",
                         f"{run_loss / max(run_n, 1):.5f}", f"{run_nme / max(run_n, 1):.5f}", train_sets[k][0]]
                        + [f"{val[m]:.5f}" if m in val else "" for m in config.markups])
        baseline = {m: mean_shape_nme(train_sets, val_set, m) for m in config.markups} if not args.val_data else {}
        summary = {
            "steps": step, "elapsed_s": round(elapsed, 1), "cpu_s": round(cpu_s, 1), "stopped_early": stopped_early,
            "parameters": n_params, "val_nme": val, "mean_shape_nme": baseline,
            "world_size": info.world_size, "config": config.to_dict(),
        }
        save(step, {"val_nme": val, "mean_shape_nme": baseline, "elapsed_s": summary["elapsed_s"]})
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"done: {step} steps in {elapsed:.1f} s ({elapsed / 60:.1f} min; process CPU time {cpu_s:.0f} s); checkpoint {out / 'checkpoint.pt'}")
        for name, value in val.items():
            line = f"  val NME {name:<16} {100 * value:6.2f}%"
            if baseline.get(name):
                line += f"   mean-shape NME {100 * baseline[name]:6.2f}%   model / mean shape = {value / baseline[name]:.3f}"
            say(line)
    if csv_file is not None:
        csv_file.close()
    if args.save_rank_weights:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / f"rank{info.rank}.pt")
    return summary


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0
