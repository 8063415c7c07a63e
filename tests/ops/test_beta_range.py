"""A Python-number beta that the kernels' compute type cannot hold (not finite, or beyond float32's range for
float16/bfloat16/float32 logits, beyond float64's for float64 logits) is refused with a ValueError naming
`beta`, on every backend and every op that takes it, before any kernel runs."""
from __future__ import annotations

import math

import pytest
import torch

from decafa_fast import ops

BACKENDS = [name for name in ("cpp", "reference", "triton") if ops.backends()[name].startswith("available")]
FLOAT32_MAX = torch.finfo(torch.float32).max


def _call(op: str, logits: torch.Tensor, beta):
    if op == "decafa_head":
        b, _, h, w = logits.shape
        return ops.decafa_head(logits, torch.rand(b, 1, h, w, dtype=logits.dtype),
                               torch.rand(b, 2, h, w, dtype=logits.dtype), beta=beta)
    return getattr(ops, op)(logits, beta)


OPS = ("spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention", "decafa_head")
TOO_LARGE = [1e300, -1e300, 10**400, -(10**400), 10**39, 3.5e38, math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_a_beta_float32_cannot_hold_is_refused_naming_it(backend, op):
    t = torch.randn(1, 2, 4, 5)
    with ops.use_backend(backend):
        for beta in TOO_LARGE:
            with pytest.raises(ValueError, match=r"^beta must be finite and representable in float32") as info:
                _call(op, t, beta)
            assert "\n" not in str(info.value)
        # the largest float32 is taken; beta * T then overflows, and each map is the softmax's exact limit
        # (tests/ops/test_beta_overflow.py)
        _call(op, t, FLOAT32_MAX)
        _call(op, t, -(2**100))


def test_the_message_names_the_value_or_its_size():
    t = torch.randn(1, 2, 4, 5)
    with pytest.raises(ValueError, match=r"got 1e\+300$"):
        ops.soft_argmax(t, 1e300)
    with pytest.raises(ValueError, match=r"got an integer of 1329 bits$"):  # 10**400: no OverflowError
        ops.soft_argmax(t, 10**400)
    with pytest.raises(ValueError, match=r"\(\|beta\| <= 3\.403e\+38\), got inf$"):
        ops.soft_argmax(t, math.inf)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # float64: CPU backends
def test_float64_logits_take_any_finite_float64_beta(backend):
    t = torch.randn(1, 2, 4, 5, dtype=torch.float64) * 1e-300
    with ops.use_backend(backend):
        z = ops.soft_argmax(t, 1e300)
        assert torch.isfinite(z).all()
        with pytest.raises(ValueError, match="representable in float64"):
            ops.soft_argmax(t, 10**400)
