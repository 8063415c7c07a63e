"""What a benchmark measures, and on what: the helpers bench/conftest.py, the suites and head_floor.py share.

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
    spread        (slowest - fastest) / fastest of the timed rounds; each row records min_s, median_s,
                  max_s and rounds, with the 1-minute load average and core count when it ended.
    peak memory   bytes allocated during one call above what was live before it. CUDA:
                  torch.cuda.max_memory_allocated. CPU: the PyTorch profiler's memory timeline
                  (torch.profiler with profile_memory=True; every CPU tensor allocation and free), whose
                  running maximum is the same quantity; if that private API fails, the bytes of the tensors
                  saved for backward (torch.autograd.graph.saved_tensors_hooks) plus the outputs.
    machine       CPU, GPU (name, clocks, power, temperature through nvidia-ml-py), versions, backends:
                  `device_facts()` once per run, `device_snapshot()` with every row.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BenchSize:
    """Problem size of the op benchmarks: logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W)."""

    landmarks: int = 98
    height: int = 128
    width: int = 128
    channels: int = 64
    image_channels: int = 1
    mode: str = "F5"


# "paper" is the tuned case (L = 98, 128 x 128, C = 64); "tiny" only checks that the machinery works
# (tests/bench/test_bench.py).
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


def time_shares(fn: Callable[[], Any]) -> dict[str, float]:
    """Where one CPU call of fn() spends its time, from the PyTorch profiler's self time per op:
    `conv_share` (convolutions, forward and backward) and `decafa_share` (the decafa:: / decafa_triton:: ops),
    each a fraction of the total. Explains a model row: on CPU its convolutions cost the same with any backend."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key)
    decafa = sum(e.self_cpu_time_total for e in events if e.key.startswith(("decafa::", "decafa_triton::")))
    return {"conv_share": conv / total, "decafa_share": decafa / total}


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
    from decafa_fast import ops

    status = ops.backends()[name]
    if not status.startswith("available"):
        return f"backend {name!r}: {status}"
    if name == "triton" and (device.type != "cuda" or "TRITON_INTERPRET" in status):
        return ("Triton on CPU runs in the interpreter (TRITON_INTERPRET=1), which is a correctness tool, "
                "not a benchmark")
    if name == "cpp" and device.type != "cpu":
        return "the cpp backend runs CPU tensors; this run benchmarks CUDA"
    return None


def median_ms(fn: Callable[[], object], reps: int, device: torch.device | None = None, warmup: int = 3,
              before_each: Callable[[], object] | None = None) -> tuple[float, list[float]]:
    """Median time of fn() in ms over `reps` calls after `warmup` untimed ones, and every time: CUDA events
    around each call on a GPU, wall time on the CPU. before_each(), when given, runs untimed before every
    timed call (an L2 flush, say). device: where fn runs, the CPU when None."""
    on_gpu = device is not None and device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if before_each is not None:
            before_each()
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times), times


def cuda_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured once in a CUDA graph (after 3 warm-up calls off the default stream: compiles, allocations);
    the returned callable replays it, which removes the Python launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


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
    from decafa_fast import __version__, ops

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


def load_and_cores() -> tuple[float | None, int]:
    """The 1-minute load average (None where the system has none) and the machine's core count, which the load
    average is measured against (it counts the runnable tasks of the whole machine)."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return load, os.cpu_count() or 1


def device_snapshot(device: torch.device) -> dict[str, Any]:
    """What may change during a run, for each benchmark's extra_info: load and core count (CPU),
    clock/temp/power (GPU)."""
    snap: dict[str, Any] = {}
    load, cores = load_and_cores()
    if load is not None:
        snap["loadavg_1m"] = load
        snap["cores"] = cores
    if device.type == "cuda":
        gpus = _nvml_facts()
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(gpus):
            g = gpus[index]
            snap.update({k: g[k] for k in ("sm_clock_mhz", "temperature_c", "power_w") if k in g})
    return snap
