"""The schema of every compiled op, derived from the op table (table.py).

`decafa::<op>` (C++: CPU kernels, CUDA glue) and `decafa_triton::<op>` (Triton) implement the same schemas.
The C++ extension only registers implementations (TORCH_LIBRARY_IMPL); the schemas of the `decafa`
namespace are defined here, from Python, when decafa_fast.ops is imported (`define_schemas`), so
`torch.ops.decafa.*` is usable after `import decafa_fast`. Triton registers from the same strings.
The argument conventions are in table.py's docstring.
"""
from __future__ import annotations

import torch

from .table import OPS

SCHEMAS: dict[str, str] = {op.name: op.schema for op in OPS}

# Libraries own their definitions: kept alive for the life of the process.
_LIBRARIES: dict[str, torch.library.Library] = {}


def define_schemas(namespace: str) -> torch.library.Library:
    """Defines every op of SCHEMAS in `namespace` (once per process) and returns its library."""
    if namespace not in _LIBRARIES:
        lib = torch.library.Library(namespace, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
        _LIBRARIES[namespace] = lib
    return _LIBRARIES[namespace]
