"""What the Triton interpreter (TRITON_INTERPRET=1) of this process can run, for tests that must say why they
skip. Older interpreters (Triton < 3.9 with numpy) have no bfloat16; anything else that breaks a probe is a
real failure and is raised, not reported as "no bfloat16"."""
from __future__ import annotations

import functools

import torch


def _is_missing_bfloat16(exc: Exception) -> bool:
    """The failure modes of an interpreter without bfloat16: numpy has no such dtype (TypeError / KeyError /
    AttributeError naming bfloat16 or bf16) or Triton rejects the type."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, (TypeError, KeyError, AttributeError, ValueError, NotImplementedError)) and (
        "bfloat16" in text or "bf16" in text)


@functools.cache
def interpreter_bfloat16_problem() -> str | None:
    """None when the interpreter runs the bfloat16 kernels right, else why not ("no bfloat16: ...").
    Raises whatever else goes wrong (a broken interpreter must fail loudly, not skip as "no bfloat16")."""
    from .ops import INTERPRET

    if not INTERPRET:
        return None
    logits = torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)
    try:
        z, _ = torch.ops.decafa_triton.soft_argmax(logits, 1.0, None, False)
    except Exception as exc:  # noqa: BLE001 - classified below, re-raised unless it is the missing dtype
        if _is_missing_bfloat16(exc):
            return f"no bfloat16 in this Triton interpreter ({type(exc).__name__}: {exc})"
        raise
    if not torch.equal(z.float(), torch.full((1, 1, 2), 0.5)):
        return f"no bfloat16 in this Triton interpreter (a bfloat16 soft-argmax of zeros gave {z.tolist()})"
    return None
