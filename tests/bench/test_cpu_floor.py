"""bench/cpu_floor.py (the CPU table): one run at a tiny shape, both allocator settings, every op's row and
floor; and the target verdicts on made-up rows at the targets' shape."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from decafa_fast import ops

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("cpu_floor", ROOT / "bench" / "cpu_floor.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cpu_floor = _load_script()

# tiny shape: B 2, L 5, 16 x 16, C 4, Ci 1, F5 (F5 has Ci + Ci + C + C channels)
B, L, S, C, CI = 2, 5, 16, 4, 1
FC = CI + CI + C + C


def expected_floor_bytes(op: str, pass_: str) -> int:
    """The floor bytes of each op in float32 counted here from the shapes: forward reads the inputs and writes
    the outputs; forward+backward also reads grad_outputs and the inputs again and writes grad_inputs."""
    t, i, e, m = B * L * S * S, B * CI * S * S, B * C * S * S, B * S * S
    z, f = B * L * 2, B * FC * S * S
    inputs, outputs = {
        "spatial_softmax": (t, t),
        "soft_argmax": (t, z),
        "attention_mask": (t, m),
        "landmark_attention": (t, z + m),
        "fuse": (i + e + m, f),
        "decafa_head": (t + i + e, z + f),
    }[op]
    elements = inputs + outputs if pass_ == "fwd" else 3 * inputs + 2 * outputs
    return 4 * elements


def test_one_run_times_every_op_under_both_allocators(tmp_path, capsys):
    out = tmp_path / "cpu_floor.json"
    argv = ["--quick", "--no-compile", "--dtypes", "float32", "--batches", str(B), "--reps", "1", "--warmup", "0",
            "--copy-mib", "16", "--json", str(out)]
    assert cpu_floor.main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())

    settings = data["allocators"]
    assert list(settings) == ["default", "thp"]
    assert settings["default"][cpu_floor.THP] is None and settings["thp"][cpu_floor.THP] == "1"
    assert settings["thp"]["exit_status"] == 0
    assert settings["thp"]["pid"] != settings["default"]["pid"]  # measured in the subprocess
    assert "default allocator (THP_MEM_ALLOC_ENABLE unset)" in text and "### THP_MEM_ALLOC_ENABLE=1" in text
    assert "| in-cache ms | cpp / in-cache |" in text

    expected_rows = {("spatial_softmax", "fwd"), ("soft_argmax", "fwd"), ("soft_argmax", "fwd+bwd"),
                     ("attention_mask", "fwd"), ("landmark_attention", "fwd"), ("fuse", "fwd"),
                     ("decafa_head", "fwd"), ("decafa_head", "fwd+bwd")}
    cpp_available = ops.backends()["cpp"] == "available"
    # one floor for both settings: the higher copy bandwidth that the two processes measured
    assert data["copy_gbs"] == max(s["copy_gbs"] for s in settings.values())
    for label, s in settings.items():
        for key in ("torch_threads", "cpu_model", "date", "loadavg_before", "loadavg_after"):
            assert s[key], (label, key)
        assert s["copy_gbs"] > 0 and s["fresh_clone_gbs"] > 0
        rows = s["rows"]
        assert {(r["op"], r["pass"]) for r in rows} == expected_rows and len(rows) == len(expected_rows), label
        for r in rows:
            what = (label, r["op"], r["pass"])
            assert r["floor_bytes"] == expected_floor_bytes(r["op"], r["pass"]), what
            assert r["floor_ms"] > 0
            assert r["floor_ms"] == pytest.approx(r["floor_bytes"] / (data["copy_gbs"] * 1e9) * 1e3), what
            assert not r["wrong"], what
            assert r["ms"]["reference"] > 0, what
            assert r["skipped"]["compiled"] == "--no-compile"
            if cpp_available:
                assert r["ms"]["cpp"] > 0 and r["cpp_x_floor"] == pytest.approx(r["ms"]["cpp"] / r["floor_ms"])
            if cpp_available and r["op"] in cpu_floor.IN_CACHE_OPS and r["pass"] == "fwd":
                # a difference of two timings: at this tiny shape it may even come out <= 0, and then has no ratio
                assert isinstance(r["in_cache_ms"], float), what
                if r["in_cache_ms"] > 0:
                    assert r["cpp_x_in_cache"] == pytest.approx(r["ms"]["cpp"] / r["in_cache_ms"]), what
            else:
                assert r["in_cache_ms"] is None and r["cpp_x_in_cache"] is None, what
            if r["op"] in cpu_floor.KORNIA_OPS:
                assert r["ms"]["kornia"] > 0, what
            else:
                assert "kornia has no" in r["skipped"]["kornia"], what
            assert r["targets"] == []  # the targets are stated at their shape only


def _row(op: str, pass_: str, dtype: str, batch: int, cpp_ms: float | None, floor_ms: float) -> dict:
    return {"op": op, "pass": pass_, "dtype": dtype, "batch": batch, "floor_ms": floor_ms, "target_shape": True,
            "ms": {} if cpp_ms is None else {"cpp": cpp_ms}}


def _verdicts(row: dict) -> dict[str, bool | None]:
    cpu_floor.judge(row)
    return {t["target"]: t["met"] for t in row["targets"]}


def test_cpu_targets():
    x3, fwd_bwd, b1 = (t[0] for t in cpu_floor.TARGETS)
    assert _verdicts(_row("decafa_head", "fwd", "float32", 8, 8.9, 3.0)) == {x3: True}
    assert _verdicts(_row("decafa_head", "fwd", "bfloat16", 8, 3.1, 1.0)) == {x3: False}
    assert _verdicts(_row("fuse", "fwd", "bfloat16", 8, 1.0, 0.5)) == {x3: True}
    assert _verdicts(_row("decafa_head", "fwd+bwd", "float32", 8, 24.0, 2.0)) == {fwd_bwd: True}
    assert _verdicts(_row("decafa_head", "fwd+bwd", "float32", 8, 26.0, 20.0)) == {fwd_bwd: False}
    assert _verdicts(_row("decafa_head", "fwd+bwd", "bfloat16", 8, 26.0, 20.0)) == {}
    assert _verdicts(_row("decafa_head", "fwd", "bfloat16", 1, 1.2, 0.1)) == {b1: False}
    assert _verdicts(_row("spatial_softmax", "fwd", "float32", 1, 9.0, 0.1)) == {}  # no target at B = 1
    assert _verdicts(_row("decafa_head", "fwd", "float32", 8, None, 3.0)) == {x3: None}  # cpp not timed
    assert _verdicts(dict(_row("decafa_head", "fwd", "float32", 8, 99.0, 3.0), target_shape=False)) == {}


def test_decafa_fast_bench_runs_it(tmp_path, monkeypatch):
    """`decafa-fast bench --cpu-floor` (bench/run.py, which the command runs as a script) passes --quick, --out and
    --backends on to bench/cpu_floor.py."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as when run.py runs as a script: its folder first
    runner = importlib.import_module("run")
    assert Path(runner.__file__) == ROOT / "bench" / "run.py"
    calls = []
    monkeypatch.setattr(cpu_floor, "main", lambda argv: calls.append(argv) or 7)
    assert runner.main(["--cpu-floor", "--quick", "--backends", "reference,cpp", "--out", str(tmp_path)]) == 7
    assert calls == [["--json", str(tmp_path.resolve() / "cpu_floor.json"), "--quick", "--no-compile"]]


def test_a_wrong_or_failing_kernel_posts_no_time_and_fails_the_run(tmp_path, monkeypatch):
    real = cpu_floor.op_function

    def broken(op, backend, mode):
        fn = real(op, backend, mode)
        if backend == "cpp" and op == "fuse":
            return lambda *a: tuple(2 * o for o in fn(*a))
        if backend == "cpp" and op == "soft_argmax":
            def fail(*a):
                raise RuntimeError("kernel exploded")
            return fail
        if backend == "kornia":
            def fail_kornia(*a):
                raise ValueError("kornia exploded")
            return fail_kornia
        return fn

    monkeypatch.setattr(cpu_floor, "op_function", broken)
    out = tmp_path / "cpu_floor.json"
    argv = ["--quick", "--no-compile", "--no-thp", "--dtypes", "float32", "--batches", "1", "--reps", "1",
            "--copy-mib", "16", "--json", str(out)]
    assert cpu_floor.main(argv) == 1
    rows = {(r["op"], r["pass"]): r for r in json.loads(out.read_text())["allocators"]["default"]["rows"]}
    fuse = rows[("fuse", "fwd")]
    assert "differs from the reference" in fuse["wrong"]["cpp"]
    assert "cpp" not in fuse["ms"] and fuse["cpp_x_floor"] is None
    for pass_ in ("fwd", "fwd+bwd"):
        soft = rows[("soft_argmax", pass_)]
        assert "RuntimeError: kernel exploded" in soft["wrong"]["cpp"] and "cpp" not in soft["ms"]
        assert "ValueError: kornia exploded" in soft["skipped"]["kornia"]  # another backend's error: a skip
    assert rows[("decafa_head", "fwd")]["ms"]["cpp"] > 0  # the others are still timed
