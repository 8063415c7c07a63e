"""The op table as C++: csrc/common/op_list.h, an X-macro over every op of the table with its C++ signature,
from which the CPU and CUDA glue declare and register their implementations (TORCH_LIBRARY_IMPL).

The header is committed, so that a build needs no Python step; tests/ops/test_single_sources.py fails when it
differs from what the table gives. After a change to the table:

    python3 -m decafa_fast.contract.op_list           # rewrites csrc/common/op_list.h
    python3 -m decafa_fast.contract.op_list --check   # exit status 1 when the committed header is stale

Run them in a source checkout (the header lives beside the package, in csrc/). Importing decafa_fast loads the
C++ extension and compiles it first where it is not built; DECAFA_FIRST_USE_BUILD=0 skips that.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .table import OPS, Op

HEADER = Path("csrc") / "common" / "op_list.h"

# How torch.library passes each schema type to a C++ kernel.
CPP_TYPES = {
    "Tensor": "const at::Tensor&",
    "Tensor?": "const std::optional<at::Tensor>&",
    "float": "double",
    "int": "int64_t",
    "bool": "bool",
}


def returns(op: Op) -> str:
    """The C++ return type: at::Tensor for one output, decafa::TensorsN (a std::tuple of N) for N."""
    n = len(op.outputs)
    return "at::Tensor" if n == 1 else f"decafa::Tensors{n}"


def params(op: Op) -> str:
    return "(" + ", ".join(f"{CPP_TYPES[a.type]} {a.name}" for a in op.inputs) + ")"


def header(ops: tuple[Op, ...] = OPS) -> str:
    """The text of csrc/common/op_list.h for `ops`."""
    tuple_sizes = sorted({len(op.outputs) for op in ops if len(op.outputs) > 1})
    aliases = "\n".join(f"using Tensors{n} = std::tuple<{', '.join(['at::Tensor'] * n)}>;" for n in tuple_sizes)
    rows = []
    for op in ops:
        rows.append(f"  X({op.name}, {returns(op)}, \\")
        rows.append(f"    {params(op)}) \\")
    rows[-1] = rows[-1].removesuffix(" \\")
    return f"""\
// Generated from decafa_fast/contract/table.py by `python3 -m decafa_fast.contract.op_list`: do not edit.
//
// DECAFA_OPS(X) expands X(name, returns, params) once per op of the table, in table order, with the C++
// signature torch.library gives a kernel of the op's schema. The glue declares its implementations from it
// and registers them with it, so that an op added to the table is registered by every glue (and fails to
// build or load until each defines it):
//   CPU:  decafa::cpu::<name>     (csrc/cpu/registration.cpp)
//   CUDA: <name>_cuda             (csrc/cuda/decafa_cuda.cu)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace decafa {{
{aliases}
}}  // namespace decafa

#define DECAFA_OPS(X) \\
{chr(10).join(rows)}
"""


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[2]
    path = root / HEADER
    if not (root / "csrc").is_dir():
        print(f"no csrc/ beside the package in {root}: run this in a source checkout", file=sys.stderr)
        return 2
    text = header()
    if argv[1:] == ["--check"]:
        if not path.is_file() or path.read_text() != text:
            print(f"{HEADER} differs from the op table: run python3 -m decafa_fast.contract.op_list", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print("usage: python3 -m decafa_fast.contract.op_list [--check]", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
