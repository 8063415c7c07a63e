"""The measured table behind the "auto" backend on CUDA (decafa_fast/autotable.py and ops/auto.py).

No GPU is needed: the table is built from benchmark rows as bench/test_ops.py writes them, and ops is asked
which backend it would run for CUDA devices (meta tensors stand in for CUDA tensors; nothing is launched).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from decafa_fast import autotable
from decafa_fast.ops import auto, status
from decafa_fast.ops import backend as backend_mod


def _row(op, pass_, dtype, batch, backend, time_s, suite="ops"):
    return {"suite": suite, "op": op, "pass": pass_, "dtype": dtype, "batch": batch, "backend": backend,
            "time_s": time_s}


def test_entries_name_the_fastest_of_at_least_two_gpu_backends():
    rows = [_row("decafa_head", "fwd", "float32", 64, "triton", 5e-4),
            _row("decafa_head", "fwd", "float32", 64, "cuda", 4e-4),
            _row("decafa_head", "fwd", "float32", 64, "reference", 1e-5),  # not a GPU backend: ignored
            _row("decafa_head", "fwd", "float32", 1, "triton", 2e-5),  # no rival measured: no entry
            _row("soft_argmax", "fwd+bwd", "bfloat16", 8, "cuda", 3e-5),
            _row("soft_argmax", "fwd+bwd", "bfloat16", 8, "triton", 2e-5),
            _row("decafa_head", "fwd", "float32", 64, "cuda", 1e-6, suite="model")]  # model rows: ignored
    entries = autotable.entries_from_rows(rows)
    assert entries == [
        {"op": "decafa_head", "pass": "fwd", "dtype": "float32", "batch": 64, "backend": "cuda",
         "times_us": {"cuda": 400.0, "triton": 500.0}},
        {"op": "soft_argmax", "pass": "fwd+bwd", "dtype": "bfloat16", "batch": 8, "backend": "triton",
         "times_us": {"cuda": 30.0, "triton": 20.0}},
    ]


def _index():
    entries = [{"op": "decafa_head", "pass": "fwd", "dtype": "float32", "batch": b, "backend": be}
               for b, be in ((1, "cuda"), (8, "triton"), (64, "cuda"))]
    entries.append({"op": "decafa_head", "pass": "fwd+bwd", "dtype": "bfloat16", "batch": 64, "backend": "triton"})
    return autotable.index_entries(entries)


@pytest.mark.parametrize("batch, expected", [(1, "cuda"), (2, "cuda"), (3, "triton"), (8, "triton"),
                                             (22, "triton"), (23, "cuda"), (4096, "cuda")])
def test_choose_takes_the_nearest_measured_batch_on_a_log_scale(batch, expected):
    # boundaries at the geometric means: sqrt(1 * 8) = 2.83, sqrt(8 * 64) = 22.6
    assert autotable.choose(_index(), "decafa_head", "fwd", "float32", batch) == expected


def test_choose_falls_back_to_the_other_pass_then_the_same_width_dtype_then_none():
    index = _index()
    assert autotable.choose(index, "decafa_head", "fwd+bwd", "float32", 64) == "cuda"  # only fwd measured
    assert autotable.choose(index, "decafa_head", "fwd", "bfloat16", 1) == "triton"  # only fwd+bwd measured
    assert autotable.choose(index, "decafa_head", "fwd+bwd", "float16", 64) == "triton"  # bf16's entry
    assert autotable.choose(index, "soft_argmax", "fwd", "float32", 64) is None  # op not measured
    assert autotable.choose({}, "decafa_head", "fwd", "float32", 64) is None


def test_save_merges_per_case_and_keeps_other_gpus(tmp_path):
    path = tmp_path / "sub" / "table.json"
    first = autotable.entries_from_rows([_row("decafa_head", "fwd", "float32", b, be, t)
                                         for b in (1, 64) for be, t in (("triton", 2.0), ("cuda", 1.0))])
    autotable.save_entries(path, "GPU A", first, source="run 1")
    autotable.save_entries(path, "GPU B", first[:1], source="run 2")
    later = autotable.entries_from_rows([_row("decafa_head", "fwd", "float32", 64, be, t)
                                         for be, t in (("triton", 1.0), ("cuda", 2.0))])
    autotable.save_entries(path, "GPU A", later, source="run 3")
    table = autotable.read_table(path)
    a = table["devices"]["GPU A"]
    assert a["source"] == "run 3"
    assert [(e["batch"], e["backend"]) for e in a["entries"]] == [(1, "cuda"), (64, "triton")]
    assert len(table["devices"]["GPU B"]["entries"]) == 1
    index = autotable.load_index([path])
    assert autotable.choose(index["GPU A"], "decafa_head", "fwd", "float32", 50) == "triton"


def test_bad_tables_are_rejected_and_skipped_with_a_warning(tmp_path):
    broken, wrong, good = tmp_path / "broken.json", tmp_path / "wrong.json", tmp_path / "good.json"
    broken.write_text("{not json")
    wrong.write_text(json.dumps({"format": 1, "devices": {"G": {"entries": [{"backend": "cpp", "batch": 1}]}}}))
    autotable.save_entries(good, "G", [{"op": "fuse", "pass": "fwd", "dtype": "float32", "batch": 8,
                                        "backend": "cuda"}], source="test")
    with pytest.raises(ValueError, match="not valid JSON"):
        autotable.read_table(broken)
    with pytest.raises(ValueError, match="bad entry"):
        autotable.read_table(wrong)
    no_pass = tmp_path / "no_pass.json"  # an entry without its pass would break the index at import
    no_pass.write_text(json.dumps({"format": 1, "devices": {"G": {"entries": [
        {"op": "fuse", "dtype": "float32", "batch": 8, "backend": "cuda"}]}}}))
    with pytest.raises(ValueError, match="bad entry"):
        autotable.read_table(no_pass)
    not_a_section = tmp_path / "not_a_section.json"
    not_a_section.write_text(json.dumps({"format": 1, "devices": {"G": []}}))
    with pytest.raises(ValueError, match="no list of entries"):
        autotable.read_table(not_a_section)
    assert autotable.read_table(tmp_path / "missing.json") == {"format": 1, "devices": {}}
    with pytest.warns(RuntimeWarning, match="ignoring the auto-backend table"):
        index = autotable.load_index([good, broken, wrong])
    assert autotable.choose(index["G"], "fuse", "fwd", "float32", 8) == "cuda"


def test_user_table_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DECAFA_AUTO_TABLE", str(tmp_path / "mine.json"))
    assert autotable.user_table_path() == tmp_path / "mine.json"
    monkeypatch.delenv("DECAFA_AUTO_TABLE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotable.user_table_path() == tmp_path / "decafa_fast" / "auto_table.json"


# --------------------------------------------------------------------------------------------------
# ops: what "auto" runs on a CUDA device
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """Both GPU backends 'available', a measured table for a GPU named "Fake GPU" (meta tensors have device
    index None, which stands for that GPU)."""
    fake = dict(status.STATUS, triton="available", cuda="available")
    monkeypatch.setattr(status, "STATUS", fake)
    monkeypatch.setattr(auto, "TABLES", {"Fake GPU": _index()})
    monkeypatch.setattr(auto, "GPU_NAMES", {None: "Fake GPU"})
    monkeypatch.setattr(auto, "AUTO_CUDA_PREFERENCE", ["triton", "cuda"])
    monkeypatch.setattr(backend_mod, "_default", "auto")
    return fake


def _meta(*shape, dtype=torch.float32, requires_grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=requires_grad)


def test_auto_on_cuda_uses_the_measured_winner(fake_gpu):
    cuda = torch.device("cuda", 0)
    for batch, expected in ((1, "cuda"), (8, "triton"), (64, "cuda")):
        assert backend_mod.resolve(cuda, "decafa_head", (_meta(batch, 98, 16, 16),)) == expected
    # an input that requires grad asks for the forward+backward race (bf16: triton at 64)
    head = (_meta(64, 98, 16, 16, dtype=torch.bfloat16), _meta(64, 1, 16, 16, dtype=torch.bfloat16, requires_grad=True))
    assert backend_mod.resolve(cuda, "decafa_head", head) == "triton"
    with torch.no_grad():  # no autograd: forward is all that runs; bf16 fwd borrows the fwd+bwd entry
        assert backend_mod.resolve(cuda, "decafa_head", head) == "triton"


def test_auto_on_cuda_falls_back_to_the_preference(fake_gpu, monkeypatch):
    cuda = torch.device("cuda", 0)
    assert backend_mod.resolve(cuda, "soft_argmax", (_meta(1, 98, 16, 16),)) == "triton"  # op not in the table
    monkeypatch.setattr(auto, "AUTO_CUDA_PREFERENCE", ["cuda", "triton"])
    assert backend_mod.resolve(cuda, "soft_argmax", (_meta(1, 98, 16, 16),)) == "cuda"
    fake_gpu["cuda"] = "not built"  # the measured winner is not available here: the other one runs
    assert backend_mod.resolve(cuda, "decafa_head", (_meta(64, 98, 16, 16),)) == "triton"
    fake_gpu["triton"] = "not installed"
    assert backend_mod.resolve(cuda, "decafa_head", (_meta(64, 98, 16, 16),)) == "reference"
    monkeypatch.setattr(auto, "GPU_NAMES", {None: "Another GPU"})  # a GPU that was never measured
    fake_gpu.update(triton="available", cuda="available")
    assert backend_mod.resolve(cuda, "decafa_head", (_meta(64, 98, 16, 16),)) == "cuda"


def test_choose_traces_under_torch_compile_fullgraph_with_dynamic_batch():
    index = _index()

    def pick(x):
        backend = autotable.choose(index, "decafa_head", "fwd", "float32", x.shape[0])
        return x * (1.0 if backend == "cuda" else 2.0)

    compiled = torch.compile(pick, fullgraph=True, dynamic=True, backend="eager")
    for batch, factor in ((2, 1.0), (5, 2.0), (30, 1.0), (6, 2.0)):
        x = torch.ones(batch, 3)
        torch.testing.assert_close(compiled(x), x * factor)


def _import_ops_with(env_updates: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_updates)
    code = ("import decafa_fast.ops.auto as o; "
            "print(sorted(o.TABLES), sorted(o.TABLES.get('G', {})))")
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_import_reads_the_user_table_and_survives_a_broken_one(tmp_path):
    good = tmp_path / "good.json"
    autotable.save_entries(good, "G", [{"op": "fuse", "pass": "fwd", "dtype": "float32", "batch": 8,
                                        "backend": "cuda"}], source="test")
    proc = _import_ops_with({"DECAFA_AUTO_TABLE": str(good)})
    assert proc.returncode == 0, proc.stderr
    gpus, entries = proc.stdout.strip().split("] [", 1)
    assert "'G'" in gpus and "[('fuse', 'float32', 'fwd')]" == "[" + entries  # beside the shipped GPUs
    info = subprocess.run([sys.executable, "-m", "decafa_fast.app.cli", "info"], capture_output=True, text=True,
                          env=dict(os.environ, DECAFA_AUTO_TABLE=str(good)), timeout=120)
    measured = info.stdout.split("races for GPU(s): ", 1)[1].split(" (tables", 1)[0]
    assert "G" in measured.split(", "), info.stdout + info.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    proc = _import_ops_with({"DECAFA_AUTO_TABLE": str(broken)})
    assert proc.returncode == 0, proc.stderr
    assert "ignoring the auto-backend table" in proc.stderr


def test_benchmark_rows_update_the_table_for_this_gpu(tmp_path, monkeypatch):
    """What bench/conftest.py does after each GPU case: the races among the rows so far go into the table."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    # bench/report.py holds the writer (the benchmark suite's, not the package's)
    spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).parents[2] / "bench" / "report.py")
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(name="Fake H100"))
    path = tmp_path / "auto.json"
    rows = [_row("decafa_head", "fwd", "bfloat16", 64, "triton", 3e-4)]
    assert B.update_auto_table(path, rows, torch.device("cuda")) == 0 and not path.exists()  # no race yet
    rows.append(_row("decafa_head", "fwd", "bfloat16", 64, "cuda", 2e-4))
    assert B.update_auto_table(path, rows, torch.device("cuda")) == 1
    index = autotable.load_index([path])
    assert autotable.choose(index["Fake H100"], "decafa_head", "fwd", "bfloat16", 64) == "cuda"
    assert autotable.read_table(path)["devices"]["Fake H100"]["source"].startswith("pytest")


def test_auto_choice_traces_under_torch_compile_fullgraph(fake_gpu):
    """auto.auto_cuda runs inside torch.compile'd models: the lookup must trace without a graph break and
    follow the batch size (CPU tensors have device index None, named "Fake GPU" by the fixture)."""
    def pick(x):
        return x * (1.0 if auto.auto_cuda("decafa_head", (x,)) == "cuda" else 2.0)

    compiled = torch.compile(pick, fullgraph=True, dynamic=True, backend="eager")
    for batch, factor in ((1, 1.0), (8, 2.0), (64, 1.0), (9, 2.0)):
        x = torch.ones(batch, 3)
        torch.testing.assert_close(compiled(x), x * factor)
