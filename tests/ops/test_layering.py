"""The op library stands apart from the application: importing it loads nothing of decafa_fast.app (nor
OpenCV or matplotlib), and no library module imports the application."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "decafa_fast"
# The package root is left out: its lazy `decafa_fast.FaceAligner` (README) imports the application only when
# that attribute is asked for, which the first test below checks does not happen on import.
LIBRARY = [p for p in PACKAGE.rglob("*.py")
           if "app" not in p.relative_to(PACKAGE).parts and p != PACKAGE / "__init__.py"]


def _first_part(module: str) -> str:
    """'decafa_fast.app.cli' and '..app.cli' -> 'app'; 'torch.nn' -> 'torch'."""
    parts = module.lstrip(".").split(".")
    return parts[1] if parts[0] == "decafa_fast" and len(parts) > 1 else parts[0]


def test_importing_the_library_loads_nothing_of_the_application():
    code = ("import sys, decafa_fast, decafa_fast.ops, decafa_fast.nn, decafa_fast.reference; "
            "print(sorted(m for m in sys.modules if m.startswith('decafa_fast.app') "
            "or m.split('.')[0] in ('cv2', 'matplotlib')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", proc.stdout


def test_no_library_module_imports_the_application():
    assert len(LIBRARY) > 10  # ops/, triton/, reference, nn, autotable, _build
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
