"""The training loop as a small object: setup, step, validate, checkpoint, log.

`Trainer(config).run()` trains as `config` (a `TrainConfig`) says and returns the summary. The pieces:
- setup(): device, model, Adam with polynomial decay, the alternating training sets and their batch order,
  and, when resuming, everything the checkpoint holds (checked against the config first);
- step(): one optimizer update on the next batch of the alternation (random flips with index permutation,
  bf16 autocast and channels_last where asked);
- advance(): step() plus the periodic log row, validation and checkpoint; False once the run is over;
- validate(), save(), finish() (final validation, checkpoint, summary.json).

Exact resume: the checkpoint holds model, optimizer, scheduler, the step, every RNG of every process
(rng.py), the number of batches drawn from each training set (the order itself is a function of that
number, batches.py) and the running sums of the next log row. A run stopped after a checkpoint and resumed
from it gives the same weights, bit for bit on CPU, as one that never stopped; metrics.csv is cut back to
the checkpoint's step so no row appears twice. With DataLoader workers and data sets that draw
augmentation from their own generator, the workers' draws are not captured: use --workers 0 for an exact
resume of such data (the synthetic default draws nothing at load time).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.transforms import hflip_batch
from ..errors import Interrupted, UserError
from ..evaluation.metrics import nme
from ..files import output_folder, write_atomically
from ..model import DeCaFA, DeCaFAConfig, count_parameters, decafa_loss
from ..model.checkpoint import save_checkpoint
from . import distributed as D
from .batches import BatchOrder, batches, build_train_sets, build_val_set, fingerprint, interleave
from .config import TrainConfig
from .metrics_log import MetricsLog
from .resume import CHECKPOINT, check_resumable, read_checkpoint_for_resume, resume_path
from .rng import capture_rng, restore_rng
from .validation import evaluate_model, mean_shape_nme

__all__ = ["StepResult", "Trainer"]

METRICS = "metrics.csv"
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------------------------
# Helpers of the step and the end of a run
# ------------------------------------------------------------------------------------------------
def _poly(total: int, power: float):
    return lambda step: max(0.0, 1.0 - step / max(1, total)) ** power


def _batch_nme(outputs, landmarks, valid, markups) -> float:
    """Mean inter-ocular NME of the last stage over the annotated markups of a batch."""
    values = []
    for k, name in enumerate(markups):
        ok = valid.get(name)
        if ok is None or not bool(ok.any()):
            continue
        ok = ok.cpu()
        pred = outputs[-1][k].detach().float().cpu()[ok]
        values.append(nme(pred, landmarks[name].detach().float().cpu()[ok], name))
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


# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float
    nme: float
    data_set: int  # index of the training set the batch came from


class Trainer:
    """Train DeCaFA as `config` says, in this process (one rank of `info` under torchrun; without `info`, the
    process group is joined when torchrun started this process, and `config.device` is picked)."""

    def __init__(self, config: TrainConfig, info: D.DistInfo | None = None) -> None:
        self.config = config
        self.info = info if info is not None else D.init_distributed(config.device)
        self.out = Path(config.out)
        self.step_count = 0
        self.session_start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.elapsed_before = 0.0  # seconds trained before this session (a resumed run)
        self.log_sums = [0.0, 0.0, 0]  # loss, nme, steps since the last log row
        self.val: dict[str, float] = {}
        self.last_set = 0  # the training set of the latest batch (named in the log row)
        self.stopped_early = False
        self.saved_step: int | None = None  # the step of the last checkpoint this session wrote
        self.resumed_step: int | None = None
        self.progress = None
        self._say = print if self.info.is_main else (lambda *a, **k: None)

    # ---- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything before the first step; a resumed run checks and loads its checkpoint here."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        path = resume_path(cfg.resume, cfg.out)
        self._check_out(path)
        state = None
        if path is not None:
            state, saved = read_checkpoint_for_resume(path)
            check_resumable(path, state, saved, cfg)
        self.resumed_from = path if state is not None else None
        self._build_model()
        self._build_data()
        if state is not None:
            self._load_state(path, state)
        self._prepare_steps()
        self._open_outputs(resumed=state is not None)
        self.session_start, self.cpu_start = time.perf_counter(), time.process_time()

    def _replaces_a_run(self, resume_from: Path | None) -> bool:
        """Whether OUT holds a run other than the one this run resumes."""
        existing = self.out / CHECKPOINT
        return existing.exists() and (resume_from is None or resume_from.resolve() != existing.resolve())

    def _check_out(self, resume_from: Path | None) -> None:
        """Refuse an --out that is a file, or that holds another run (unless --overwrite), before any work."""
        if not self.info.is_main:
            return
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {str(self.out)!r} is a file, not a folder; choose a folder (it is made if "
                            f"missing)")
        if self._replaces_a_run(resume_from) and not self.config.overwrite:
            raise UserError(f"--out {str(self.out)!r} already holds a run ({str(self.out / CHECKPOINT)!r}); continue "
                            f"it with --resume auto, start it over with --overwrite (its checkpoint, {METRICS} and "
                            f"{SUMMARY} are replaced), or choose another --out")

    def _build_model(self) -> None:
        cfg = self.config
        self.device = self.info.device
        self.model_config: DeCaFAConfig = cfg.model_config()
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
        self.model = DeCaFA(self.model_config).to(self.device)
        self.amp = self.device.type == "cuda" if cfg.amp == "auto" else cfg.amp == "bf16"
        self.channels_last = self.device.type == "cuda" if cfg.channels_last == "auto" else cfg.channels_last == "on"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.schedule = _poly(cfg.steps, cfg.poly_power)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)

    def _build_data(self) -> None:
        cfg, info = self.config, self.info
        self.train_sets = build_train_sets(cfg)
        self.val_set = build_val_set(cfg)
        self.cycle = interleave(cfg.weights_per_set())
        self.orders = [BatchOrder(len(ds), cfg.batch_size, cfg.seed + 7919 * k, info.rank, info.world_size)
                       for k, (_, ds) in enumerate(self.train_sets)]
        self.positions = [0] * len(self.train_sets)  # batches drawn from each set so far
        self.flip_generator = torch.Generator().manual_seed(cfg.seed * 31 + info.rank)
        self.data_fingerprint = fingerprint([ds for _, ds in self.train_sets])

    def _prepare_steps(self) -> None:
        """The batch iterators (from the resumed positions) and the model as the steps call it (DDP, compile)."""
        cfg, info = self.config, self.info
        self.iterators = [batches(ds, order, start, cfg.workers)
                          for (_, ds), order, start in zip(self.train_sets, self.orders, self.positions)]
        self.net: nn.Module = self.model
        if info.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.model.train()

    def _open_outputs(self, resumed: bool) -> None:
        """The output folder and metrics.csv (cut back to the checkpoint's step when resumed), the banner and
        the progress bar: rank 0's business."""
        cfg, info = self.config, self.info
        self.metrics = MetricsLog(self.out / METRICS, cfg.markups) if info.is_main else None
        if self.metrics is not None:
            self._make_out()
            if cfg.overwrite and self._replaces_a_run(self.resumed_from):
                # the old run goes now, so that the folder never mixes its checkpoint with this run's metrics
                for name in (CHECKPOINT, SUMMARY):
                    (self.out / name).unlink(missing_ok=True)
            self.metrics.start(self.step_count if resumed else None)
        self._announce()
        if info.is_main and cfg.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=cfg.steps, initial=self.step_count, desc="train", dynamic_ncols=True,
                                 mininterval=1.0)

    def _make_out(self) -> None:
        output_folder(self.out)

    def _load_state(self, path: Path, state: dict) -> None:
        training = state["training"]
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{str(path)!r}: its weights or optimizer state do not fit its config ({first})") from exc
        self.step_count = int(state["step"])
        self.resumed_step = self.step_count
        # --steps may have grown: the learning rate follows the new schedule from the resumed step (with the
        # same --steps this is exactly the stored rate)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.schedule(self.step_count)
        self.positions = [int(p) for p in training["positions"]]
        self.log_sums = list(training["log_sums"])
        self.elapsed_before = float(training["elapsed_s"])
        if training.get("data", self.data_fingerprint) != self.data_fingerprint:
            self._say(f"note: the training data differ from those {path} was trained on (another synthetic "
                      f"generator or other files): the run continues on these, not as the original would have")
        rng = training["rng"]
        if len(rng) != self.info.world_size:
            self._say(f"note: {path} was written by {len(rng)} process(es), this run has {self.info.world_size}: "
                      f"it continues, but not bit for bit as the original would have")
        restore_rng(rng[min(self.info.rank, len(rng) - 1)], {"flip": self.flip_generator},
                    [ds for _, ds in self.train_sets])

    def _announce(self) -> None:
        cfg, mc = self.config, self.model_config
        self._say(f"decafa-fast train: preset {cfg.preset}: {mc.stages} stage(s), {mc.image_size}x{mc.image_size}, "
                  f"widths {list(mc.widths)}, embedding {mc.embedding_channels}, {mc.fusion}, {mc.transfer}, "
                  f"lambdas {mc.stage_lambdas()}, {count_parameters(self.model) / 1e6:.2f}M parameters")
        data = ", ".join(f"{n} ({len(d)})" for n, d in self.train_sets)
        self._say(f"  {cfg.steps} steps x batch {cfg.batch_size} x {self.info.world_size} process(es), lr {cfg.lr} "
                  f"poly {cfg.poly_power}, data: {data}; val {len(self.val_set)} faces; device {self.device}, "
                  f"bf16 {'on' if self.amp else 'off'}, channels_last {'on' if self.channels_last else 'off'}"
                  + (f", resuming at step {self.step_count} from {self.resumed_from}" if self.resumed_from else ""))

    # ---- one update -------------------------------------------------------------------------------
    def step(self) -> StepResult:
        cfg, mc = self.config, self.model_config
        k = self.cycle[self.step_count % len(self.cycle)]  # alternate between the data sets
        batch = next(self.iterators[k])
        self.positions[k] += 1
        images, targets, valid = batch["image"], batch["landmarks"], batch["valid"]
        if cfg.flip:
            flags = torch.rand(images.shape[0], generator=self.flip_generator) < 0.5
            images, targets = hflip_batch(images, targets, flags)
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {n: v.to(self.device) for n, v in targets.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            outputs = self.net(images)
        loss = decafa_loss(outputs, targets, valid, mc.markups, mc.stage_lambdas(), scale=1.0 / mc.image_size)
        if self.info.enabled:
            # keep every output in the graph so DDP sees a gradient (maybe zero) for every parameter
            loss = loss + 0.0 * sum(z.float().sum() for stage in outputs for z in stage)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise UserError(f"the training loss became {value} at step {self.step_count} (learning rate "
                            f"{self.config.lr}); try a lower --lr")
        return StepResult(value, _batch_nme(outputs, targets, valid, mc.markups), k)

    def advance(self) -> bool:
        """One step, then the log row, validation and checkpoint that fall on it. False when the run is over
        (all steps done, or --max-minutes reached: then the caller's finish() saves)."""
        cfg = self.config
        result = self.step()
        self.last_set = result.data_set
        self.log_sums[0] += result.loss
        self.log_sums[1] += result.nme if math.isfinite(result.nme) else 0.0
        self.log_sums[2] += 1
        if self.progress is not None:
            n = self.log_sums[2]
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{self.log_sums[0] / n:.4f}", nme=f"{self.log_sums[1] / n:.4f}",
                                      refresh=False)
        step = self.step_count
        session = time.perf_counter() - self.session_start
        out_of_time = cfg.max_minutes is not None and session > cfg.max_minutes * 60 and step < cfg.steps
        out_of_time = bool(D.broadcast_object(out_of_time, self.info))
        if step >= cfg.steps or out_of_time:
            if out_of_time:
                self._say(f"\nstopping early at step {step}: --max-minutes {cfg.max_minutes} reached")
            self.stopped_early = out_of_time
            return False
        # periodic validation; the final one is finish()'s (after the ranks' BN statistics are averaged)
        is_eval = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if is_eval and self.info.is_main:
            self.val = self.validate()
        if step % cfg.log_every == 0 or is_eval:
            self.log(with_val=is_eval)
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
        return True

    # ---- validation, log, checkpoint --------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        errs = evaluate_model(self.model, self.val_set, self.model_config.markups, self.device, autocast=self.amp,
                              channels_last=self.channels_last)
        return {k: float(np.nanmean(v)) for k, v in errs.items()}

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.session_start

    def log(self, with_val: bool) -> None:
        """Append the row of the current step (averages since the last row) to metrics.csv."""
        if self.metrics is not None:
            loss, nme_sum, n = self.log_sums
            n = max(n, 1)
            self.metrics.append([self.step_count, f"{self.elapsed():.1f}", f"{self.scheduler.get_last_lr()[0]:.3g}",
                                 f"{loss / n:.5f}", f"{nme_sum / n:.5f}", self.train_sets[self.last_set][0]]
                                + [f"{self.val[m]:.5f}" if with_val and m in self.val else ""
                                   for m in self.model_config.markups])
        self.log_sums = [0.0, 0.0, 0]

    def training_state(self) -> dict:
        """What a resumed run needs beyond model, optimizer and scheduler (collective under DDP: every rank's
        RNG states are gathered)."""
        rng = capture_rng({"flip": self.flip_generator}, [ds for _, ds in self.train_sets])
        return {"config": self.config.to_dict(), "positions": list(self.positions), "log_sums": list(self.log_sums),
                "elapsed_s": self.elapsed(), "world_size": self.info.world_size, "data": self.data_fingerprint,
                "rng": D.all_gather_object(rng, self.info)}

    def save(self, extra: dict | None = None, training: dict | None = None) -> None:
        training = training if training is not None else self.training_state()
        if self.info.is_main:
            save_checkpoint(self.out / CHECKPOINT, self.model, self.model_config, self.optimizer, self.scheduler,
                            self.step_count, {"val_nme": self.val, **(extra or {})}, training=training)
            self.saved_step = self.step_count

    # ---- end --------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Final validation, checkpoint and summary.json; returns the summary (empty on ranks other than 0)."""
        cfg, info = self.config, self.info
        self.close_progress()
        session_s, cpu_s = time.perf_counter() - self.session_start, time.process_time() - self.cpu_start
        if info.enabled and not self.stopped_early:
            # (a stopped run keeps rank 0's statistics, which DDP hands every rank at the next forward: its
            # resumption then matches a run that never stopped)
            _average_buffers(self.model, info)
        training = self.training_state()  # before the baseline reads the training sets
        training["log_sums"] = [0.0, 0.0, 0]  # the row written below reports them
        summary: dict = {}
        if info.is_main:
            self.val = self.validate()
            self.log(with_val=True)
            baseline = {m: mean_shape_nme(self.train_sets, self.val_set, m) for m in cfg.markups} \
                if not cfg.val_data else {}
            summary = {
                "steps": self.step_count, "elapsed_s": round(self.elapsed(), 1), "session_s": round(session_s, 1),
                "cpu_s": round(cpu_s, 1), "stopped_early": self.stopped_early,
                "parameters": count_parameters(self.model), "val_nme": self.val, "mean_shape_nme": baseline,
                "world_size": info.world_size, "config": self.model_config.to_dict(), "train": cfg.to_dict(),
            }
            self.save({"mean_shape_nme": baseline, "elapsed_s": summary["elapsed_s"]}, training)
            write_atomically(self.out / SUMMARY, json.dumps(summary, indent=2).encode(), what="summary")
            self._report(summary, session_s, cpu_s)
        if cfg.save_rank_weights:
            weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            self._make_out()
            torch.save(weights, self.out / f"rank{info.rank}.pt")
        return summary

    def _report(self, summary: dict, session_s: float, cpu_s: float) -> None:
        self._say(f"done: {self.step_count} steps, this session {session_s:.1f} s ({session_s / 60:.1f} min; process "
                  f"CPU time {cpu_s:.0f} s); checkpoint {self.out / CHECKPOINT}")
        for name, value in summary["val_nme"].items():
            line = f"  val NME {name:<16} {100 * value:6.2f}%"
            base = summary["mean_shape_nme"].get(name)
            if base:
                line += f"   mean-shape NME {100 * base:6.2f}%   model / mean shape = {value / base:.3f}"
            self._say(line)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def run(self) -> dict:
        """setup(), advance() until the run is over, finish(); returns the summary. Ctrl-C raises `Interrupted`
        saying which checkpoint is kept."""
        try:
            self.setup()
            while self.advance():
                pass
            return self.finish()
        except KeyboardInterrupt as interrupt:
            self.close_progress()
            raise Interrupted(self.kept()) from interrupt
        finally:
            self.close_progress()

    def kept(self) -> str:
        """What an interrupted run leaves in OUT, in one line."""
        path, steps = self.out / CHECKPOINT, self.config.steps
        stopped = f"stopped at step {self.step_count} of {steps}"
        if self.saved_step is not None:
            return (f"{stopped}; kept {path} (step {self.saved_step}) and {self.out / METRICS}; continue with "
                    f"--resume auto --out {self.out}")
        resumed = getattr(self, "resumed_from", None)
        if resumed is not None:
            how = f"--resume auto --out {self.out}" if resumed == path else f"--resume {resumed}"
            at = f" (step {self.resumed_step})" if self.resumed_step is not None else ""
            return f"{stopped}; {resumed}{at} is unchanged; continue with {how}"
        hint = "" if self.config.save_every else "; --save-every N saves one every N steps"
        return f"{stopped}; no checkpoint was written yet{hint}"
