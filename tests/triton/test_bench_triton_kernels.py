"""bench/triton_kernels.py (the GPU check's per-kernel race) on CPU tensors under the interpreter, tiny shapes:
every op and pass gives one row per kernel family with the keys the GPU report reads, and the tuning-table
entry names the faster family."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "triton_kernels.py"
KEYS = {"backend", "op", "pass", "dtype", "batch", "cuda_graph", "time_us", "floor_us"}


def _load():
    spec = importlib.util.spec_from_file_location("triton_kernels_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU check runs the script itself")
def test_rows_and_table_on_cpu(tmp_path):
    bench = _load()
    out, table = tmp_path / "rows.json", tmp_path / "table.json"
    rc = bench.main(["--allow-cpu", "--batches", "2", "--dtypes", "float32", "--maps", "3", "--size", "8",
                     "--channels", "2", "--reps", "1", "--json", str(out), "--table-out", str(table)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert len(rows) == len(bench.OPS) * 2 * len(bench.KERNELS)  # op x pass x kernel family, no graphs on CPU
    assert all(KEYS <= set(r) and r["floor_us"] > 0 and r["time_us"] > 0 for r in rows)
    assert {(r["op"], r["pass"], r["backend"]) for r in rows} == {
        (op, p, f"triton-{k}") for op in bench.OPS for p in ("forward", "backward") for k in bench.KERNELS}
    entry = json.loads(table.read_text())["gpus"]["cpu (interpreter)"]
    assert entry == {"map_kernel": data["best_map_kernel"]} and data["best_map_kernel"] in bench.KERNELS


def test_best_kernel_and_argument_checks():
    bench = _load()

    def row(kernel, op, t, graph=False):
        return dict(backend=f"triton-{kernel}", op=op, dtype="float32", batch=1, cuda_graph=graph, time_us=t,
                    floor_us=1.0, **{"pass": "forward"})

    rows = [row("persistent", "a", 10), row("runs", "a", 12), row("persistent", "b", 30), row("runs", "b", 20),
            row("runs", "c", 1), row("persistent", "a", 1, graph=True)]
    assert bench.best_kernel(rows) == "runs"  # 40 vs 32 over a and b; c (one family) and graphs ignored
    assert bench.best_kernel(rows[:1]) is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--ops", "decafa_hed"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--kernels", "fast"])
