"""`decafa-fast bench`: the benchmark suite for this machine, plus the measuring helpers it shares.

The suite itself is pytest-benchmark code in bench/ (test_ops.py: every op x backend x dtype x batch,
forward and forward+backward; test_model.py: the DeCaFA model). This module

* runs it (`pytest bench/ --benchmark-only --benchmark-json=...`, in this process),
* reads the JSON back, prints one readable table per suite and saves plots of time against batch size,
* holds what bench/conftest.py and the suites use to measure: the copy bandwidth that defines the
  floor, the floor bytes of a call, peak memory, and the device facts recorded with every run.

Definitions (the same in every table and in the JSON's `extra_info`):
    floor bytes   bytes that must move at least once: forward = inputs read + outputs written;
                  forward+backward adds grad_outputs read, inputs read again (Phi is recomputed from
                  the logits, never stored) and grad_inputs written.
    copy GB/s     (read + written bytes) / time to copy a large tensor into a buffer allocated beforehand,
                  best of a few, measured once per session on the benchmark's device: the ceiling. (A
                  fresh `clone()` is also recorded; on CPU it is several times slower because new pages
                  must be faulted in, a cost every op that returns a fresh tensor pays as well.)
    % of floor    100 * (floor bytes / copy bandwidth) / measured time.
    time          the fastest round (least disturbed by other load on the machine); the JSON also
                  holds the median and every round.
    peak memory   bytes allocated during one call above what was live before it. CUDA:
                  torch.cuda.max_memory_allocated. CPU: the PyTorch profiler's memory timeline
                  (torch.profiler with profile_memory=True; every CPU tensor allocation and free), whose
                  running maximum is the same quantity; if that private API fails, the bytes of the tensors
                  saved for backward (torch.autograd.graph.saved_tensors_hooks) plus the outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "BenchSize",
    "SIZES",
    "bench_device",
    "synchronize",
    "copy_bandwidth",
    "tensor_bytes",
    "floor_bytes",
    "peak_memory",
    "device_facts",
    "device_snapshot",
    "choose_rounds",
    "ALL_BACKENDS",
    "selected_backends",
    "backend_skip_reason",
    "fastest_time",
    "load_rows",
    "format_op_table",
    "format_model_table",
    "format_targets",
    "plot_rows",
    "add_arguments",
    "run",
]

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


@dataclass(frozen=True)
class BenchSize:
    """Problem size of the op benchmarks: logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W)."""

    landmarks: int = 98
    height: int = 128
    width: int = 128
    channels: int = 64
    image_channels: int = 1
    mode: str = "F5"


# "paper" is the tuned case of DESIGN.md; "tiny" only checks that the machinery works (tests/test_bench.py).
SIZES = {
    "paper": BenchSize(),
    "tiny": BenchSize(landmarks=5, height=16, width=16, channels=4),
}


def bench_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU: the suite benchmarks the machine's accelerator if it has one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5,
                   fresh: bool = False) -> float:
    """Copy bandwidth in bytes/s: (read + written bytes) / time to copy a large float32 tensor, best of
    `repeats`. Default size: 1 GiB on CUDA, 256 MiB on CPU (well beyond every cache).

    fresh=False copies into a buffer allocated (and touched) beforehand: the memory system's ceiling.
    fresh=True times `x.clone()`, which on CPU also pays for faulting in a new allocation's pages (several
    times slower there; the same on CUDA, whose caching allocator reuses memory).
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once before timing
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        if fresh:
            out = src.clone()
        else:
            dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
        if fresh:
            del out
    return 2 * src.numel() * 4 / best


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Sum of numel * element size over the given tensors (None entries count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def floor_bytes(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], backward: bool,
                grad_inputs: Sequence[torch.Tensor] = ()) -> int:
    """The bytes a call must move at least once (see the module docstring).

    inputs: every tensor the op reads; outputs: every tensor it returns; backward=True adds the backward
    pass: read one gradient per output and the inputs again, write one gradient per differentiable input
    (`grad_inputs`, shapes of the inputs that require grad).
    """
    total = tensor_bytes(inputs) + tensor_bytes(outputs)
    if backward:
        total += tensor_bytes(outputs) + tensor_bytes(inputs) + tensor_bytes(grad_inputs)
    return total


def _profiled_peak(fn: Callable[[], Any]) -> int:
    """Peak CPU tensor bytes live during fn() above those live before, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        out = fn()
        del out
    live = peak = 0
    for _time, action, _key, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def _saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward during fn(), plus fn's outputs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    flat = out if isinstance(out, (tuple, list)) else (out,)
    return sum(seen.values()) + tensor_bytes(t for t in flat if isinstance(t, torch.Tensor))


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated while fn() runs, above what was allocated before; and the method's name."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base, "torch.cuda.max_memory_allocated"
    try:
        return _profiled_peak(fn), "torch.profiler memory timeline"
    except Exception:  # a private profiler API: fall back to a documented lower bound
        try:
            return _saved_bytes(fn), "saved-for-backward + output bytes"
        except Exception:
            return None, "unavailable"


def choose_rounds(seconds_per_call: float, device: torch.device, budget_s: float | None = None,
                  min_rounds: int | None = None) -> tuple[int, int]:
    """(rounds, iterations) for benchmark.pedantic: about `budget_s` of timing, at least a few rounds.

    CPU: 3..20 rounds of one call (big cases are slow, the whole suite must stay in minutes).
    CUDA: every round at least ~1 ms of work (calls batched by iterations), 10..200 rounds.
    `min_rounds` overrides the lower bound (the tiny machinery check uses 1).
    """
    t = max(seconds_per_call, 1e-7)
    if device.type == "cuda":
        iterations = max(1, math.ceil(1e-3 / t))
        lowest = 10 if min_rounds is None else min_rounds
        rounds = int(min(200, max(lowest, (budget_s or 0.5) / (t * iterations))))
        return rounds, iterations
    lowest = 3 if min_rounds is None else min_rounds
    return int(min(20, max(lowest, (budget_s or 1.0) / t))), 1


ALL_BACKENDS = ("reference", "compiled", "kornia", "cpp", "triton", "cuda")


def selected_backends(value: str | None) -> tuple[str, ...]:
    """The backends named in a comma-separated list (all of ALL_BACKENDS for None or "")."""
    if not value:
        return ALL_BACKENDS
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in ALL_BACKENDS]
    if unknown:
        raise ValueError(f"--decafa-backends: unknown {unknown}; choose from {ALL_BACKENDS}")
    return names


def backend_skip_reason(name: str, device: torch.device) -> str | None:
    """Why `name` cannot be benchmarked on `device` here (None: it can)."""
    if name in ("reference", "compiled"):
        return None
    if name == "kornia":
        try:
            import kornia  # noqa: F401
        except ImportError as exc:
            return f"kornia is not installed ({exc})"
        return None
    from .. import ops

    status = ops.backends()[name]
    if not status.startswith("available"):
        return f"backend {name!r}: {status}"
    if name == "triton" and (device.type != "cuda" or "TRITON_INTERPRET" in status):
        return ("Triton on CPU runs in the interpreter (TRITON_INTERPRET=1), which is a correctness tool, "
                "not a benchmark")
    if name == "cpp" and device.type != "cpu":
        return "the cpp backend runs CPU tensors; this run benchmarks CUDA"
    return None


def fastest_time(benchmark: Any) -> float | None:
    """The fastest round of a pytest-benchmark fixture, in seconds per call (None when benchmarking is off)."""
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else stats.stats.min


# --------------------------------------------------------------------------------------------------
# Device facts
# --------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nvml_facts() -> list[dict[str, Any]]:
    """Name, clocks, power, temperature, memory of every GPU through nvidia-ml-py (empty without it)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    gpus = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        for index in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            facts: dict[str, Any] = {"index": index, "driver": driver}
            queries = {
                "name": lambda: pynvml.nvmlDeviceGetName(h),
                "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "sm_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "mem_clock_max_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
                "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
                "memory_total_gib": lambda: round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30, 2),
                "memory_used_gib": lambda: round(pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**30, 2),
                "pstate": lambda: pynvml.nvmlDeviceGetPerformanceState(h),
                "utilization_pct": lambda: pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
            }
            for key, query in queries.items():
                try:
                    value = query()
                    facts[key] = value.decode() if isinstance(value, bytes) else value
                except Exception:  # a field this GPU / driver does not report
                    facts[key] = None
            gpus.append(facts)
    finally:
        pynvml.nvmlShutdown()
    return gpus


def device_facts() -> dict[str, Any]:
    """Everything that decides a benchmark number on this machine: CPU, GPU(s), versions, backends."""
    from .. import __version__, ops

    facts: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "kornia": _version("kornia"),
        "decafa_fast": __version__,
        "backends": ops.backends(),
        "benchmark_device": str(bench_device()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["cuda_device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                                "sms": props.multi_processor_count,
                                "memory_gib": round(props.total_memory / 2**30, 2)}
    facts["gpus_nvml"] = _nvml_facts()
    return facts


def device_snapshot(device: torch.device) -> dict[str, Any]:
    """What may change during a run, for each benchmark's extra_info: load (CPU), clock/temp/power (GPU)."""
    snap: dict[str, Any] = {}
    if hasattr(os, "getloadavg"):
        snap["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        gpus = _nvml_facts()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(gpus):
            g = gpus[index]
            snap.update({k: g[k] for k in ("sm_clock_mhz", "temperature_c", "power_w") if k in g})
    return snap


def update_auto_table(path: str | Path, rows: Sequence[dict[str, Any]], device: torch.device) -> int:
    """Saves the Triton-vs-CUDA races among `rows` for this GPU into the auto-backend table at `path`
    (decafa_fast/autotable.py); returns how many entries the rows gave (0: nothing raced, nothing written)."""
    from .. import autotable

    entries = autotable.entries_from_rows(rows)
    if entries:
        name = torch.cuda.get_device_properties(device).name
        autotable.save_entries(Path(path), name, entries, source="pytest " + " ".join(sys.argv[1:]))
    return len(entries)


# --------------------------------------------------------------------------------------------------
# Reading results back: tables and plots
# --------------------------------------------------------------------------------------------------
def load_rows(json_path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The benchmark rows of a pytest-benchmark JSON file (extra_info + time), and its machine_info."""
    data = json.loads(Path(json_path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        stats = bench.get("stats", {})
        info.setdefault("time_s", stats.get("min"))
        info["median_s"] = stats.get("median")
        info["rounds"] = stats.get("rounds")
        info["name"] = bench.get("name")
        rows.append(info)
    return rows, data.get("machine_info", {})


def load_results(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (and machine_info) of a pytest-benchmark JSON file, or of a --decafa-rows JSON-lines file
    (rows only; what a run cut off before its end has kept)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], {}
    return load_rows(path)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def format_op_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the op benchmarks: op, pass, dtype, B, backend, time, speed-up, GB/s, % floor, peak."""
    ops_rows = [r for r in rows if r.get("suite") == "ops"]
    header = ["op", "pass", "dtype", "B", "backend", "time (ms)", "speed-up", "GB/s", "% floor", "peak MiB"]
    body = [
        [r["op"], r["pass"], r["dtype"], str(r["batch"]), r["backend"], _fmt(r["time_s"] * 1e3, ".3f"),
         _fmt(r.get("speedup"), ".2f", "x"), _fmt(r.get("gbps"), ".1f"), _fmt(r.get("floor_pct"), ".1f"),
         _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20, ".1f")]
        for r in ops_rows
    ]
    return _markdown(header, body)


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the model benchmarks: task, mode, dtype, B, backend, time, images/s, speed-up."""
    model_rows = [r for r in rows if r.get("suite") == "model"]
    header = ["task", "mode", "dtype", "B", "backend", "time (ms)", "images/s", "speed-up", "peak MiB"]
    body = [
        [r["task"], r["mode"], r["dtype"], str(r["batch"]), r["backend"], _fmt(r["time_s"] * 1e3, ".1f"),
         _fmt(r["batch"] / r["time_s"], ".1f"), _fmt(r.get("speedup"), ".2f", "x"),
         _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20, ".1f")]
        for r in model_rows
    ]
    return _markdown(header, body)


# The project's targets (issues 3 and 8): (description, row filter, measured quantity, threshold).
# (only rows of the paper's size count: L 98, 128 x 128, C 64; the S = 4 model at 128 x 128)
_HEAD_B8 = dict(suite="ops", op="decafa_head", dtype="float32", batch=8, backend="cpp", L=98, H=128, W=128, C=64)
_PAPER_MODEL = dict(suite="model", task="infer", mode="reduce-overhead", stages=4, image_size=128)
TARGETS = [
    ("CPU: fused head forward >= 3x the reference (cpp, fp32, B 8)", dict(_HEAD_B8, **{"pass": "fwd"}),
     "speedup", 3.0),
    ("CPU: fused head forward+backward >= 2x the reference (cpp, fp32, B 8)",
     dict(_HEAD_B8, **{"pass": "fwd+bwd"}), "speedup", 2.0),
    ("CPU: fused head forward+backward peak memory below the reference's (cpp, fp32, B 8)",
     dict(_HEAD_B8, **{"pass": "fwd+bwd"}), "peak_vs_reference", 1.0),
    ("GPU: DeCaFA S=4 at B 1 >= 1000 images/s (CUDA graphs)",
     dict(_PAPER_MODEL, dtype="float32", batch=1), "images_per_s", 1000.0),
    ("GPU: DeCaFA S=4 at B 256 bf16 >= 6000 images/s",
     dict(_PAPER_MODEL, dtype="bfloat16", batch=256), "images_per_s", 6000.0),
]


def format_targets(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the targets that this run measured: target, backend, measured value, met or not."""
    body = []
    for text, match, quantity, threshold in TARGETS:
        for r in rows:
            if any(r.get(k) != v for k, v in match.items()) or r.get("backend") == "reference":
                continue
            if quantity == "peak_vs_reference":
                ref = next((q for q in rows if q.get("backend") == "reference"
                            and all(q.get(k) == v for k, v in match.items() if k != "backend")), None)
                if ref is None or r.get("peak_bytes") is None or ref.get("peak_bytes") is None:
                    continue
                value = f"{r['peak_bytes'] / 2**20:.1f} MiB vs {ref['peak_bytes'] / 2**20:.1f} MiB"
                met = r["peak_bytes"] < ref["peak_bytes"]
            else:
                measured = r.get(quantity) if quantity != "images_per_s" else r["batch"] / r["time_s"]
                if measured is None:
                    continue
                value, met = f"{measured:.2f}" + ("x" if quantity == "speedup" else " images/s"), measured >= threshold
            body.append([text, r["backend"], value, "yes" if met else "NO"])
    return _markdown(["target", "backend", "measured", "met"], body) if body else ""


# one colour per backend and one line style per pass / compile mode, the same in every panel
_COLORS = {"reference": "black", "compiled": "tab:purple", "kornia": "tab:green", "cpp": "tab:blue",
           "triton": "tab:orange", "cuda": "tab:red"}
_LINESTYLES = {"fwd": "-", "fwd+bwd": "--", "eager": "-", "compile": "--", "reduce-overhead": ":"}


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Time against batch size, one colour per backend (solid forward, dashed forward+backward; for the
    model: solid eager, dashed torch.compile, dotted CUDA graphs), one panel per op (or model task) and
    dtype; log-log axes. Returns the PNG path (None: no rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], dict[tuple[str, str], list[tuple[int, float]]]] = {}
    for r in rows:
        if r.get("suite") == "ops":
            panel, line = (r["op"], r["dtype"]), (r["backend"], r["pass"])
        elif r.get("suite") == "model":
            panel, line = (f"model {r['task']}", r["dtype"]), (r["backend"], r["mode"])
        else:
            continue
        panels.setdefault(panel, {}).setdefault(line, []).append((r["batch"], r["time_s"] * 1e3))
    if not panels:
        return None
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, ((title, dtype), lines) in zip(axes.flat, sorted(panels.items())):
        for (backend, style), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], _LINESTYLES.get(style, "-"), marker="o",
                    color=_COLORS.get(backend, "gray"), label=f"{backend} {style}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{title} ({dtype})", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine_line(machine: dict[str, Any]) -> str:
    facts = machine.get("decafa", {})
    parts = [f"CPU {facts.get('cpu_model', machine.get('cpu', {}).get('brand_raw', '?'))} "
             f"({facts.get('cpu_count', '?')} cores, {facts.get('torch_threads', '?')} torch threads)"]
    if facts.get("cuda_device"):
        parts.append(f"GPU {facts['cuda_device']['name']}")
    parts.append(f"torch {facts.get('torch', '?')}, triton {facts.get('triton')}, CUDA {facts.get('torch_cuda')}")
    if facts.get("loadavg"):
        parts.append(f"load average at start {facts['loadavg']}")
    return "; ".join(parts)


def summarize(rows: Sequence[dict[str, Any]], machine: dict[str, Any], out_dir: str | Path | None) -> str:
    """The readable summary of one run (markdown). With `out_dir`: also written to out_dir/summary.md,
    with the plots beside it."""
    text = [f"# decafa-fast bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    if machine:
        text += [_machine_line(machine), ""]
    for suite, title, table in (("ops", "Ops", format_op_table), ("model", "Model (DeCaFA)", format_model_table)):
        suite_rows = [r for r in rows if r.get("suite") == suite]
        if suite_rows:
            text += [f"## {title}", "", table(rows), ""]
            if out_dir is not None:
                text += [f"plot: {plot_rows(suite_rows, Path(out_dir) / f'{suite}_time_vs_batch.png')}", ""]
    targets = format_targets(rows)
    if targets:
        text += ["## Targets", "", targets, ""]
    text += ["time: fastest round; speed-up: reference-eager time / this time, same run; "
             "% floor: (floor bytes / copy bandwidth) / time.", ""]
    summary = "\n".join(text)
    if out_dir is not None:
        (Path(out_dir) / "summary.md").write_text(summary)
    return summary


# --------------------------------------------------------------------------------------------------
# The subcommand
# --------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench-results", help="directory for the JSON, summary and plots")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset: the fused head and soft-argmax in float32 at one batch size, and "
                             "model inference at B = 1")
    parser.add_argument("--full", action="store_true",
                        help="everything, also the slow cases skipped by default on CPU (torch.compile in bf16 "
                             "and at B = 1, model training at B = 8)")
    parser.add_argument("--size", choices=sorted(SIZES), default="paper",
                        help="op problem size: paper = L 98, 128x128, C 64 (default); tiny only checks the machinery")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of reference,compiled,kornia,cpp,triton,cuda (default: all)")
    parser.add_argument("--suite", choices=["all", "ops", "model"], default="all", help="which suite(s) to run")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select benchmarks")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--auto-table", default=None,
                        help="on a GPU, save the Triton-vs-CUDA races here for the 'auto' backend (default: "
                             "decafa_fast.autotable.user_table_path(), which 'auto' reads at import)")
    parser.add_argument("--no-auto-table", action="store_true", help="do not save the races for 'auto'")
    parser.add_argument("--report", nargs="+", metavar="FILE", default=None,
                        help="run nothing: print the tables of saved results (pytest-benchmark .json or the "
                             ".jsonl rows that a run streams beside it)")


def pytest_args(args: argparse.Namespace, json_path: Path) -> list[str]:
    """The pytest command line that `decafa-fast bench` runs (also shown to the user). Rows also go to a
    JSON-lines file beside the JSON as they are measured, so that an interrupted run keeps them."""
    files = {"all": ["test_ops.py", "test_model.py"], "ops": ["test_ops.py"], "model": ["test_model.py"]}
    argv = [str(BENCH_DIR / f) for f in files[args.suite]]
    argv += ["--benchmark-only", f"--benchmark-json={json_path}", f"--decafa-rows={json_path.with_suffix('.jsonl')}",
             "-q", "-p", "no:cacheprovider",
             "--benchmark-columns=min,median,rounds", "--benchmark-sort=name", f"--decafa-size={args.size}",
             "--decafa-no-summary"]
    if args.quick:
        argv.append("--decafa-quick")
    if args.full:
        argv.append("--decafa-full")
    if args.backends:
        argv.append(f"--decafa-backends={args.backends}")
    if args.keyword:
        argv += ["-k", args.keyword]
    if torch.cuda.is_available() and not args.no_auto_table:
        from ..autotable import user_table_path

        argv.append(f"--decafa-auto-table={args.auto_table or user_table_path()}")
    return argv


def run(args: argparse.Namespace) -> int:
    import pytest

    if args.report:  # tables of saved results, nothing run
        rows, machine = [], {}
        for path in args.report:
            more, info = load_results(path)
            rows += more
            machine = machine or info
        print(summarize(rows, machine, None))
        return 0 if rows else 1
    if not (BENCH_DIR / "test_ops.py").is_file():
        print(f"decafa-fast bench: the benchmark suite is not at {BENCH_DIR}; run it from a source checkout "
              "(pip install --no-build-isolation -e .)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = (out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json").resolve()
    argv = pytest_args(args, json_path)
    print("running: python -m pytest " + " ".join(argv), flush=True)
    start = time.perf_counter()
    code = int(pytest.main(argv))
    elapsed = time.perf_counter() - start
    if not json_path.is_file():
        print(f"decafa-fast bench: pytest exited with {code} and wrote no results", file=sys.stderr)
        return code or 1
    rows, machine = load_rows(json_path)
    summary = summarize(rows, machine, None if args.no_plot else out)
    print()
    print(summary)
    print(f"results: {json_path} ({elapsed:.0f} s)")
    return code

