"""The op library stands apart from the application, and no module of decafa_fast takes part in an import cycle.

- Importing the library loads nothing of decafa_fast.app (nor OpenCV, matplotlib or tqdm), and no library module
  imports the application.
- The import graph of decafa_fast, read from the source (ast), has no cycle. What counts as an edge M -> T:
  every `import` / `from ... import` in M, relative or absolute, at module level or inside a function or class
  body (a function-level import is a dependency that runs later, often during import anyway, as a registration
  function called at import does), except those under `if TYPE_CHECKING:` (never executed). `from P import x`
  is an edge to P.x when P.x is a module, else to P. Importing P.Q.T also runs P/__init__ and P/Q/__init__, so
  it adds an edge to each package above T that does not already contain M (a module's own packages are being
  imported before it runs); that is what makes `reference -> ops.layout` a cycle when ops/__init__ imports
  reference. Not followed: importlib calls with a computed name and files loaded by path (the CLI's
  subcommand table, the benchmark runner), which carry no static import.
- Nor between packages: each subpackage (ops, contract, triton, app.training, app.evaluation, ...) taken as one
  node, the modules directly in decafa_fast/ and decafa_fast/app/ each a node of their own.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "decafa_fast"
# Every module but the application's and the console script's shim (_cli.py: it checks for the app extra, then
# hands over to decafa_fast.app.cli).
LIBRARY = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "_cli.py"
           and "app" not in p.relative_to(PACKAGE).parts and "_sources" not in p.relative_to(PACKAGE).parts]
APPLICATION_MODULES = ("cv2", "matplotlib", "tqdm")


def _first_part(module: str) -> str:
    """'decafa_fast.app.cli' and '..app.cli' -> 'app'; 'torch.nn' -> 'torch'."""
    parts = module.lstrip(".").split(".")
    return parts[1] if parts[0] == "decafa_fast" and len(parts) > 1 else parts[0]


def test_importing_the_library_loads_nothing_of_the_application():
    """Beyond what `import torch` loads itself (torch imports tqdm where it is installed)."""
    code = ("import sys, torch; torch_loads = set(sys.modules); "
            "import decafa_fast, decafa_fast.ops, decafa_fast.nn, decafa_fast.reference; "
            "print(sorted(m for m in set(sys.modules) - torch_loads if m.startswith('decafa_fast.app') "
            f"or m.split('.')[0] in {APPLICATION_MODULES!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_the_package_root_exports_the_library_only():
    import decafa_fast

    assert {"ops", "nn", "reference"} <= set(decafa_fast.__all__)
    assert not hasattr(decafa_fast, "FaceAligner")


def test_no_library_module_imports_the_application():
    assert len(LIBRARY) > 10  # the package root, ops/, contract/, triton/, reference, nn, autotable, _build
    offenders = []
    for path in LIBRARY:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
                names = [name] + [f"{name}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(_first_part(n) == "app" for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------
# Import cycles
# --------------------------------------------------------------------------------------------------
def _module_name(root: Path, path: Path) -> str:
    parts = (root.name, *path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: modules it imports} over the package at `root` (its own modules only, see the docstring)."""
    paths = {_module_name(root, p): p for p in root.rglob("*.py") if "_sources" not in p.relative_to(root).parts}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in paths else base)
        edges = set()
        own_packages = {module.rsplit(".", n)[0] for n in range(module.count(".") + 1)}
        for target in targets:
            parts = target.split(".")
            for n in range(1, len(parts) + 1):  # the target and every package above it
                name = ".".join(parts[:n])
                if name in paths and name not in own_packages:
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path [a, b, ..., a]) per strongly connected component of more than one module,
    or of one module that imports itself; sorted, so that a failure reads the same every run."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few dozen modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        # a shortest path back to start inside the component (breadth first)
        previous = {start: None}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w == start:
                        found = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = previous[v]
        cycles.append([start, *reversed(path[1:]), start])
    return sorted(cycles)


def test_no_import_cycle_between_modules_of_decafa_fast():
    graph = import_graph(PACKAGE)
    assert "decafa_fast.ops.backend" in graph["decafa_fast.ops"]  # the graph is read at all
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with each subpackage collapsed into one node: a module of decafa_fast/X/ or of
    decafa_fast/app/X/ (the two layers' roots) belongs to X; a module directly in a root is its own node."""

    def node(module: str) -> str:
        parts = module.split(".")
        depth = 3 if len(parts) > 2 and parts[1] == "app" else 2
        return ".".join(parts[:depth])

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(node(module), set()).update(node(t) for t in targets)
    return {name: targets - {name} for name, targets in packages.items()}


def test_no_import_cycle_between_packages_of_decafa_fast():
    graph = package_graph(import_graph(PACKAGE))
    assert {"decafa_fast.contract", "decafa_fast.ops", "decafa_fast.app.training"} <= set(graph)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_relative_function_level_and_package_cycles(tmp_path):
    """The finder on a made-up package: it must report each kind of cycle the docstring counts, and nothing
    for sibling imports inside a package, for a TYPE_CHECKING import, or for an import of the package above."""
    files = {
        "__init__.py": "from . import a\n",
        "a.py": "def f():\n    from .b import g\n",  # function level: a -> b
        "b.py": "from pkg import a\n",  # absolute: b -> a (cycle a, b)
        "lib/__init__.py": "from .core import x\nfrom .. import ref\n",  # lib -> lib.core, lib -> ref
        "lib/core.py": "from . import util\nx = 1\n",  # a sibling inside lib: no edge to lib itself
        "lib/util.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n",
        "ref.py": "from .lib.core import x\nimport pkg\n",  # ref -> lib.core and the package lib above it
    }
    root = tmp_path / "pkg"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert graph["pkg.lib.util"] == set() and graph["pkg.lib.core"] == {"pkg.lib.util"}
    assert graph["pkg.ref"] == {"pkg.lib", "pkg.lib.core"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.lib", "pkg.ref", "pkg.lib"]]
    assert find_cycles(package_graph(graph)) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.lib", "pkg.ref", "pkg.lib"]]
