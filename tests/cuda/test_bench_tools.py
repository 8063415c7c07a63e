"""The GPU-run tools that work without a GPU: bench/gpu_results.py (the machine-readable record of a GPU run, on
fake step outputs), bench/sass_report.py (its parsers on fixed text; the full nvcc + cuobjdump run is slow),
bench/ncu_head.py (the profiler's driver, on the CPU backend) and bench/gpu_check.sh's syntax."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gpu_results = _module("gpu_results")
sass_report = _module("sass_report")
ncu_head = _module("ncu_head")

HEAD_FLOOR = {
    "info": {"device": "NVIDIA H200", "copy_gbs": 4150.0},
    "shape": {"batch": 64},
    "cases": [
        {"dtype": "float32", "case": "floor forward", "ms": 0.30, "floor_ms": None, "x_floor": None},
        {"dtype": "float32", "case": "cuda forward", "ms": 0.57, "floor_ms": 0.30, "x_floor": 1.9},
        {"dtype": "float32", "case": "cuda forward cuda graph", "ms": 0.56, "floor_ms": 0.30, "x_floor": 1.87},
        {"dtype": "bfloat16", "case": "triton forward+backward", "ms": 1.2, "floor_ms": 0.6, "x_floor": 2.0},
        {"dtype": "float32", "case": "cuda forward B=1 eager", "ms": 0.04, "floor_ms": 0.005, "x_floor": 8.0},
        {"dtype": "float32", "case": "cuda forward B=1 cuda graph", "ms": 0.025, "floor_ms": 0.005, "x_floor": 5},
        {"dtype": "float32", "case": "cuda forward B=1 cuda graph, pixel split 1", "ms": 0.03, "floor_ms": 0.005,
         "x_floor": 6},
        {"dtype": "float32", "case": "reference compile forward", "ms": 0.66, "floor_ms": 0.30, "x_floor": 2.2},
        {"dtype": "float32", "case": "reference eager forward+backward", "ms": 3.0, "floor_ms": 0.8, "x_floor": 4},
    ],
}
MODEL = {"device": "NVIDIA H200", "dtype": "bfloat16", "cases": [
    {"case": "eager", "backend": "cuda", "batch": 64, "ms": 20.0, "images_per_s": 3200.0},
    {"case": "eager cuda graph", "backend": "triton", "batch": 1, "ms": 2.0, "images_per_s": 500.0},
    {"case": "compile reduce-overhead", "backend": "cuda", "batch": 1, "ms": 1.5, "images_per_s": 666.7},
    {"case": "eager", "backend": "reference", "batch": 1, "error": "boom"},
]}
REQUIRED = {"backend", "op", "pass", "dtype", "batch", "cuda_graph", "time_us"}


def test_gpu_results_rows_from_fake_step_outputs(tmp_path):
    ring = json.loads(json.dumps(HEAD_FLOOR))
    ring["cases"][1]["ms"] = 0.40
    paths = {}
    for name, data in (("hf", HEAD_FLOOR), ("ring", ring), ("model", MODEL)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    out = tmp_path / "out"
    assert gpu_results.main(["--head-floor", str(paths["hf"]), "--head-floor-ring", str(paths["ring"]),
                             "--model", str(paths["model"]), "--clocks", "1980 MHz, 3201 MHz, 1980 MHz, 3201 MHz",
                             "--commit", "abc123", "--out-dir", str(out)]) == 0
    files = list(out.glob("gpu-*-nvidia-h200.json"))
    assert len(files) == 1, list(out.iterdir())
    rec = json.loads(files[0].read_text())
    assert rec["commit"] == "abc123" and rec["device"] == "NVIDIA H200" and rec["copy_gb_s"] == 4150.0
    assert rec["clocks"] == {"sm_mhz": 1980, "mem_mhz": 3201, "max_sm_mhz": 1980, "max_mem_mhz": 3201}
    rows = rec["rows"]
    for r in rows:
        assert REQUIRED <= set(r), r
        assert ("images_per_s" in r) == (r["op"] == "model"), r
        assert r["op"] == "model" or r["floor_us"] is not None, r
    head = [r for r in rows if r["op"] == "decafa_head"]
    # 8 timed cases (the floor's row folded in), plus the ring run's cuda rows (5)
    assert len(head) == 8 + 5
    split = [r for r in head if "pixel_split" in r]
    assert [(r["maps"], r["batch"], r["cuda_graph"], r["pixel_split"], r["time_us"]) for r in split] == \
        [("onchip", 1, True, 1, 30.0), ("ring", 1, True, 1, 30.0)]
    fwd = [r for r in head if r["backend"] == "cuda" and r["batch"] == 64 and not r["cuda_graph"]
           and r["pass"] == "fwd"]
    assert sorted((r["maps"], r["time_us"]) for r in fwd) == [("onchip", 570.0), ("ring", 400.0)]
    one = [r for r in head if r["batch"] == 1 and r["maps"] == "onchip"]
    assert {r["cuda_graph"] for r in one} == {False, True}
    assert {r["backend"] for r in head} == {"cuda", "triton", "compile", "reference"}
    assert [r["pass"] for r in head if r["backend"] == "triton"] == ["fwd+bwd"]
    model = [r for r in rows if r["op"] == "model"]
    assert len(model) == 3  # the failed case is left out
    assert [r["cuda_graph"] for r in model] == [False, True, True]
    assert model[2]["backend"] == "compile" and model[2]["ops_backend"] == "cuda"


def test_gpu_results_ops_rows(tmp_path):
    lines = [
        {"suite": "ops", "op": "soft_argmax", "backend": "cuda", "dtype": "bfloat16", "batch": 64, "pass": "fwd",
         "time_s": 2e-4, "floor_bytes": 4.15e8, "copy_gbps": 4150.0},
        {"suite": "ops", "op": "fuse", "backend": "compiled", "dtype": "float32", "batch": 64, "pass": "fwd+bwd",
         "time_s": 1e-3, "floor_bytes": 1e6, "copy_gbps": 1000.0},
        {"suite": "ops", "op": "fuse", "backend": "cuda", "dtype": "float32", "batch": 64, "pass": "fwd"},  # untimed
    ]
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert gpu_results.main(["--ops-rows", str(rows_file), "--commit", "c", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())["rows"]
    assert len(rows) == 2
    assert rows[0]["op"] == "soft_argmax" and rows[0]["time_us"] == pytest.approx(200.0)
    assert rows[0]["floor_us"] == pytest.approx(100.0) and rows[0]["cuda_graph"] is False
    assert rows[1]["backend"] == "compile" and rows[1]["pass"] == "fwd+bwd"
    assert rows[1]["floor_us"] == pytest.approx(1.0)


def test_gpu_results_folds_in_the_triton_kernel_rows(tmp_path):
    row = {"backend": "triton-persistent", "op": "soft_argmax", "pass": "fwd", "dtype": "float32", "batch": 1,
           "cuda_graph": True, "time_us": 9.0, "floor_us": 2.0}
    tk = tmp_path / "triton_kernels.json"
    tk.write_text(json.dumps({"gpu": "NVIDIA H200", "rows": [row], "best_map_kernel": "persistent"}))
    assert gpu_results.main(["--triton-kernels", str(tk), "--commit", "c", "--out-dir", str(tmp_path)]) == 0
    assert json.loads(next(tmp_path.glob("gpu-*.json")).read_text())["rows"] == [row]


def test_gpu_results_without_the_optional_steps(tmp_path):
    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps(HEAD_FLOOR))
    assert gpu_results.main(["--head-floor", str(hf), "--model", str(tmp_path / "missing.json"), "--commit", "x",
                             "--out-dir", str(tmp_path)]) == 0
    rec = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert rec["clocks"] == {"raw": ""} and all(r["op"] == "decafa_head" for r in rec["rows"])


def test_gpu_results_rejects_an_unknown_case():
    with pytest.raises(ValueError, match="head_floor case"):
        gpu_results.head_floor_rows({"cases": [{"dtype": "float32", "case": "cuda sideways", "ms": 1.0}]})


PTXAS = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 656 bytes smem, 400 bytes cmem[0]
"""
SASS = """	code for sm_90
		Function : _Z1kPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   FFMA R3, R2, R2, R2 ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   BRA.DIV UR4, 0x90 ;
        /*0050*/                   SHFL.BFLY PT, R4, R3, 0x1, 0x1f ;
        /*0060*/                   NOP ;
        /*0070*/               @P0 BRA 0x20 ;
        /*0080*/                   EXIT ;
        /*0090*/                   BRA 0x10 ;
"""


# sm_80 style: the shuffles' out-of-line path after the last EXIT branches back into the loop, without BRA.DIV
SASS_OUT_OF_LINE = """		Function : _Z1gPf
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
        /*0020*/                   FFMA R3, R2, R2, R2 ;
        /*0030*/               @P1 CALL.REL.NOINC 0x80 ;
        /*0040*/                   MUFU.EX2 R3, R3 ;
        /*0050*/                   FADD R4, R3, R3 ;
        /*0060*/               @P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   SHFL.IDX PT, R4, R3, RZ, 0x1f ;
        /*0090*/                   BRA 0x40 ;
"""


def test_sass_report_parsers():
    res = sass_report.parse_ptxas(PTXAS)["_Z1kPf"]
    assert res == {"registers": 40, "static_smem": 656, "stack": 0, "spill_stores": 8, "spill_loads": 12}
    insns = sass_report.parse_sass(SASS)["_Z1kPf"]
    assert len(insns) == 10
    # the back edge 0x70 -> 0x20 (the divergence path's branch at 0x90 is out of line), NOP not counted
    assert sass_report.per_map_loop(insns) == (0x20, 0x70)
    assert sass_report.count_instructions(insns, 0x20, 0x70) == 5
    insns = sass_report.parse_sass(SASS_OUT_OF_LINE)["_Z1gPf"]
    assert sass_report.per_map_loop(insns) == (0x10, 0x60)
    name, targs = sass_report.split_name(
        "void decafa_kernels::detail::(anonymous namespace)::maps_forward_ring<float, true, false>"
        "(decafa_kernels::detail::(anonymous namespace)::RingArgs<float>)")
    assert (name, targs) == ("maps_forward_ring", ["float", "true", "false"])


def test_sass_report_occupancy():
    # 1024 threads at 64 registers: the whole register file, one CTA
    assert sass_report.occupancy(90, 64, 1024, 1024) == (1, "registers")
    assert sass_report.occupancy(90, 32, 0, 256)[0] == 8  # threads: 2048 / 256
    assert sass_report.occupancy(80, 32, 100 * 1024, 256) == (1, "shared memory")  # 164 KiB an SM


@pytest.mark.slow
def test_sass_report_on_the_kernels(tmp_path):
    """nvcc + cuobjdump over the on-chip and ring per-map kernels, sm_80 and sm_90: every kernel parsed, no
    spills, a per-map loop in each; the ring's loops take fewer instructions per logit than the run kernels'
    (the head's variants: NCHW vectors, float32 mask gradient)."""
    if sass_report.find_tool("nvcc") is None or sass_report.find_tool("cuobjdump") is None:
        pytest.skip("nvcc or cuobjdump not found")
    out = tmp_path / "sass.json"
    assert sass_report.main(["--sources", "stats.cu,ring.cu", "--kernels", "^maps_(forward|backward)_(onchip|ring)$",
                             "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    names = {r["name"] for r in rows}
    assert names == {"maps_forward_onchip", "maps_forward_ring", "maps_backward_onchip", "maps_backward_ring"}
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["registers"] > 0 and r["instructions"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack"] == 0, r
        assert r["loop_instructions"] > 0 and r["per_logit"] > 0, r
        assert r["ctas_per_sm"] >= 1, r

    def per_logit(name, targs, arch):
        return next(r["per_logit"] for r in rows if r["name"] == name and r["targs"] == targs and r["arch"] == arch)

    for arch in (80, 90):
        for t, v in (("float", "4"), ("__nv_bfloat16", "8")):
            assert per_logit("maps_forward_ring", [t, "true", "false"], arch) < \
                per_logit("maps_forward_onchip", [t, v, "false"], arch)
            assert per_logit("maps_backward_ring", [t], arch) < \
                per_logit("maps_backward_onchip", [t, "float", v, "false", "false"], arch)
    # issue 23's targets, static counts: <= 16 instructions per logit in the forward's map loop (raw logits and
    # the general path) and <= 32 in the backward's, float32 and bfloat16, sm_80 and sm_90
    for arch in (80, 90):
        for t in ("float", "__nv_bfloat16"):
            for raw in ("true", "false"):
                assert per_logit("maps_forward_ring", [t, raw, "false"], arch) <= 16.0, (t, raw, arch)
            assert per_logit("maps_backward_ring", [t], arch) <= 32.0, (t, arch)


def test_ncu_driver_runs_on_cpu(capsys):
    assert ncu_head.main(["--device", "cpu", "--backend", "cpp", "--batch", "1", "--size", "8", "--maps", "2",
                          "--channels", "2", "--dtypes", "float32", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "cpp float32 forward B=1" in out and "cpp float32 forward+backward B=1" in out
    with pytest.raises(SystemExit):
        ncu_head.parse_args(["--dtypes", "float64"])


def test_gpu_check_script_syntax():
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    run = subprocess.run([bash, "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "bench/gpu_results.py" in text and "DECAFA_CUDA_MAPS=ring" in text
