"""The benchmark machinery: measuring helpers, tables, plots, and `decafa-fast bench` end to end at a tiny size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decafa_fast import ops
from decafa_fast.app import benchmark as B

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_floor_bytes_counts_each_tensor_once_forward_and_again_for_backward():
    t = torch.zeros(2, 3, 4, 5)  # 120 float32 = 480 bytes
    z = torch.zeros(2, 3, 2, dtype=torch.bfloat16)  # 12 bf16 = 24 bytes
    assert B.tensor_bytes([t, None, z]) == 504
    assert B.floor_bytes([t], [z], backward=False) == 504
    # backward: read grad_z (24) and t again (480), write grad_t (480)
    assert B.floor_bytes([t], [z], backward=True, grad_inputs=[t]) == 504 + 24 + 480 + 480


def test_choose_rounds_stays_within_bounds():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert B.choose_rounds(10.0, cpu) == (3, 1)  # slow case: the minimum
    assert B.choose_rounds(1e-6, cpu) == (20, 1)  # fast case: the cap
    assert B.choose_rounds(10.0, cpu, min_rounds=1) == (1, 1)
    rounds, iterations = B.choose_rounds(1e-5, cuda)  # 10 us kernels are batched to >= 1 ms per round
    assert iterations == 100 and 10 <= rounds <= 200


def test_selected_backends_rejects_unknown_names():
    assert B.selected_backends(None) == B.ALL_BACKENDS
    assert B.selected_backends("cpp, reference") == ("cpp", "reference")
    with pytest.raises(ValueError, match="unknown"):
        B.selected_backends("cpp,fast")


def test_backend_skip_reasons():
    cpu = torch.device("cpu")
    assert B.backend_skip_reason("reference", cpu) is None
    assert B.backend_skip_reason("cuda", cpu) is not None  # CPU run, or no CUDA build
    if not torch.cuda.is_available():  # Triton is unavailable, or only the interpreter: never benchmarked
        assert B.backend_skip_reason("triton", cpu) is not None
    if ops.backends()["cpp"] == "available":
        assert B.backend_skip_reason("cpp", cpu) is None


def test_copy_bandwidth_and_peak_memory_on_cpu():
    cpu = torch.device("cpu")
    assert B.copy_bandwidth(cpu, nbytes=8 << 20, repeats=2) > 1e8  # > 0.1 GB/s on anything
    x = torch.randn(256, 256)
    peak, method = B.peak_memory(lambda: x * 2 + 1, cpu)  # two 256 KiB temporaries at most
    assert method != "unavailable"
    assert 256 * 256 * 4 <= peak <= 4 * 256 * 256 * 4


def test_tables_and_plots_from_rows(tmp_path):
    rows = [
        dict(suite="ops", op="decafa_head", **{"pass": "fwd"}, dtype="float32", batch=b, backend=be,
             time_s=t * b, speedup=s, gbps=1.5, floor_pct=20.0, peak_bytes=2**21)
        for b in (1, 8) for be, t, s in (("reference", 3e-3, None), ("cpp", 1e-3, 3.0))
    ] + [dict(suite="model", task="infer", mode="eager", dtype="float32", batch=1, backend="cpp", time_s=0.5,
              speedup=1.1, peak_bytes=None)]
    table = B.format_op_table(rows)
    assert "| decafa_head" in table and "3.00x" in table and "2.0" in table  # peak in MiB
    assert len(table.splitlines()) == 2 + 4
    model = B.format_model_table(rows)
    assert "2.0" in model and "1.10x" in model  # 1 image / 0.5 s
    png = B.plot_rows(rows, tmp_path / "ops.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC
    assert B.plot_rows([], tmp_path / "none.png") is None


def test_targets_table_judges_speedup_and_peak_memory():
    head = dict(suite="ops", op="decafa_head", dtype="float32", batch=8, L=98, H=128, W=128, C=64)
    rows = [dict(head, **{"pass": "fwd"}, backend="reference", time_s=3.0, peak_bytes=10),
            dict(head, **{"pass": "fwd"}, backend="cpp", time_s=1.0, speedup=3.0, peak_bytes=5),
            dict(head, **{"pass": "fwd+bwd"}, backend="reference", time_s=3.0, peak_bytes=2**20),
            dict(head, **{"pass": "fwd+bwd"}, backend="cpp", time_s=2.0, speedup=1.5, peak_bytes=2**21)]
    lines = B.format_targets(rows).splitlines()[2:]
    assert len(lines) == 3
    assert "3.00x" in lines[0] and lines[0].rstrip(" |").endswith("yes")
    assert "1.50x" in lines[1] and "NO" in lines[1]  # fwd+bwd needs >= 2x
    assert "2.0 MiB vs 1.0 MiB" in lines[2] and "NO" in lines[2]
    assert B.format_targets([]) == ""
    tiny = [dict(r, H=16, W=16) for r in rows]  # only the paper's size is judged
    assert B.format_targets(tiny) == ""


def test_device_facts_name_the_machine():
    facts = B.device_facts()
    assert facts["torch"] == torch.__version__
    assert facts["cpu_count"] >= 1 and facts["cpu_model"]
    assert set(facts["backends"]) >= {"reference", "cpp", "triton", "cuda"}


def test_decafa_fast_bench_end_to_end_tiny(tmp_path):
    """`decafa-fast bench` runs pytest-benchmark on bench/, writes JSON, a summary and plots."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user would run it (tests/conftest.py sets it for the op tests)
    cmd = [sys.executable, "-m", "decafa_fast.app.cli", "bench", "--size", "tiny", "--quick",
           "--backends", "reference,kornia,cpp", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| op" in proc.stdout and "speed-up" in proc.stdout

    (json_path,) = tmp_path.glob("bench-*.json")
    data = json.loads(json_path.read_text())
    streamed = [json.loads(line) for line in json_path.with_suffix(".jsonl").read_text().splitlines()]
    assert len(streamed) == len(data["benchmarks"]) > 0  # one JSON line per benchmark, written as it ended
    assert data["machine_info"]["decafa"]["copy_gbps"] > 0
    rows, _ = B.load_rows(json_path)
    op_rows = [r for r in rows if r["suite"] == "ops"]
    model_rows = [r for r in rows if r["suite"] == "model"]
    assert {r["op"] for r in op_rows} == {"soft_argmax", "decafa_head"}
    assert {r["backend"] for r in op_rows} >= {"reference", "kornia"}
    for r in op_rows:
        assert r["time_s"] > 0 and r["floor_bytes"] > 0 and r["gbps"] > 0 and r["floor_pct"] > 0
        assert r["peak_bytes"] is not None and r["peak_method"]
        assert ("speedup" in r) == (r["backend"] != "reference")
    assert model_rows and all(r["images_per_s"] > 0 for r in model_rows)
    if ops.backends()["cpp"] == "available":
        assert any(r["backend"] == "cpp" and r["speedup"] > 0 for r in op_rows + model_rows)

    assert (tmp_path / "summary.md").read_text().startswith("# decafa-fast bench")
    for name in ("ops_time_vs_batch.png", "model_time_vs_batch.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def _load_bench_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_head_floor_script_needs_a_gpu():
    proc = subprocess.run([sys.executable, "bench/head_floor.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


@pytest.mark.skipif(not ops.backends()["triton"].startswith("available"), reason="Triton is not installed")
def test_head_floor_race_logic_on_cpu_tensors(tmp_path, monkeypatch, capsys):
    """bench/head_floor.py only runs on a GPU session, which is rare: run its logic (correctness gate, records,
    sweep, JSON) here on CPU tensors with the Triton interpreter and cpp racing, timing stubbed out."""
    script = _load_bench_script("head_floor")
    calls = []

    def fake_time(fn, reps, flush=True):
        fn()
        calls.append(reps)
        return 2e-3

    monkeypatch.setattr(script, "time_ms", fake_time)
    monkeypatch.setattr(script, "graph_time_ms", fake_time)
    monkeypatch.setattr(script, "SWEEP", {"fuse_warps": [2], "stats_block": [64]})
    monkeypatch.setattr(B, "copy_bandwidth", lambda device: 1e10)
    out = tmp_path / "race.json"
    args = script.parse_args(["--batch", "2", "--maps", "3", "--size", "9", "--channels", "2", "--dtypes",
                              "float32", "--no-compile", "--sweep", "--backends", "triton,cpp,cuda",
                              "--json", str(out)])
    assert script.race(args, torch.device("cpu"), ("triton", "cpp"), deadline=float("inf")) == 0
    text = capsys.readouterr().out
    assert "backend 'cuda' skipped" in text
    data = json.loads(out.read_text())
    cases = {c["case"]: c for c in data["cases"]}
    for backend in ("triton", "cpp"):
        for case in ("forward", "forward cuda graph", "forward+backward", "forward B=1 eager",
                     "forward B=1 cuda graph"):
            assert cases[f"{backend} {case}"]["ms"] == 2e-3
    assert "reference eager forward" in cases and "reference compile forward" not in cases
    # floor: (T + I + E + F + z) float32 bytes / 1e10 B/s, in ms
    b, l, s, c, fc = 2, 3, 9, 2, 1 + 1 + 2 + 2
    floor = (b * l * s * s + b * s * s + b * c * s * s + b * fc * s * s + b * l * 2) * 4 / 1e10 * 1e3
    assert cases["floor forward"]["ms"] == pytest.approx(floor)
    assert cases["triton forward"]["x_floor"] == pytest.approx(2e-3 / floor)
    assert [(r["dtype"], r.get("fuse_warps"), r.get("stats_block")) for r in data["sweep"]] == [
        ("float32", 2, None), ("float32", None, 64)]
    from decafa_fast.triton import ops as tops

    assert tops.TUNING.fuse_warps == data["info"]["triton_tuning"]["fuse_warps"]  # sweep restores TUNING


def test_gpu_check_script_without_a_gpu(tmp_path):
    """bench/gpu_check.sh refuses to run without a GPU; with GPU_CHECK_ALLOW_CPU=1 and no time left for any
    step it still writes the report (steps table, and the tables of rows already in OUTDIR/rows.jsonl)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "refused")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr

    out = tmp_path / "out"
    out.mkdir()
    row = dict(suite="ops", op="decafa_head", dtype="float32", batch=8, gbps=1.0, floor_pct=5.0, peak_bytes=2**20,
               **{"pass": "fwd"})
    (out / "rows.jsonl").write_text(json.dumps(dict(row, backend="reference", time_s=0.3)) + "\n"
                                    + json.dumps(dict(row, backend="cpp", time_s=0.1, speedup=3.0)) + "\n")
    env.update(GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_BUDGET_S="20")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # no step ran: that is a failed check
    report = (out / "report.md").read_text()
    for step in ("install", "tests", "head_floor", "bench_ops", "bench_model"):
        assert f"| {step} | skipped: out of time |" in report
    assert "| decafa_head | fwd  | float32 | 8 | cpp       |" in report and "3.00x" in report
    assert (out / "steps.log").is_file()
