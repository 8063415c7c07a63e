"""The whole DeCaFA model (S = 4, 98/68/5 chained, F5, 128 x 128): inference and one training step.

    pytest bench/test_model.py --benchmark-only [--decafa-quick] [--decafa-full]

Each case runs once with the fused ops (backend cpp on CPU; triton and cuda on CUDA) and once with the
reference ops (ops.set_backend("reference")), the reference first, so that the fused ops' gain for the
whole model is a ratio measured in one run (`extra_info["speedup"]`). Images per second are B / time.

CUDA: inference at B = 1 in eager float32 and through torch.compile(mode="reduce-overhead") (CUDA graphs);
throughput at B = 64 and 256 in bfloat16 with channels_last, compiled with mode "reduce-overhead"; a
training step (forward, loss of eq. 10, backward, Adam) at B = 64 under bf16 autocast, channels_last,
torch.compile. --decafa-quick keeps B = 1 (reduce-overhead) and B = 256, with the reference and the GPU
backend that "auto" picks (every case compiles the whole model).

CPU (eager float32; compiling the model there takes minutes): inference at B = 1 and 8, a training step at
B = 1 (B = 8 too with --decafa-full). --decafa-quick keeps inference at B = 1.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import measure
import pytest
import torch

from decafa_fast import ops

try:
    from decafa_fast.app.model import DeCaFA, DeCaFAConfig, decafa_loss

    _MODEL_ERROR = None
except ImportError as exc:  # the model package is not there (yet)
    _MODEL_ERROR = f"decafa_fast.app.model is not importable: {exc}"


@dataclass(frozen=True)
class ModelCase:
    task: str  # "infer" or "train"
    mode: str  # "eager", "compile" (default mode) or "reduce-overhead" (CUDA graphs)
    dtype: str  # "float32", or "bfloat16" (inference: weights and images; training: autocast)
    batch: int
    backend: str

    @property
    def key(self) -> tuple:
        return (self.task, self.mode, self.dtype, self.batch)

    def __str__(self) -> str:
        return f"{self.task}-{self.mode}-{self.dtype}-B{self.batch}-{self.backend}"


def model_cases(config: pytest.Config) -> list[ModelCase]:
    cuda = measure.bench_device().type == "cuda"
    quick, full = config.getoption("--decafa-quick"), config.getoption("--decafa-full")
    if cuda:
        groups = [("infer", "eager", "float32", 1), ("infer", "reduce-overhead", "float32", 1),
                  ("infer", "reduce-overhead", "bfloat16", 64), ("infer", "reduce-overhead", "bfloat16", 256),
                  ("train", "compile", "bfloat16", 64)]
        fused = ("triton", "cuda")
        if quick:  # each case compiles the whole model: keep the GPU backend that "auto" would pick
            groups = [g for g in groups if g[1] == "reduce-overhead" and g[3] in (1, 256)]
            status = ops.backends()
            fused = tuple(b for b in ops.AUTO_CUDA_PREFERENCE if status[b] == "available")[:1] or fused
    else:
        groups = [("infer", "eager", "float32", 1), ("infer", "eager", "float32", 8),
                  ("train", "eager", "float32", 1)] + ([("train", "eager", "float32", 8)] if full else [])
        if quick:
            groups = groups[:1]
        fused = ("cpp",)
    selected = measure.selected_backends(config.getoption("--decafa-backends"))
    backends = [b for b in ("reference", *fused) if b in selected]
    return [ModelCase(*g, backend) for g in groups for backend in backends]


_WARM: list[bool] = []  # non-empty once a model has run in this process


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mcase" in metafunc.fixturenames:
        metafunc.parametrize("mcase", model_cases(metafunc.config), ids=str)


def model_config(size_name: str) -> DeCaFAConfig:
    """The paper's model; for --decafa-size tiny, a two-stage toy that only checks the machinery."""
    if size_name == "tiny":
        return DeCaFAConfig(stages=2, image_size=32, widths=(8, 8, 8), embedding_channels=8)
    return DeCaFAConfig()


def test_model(benchmark, mcase: ModelCase, device, tiny, time_budget, min_rounds, reference_times, record_row,
               use_backend, pytestconfig):
    if _MODEL_ERROR:
        pytest.skip(_MODEL_ERROR)
    reason = measure.backend_skip_reason(mcase.backend, device)
    if reason:
        pytest.skip(reason)
    use_backend(mcase.backend)
    torch._dynamo.reset()  # every compiled case compiles its own graphs: no stale guards across backends

    cfg = model_config(pytestconfig.getoption("--decafa-size"))
    torch.manual_seed(0)
    model = DeCaFA(cfg).to(device)
    low = mcase.dtype == "bfloat16"
    channels_last = device.type == "cuda" and low
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    images = torch.rand(mcase.batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=device)
    images = images.contiguous(memory_format=fmt)
    runner = model if mcase.mode == "eager" else torch.compile(
        model, mode=None if mcase.mode == "compile" else mcase.mode)

    if mcase.task == "infer":
        model.eval()
        if low:
            model.to(torch.bfloat16)
            images = images.to(torch.bfloat16)

        def call():
            with torch.no_grad():
                out = runner(images)
            measure.synchronize(device)
            return out
    else:
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
        targets = {m: torch.rand(mcase.batch, n, 2, device=device) * cfg.image_size
                   for m, n in zip(cfg.markups, cfg.n_points)}
        valid = {m: torch.ones(mcase.batch, dtype=torch.bool, device=device) for m in cfg.markups}
        lambdas = cfg.stage_lambdas()

        def call():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
                loss = decafa_loss(runner(images), targets, valid, cfg.markups, lambdas)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            measure.synchronize(device)
            return loss.detach()

    # warm-up: compilation, CUDA graph recording (reduce-overhead records on the second/third call), and on
    # CPU the first calls of a process, which run several times slower than the next ones
    if device.type == "cuda" or mcase.mode != "eager":
        warmups = 3
    else:  # CPU eager: the slow first calls happen once per process, not once per shape
        warmups = 1 if tiny or _WARM else 2
    for _ in range(warmups):
        start = time.perf_counter()
        call()
        estimate = time.perf_counter() - start

    _WARM.append(True)

    peak, peak_method = None, "not measured on CPU (the profiler over a whole model costs more than the run)"
    shares = {}
    if device.type == "cuda":
        peak, peak_method = measure.peak_memory(call, device)
    else:  # what the table's note on a CPU row slower than the reference rests on
        shares = measure.time_shares(call)

    budget = time_budget or (2.0 if device.type == "cuda" else 1.0)
    rounds, iterations = measure.choose_rounds(estimate, device, budget, min_rounds)
    benchmark.pedantic(call, rounds=rounds, iterations=iterations)

    t = measure.fastest_time(benchmark)
    info = benchmark.extra_info
    info.update(suite="model", task=mcase.task, mode=mcase.mode, dtype=mcase.dtype, batch=mcase.batch,
                backend=mcase.backend, device=str(device), stages=cfg.stages, image_size=cfg.image_size,
                channels_last=channels_last, peak_bytes=peak, peak_method=peak_method, **shares,
                **measure.device_snapshot(device))
    if t is not None:
        info.update(time_s=t, images_per_s=mcase.batch / t)
        if mcase.backend == "reference":
            reference_times[("model", *mcase.key)] = t
        elif ("model", *mcase.key) in reference_times:
            info["speedup"] = reference_times[("model", *mcase.key)] / t
        record_row(info)
