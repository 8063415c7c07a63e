"""Face-alignment metrics: NME, the cumulative error distribution (CED), AUC@t, failure rate @t, CED plot.

NME of one face = mean over its L landmarks of the Euclidean error, divided by a normalising distance
measured on the ground truth: "inter_ocular" = distance between the outer eye corners (300W 36/45,
WFLW 60/72; CelebA eye centres 0/1), "inter_pupil" = distance between the pupils / eye centres.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from ..data.markups import eye_centres, get_markup
from ..files import write_atomically

__all__ = ["nme", "ced_curve", "auc", "failure_rate", "plot_ced", "NORMALISATIONS"]

NORMALISATIONS = ("inter_ocular", "inter_pupil")


def nme(pred, target, markup: str, normalisation: str = "inter_ocular"):
    """Per-sample normalised mean error.

    pred, target: (N, L, 2) numpy arrays or tensors (pixel coordinates, any consistent unit) -> (N,)
    of the same kind (a tensor is returned in float32 or float64, on the input device). A face whose
    normalising distance is zero gets NaN.
    """
    m = get_markup(markup)
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.ndim != 3 or pred.shape[1:] != (m.n_points, 2):
        raise ValueError(f"pred must have shape (N, {m.n_points}, 2) for markup {m.name!r}, got {tuple(pred.shape)}")
    is_numpy = isinstance(pred, np.ndarray)
    if is_numpy != isinstance(target, np.ndarray):
        raise TypeError("pred and target must both be numpy arrays or both be tensors")
    if is_numpy:
        pred, target = pred.astype(np.float64), target.astype(np.float64)
        err = np.linalg.norm(pred - target, axis=-1).mean(axis=-1)
    else:
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        pred, target = pred.to(dtype), target.to(dtype)
        err = torch.linalg.vector_norm(pred - target, dim=-1).mean(dim=-1)
    if normalisation == "inter_ocular":
        a, b = m.normalisation
        left, right = target[:, a], target[:, b]
    else:
        left, right = eye_centres(target, m)
    if is_numpy:
        d = np.linalg.norm(left - right, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, err / np.where(d > 0, d, 1.0), np.nan)
    d = torch.linalg.vector_norm(left - right, dim=-1)
    return torch.where(d > 0, err / d.clamp_min(torch.finfo(d.dtype).tiny), torch.full_like(d, float("nan")))


def _as_numpy(errors) -> np.ndarray:
    if isinstance(errors, torch.Tensor):
        errors = errors.detach().cpu().double().numpy()
    errors = np.asarray(errors, dtype=np.float64).reshape(-1)
    if errors.size == 0:
        raise ValueError("errors must not be empty")
    return errors


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    return threshold


def ced_curve(errors, threshold: float = 0.08, steps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """The cumulative error distribution on [0, threshold].

    errors: (N,) per-sample NMEs (NaN counts as a failure) -> (x (steps,), fraction of samples with
    error <= x (steps,)).
    """
    threshold = _check_threshold(threshold)
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    e = _as_numpy(errors)
    e = np.where(np.isnan(e), np.inf, e)
    x = np.linspace(0.0, threshold, steps)
    y = np.searchsorted(np.sort(e), x, side="right") / e.size
    return x, y


def auc(errors, threshold: float = 0.08, steps: int = 10000) -> float:
    """Area under the CED curve up to `threshold`, divided by `threshold` (so it lies in [0, 1]).

    Computed exactly from the sorted errors: AUC = mean over samples of max(0, 1 - e / threshold).
    (`steps` is accepted for API symmetry with `ced_curve` and is unused.)
    """
    threshold = _check_threshold(threshold)
    e = _as_numpy(errors)
    e = np.where(np.isnan(e), np.inf, e)
    return float(np.clip(1.0 - e / threshold, 0.0, 1.0).mean())


def failure_rate(errors, threshold: float = 0.08) -> float:
    """Fraction of samples whose error exceeds `threshold` (NaN counts as a failure)."""
    threshold = _check_threshold(threshold)
    e = _as_numpy(errors)
    return float(np.mean(~(e <= threshold)))


def plot_ced(errors_by_name: dict, path, threshold: float = 0.08, title: str | None = None,
             flag: str = "--ced") -> Path:
    """Save the CED curves of several methods / sets to a PNG; returns the path. A failed write raises
    files.WriteError naming the path (and `flag`, the option that chose it).

    errors_by_name: name -> (N,) per-sample NMEs. The legend shows AUC and failure rate at `threshold`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not errors_by_name:
        raise ValueError("errors_by_name must name at least one set of errors")
    threshold = _check_threshold(threshold)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    for name, errors in errors_by_name.items():
        x, y = ced_curve(errors, threshold, steps=500)
        label = f"{name} (AUC {auc(errors, threshold):.3f}, FR {100 * failure_rate(errors, threshold):.1f}%)"
        ax.plot(x, y, label=label)
    ax.set_xlim(0, threshold)
    ax.set_ylim(0, 1)
    ax.set_xlabel("NME")
    ax.set_ylabel("fraction of faces")
    ax.set_title(title or f"Cumulative error distribution (threshold {threshold:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return write_atomically(path, png.getbuffer(), what="CED plot", flag=flag)
