"""Metrics against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from decafa_fast.app.evaluation.metrics import auc, ced_curve, failure_rate, nme, plot_ced


def _face(n_points: int, a: int, b: int, distance: float = 10.0) -> np.ndarray:
    target = np.zeros((1, n_points, 2))
    target[0, b] = (distance, 0.0)
    return target


@pytest.mark.parametrize("markup,a,b", [("300w68", 36, 45), ("wflw98", 60, 72), ("celeba5", 0, 1)])
def test_nme_inter_ocular_hand_value(markup, a, b):
    target = _face({"300w68": 68, "wflw98": 98, "celeba5": 5}[markup], a, b)
    pred = target + np.array([3.0, 4.0])  # every point 5 px off; normaliser 10 px
    np.testing.assert_allclose(nme(pred, target, markup), [0.5])
    out = nme(torch.tensor(pred), torch.tensor(target), markup)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.tensor([0.5], dtype=torch.float64))


def test_nme_per_sample_and_partial_errors():
    target = np.zeros((2, 5, 2))
    target[:, 1] = (20.0, 0.0)  # eye centres 20 px apart
    pred = target.copy()
    pred[0, 2] += (6.0, 8.0)  # one of five points 10 px off -> mean 2 px -> 0.1
    np.testing.assert_allclose(nme(pred, target, "celeba5"), [0.1, 0.0])


def test_nme_inter_pupil_300w():
    target = np.zeros((1, 68, 2))
    target[0, 42:48] = (12.0, 0.0)  # right-eye points centred 12 px from the left eye's centre
    target[0, 45] = (30.0, 0.0)  # moves the right eye centre by 18/6 = 3 px -> 15 px apart
    pred = target + np.array([1.5, 0.0])
    np.testing.assert_allclose(nme(pred, target, "300w68", "inter_pupil"), [0.1])
    # inter-ocular uses 36 (0, 0) and 45 (30, 0) instead
    np.testing.assert_allclose(nme(pred, target, "300w68", "inter_ocular"), [0.05])


def test_nme_bad_input():
    with pytest.raises(ValueError, match="shape"):
        nme(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)), "300w68")
    with pytest.raises(ValueError, match="one shape"):
        nme(np.zeros((1, 5, 2)), np.zeros((2, 5, 2)), "celeba5")
    with pytest.raises(ValueError, match="normalisation"):
        nme(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)), "celeba5", "bogus")
    with pytest.raises(ValueError, match="unknown markup"):
        nme(np.zeros((1, 5, 2)), np.zeros((1, 5, 2)), "nope")
    # a degenerate face (zero normaliser) gives NaN rather than inf
    assert np.isnan(nme(np.ones((1, 5, 2)), np.zeros((1, 5, 2)), "celeba5")[0])


def test_auc_failure_rate_ced_hand_values():
    errors = np.array([0.0, 0.04, 0.08, 0.2])
    # per-sample area 1 - e/t clipped at 0: 1, 0.5, 0, 0
    assert auc(errors, 0.08) == pytest.approx(0.375)
    assert auc(errors, 0.10) == pytest.approx((1 + 0.6 + 0.2 + 0) / 4)
    assert failure_rate(errors, 0.08) == pytest.approx(0.25)  # 0.08 itself is not a failure
    assert failure_rate(errors, 0.10) == pytest.approx(0.25)
    assert failure_rate(errors, 0.01) == pytest.approx(0.75)
    x, y = ced_curve(errors, 0.08, steps=5)
    np.testing.assert_allclose(x, [0.0, 0.02, 0.04, 0.06, 0.08])
    np.testing.assert_allclose(y, [0.25, 0.25, 0.5, 0.5, 0.75])
    # the exact AUC matches integrating the CED curve numerically
    x, y = ced_curve(np.random.default_rng(0).uniform(0, 0.12, 500), 0.1, steps=20001)
    assert np.trapezoid(y, x) / 0.1 == pytest.approx(auc(np.random.default_rng(0).uniform(0, 0.12, 500), 0.1), abs=1e-3)


def test_nan_counts_as_failure_and_bad_threshold():
    assert failure_rate([np.nan, 0.0], 0.08) == 0.5
    assert auc([np.nan, 0.0], 0.08) == 0.5
    with pytest.raises(ValueError):
        auc([0.1], 0.0)
    with pytest.raises(ValueError):
        failure_rate([], 0.08)


def test_plot_ced_writes_png(tmp_path):
    path = plot_ced({"a": [0.01, 0.05, 0.2], "b": torch.tensor([0.02, 0.03])}, tmp_path / "ced.png", 0.1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_ced({}, tmp_path / "x.png")
