"""`decafa-fast evaluate`: a checkpoint's accuracy as the paper reports it, per test subset.

    decafa-fast evaluate --data 300w:/data/300W --checkpoint runs/decafa.pt --ced ced_300w.png
    decafa-fast evaluate --data wflw:/data/WFLW --checkpoint runs/decafa.pt --out results/wflw
    decafa-fast evaluate --data synthetic:500 --checkpoint runs/decafa.pt

For each subset (300W: common, challenging, full; WFLW: test and its pose / expression / illumination /
make-up / occlusion / blur subsets; CelebA: test; folder: all; synthetic:N: one row per markup) it prints
the mean NME (in %), the failure rates at 0.08 and 0.10 (in %) and the AUC at 0.08 and 0.10; it writes files
only where asked: --out DIR (results.json and ced.png), --json FILE, --ced FILE (the CED curves as a PNG).
Each face is cropped around its ground-truth landmarks (the usual protocol for these benchmarks), the
model's last stage predicts on the crop, and the points are mapped back to the original image, where the
error is measured. An image that cannot be read is reported on stderr and left out of the
table (exit status 1 after the others are evaluated); a malformed annotation stops the run (status 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.crop import ImageReadError, apply_affine
from ..data.markups import MARKUPS, derive_from_wflw98
from ..data.real import SYNTHETIC_EVAL_SEED, FaceDataset, FaceRecord, parse_data_spec, read_eval_subsets
from ..data.synthetic import SyntheticFaces, collate_faces
from ..device import pick_device
from ..errors import Interrupted, UserError
from ..files import write_text
from ..model.checkpoint import load_model
from . import metrics

THRESHOLDS = (0.08, 0.10)
DATA_NAMES = {"300w": "300W", "wflw": "WFLW", "celeba": "CelebA", "folder": "folder", "synthetic": "synthetic"}


@dataclass
class SubsetResult:
    """Per-face NMEs of one subset and their summary."""

    name: str
    markup: str
    errors: np.ndarray  # (N,)
    faces: list[str] = field(default_factory=list)  # (N,) what each face is: its image file, or "synthetic #i"

    @property
    def n(self) -> int:
        return int(self.errors.size)

    def summary(self) -> dict:
        if self.n == 0:
            return {"subset": self.name, "markup": self.markup, "faces": 0}
        out = {"subset": self.name, "markup": self.markup, "faces": self.n,
               "nme": float(np.nanmean(self.errors)) if np.isfinite(self.errors).any() else float("nan")}
        for t in THRESHOLDS:
            out[f"fr@{t:.2f}"] = metrics.failure_rate(self.errors, t)
            out[f"auc@{t:.2f}"] = metrics.auc(self.errors, t)
        return out

    def rows(self) -> list[dict]:
        """One row per face: {"face": image file (or synthetic index), "nme": error or None if undefined}."""
        names = self.faces or [f"#{i}" for i in range(self.n)]
        return [{"face": name, "nme": float(e) if np.isfinite(e) else None} for name, e in zip(names, self.errors)]


def model_points(outputs: list[torch.Tensor], model_markups: tuple[str, ...], markup: str) -> torch.Tensor:
    """The model's points for `markup` from one stage's outputs (list over the model's markups of
    (B, L_k, 2)); a markup the model lacks is derived from its 98 WFLW points when it has them."""
    if markup in model_markups:
        return outputs[model_markups.index(markup)]
    if "wflw98" in model_markups and MARKUPS[markup].wflw98_groups is not None:
        return derive_from_wflw98(outputs[model_markups.index("wflw98")], markup)
    raise ValueError(f"the model predicts {list(model_markups)}; it cannot give {markup!r} points")


class _ReportUnreadable(Dataset):
    """A FaceDataset whose items are None (after `report(record, error)`) when the image cannot be read."""

    def __init__(self, dataset: FaceDataset, report: Callable[[FaceRecord, Exception], None] | None):
        self.dataset, self.report = dataset, report

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        try:
            return self.dataset[index]
        except (FileNotFoundError, ImageReadError) as error:
            if self.report is None:
                raise
            self.report(self.dataset.records[index], error)
            return None


def _collate(items: list[dict | None]) -> dict | None:
    items = [it for it in items if it is not None]
    if not items:
        return None
    return {"image": torch.stack([it["image"] for it in items]),
            "crop": torch.stack([it["crop"] for it in items]),
            "index": torch.tensor([it["index"] for it in items])}


@torch.inference_mode()
def predict_records(model: torch.nn.Module, records: list[FaceRecord], batch_size: int = 32,
                    device: torch.device | str = "cpu", stage: int = -1, workers: int = 0,
                    progress: bool = True,
                    on_unreadable: Callable[[FaceRecord, Exception], None] | None = None) -> np.ndarray:
    """Predicted landmarks of annotated faces, in original-image pixels: (N, L, 2) float64 for the
    records' markup (all records must share it). Crops around the ground-truth landmarks.
    on_unreadable: None = an image that cannot be read raises; else it is called with the record and the
    error, and that face's points are NaN."""
    if not records:
        raise ValueError("no records to predict")
    markup = records[0].markup
    if any(r.markup != markup for r in records):
        raise ValueError("all records must have one markup")
    markups = tuple(model.config.markups)
    dataset = _ReportUnreadable(FaceDataset(records, size=model.config.image_size, markups=(markup,)), on_unreadable)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    out = np.full((len(records), MARKUPS[markup].n_points, 2), np.nan)
    for batch in tqdm(loader, desc=f"predict {markup}", unit="batch", disable=not progress):
        if batch is None:
            continue
        z = model_points(model(batch["image"].to(device))[stage], markups, markup).double().cpu().numpy()
        for j, (index, matrix) in enumerate(zip(batch["index"].tolist(), batch["crop"].numpy())):
            out[index] = apply_affine(cv2.invertAffineTransform(matrix), z[j])
    return out


def _key(record: FaceRecord) -> tuple:
    return str(record.image), record.landmarks.tobytes()


def evaluate_records(model: torch.nn.Module, subsets: dict[str, list[FaceRecord]], normalisation: str = "inter_ocular",
                     skipped: list[tuple[FaceRecord, str]] | None = None, **kwargs) -> list[SubsetResult]:
    """NMEs per subset; each distinct face is predicted once even when subsets overlap.
    skipped: None = an unreadable image raises; a list = such faces are appended to it as (record, reason)
    and left out of every subset."""
    unique: dict[tuple, FaceRecord] = {}
    for records in subsets.values():
        for r in records:
            unique.setdefault(_key(r), r)
    by_markup: dict[str, list[FaceRecord]] = {}
    for r in unique.values():
        by_markup.setdefault(r.markup, []).append(r)
    report = None if skipped is None else (lambda record, error: skipped.append((record, str(error))))
    errors: dict[tuple, float] = {}
    for markup, records in by_markup.items():
        pred = predict_records(model, records, on_unreadable=report, **kwargs)
        target = np.stack([r.landmarks for r in records])
        for r, p, e in zip(records, pred, metrics.nme(pred, target, markup, normalisation)):
            if np.isfinite(p).all():
                errors[_key(r)] = float(e)
    results = []
    for name, records in subsets.items():
        markup = records[0].markup if records else next(iter(by_markup), "")
        kept = [r for r in records if _key(r) in errors]
        results.append(SubsetResult(name, markup, np.array([errors[_key(r)] for r in kept]),
                                    [str(r.image) for r in kept]))
    return results


@torch.inference_mode()
def evaluate_synthetic(model: torch.nn.Module, n: int, normalisation: str = "inter_ocular", batch_size: int = 32,
                       device: torch.device | str = "cpu", stage: int = -1, seed: int = SYNTHETIC_EVAL_SEED,
                       progress: bool = True, **_) -> list[SubsetResult]:
    """NMEs of `n` held-out synthetic faces (a seed the training runs do not use), one result per markup."""
    markups = tuple(model.config.markups)
    dataset = SyntheticFaces(n, size=model.config.image_size, seed=seed, markups=markups)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_faces)
    errors: dict[str, list[np.ndarray]] = {m: [] for m in markups}
    for batch in tqdm(loader, desc="predict synthetic", unit="batch", disable=not progress):
        outputs = model(batch["image"].to(device))[stage]
        for m, z in zip(markups, outputs):
            errors[m].append(metrics.nme(z.double().cpu().numpy(), batch["landmarks"][m].double().numpy(), m,
                                         normalisation))
    faces = [f"synthetic:{n} #{i} (seed {seed})" for i in range(n)]
    return [SubsetResult(m, m, np.concatenate(e), faces) for m, e in errors.items()]


def format_table(results: list[SubsetResult], title: str) -> str:
    """The paper-style table: one row per subset."""
    head = f"{'subset':<14}{'markup':<9}{'faces':>7}{'NME %':>8}" + "".join(
        f"{f'FR@{t:.2f} %':>11}" for t in THRESHOLDS) + "".join(f"{f'AUC@{t:.2f}':>10}" for t in THRESHOLDS)
    lines = [title, head, "-" * len(head)]
    for r in results:
        s = r.summary()
        if r.n == 0:
            lines.append(f"{r.name:<14}{r.markup:<9}{0:>7}{'-':>8}" + f"{'-':>11}" * 2 + f"{'-':>10}" * 2)
            continue
        lines.append(f"{r.name:<14}{r.markup:<9}{r.n:>7}{100 * s['nme']:>8.2f}"
                     + "".join(f"{100 * s[f'fr@{t:.2f}']:>11.2f}" for t in THRESHOLDS)
                     + "".join(f"{s[f'auc@{t:.2f}']:>10.4f}" for t in THRESHOLDS))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic:500",
                        help="KIND:PATH with KIND 300w, wflw, celeba, folder; or synthetic:N (default %(default)s)")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (decafa-fast train)")
    parser.add_argument("--normalisation", choices=metrics.NORMALISATIONS, default="inter_ocular",
                        help="NME normaliser: outer eye corners (default) or pupils / eye centres")
    parser.add_argument("--out", help="folder for results.json (the table and one row per face) and ced.png (the CED "
                                      "plot); nothing is written unless --out, --json or --ced is given")
    parser.add_argument("--ced", help="where to save the CED plot (default: OUT/ced.png with --out, else beside "
                                      "--json as NAME_ced.png, else no plot)")
    parser.add_argument("--ced-threshold", type=float, default=0.08, help="x-axis limit of the CED plot")
    parser.add_argument("--json", help="write the table and one row per face (its image file and NME) to this JSON "
                                       "file (default: OUT/results.json with --out)")
    parser.add_argument("--stage", type=int, default=-1, help="which stage's output to evaluate (default last)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for reading images")
    parser.add_argument("--device", default="auto", help="auto (GPU if available), cpu, cuda, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_paths(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """(JSON path, CED plot path) of a run, each None when not asked for: --json and --ced name them; --out DIR
    gives DIR/results.json and DIR/ced.png; a plot not placed otherwise goes beside the JSON. Checked before
    any work; the folders are made when the files are written."""
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a folder; choose a folder (it is made if missing)")
    json_path = Path(args.json) if args.json else (out / "results.json" if out is not None else None)
    if args.ced:
        ced = Path(args.ced)
    elif out is not None:
        ced = out / "ced.png"
    elif json_path is not None:
        ced = json_path.with_name(json_path.stem + "_ced.png")
    else:
        ced = None
    for path, flag in ((json_path, "--json"), (ced, "--ced")):
        if path is not None and path.is_dir():
            raise UserError(f"{flag} {str(path)!r} is a folder; name a file (or give the folder as --out)")
    return json_path, ced


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt as interrupt:
        raise Interrupted("nothing was written (the results are written once every face is evaluated)") from interrupt


def _run(args: argparse.Namespace) -> int:
    kind, rest = parse_data_spec(args.data)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.ced_threshold > 0:
        raise ValueError(f"--ced-threshold must be > 0, got {args.ced_threshold}")
    json_path, ced_path = output_paths(args)
    device = pick_device(args.device)
    model, config = load_model(args.checkpoint, map_location=device)
    if not -config.stages <= args.stage < config.stages:
        raise ValueError(f"--stage must index the model's {config.stages} stages, got {args.stage}")
    options = dict(normalisation=args.normalisation, batch_size=args.batch_size, device=device, stage=args.stage,
                   progress=not args.no_progress)
    skipped: list[tuple[FaceRecord, str]] = []
    if kind == "synthetic":
        results = evaluate_synthetic(model, int(rest), **options)
    else:
        results = evaluate_records(model, read_eval_subsets(args.data), workers=args.workers, skipped=skipped,
                                   **options)
    for _, reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    stage = config.stages + args.stage + 1 if args.stage < 0 else args.stage + 1
    norm = ("inter-ocular distance (outer eye corners; eye centres for 5 points)"
            if args.normalisation == "inter_ocular" else "inter-pupil distance")
    title = f"{DATA_NAMES[kind]} {rest}: NME normalised by {norm}; stage {stage} of {config.stages}; {args.checkpoint}"
    print(format_table(results, title))
    curves = {r.name: r.errors for r in results if r.n}
    if curves and ced_path is not None:
        path = metrics.plot_ced(curves, ced_path, threshold=args.ced_threshold,
                                title=f"{DATA_NAMES[kind]}: cumulative error distribution",
                                flag="--ced" if args.ced else "--out" if args.out else "--json")
        print(f"CED plot: {path}")
    if json_path is not None:
        write_text(json_path, json.dumps({
            "data": args.data, "checkpoint": str(args.checkpoint), "normalisation": args.normalisation,
            "stage": stage, "results": [r.summary() for r in results],
            "faces": {r.name: r.rows() for r in results},
            "skipped": [{"face": str(record.image), "reason": reason} for record, reason in skipped],
        }, indent=1), what="results", flag="--json" if args.json else "--out")
        print(f"results: {json_path}")
    if json_path is None and ced_path is None:
        print("no files written (--out DIR saves the results and the CED plot; --json and --ced name them)")
    if skipped:
        print(f"{len(skipped)} face(s) skipped: their images could not be read (listed above)", file=sys.stderr)
        return 1
    return 0
