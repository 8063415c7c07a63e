"""The benchmark machinery (bench/measure.py, bench/report.py, bench/run.py): measuring helpers, tables, plots,
notes, and `decafa-fast bench` end to end at a tiny size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decafa_fast import ops
from decafa_fast.app import benchmark as launcher

ROOT = Path(__file__).resolve().parents[2]
# the suite's modules import each other by name, as pytest and bench/run.py import them
if str(ROOT / "bench") not in sys.path:
    sys.path.append(str(ROOT / "bench"))
import measure  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_floor_bytes_counts_each_tensor_once_forward_and_again_for_backward():
    t = torch.zeros(2, 3, 4, 5)  # 120 float32 = 480 bytes
    z = torch.zeros(2, 3, 2, dtype=torch.bfloat16)  # 12 bf16 = 24 bytes
    assert measure.tensor_bytes([t, None, z]) == 504
    assert measure.floor_bytes([t], [z], backward=False) == 504
    # backward: read grad_z (24) and t again (480), write grad_t (480)
    assert measure.floor_bytes([t], [z], backward=True, grad_inputs=[t]) == 504 + 24 + 480 + 480


def test_choose_rounds_stays_within_bounds():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert measure.choose_rounds(10.0, cpu) == (3, 1)  # slow case: the minimum
    assert measure.choose_rounds(1e-6, cpu) == (20, 1)  # fast case: the cap
    assert measure.choose_rounds(10.0, cpu, min_rounds=1) == (1, 1)
    rounds, iterations = measure.choose_rounds(1e-5, cuda)  # 10 us kernels are batched to >= 1 ms per round
    assert iterations == 100 and 10 <= rounds <= 200


def test_selected_backends_rejects_unknown_names():
    assert measure.selected_backends(None) == measure.ALL_BACKENDS
    assert measure.selected_backends("cpp, reference") == ("cpp", "reference")
    with pytest.raises(ValueError, match="unknown"):
        measure.selected_backends("cpp,fast")


def test_backend_skip_reasons():
    cpu = torch.device("cpu")
    assert measure.backend_skip_reason("reference", cpu) is None
    assert measure.backend_skip_reason("cuda", cpu) is not None  # CPU run, or no CUDA build
    if not torch.cuda.is_available():  # Triton is unavailable, or only the interpreter: never benchmarked
        assert measure.backend_skip_reason("triton", cpu) is not None
    if ops.backends()["cpp"] == "available":
        assert measure.backend_skip_reason("cpp", cpu) is None


def test_copy_bandwidth_and_peak_memory_on_cpu():
    cpu = torch.device("cpu")
    assert measure.copy_bandwidth(cpu, nbytes=8 << 20, repeats=2) > 1e8  # > 0.1 GB/s on anything
    x = torch.randn(256, 256)
    peak, method = measure.peak_memory(lambda: x * 2 + 1, cpu)  # two 256 KiB temporaries at most
    assert method != "unavailable"
    assert 256 * 256 * 4 <= peak <= 4 * 256 * 256 * 4


def test_tables_and_plots_from_rows(tmp_path):
    rows = [
        dict(suite="ops", op="decafa_head", **{"pass": "fwd"}, dtype="float32", batch=b, backend=be,
             time_s=t * b, speedup=s, gbps=1.5, floor_pct=20.0, peak_bytes=2**21)
        for b in (1, 8) for be, t, s in (("reference", 3e-3, None), ("cpp", 1e-3, 3.0))
    ] + [dict(suite="model", task="infer", mode="eager", dtype="float32", batch=1, backend="cpp", time_s=0.5,
              speedup=1.1, peak_bytes=None)]
    table = report.format_op_table(rows)
    assert "| decafa_head" in table and "3.00x" in table and "2.0" in table  # peak in MiB
    assert len(table.splitlines()) == 2 + 4
    model = report.format_model_table(rows)
    assert "2.0" in model and "1.10x" in model  # 1 image / 0.5 s
    png = report.plot_rows(rows, tmp_path / "ops.png")
    assert png is not None and png.read_bytes()[:8] == PNG_MAGIC
    assert report.plot_rows([], tmp_path / "none.png") is None


def test_targets_table_judges_speedup_and_peak_memory():
    head = dict(suite="ops", op="decafa_head", dtype="float32", batch=8, L=98, H=128, W=128, C=64)
    rows = [dict(head, **{"pass": "fwd"}, backend="reference", time_s=3.0, peak_bytes=10),
            dict(head, **{"pass": "fwd"}, backend="cpp", time_s=1.0, speedup=3.0, peak_bytes=5),
            dict(head, **{"pass": "fwd+bwd"}, backend="reference", time_s=3.0, peak_bytes=2**20),
            dict(head, **{"pass": "fwd+bwd"}, backend="cpp", time_s=2.0, speedup=1.5, peak_bytes=2**21)]
    lines = report.format_targets(rows).splitlines()[2:]
    assert len(lines) == 3
    assert "3.00x" in lines[0] and lines[0].rstrip(" |").endswith("yes")
    assert "1.50x" in lines[1] and "NO" in lines[1]  # fwd+bwd needs >= 2x
    assert "2.0 MiB vs 1.0 MiB" in lines[2] and "NO" in lines[2]
    assert report.format_targets([]) == ""
    tiny = [dict(r, H=16, W=16) for r in rows]  # only the paper's size is judged
    assert report.format_targets(tiny) == ""


def test_device_facts_name_the_machine():
    facts = measure.device_facts()
    assert facts["torch"] == torch.__version__
    assert facts["cpu_count"] >= 1 and facts["cpu_model"]
    assert set(facts["backends"]) >= {"reference", "cpp", "triton", "cuda"}


def test_model_notes_say_why_a_cpu_model_row_is_slower():
    """A model row slower than the reference gets a note built from what the run measured: the share of its time
    in convolutions (the same with either backend), whether the gap fits in the rest, and the rounds' spread."""
    base = dict(suite="model", task="infer", mode="eager", dtype="float32", batch=1)
    rows = [dict(base, backend="reference", time_s=1.0, median_s=1.02, conv_share=0.9, loadavg_1m=1.5),
            dict(base, backend="cpp", time_s=1.03, median_s=1.08, speedup=1 / 1.03, conv_share=0.91, loadavg_1m=2.5),
            dict(base, batch=8, backend="reference", time_s=1.0, conv_share=0.9),
            dict(base, batch=8, backend="cpp", time_s=1.6, speedup=1 / 1.6, conv_share=0.9),
            dict(base, batch=16, backend="reference", time_s=1.0, median_s=1.01, conv_share=0.8),
            dict(base, batch=16, backend="cpp", time_s=1.1, median_s=1.11, speedup=1 / 1.1, conv_share=0.8),
            dict(base, batch=4, backend="cpp", time_s=0.5, speedup=2.0, conv_share=0.5),  # faster: no note
            dict(base, batch=2, backend="cpp", time_s=2.0, speedup=0.5)]  # cause not measured: no note
    notes = report.model_notes(rows)
    assert len(notes) == 3
    assert "B 1 cpp is 0.97x" in notes[0] and "91% of its time" in notes[0] and "other 9% at most" in notes[0]
    assert "3% slower, less than the spread of the timed rounds themselves (median 5% above" in notes[0]
    assert "load average 2.5 here, 1.5 for the reference" in notes[0]
    assert "B 8 cpp is 0.62x" in notes[1] and "60% slower, more than that share" in notes[1]
    assert "B 16 cpp is 0.91x" in notes[2] and notes[2].endswith("10% slower.")  # within 20%, beyond the spread
    table = report.format_model_table(rows)
    assert "conv %" in table and table.count("Note:") == 3


def test_time_shares_find_the_convolutions():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 32, 32)
    with torch.no_grad():
        shares = measure.time_shares(lambda: conv(x).sum())
    assert 0.5 < shares["conv_share"] <= 1.0 and shares["decafa_share"] == 0.0


def test_report_line_and_default_folder(monkeypatch, tmp_path):
    row = dict(suite="ops", op="decafa_head", dtype="float32", batch=8, backend="cpp", time_s=0.034,
               floor_pct=12.5, speedup=4.93, **{"pass": "fwd"})
    assert run.report_line(row) == "decafa_head fwd float32 B8 cpp: 34.000 ms, 12.5% of the floor, 4.93x the reference"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert run.default_out().parent == tmp_path / "decafa_fast" / "bench"


def test_launcher_finds_the_suite_or_says_in_one_line_where_it_is(monkeypatch, tmp_path, capsys):
    """`decafa-fast bench` runs bench/run.py from the checkout or from the copy a wheel carries
    (decafa_fast/_sources/bench); an install with neither says what to run instead."""
    assert launcher.suite_dir() == ROOT / "bench"  # this checkout
    wheel_copy = tmp_path / "site" / "decafa_fast" / "_sources" / "bench"
    wheel_copy.mkdir(parents=True)
    (wheel_copy / "run.py").write_text("")
    (wheel_copy / "measure.py").write_text("")
    monkeypatch.setattr(launcher, "SUITE_DIRS", (tmp_path / "site" / "bench", wheel_copy))
    assert launcher.suite_dir() == wheel_copy
    monkeypatch.setattr(launcher, "SUITE_DIRS", (tmp_path / "nowhere",))
    from decafa_fast.app import cli

    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python bench/run.py" in err


def test_launcher_runs_the_suite_as_a_script_by_path_on_this_package():
    """The runner is a program of its own, run by path: the package never imports bench/ (no import cycle, no
    sys.path edits), and the child process imports this copy of decafa_fast first."""
    command, env = launcher.runner_command(ROOT / "bench", ["--quick"])
    assert command == [sys.executable, "-B", str(ROOT / "bench" / "run.py"), "--quick"]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    probe = ("import sys, decafa_fast.app.benchmark, decafa_fast.app.cli; "
             "bench = [m for m in sys.modules if m in ('run', 'measure', 'report', 'conftest', 'decafa_bench_run')]; "
             "assert not bench, bench; print(decafa_fast.__file__)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / "decafa_fast" / "__init__.py")
    assert "sys.path" not in (ROOT / "decafa_fast" / "app" / "benchmark.py").read_text().split('"""')[2]


@pytest.mark.slow
def test_bench_report_through_the_cli_marks_busy_and_unranked_rows(tmp_path, capfd):
    """`decafa-fast bench --report ROWS.jsonl`, through the launcher's child process: the table marks the rows
    and the warnings are printed, one line each."""
    base = dict(suite="ops", op="soft_argmax", dtype="float32", batch=8, gbps=1.0, floor_pct=5.0, peak_bytes=2**20,
                **{"pass": "fwd"})
    rows = [dict(base, backend="reference", time_s=1e-3, min_s=1e-3, median_s=1.1e-3, max_s=1.5e-3, loadavg_1m=0.5,
                 cores=2),
            dict(base, backend="cpp", time_s=0.9e-3, min_s=0.9e-3, median_s=1e-3, max_s=1.4e-3, speedup=1.11,
                 loadavg_1m=9.0, cores=2)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from decafa_fast.app import cli

    assert cli.main(["bench", "--report", str(path)]) == 0
    out = capfd.readouterr().out
    assert "| busy, spread > gap |" in out
    assert sum(line.startswith("warning: ") for line in out.splitlines()) == 2


@pytest.mark.slow
def test_decafa_fast_bench_end_to_end_tiny(tmp_path):
    """`decafa-fast bench` runs the suites through pytest-benchmark and prints one table per suite (not
    pytest-benchmark's as well) and no third-party deprecation warnings; with no --out it names a new folder
    under the cache and writes only there (the working directory stays empty): JSON, rows, summary and plots.
    kornia rows are there when kornia is installed; without it the run says why they are not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user would run it
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "decafa_fast.app.cli", "bench", "--size", "tiny", "--quick",
           "--backends", "reference,kornia,cpp"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("| op ") == 1 and out.count("| task ") == 1  # one ops table, one model table
    assert "Name (time in" not in out and "-- benchmark" not in out  # pytest-benchmark's own table
    assert "DeprecationWarning: " not in out + proc.stderr and "jit" not in out + proc.stderr
    assert list(cwd.iterdir()) == []

    (folder,) = (tmp_path / "cache" / "decafa_fast" / "bench").iterdir()
    assert f"results go to {folder}" in out
    (json_path,) = folder.glob("bench-*.json")
    data = json.loads(json_path.read_text())
    streamed = [json.loads(line) for line in json_path.with_suffix(".jsonl").read_text().splitlines()]
    assert len(streamed) == len(data["benchmarks"]) > 0  # one JSON line per benchmark, written as it ended
    assert data["machine_info"]["decafa"]["copy_gbps"] > 0
    rows, _ = report.load_rows(json_path)
    op_rows = [r for r in rows if r["suite"] == "ops"]
    model_rows = [r for r in rows if r["suite"] == "model"]
    assert {r["op"] for r in op_rows} == {"soft_argmax", "decafa_head"}
    assert "reference" in {r["backend"] for r in op_rows}
    kornia_reason = measure.backend_skip_reason("kornia", torch.device("cpu"))
    if kornia_reason is None:
        assert "kornia" in {r["backend"] for r in op_rows}
    else:
        assert "kornia" not in {r["backend"] for r in op_rows} and f"skipped: {kornia_reason}" in out
    for r in op_rows:
        assert r["time_s"] > 0 and r["floor_bytes"] > 0 and r["gbps"] > 0 and r["floor_pct"] > 0
        assert r["peak_bytes"] is not None and r["peak_method"]
        assert ("speedup" in r) == (r["backend"] != "reference")
        assert f"{r['op']} {r['pass']} {r['dtype']} B{r['batch']} {r['backend']}: " in out  # its progress line
    assert model_rows and all(r["images_per_s"] > 0 for r in model_rows)
    if not torch.cuda.is_available():  # a CPU run: the cpp backend races, the model rows say where the time goes
        assert all(0 < r["conv_share"] <= 1 for r in model_rows)
        if ops.backends()["cpp"] == "available":
            assert any(r["backend"] == "cpp" and r["speedup"] > 0 for r in op_rows + model_rows)

    assert (folder / "summary.md").read_text().startswith("# decafa-fast bench")
    for name in ("ops_time_vs_batch.png", "model_time_vs_batch.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_ctrl_c_during_decafa_fast_bench_keeps_the_rows_and_says_so(tmp_path):
    """SIGINT to the terminal's process group (Ctrl-C) once a row is measured: the launcher and the runner both
    get it; the runner prints the rows so far and one line naming the file that keeps them; exit status 130."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "decafa_fast.app.cli", "bench", "--size", "tiny", "--quick",
                             "--backends", "reference", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.stat().st_size for p in out.glob("*.jsonl")):
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    (rows,) = out.glob("*.jsonl")
    assert stderr.strip().splitlines() == [
        f"decafa-fast bench: interrupted: kept the {len(rows.read_text().splitlines())} row(s) measured so far in "
        f"{rows} (python bench/run.py --report {rows} prints them)"]
    assert "| soft_argmax" in stdout and "Traceback" not in stdout + stderr


def _load_bench_script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_head_floor_script_needs_a_gpu():
    proc = subprocess.run([sys.executable, "bench/head_floor.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_head_floor_pixel_split_block_restores_the_setting(monkeypatch):
    """head_floor times the CUDA forward at B = 1 with the pixel split forced to 1 inside `pixel_split(1)`:
    the setting before it comes back, also when the timing raises."""
    from decafa_fast.ops import cuda_runs

    script = _load_bench_script("head_floor")
    state = {"groups": 4}
    monkeypatch.setattr(cuda_runs, "pixel_split", lambda: state["groups"])
    monkeypatch.setattr(cuda_runs, "set_pixel_split", lambda n: state.update(groups=n))
    with script.pixel_split(1):
        assert state["groups"] == 1
    assert state["groups"] == 4
    with pytest.raises(RuntimeError), script.pixel_split(1):
        raise RuntimeError("out of memory")
    assert state["groups"] == 4


@pytest.mark.slow
@pytest.mark.skipif(not ops.backends()["triton"].startswith("available"), reason="Triton is not installed")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_head_floor_race_logic_on_cpu_tensors(tmp_path, monkeypatch, capsys, channels_last):
    """bench/head_floor.py only runs on a GPU session, which is rare: run its logic (correctness gate, records,
    sweep, JSON) here on CPU tensors with the Triton interpreter and cpp racing, timing stubbed out."""
    script = _load_bench_script("head_floor")
    layouts = []

    def fake_time(fn, reps, flush=True):
        fn()
        return 2e-3

    monkeypatch.setattr(script, "time_ms", fake_time)
    monkeypatch.setattr(script, "graph_time_ms", fake_time)
    monkeypatch.setattr(script, "SWEEP", {"fuse_warps": [2], "map_warps": [4], "interleaved_whole_maps": [False]})
    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: 1e10)  # head_floor imports it as B
    real_head = ops.decafa_head

    def spy_head(logits, *a, **k):
        layouts.append(logits.is_contiguous(memory_format=torch.channels_last))
        return real_head(logits, *a, **k)

    monkeypatch.setattr(ops, "decafa_head", spy_head)
    out = tmp_path / "race.json"
    args = script.parse_args(["--batch", "2", "--maps", "3", "--size", "9", "--channels", "2", "--dtypes",
                              "float32", "--no-compile", "--sweep", "--backends", "triton,cpp,cuda",
                              "--json", str(out)] + (["--channels-last"] if channels_last else []))
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
    swept = [("float32", 2, None, None), ("float32", None, 4, None)]
    if channels_last:  # the layout switch is swept for channels_last T only
        swept.append(("float32", None, None, False))
    assert [(r["dtype"], r.get("fuse_warps"), r.get("map_warps"), r.get("interleaved_whole_maps"))
            for r in data["sweep"]] == swept
    assert layouts and set(layouts) == {channels_last}
    from decafa_fast.triton import ops as tops

    assert tops.TUNING.fuse_warps == data["info"]["triton_tuning"]["fuse_warps"]  # sweep restores TUNING


@pytest.mark.slow
def test_gpu_check_script_without_a_gpu(tmp_path):
    """bench/gpu_check.sh refuses to run without a GPU; with GPU_CHECK_ALLOW_CPU=1 and no time left for any
    step it still writes the report (steps table, and the tables of rows already in OUTDIR/rows.jsonl)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the script would run for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable  # the python3 on PATH may lack torch
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
    text = (out / "report.md").read_text()
    for step in ("install", "tests", "head_floor", "bench_ops", "bench_model"):
        assert f"| {step} | skipped: out of time |" in text
    assert "| decafa_head | fwd  | float32 | 8 | cpp       |" in text and "3.00x" in text
    assert (out / "steps.log").is_file()


# ---- load, spread, marks and plots ----------------------------------------------------------------------
def _op_row(backend, batch, time_s, max_s, pass_="fwd", load=0.5, cores=2, **extra):
    return dict(suite="ops", op="decafa_head", dtype="float32", batch=batch, backend=backend, time_s=time_s,
                min_s=time_s, median_s=(time_s + max_s) / 2, max_s=max_s, loadavg_1m=load, cores=cores,
                **{"pass": pass_}, **extra)


def test_rows_are_marked_when_busy_or_when_their_spread_exceeds_the_gap():
    ref = _op_row("reference", 8, 10e-3, 11e-3)
    clear = _op_row("cpp", 8, 2e-3, 2.5e-3, speedup=5.0)  # gap 8 ms, spreads 1 and 0.5 ms
    close = _op_row("kornia", 8, 9.5e-3, 10.2e-3, speedup=1.05)  # gap 0.5 ms < the reference's 1 ms spread
    busy = _op_row("cpp", 8, 3e-3, 3.1e-3, pass_="fwd", load=9.0)
    rows = [ref, clear, close]
    assert report.spread(ref) == pytest.approx(0.1) and report.spread(dict(ref, max_s=None)) is None
    assert report.row_marks(ref, rows) == "" and report.row_marks(clear, rows) == ""
    assert report.row_marks(close, rows) == "spread > gap"
    assert report.row_marks(busy, [ref, busy]) == "busy"
    assert report.row_marks(dict(close, loadavg_1m=3.0), rows) == "busy, spread > gap"
    assert report.run_warnings(rows + [busy]) == [
        "warning: the machine was busy during 1 of 4 rows (1-minute load average up to 9.0 on 2 cores; marked "
        "'busy'): their times include waiting for the CPU; rerun on an idle machine before comparing them",
        "warning: 1 row(s) have timed rounds spread wider than their gap to the reference (marked 'spread > gap'): "
        "they cannot be ranked against it"]
    assert report.run_warnings([ref, clear]) == []
    table = report.format_op_table(rows)
    assert [c.strip() for c in table.splitlines()[0].split("|")][6:8] == ["time (ms)", "spread"]
    assert table.splitlines()[4].rstrip(" |").endswith("spread > gap") and "10%" in table.splitlines()[2]
    assert run.report_line(busy, [ref, busy]) == "decafa_head fwd float32 B8 cpp: 3.000 ms (spread 3%) [busy]"
    summary = report.summarize(rows + [busy], {}, None)
    assert "1-minute load average as the rows ended: 0.5 to 9.0 on 2 cores" in summary
    assert summary.count("warning: ") == 2


def test_busy_warning_compares_the_load_with_the_cores():
    assert report.busy_warning(None, 2) is None and report.busy_warning(2.0, 2) is None
    line = report.busy_warning(9.04, 2)
    assert line.startswith("warning: the machine is busy: 1-minute load average 9.0 on 2 cores") and "\n" not in line
    load, cores = measure.load_and_cores()
    assert cores >= 1 and (load is None or load >= 0)
    assert {"loadavg_1m", "cores"} <= set(measure.device_snapshot(torch.device("cpu")))


def test_pytest_benchmark_rows_carry_the_spread_of_their_rounds(tmp_path):
    data = {"benchmarks": [{"name": "x", "extra_info": dict(suite="ops", time_s=1.0),
                            "stats": {"min": 1.0, "median": 1.5, "max": 3.0, "rounds": 5}}], "machine_info": {}}
    (tmp_path / "b.json").write_text(json.dumps(data))
    (row,), _ = report.load_rows(tmp_path / "b.json")
    assert (row["min_s"], row["median_s"], row["max_s"], row["rounds"]) == (1.0, 1.5, 3.0, 5)
    assert report.spread(row) == 2.0
    bench_conftest = _load_bench_script("conftest")  # bench/conftest.py: the same numbers from the live fixture

    stats = type("S", (), {"min": 1.0, "median": 1.5, "max": 3.0, "rounds": 5})()
    fixture = type("B", (), {"stats": type("M", (), {"stats": stats})()})()
    assert bench_conftest._spread_of(fixture) == {"min_s": 1.0, "median_s": 1.5, "max_s": 3.0, "rounds": 5}
    assert bench_conftest._spread_of(None) == {}


def test_plots_show_every_batch_size_and_tell_passes_and_backends_apart(tmp_path):
    """A quick run's single batch size is one labelled column with a point per (backend, pass), side by side, each
    with its colour and marker and a legend entry; several batch sizes are all on the axis."""
    import matplotlib.pyplot as plt

    quick = [_op_row(be, 8, t, t * 1.1, pass_=p) for be, t in (("reference", 4e-3), ("cpp", 1e-3))
             for p in ("fwd", "fwd+bwd")]
    fig = report.figure(quick)
    (ax,) = [a for a in fig.axes if a.has_data()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(labels) == ["cpp fwd", "cpp fwd+bwd", "reference fwd", "reference fwd+bwd"]
    handles, _ = ax.get_legend_handles_labels()
    data_lines = [h.lines[0] for h in handles]  # each series' errorbar container: its points' line first
    assert len({(line.get_color(), line.get_marker()) for line in data_lines}) == 4  # every series looks different
    assert len({line.get_color() for line in data_lines}) == 2 and len({line.get_marker() for line in data_lines}) == 2
    xs = sorted(float(line.get_xdata()[0]) for line in data_lines)
    assert len(set(xs)) == 4 and -0.5 < xs[0] and xs[-1] < 0.5  # side by side within the column
    plt.close(fig)

    sweep = [_op_row(be, b, 1e-3 * b, 1.1e-3 * b) for be in ("reference", "cpp") for b in (1, 8, 64)]
    sweep.append(_op_row("cpp", 256, 0.2, 0.21, load=9.0))  # a busy row: circled, and named in the legend
    fig = report.figure(sweep)
    (ax,) = [a for a in fig.axes if a.has_data()]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8", "64", "256"]
    assert "marked (busy / spread > gap)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    png = report.plot_rows(sweep, tmp_path / "ops.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
