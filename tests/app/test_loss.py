"""The loss of eq. (10): hand values, stage weights, and per-sample markup masks."""
from __future__ import annotations

import pytest
import torch

from decafa_fast.app.model import decafa_loss, stage_lambdas

MARKUPS = ("wflw98", "300w68", "celeba5")


def _outputs(stages: int, batch: int, fill: float = 0.0, requires_grad: bool = False):
    return [[torch.full((batch, n, 2), fill, requires_grad=requires_grad) for n in (98, 68, 5)] for _ in range(stages)]


def test_hand_value_single_markup():
    outputs = _outputs(1, 2)
    targets = {"celeba5": torch.ones(2, 5, 2)}
    valid = {"celeba5": torch.tensor([True, True])}
    # |dx| + |dy| = 2 per point, summed over 5 points, divided by L = 5 -> 2 per sample; batch mean 2
    loss = decafa_loss(outputs, targets, valid, MARKUPS, [1.0])
    assert loss.item() == pytest.approx(2.0)
    # scale multiplies the coordinates' error
    assert decafa_loss(outputs, targets, valid, MARKUPS, [1.0], scale=0.5).item() == pytest.approx(1.0)


def test_stage_weights():
    assert stage_lambdas("increasing", 4) == [0.125, 0.25, 0.5, 1.0]
    assert stage_lambdas("decreasing", 4) == [1.0, 0.5, 0.25, 0.125]
    assert stage_lambdas("constant", 3) == [1.0, 1.0, 1.0]
    assert stage_lambdas([0.1, 0.2], 2) == [0.1, 0.2]
    with pytest.raises(ValueError):
        stage_lambdas([1.0], 2)
    with pytest.raises(ValueError):
        stage_lambdas("bogus", 2)
    outputs = _outputs(4, 1)
    targets = {"wflw98": torch.ones(1, 98, 2)}
    valid = {"wflw98": torch.tensor([True])}
    # every stage is off by 2 per sample: total = 2 * sum(lambdas)
    loss = decafa_loss(outputs, targets, valid, MARKUPS, stage_lambdas("increasing", 4))
    assert loss.item() == pytest.approx(2.0 * 1.875)


def test_unannotated_markups_are_ignored():
    torch.manual_seed(0)
    outputs = [[torch.randn(3, n, 2, requires_grad=True) for n in (98, 68, 5)] for _ in range(2)]
    targets = {name: torch.randn(3, n, 2) for name, n in zip(MARKUPS, (98, 68, 5))}
    # sample 0: 98 points only; sample 1: 68 only; sample 2: 5 only
    valid = {name: torch.arange(3) == k for k, name in enumerate(MARKUPS)}
    loss = decafa_loss(outputs, targets, valid, MARKUPS, [0.5, 1.0])
    # garbage (NaN, huge) in unannotated entries changes nothing
    garbage = {name: t.clone() for name, t in targets.items()}
    for k, name in enumerate(MARKUPS):
        garbage[name][torch.arange(3) != k] = float("nan")
    assert decafa_loss(outputs, garbage, valid, MARKUPS, [0.5, 1.0]).item() == pytest.approx(loss.item())
    # the loss equals the sum of per-sample hand computations
    expected = 0.0
    for k, name in enumerate(MARKUPS):
        for lam, stage in zip([0.5, 1.0], outputs):
            expected += lam * (stage[k][k] - targets[name][k]).abs().sum().item() / stage[k].shape[1]
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    # no gradient reaches the predictions of unannotated (sample, markup) pairs
    loss.backward()
    for k in range(3):
        grad = outputs[1][k].grad
        assert grad[k].abs().sum() > 0
        assert torch.all(grad[torch.arange(3) != k] == 0)


def test_markup_missing_from_targets_and_no_annotation():
    outputs = _outputs(1, 2)
    loss = decafa_loss(outputs, {}, {}, MARKUPS, [1.0])
    assert loss.item() == 0.0
    targets = {"celeba5": torch.ones(2, 5, 2)}
    assert decafa_loss(outputs, targets, {"celeba5": torch.zeros(2, dtype=torch.bool)}, MARKUPS, [1.0]).item() == 0.0


def test_bad_input():
    outputs = _outputs(2, 2)
    with pytest.raises(ValueError, match="lambdas"):
        decafa_loss(outputs, {}, {}, MARKUPS, [1.0])
    with pytest.raises(ValueError, match="valid"):
        decafa_loss(outputs, {"celeba5": torch.ones(2, 5, 2)}, {"celeba5": torch.ones(3, dtype=torch.bool)},
                    MARKUPS, [1.0, 1.0])
    with pytest.raises(ValueError, match="prediction"):
        decafa_loss(outputs, {"celeba5": torch.ones(2, 4, 2)}, {"celeba5": torch.ones(2, dtype=torch.bool)},
                    MARKUPS, [1.0, 1.0])
