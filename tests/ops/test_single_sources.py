"""Things written once, checked across the backends that use them:

- each op's schema lives in decafa_fast/contract/schemas.py and every namespace is defined from it (no C++
  TORCH_LIBRARY block, no second set of schema strings);
- one fake per op (decafa_fast/contract/fakes.py), registered for every namespace from that table (no C++ Meta
  kernels, no other register_fake);
- the fusion channel layout once per language, decafa_fast/contract/layout.py and kernels/fusion_layout.h, and
  the two twins give the same layout for every mode.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from decafa_fast import ops
from decafa_fast.contract.fakes import FAKES
from decafa_fast.contract.layout import fusion_layout
from decafa_fast.contract.schemas import SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "decafa_fast"
CPP_SOURCES = sorted(p for d in ("csrc", "kernels") for p in (ROOT / d).rglob("*")
                     if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
PY_SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "_sources" not in p.parts)


def _namespaces() -> list[str]:
    names = ["decafa"]
    try:
        import decafa_fast.triton.ops  # noqa: F401  (registers decafa_triton::*)
    except Exception as exc:  # noqa: BLE001 - Triton missing or unusable: only the C++ namespace is checked
        print(f"decafa_triton not checked: {type(exc).__name__}: {exc}")
    else:
        names.append("decafa_triton")
    return names


@pytest.mark.parametrize("namespace", _namespaces())
def test_every_namespace_has_the_schemas_of_schemas_py(namespace):
    """Names, order and types of every argument and return, as written in SCHEMAS (torch.library may infer an
    `int` of a Python-registered op as SymInt)."""
    ops.backends()  # loads decafa_fast._C where it is built
    for name, schema in SCHEMAS.items():
        got = getattr(getattr(torch.ops, namespace), name).default._schema
        want = torch._C.parse_schema(f"{namespace}::{name}{schema}")
        assert [a.name for a in got.arguments] == [a.name for a in want.arguments], name
        assert [str(a.type).replace("SymInt", "int") for a in got.arguments] == [str(a.type) for a in want.arguments]
        assert [str(r.type) for r in got.returns] == [str(r.type) for r in want.returns], name
    assert set(FAKES) == set(SCHEMAS), "one fake per op"


def test_no_second_schema_source():
    """The C++ side registers implementations only; Python defines ops in schemas.py alone."""
    for path in CPP_SOURCES:
        text = path.read_text(errors="replace")
        for pattern in (r"\bTORCH_LIBRARY\s*\(", r"\bTORCH_LIBRARY_FRAGMENT\s*\(", r"\bm\.def\s*\("):
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)} defines a schema ({pattern})"
    for path in PY_SOURCES:
        if path == PACKAGE / "contract" / "schemas.py":
            continue
        text = path.read_text()
        assert not re.search(r"\.define\(", text), f"{path.relative_to(ROOT)} defines an op outside schemas.py"
        assert "-> (Tensor" not in text, f"{path.relative_to(ROOT)} holds a schema string"


def test_one_fake_per_op():
    """Fakes are registered from FAKES only (contract/fakes.py for decafa, triton/ops.py for decafa_triton), and
    no C++ Meta kernel competes with them."""
    for path in PY_SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"register_fake\(|impl_abstract\(|register_kernel\(\s*\"Meta\"", line):
                where = f"{path.relative_to(ROOT)}:{n}"
                assert path == PACKAGE / "contract" / "fakes.py" or "FAKES[" in line, f"{where}: a fake not from FAKES"
    for path in CPP_SOURCES:
        text = path.read_text(errors="replace")
        assert not re.search(r"TORCH_LIBRARY_IMPL\s*\(\s*\w+\s*,\s*Meta", text), f"{path.relative_to(ROOT)}"


LAYOUT_PROGRAM = r"""
#include <cstdio>
#include "fusion_layout.h"
int main() {
  const int sizes[][2] = {{1, 1}, {1, 64}, {3, 4}, {2, 7}};
  for (int mode = -1; mode <= 6; ++mode)
    for (const auto& s : sizes) {
      const decafa::FusionLayout l = decafa::fusion_layout(mode, s[0], s[1]);
      std::printf("%d %d %d %d %d %d %d %d\n", mode, s[0], s[1], l.image, l.image_mask, l.embedding,
                  l.embedding_mask, l.channels);
    }
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to compile kernels/fusion_layout.h")
def test_fusion_layout_twins_agree(tmp_path):
    """kernels/fusion_layout.h (C++: csrc/cpu and kernels/) and contract/layout.py (Python: reference, fakes,
    Triton) give the same blocks for modes 0..5; both reject any other mode (C++: channels = -1)."""
    source = tmp_path / "layout.cpp"
    source.write_text(LAYOUT_PROGRAM)
    exe = tmp_path / "layout"
    subprocess.run(["g++", "-std=c++17", "-I", str(ROOT / "kernels"), str(source), "-o", str(exe)], check=True,
                   timeout=120)
    rows = [list(map(int, line.split())) for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout.splitlines()]
    assert len(rows) == 8 * 4
    for mode, ci, c, *cpp in rows:
        if 0 <= mode <= 5:
            assert tuple(fusion_layout(mode, ci, c)) == tuple(cpp), (mode, ci, c)
        else:
            assert cpp[-1] == -1, (mode, ci, c)
            with pytest.raises(ValueError):
                fusion_layout(mode, ci, c)
