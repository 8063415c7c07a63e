"""Fake (meta) kernels of the op contract: the output shapes, dtypes and memory formats of every compiled op,
the fake rules of the op table (table.py), registered for every namespace (`decafa`, `decafa_triton`), so
torch.compile and opcheck trace them without running a kernel."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .table import OPS, acc_dtype

__all__ = ["FAKES", "acc_dtype", "register_fakes"]

FAKES: dict[str, Callable] = {op.name: op.fake for op in OPS}


def register_fakes(namespace: str, lib: torch.library.Library | None = None) -> None:
    """Registers the fake of every op of `namespace` (whose schemas are already defined)."""
    for op, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{op}", fake, lib=lib)
