"""The application's packages import each other one way (data <- model <- training / evaluation / prediction <-
cli), with no cycle between them; the benchmark runner in bench/ is outside the package's import graph (the
`bench` command runs it as a script by path); and every command's module imports on its own in a fresh
process."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "decafa_fast" / "app"
BENCH_MODULES = {"run", "measure", "report", "conftest", "cpu_floor", "head_floor", "model_check", "bench"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute names of the modules (or module attributes) `path` imports, anywhere in the file."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, node.lineno)] + [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return found


def _unit(module: str) -> str | None:
    """The app package (or top-level app module) a module belongs to: 'decafa_fast.app.training.trainer' ->
    'training'; None outside the application."""
    parts = module.split(".")
    if parts[:2] != ["decafa_fast", "app"] or len(parts) < 3:
        return None
    return parts[2]


def _graph() -> dict[str, dict[str, list[str]]]:
    """unit -> unit it imports -> where (file:line)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(APP.rglob("*.py")):
        source = _unit(_module_name(path))
        for target, line in _imports(path):
            unit = _unit(target)
            if source and unit and unit != source and (APP / unit).exists() | (APP / f"{unit}.py").exists():
                graph.setdefault(source, {}).setdefault(unit, []).append(f"{path.relative_to(ROOT)}:{line}")
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Every strongly connected group of more than one unit (Tarjan)."""
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in list(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycle_between_the_application_packages():
    graph = _graph()
    assert graph["evaluation"].keys() >= {"model"} and "training" not in graph["evaluation"]
    assert "training" not in graph["prediction"] and "model" in graph["prediction"]
    cycles = _cycles(graph)
    where = {tuple(c): {a: {b: graph[a][b] for b in c if b in graph.get(a, {})} for a in c} for c in cycles}
    assert not cycles, where


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}) == [["a", "b", "c"]]


def test_the_application_never_imports_the_benchmark_suite():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in APP.rglob("*.py")
                 for name, line in _imports(path) if name.split(".")[0] in BENCH_MODULES]
    assert not offenders, offenders
    launcher = (APP / "benchmark.py").read_text()
    assert "sys.path" not in launcher.split('"""', 2)[2] and "spec_from_file_location" not in launcher


def test_each_command_module_imports_first_in_a_fresh_process():
    """Import order cannot matter: each command's module, and the checkpoint module, imported first."""
    modules = ["decafa_fast.app.model.checkpoint", "decafa_fast.app.evaluation.evaluate",
               "decafa_fast.app.prediction.predict", "decafa_fast.app.training.train", "decafa_fast.app.export",
               "decafa_fast.app.benchmark", "decafa_fast.app.training.ablate", "decafa_fast.app.cli"]
    # one process (torch loads once); the application's modules are forgotten before each round
    code = f"""
import importlib, sys
import decafa_fast.ops
modules = {modules!r}
for first in modules:
    for name in [m for m in sys.modules if m.startswith("decafa_fast.app")]:
        del sys.modules[name]
    try:
        for name in [first] + modules:
            importlib.import_module(name)
    except Exception as error:
        sys.exit(f"{{first}} first: {{type(error).__name__}}: {{error}}")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
