"""Things written once, checked across the backends that use them:

- each op is described once, in the op table (decafa_fast/contract/table.py); the schemas, the fakes, the
  autograd registration, the Triton registration and the shapes the Python argument checks word derive from it,
  and no other module of the package lists the ops;
- each op's schema is derived in decafa_fast/contract/schemas.py and every namespace is defined from it (no C++
  TORCH_LIBRARY block, no second set of schema strings);
- one fake per op (decafa_fast/contract/fakes.py), registered for every namespace from the table (no C++ Meta
  kernels, no other register_fake);
- the fusion channel layout once per language, decafa_fast/contract/layout.py and kernels/fusion_layout.h, and
  the two twins give the same layout for every mode;
- the C++ glue registers every op from csrc/common/op_list.h, which is generated from the table (and must be
  what the table gives now), and words its argument checks in one header, csrc/common/checks.h.
"""
from __future__ import annotations

import ast
import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from decafa_fast import ops
from decafa_fast.contract import op_list, table
from decafa_fast.contract.fakes import FAKES
from decafa_fast.contract.layout import fusion_layout
from decafa_fast.contract.schemas import SCHEMAS
from decafa_fast.contract.table import OPS, OPS_BY_NAME, TENSOR_ARGS, check_table
from harness import opcheck_args

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


# --------------------------------------------------------------------------------------------------
# The op table
# --------------------------------------------------------------------------------------------------
def test_schemas_and_fakes_are_the_tables():
    assert list(SCHEMAS) == list(FAKES) == [op.name for op in OPS]
    for op in OPS:
        assert SCHEMAS[op.name] == op.schema
        assert FAKES[op.name] is op.fake
        parsed = torch._C.parse_schema(f"decafa::{op.name}{op.schema}")
        assert [a.name for a in parsed.arguments] == list(op.input_names)
        assert len(parsed.returns) == len(op.outputs)


def test_triton_bodies_are_the_tables():
    try:
        import decafa_fast.triton.ops as tops
    except Exception as exc:  # noqa: BLE001 - Triton missing or unusable
        pytest.skip(f"decafa_triton not importable: {type(exc).__name__}: {exc}")
    assert list(tops.IMPLS) == [op.name for op in OPS]
    assert list(tops.OPS) == [op.name for op in OPS]


@pytest.mark.parametrize("op", [op for op in OPS if op.public], ids=lambda op: op.name)
def test_derived_autograd_of_every_forward_op(op):
    """The autograd the table derives (decafa_fast.ops.autograd) gives the gradients of every input in op.grads
    through the fused backward op (float64 gradcheck on the raw decafa op, C++ CPU kernels), and none for the
    others."""
    if not ops.backends()["cpp"].startswith("available"):
        pytest.skip("decafa_fast._C is not built")
    raw = getattr(torch.ops.decafa, op.name)
    args = list(opcheck_args("cpu", torch.float64, per_map_beta=True)[op.name])
    grad_at = [op.input_names.index(g) for g in op.grads]
    diff = [op.outputs.index(o) for o in op.differentiable_outputs]

    def outputs(*xs):
        call = list(args)
        for i, x in zip(grad_at, xs):
            call[i] = x
        out = raw(*call)
        return out if isinstance(out, tuple) else (out,)

    inputs = tuple(args[i].detach().requires_grad_() for i in grad_at)
    assert torch.autograd.gradcheck(lambda *xs: tuple(outputs(*xs)[i] for i in diff), inputs, eps=1e-6, atol=1e-5,
                                    fast_mode=True)
    out = dict(zip(op.outputs, outputs(*inputs)))
    assert all(out[o].requires_grad for o in op.differentiable_outputs)
    assert not any(out[o].requires_grad for o in op.nondiff)


@pytest.mark.parametrize("op", [op for op in OPS if not op.public], ids=lambda op: op.name)
def test_derived_autograd_of_every_backward_op_refuses(op):
    if not ops.backends()["cpp"].startswith("available"):
        pytest.skip("decafa_fast._C is not built")
    args = list(opcheck_args("cpu", torch.float32)[op.name])
    first = op.tensor_inputs.index("logits") if "logits" in op.tensor_inputs else 1
    index = op.input_names.index(op.tensor_inputs[first])
    args[index] = args[index].detach().requires_grad_()
    out = getattr(torch.ops.decafa, op.name)(*args)
    with pytest.raises(RuntimeError, match="has no derivative of its own"):
        out[0].sum().backward()


def _broken(op: str, **changes) -> tuple:
    return tuple(dataclasses.replace(o, **changes) if o.name == op else o for o in OPS)


@pytest.mark.parametrize("ops_, message", [
    (_broken("fuse", grads=("image", "mode")), "must be tensor inputs"),
    (_broken("fuse", backward="decafa_head"), "is not a backward op"),
    (_broken("fuse", backward="spatial_softmax_backward"), "must return"),
    (_broken("soft_argmax", fake=table.attention_mask), "the fake takes"),
    (_broken("attention_mask", backward_args={}), "takes normalized"),
    (_broken("fuse", inputs=OPS_BY_NAME["fuse"].inputs[:3] + (table.Arg("mode", "str"),)), "has type"),
    (_broken("fuse", inputs=(table.Arg("picture", "Tensor"),) + OPS_BY_NAME["fuse"].inputs[1:]), "TENSOR_ARGS"),
    (_broken("landmark_attention_backward", inputs=(table.Arg("grad_z", "Tensor"),)
             + OPS_BY_NAME["landmark_attention_backward"].inputs[1:]), "attention_mask: .* takes grad_z, not"),
    (_broken("decafa_head_backward", inputs=(table.Arg("grad_z", "Tensor"),)
             + OPS_BY_NAME["decafa_head_backward"].inputs[1:]), "grad_z must be optional"),
])
def test_the_table_check_rejects_a_broken_entry(ops_, message):
    check_table(OPS)
    with pytest.raises(ValueError, match=message):
        check_table(ops_)


def test_python_checks_take_the_tables_shapes():
    """The public ops' rank and fixed-size checks follow TENSOR_ARGS (the mask's one channel)."""
    t = torch.randn(2, 3, 4, 5)
    i, e = torch.randn(2, 1, 4, 5), torch.randn(2, 2, 4, 5)
    with pytest.raises(ValueError, match=re.escape("mask must have 1 channel(s) of shape (B, 1, H, W)")):
        ops.fuse(i, e, torch.rand(2, 2, 4, 5))
    with pytest.raises(ValueError, match=re.escape("logits must have rank 4 of shape (B, L, H, W)")):
        ops.soft_argmax(t[0])
    with pytest.raises(ValueError, match=re.escape("image must match logits in batch and spatial size (B=2, H=4")):
        ops.decafa_head(t, i[:, :, :3], e)
    assert TENSOR_ARGS["mask"].what == "of shape (B, 1, H, W)"


def _op_name_strings(node: ast.AST) -> int:
    return sum(isinstance(n, ast.Constant) and n.value in OPS_BY_NAME for n in ast.walk(node))


def test_the_op_list_scan_counts_op_names():
    assert _op_name_strings(ast.parse('{"fuse": 1, "soft_argmax": 2, "decafa_head_backward": 3}')) == 3
    assert _op_name_strings(ast.parse('("fuse", "softmax")')) == 1


def test_no_other_module_lists_the_ops():
    """No literal collection of three or more op names (a second op table) outside contract/table.py; the
    public API's __all__ names the public functions, not the ops."""
    offenders = []
    for path in PY_SOURCES:
        if path == PACKAGE / "contract" / "table.py":
            continue
        tree = ast.parse(path.read_text())
        public_api = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
                      for n in ast.walk(node.value)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Dict | ast.List | ast.Tuple | ast.Set) and id(node) not in public_api
                    and _op_name_strings(node) >= 3):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------
# The C++ glue: registered from the table's op list, argument checks in one header
# --------------------------------------------------------------------------------------------------
def test_op_list_header_is_the_tables():
    """csrc/common/op_list.h is what the table gives: an op added to (or changed in) the table without
    regenerating the header fails here."""
    committed = (ROOT / op_list.HEADER).read_text()
    assert committed == op_list.header(), f"{op_list.HEADER} is stale: run python3 -m decafa_fast.contract.op_list"


def test_op_list_follows_the_table():
    text = op_list.header()
    for op in OPS:
        assert f"X({op.name}, {op_list.returns(op)}, \\\n    {op_list.params(op)})" in text, op.name
    assert op_list.header(OPS[:-1]) != text
    assert set(op_list.CPP_TYPES) == set(table.SCHEMA_TYPES)
    assert op_list.params(OPS_BY_NAME["fuse"]) == ("(const at::Tensor& image, const at::Tensor& embedding, "
                                                "const at::Tensor& mask, int64_t mode)")


def test_the_op_list_check_reports_a_stale_header(tmp_path, monkeypatch):
    stale = tmp_path / op_list.HEADER
    stale.parent.mkdir(parents=True)
    stale.write_text(op_list.header(OPS[:-1]))
    monkeypatch.setattr(op_list, "HEADER", stale)  # an absolute path: ROOT / HEADER is the file itself
    assert op_list.main(["op_list", "--check"]) == 1
    stale.write_text(op_list.header())
    assert op_list.main(["op_list", "--check"]) == 0


def test_the_glue_registers_every_op_from_the_op_list():
    """No op registered by hand: one TORCH_LIBRARY_IMPL block per dispatch key (CPU, CUDA), each expanding
    DECAFA_OPS."""
    blocks: dict[str, list[str]] = {}
    for path in CPP_SOURCES:
        text = path.read_text(errors="replace")
        where = str(path.relative_to(ROOT))
        assert not re.search(r"\bm\.impl\(\s*\"", text), f"{where} registers an op by hand"
        for match in re.finditer(r"TORCH_LIBRARY_IMPL\s*\(\s*decafa\s*,\s*(\w+)\s*,\s*m\s*\)\s*\{", text):
            body = text[match.end():text.index("\n}", match.end())]
            assert "DECAFA_OPS(" in body, f"{where}: the {match[1]} block does not register from DECAFA_OPS"
            blocks.setdefault(match[1], []).append(where)
    assert blocks == {"CPU": ["csrc/cpu/registration.cpp"], "CUDA": ["csrc/cuda/decafa_cuda.cu"]}, blocks


# Phrases of the shared checks' messages: written in csrc/common/checks.h and nowhere else in the C++.
SHARED_CHECK_WORDS = (" must have rank ", " must match ", "mode must be 1..5", " must have the dtype of ",
                      " must be a tensor, got None", " must have shape ",
                      "must be float16, bfloat16, float32 or float64")


def test_cpp_argument_checks_are_written_once():
    checks = ROOT / "csrc" / "common" / "checks.h"
    text = checks.read_text()
    assert all(words in text for words in SHARED_CHECK_WORDS)
    for path in CPP_SOURCES:
        if path != checks:
            text = path.read_text(errors="replace")
            again = [words for words in SHARED_CHECK_WORDS if words in text]
            assert not again, f"{path.relative_to(ROOT)} words a shared check again: {again}"
    for glue in ("csrc/cpu/attention.h", "csrc/cuda/decafa_cuda.cu"):
        assert '#include "../common/checks.h"' in (ROOT / glue).read_text(), glue
