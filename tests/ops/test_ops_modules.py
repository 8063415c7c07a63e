"""decafa_fast.ops is split by job (extension loading, Triton import, backend status, the auto table, backend
choice and resolution, the CPU cache, argument checks) beside decafa_fast.settings, autotable and _build; no
import cycle runs through any of them, and the public backend API is where it was."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "decafa_fast"
CHECKED = {"decafa_fast.ops", "decafa_fast.ops.extension", "decafa_fast.ops.triton_import", "decafa_fast.ops.status",
           "decafa_fast.ops.auto", "decafa_fast.ops.backend", "decafa_fast.ops.cpu_cache",
           "decafa_fast.ops.validation", "decafa_fast.settings", "decafa_fast.autotable", "decafa_fast._build"}


def _module_name(path: Path) -> str:
    parts = ("decafa_fast", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts}


EXTENSION = "decafa_fast._C"  # compiled: a leaf of the graph


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The library modules that `name` imports when it is imported (module level, not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Try):  # import attempts (the extension loader's)
            for stmt in node.body + [s for h in node.handlers for s in h.body]:
                if isinstance(stmt, ast.ImportFrom) and stmt.level:
                    anchor = package.split(".")[: len(package.split(".")) - stmt.level + 1]
                    base = ".".join(anchor + ([stmt.module] if stmt.module else []))
                    found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in stmt.names}
    return found & modules


def _cycles_through(checked: set[str]) -> list[list[str]]:
    library = _library()
    modules = {*library, EXTENSION}
    graph = {name: _imports(name, path, modules) - {name} for name, path in library.items()}
    cycles = []
    for start in sorted(checked):
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    cycles.append([*trail, start])
                elif nxt not in trail and len(trail) < 12:
                    stack.append((nxt, [*trail, nxt]))
    return cycles


def test_no_import_cycle_runs_through_the_ops_backend_modules():
    library = _library()
    assert CHECKED <= set(library), CHECKED - set(library)
    assert _cycles_through(CHECKED - {"decafa_fast.ops"}) == []


def test_each_module_does_one_job():
    """The loaders import nothing of the choice, the choice nothing of the loaders' internals beyond status."""
    library = _library()
    edges = {name: _imports(name, library[name], {*library, EXTENSION}) for name in CHECKED}
    assert edges["decafa_fast.settings"] == set()
    assert edges["decafa_fast.ops.extension"] <= {"decafa_fast._C", "decafa_fast._build"}
    assert edges["decafa_fast.ops.triton_import"] <= {"decafa_fast.settings", "decafa_fast.triton.ops"}
    assert edges["decafa_fast.ops.status"] == {"decafa_fast.ops.extension", "decafa_fast.ops.triton_import",
                                               "decafa_fast._torch_private"}
    assert edges["decafa_fast.ops.auto"] == {"decafa_fast.autotable", "decafa_fast.settings",
                                             "decafa_fast.ops.status"}
    assert edges["decafa_fast.ops.backend"] == {"decafa_fast.settings", "decafa_fast.ops.auto",
                                                "decafa_fast.ops.status"}


def test_the_public_backend_api_is_unchanged():
    from decafa_fast import ops
    from decafa_fast.ops import auto, backend, status

    assert ops.set_backend is backend.set_backend and ops.use_backend is backend.use_backend
    assert ops.backends is status.backends and ops.get_backend is backend.get_backend
    assert ops.resolve is backend.resolve and ops.namespace is backend.namespace
    assert ops.AUTO_CUDA_PREFERENCE is auto.AUTO_CUDA_PREFERENCE and ops.measured_gpus is auto.measured_gpus
    assert ops.BACKENDS == ("auto", "triton", "cuda", "cpp", "reference")
    assert set(ops.backends()) == set(ops.BACKENDS)
