"""Every op x backend x dtype x batch size, forward and forward+backward (pytest-benchmark).

    pytest bench/test_ops.py --benchmark-only [-k decafa_head] [--decafa-quick] [--decafa-full]

Size: L = 98 maps of 128 x 128, C = 64 embedding channels, Ci = 1, fusion F5 (`--decafa-size tiny` for a
machinery check). Backends: the reference in eager mode (through decafa_fast.ops, backend "reference"),
the reference under torch.compile ("compiled"), kornia's spatial_softmax2d / spatial_soft_argmax2d where
they apply ("kornia"), and the compiled backends cpp, triton, cuda. Batch sizes 1, 8, 64 on CUDA; 1, 8 on
CPU. Forward runs under no_grad; forward+backward computes the gradients of every input.

For each case `extra_info` records the floor bytes, GB/s, % of the floor, peak memory and the speed-up over
the reference (eager) of the same case; the definitions are in bench/measure.py. Parameters are
ordered so that the reference runs first in every (op, pass, dtype, B) group. Every benchmarked output is
first checked against the reference, so that a wrong fast kernel cannot post a time.

Defaults keep the suite to minutes: torch.compile of the reference (10-40 s of compilation per graph on
the 2-core CPU) runs at one batch size, B = 8 in float32 on CPU and B = 64 in both dtypes on CUDA, unless
--decafa-full. --decafa-quick: soft_argmax and the fused head, float32, B = 8 on CPU; on CUDA float32 and
bf16 at B = 1 and 64 (the reference under torch.compile in float32 at B = 64 only).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import measure
import pytest
import torch

from decafa_fast import ops, reference

OPS = ("spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention", "fuse", "decafa_head")
KORNIA_OPS = ("spatial_softmax", "soft_argmax")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Where the reference under torch.compile runs without --decafa-full: (dtypes, batch sizes) per device type
COMPILED_DEFAULT = {"cpu": (("float32",), (8,)), "cuda": (("float32", "bfloat16"), (64,))}
# (rtol, atol as a fraction of the largest reference value) for the pre-timing correctness check
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Case:
    op: str
    pass_: str
    dtype: str
    batch: int
    backend: str

    @property
    def key(self) -> tuple:
        """Cases with one key are timed against the same reference."""
        return (self.op, self.pass_, self.dtype, self.batch)

    def __str__(self) -> str:
        return f"{self.op}-{self.pass_}-{self.dtype}-B{self.batch}-{self.backend}"


def op_cases(config: pytest.Config) -> list[Case]:
    cuda = measure.bench_device().type == "cuda"
    quick = config.getoption("--decafa-quick")
    ops_, dtypes, batches = OPS, tuple(DTYPES), ((1, 8, 64) if cuda else (1, 8))
    if quick:  # on CUDA also bf16 and B = 1: the Triton-vs-CUDA races that the auto table needs
        ops_ = ("soft_argmax", "decafa_head")
        dtypes, batches = (tuple(DTYPES), (1, 64)) if cuda else (("float32",), (8,))
    backends = measure.selected_backends(config.getoption("--decafa-backends"))
    # the reference first in each group, so that every other backend's speed-up is known when it runs
    backends = tuple(sorted(backends, key=lambda b: b != "reference"))
    return [
        Case(op, pass_, dtype, batch, backend)
        for op in ops_ for pass_ in PASSES for dtype in dtypes for batch in batches for backend in backends
        if backend != "kornia" or op in KORNIA_OPS
    ]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", op_cases(metafunc.config), ids=str)


# --------------------------------------------------------------------------------------------------
# Inputs and the function under test
# --------------------------------------------------------------------------------------------------
def make_inputs(op: str, batch: int, dtype: torch.dtype, device: torch.device, size: measure.BenchSize,
                requires_grad: bool) -> list[torch.Tensor]:
    """The op's tensor arguments: logits (B, L, H, W) for the map ops; image (B, Ci, H, W), embedding
    (B, C, H, W) and mask (B, 1, H, W) for fuse; logits, image, embedding for the head."""
    g = torch.Generator(device=device).manual_seed(0)
    b, h, w = batch, size.height, size.width

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=device).to(dtype)

    if op == "fuse":
        tensors = [rand(b, size.image_channels, h, w), randn(b, size.channels, h, w), rand(b, 1, h, w)]
    elif op == "decafa_head":
        tensors = [randn(b, size.landmarks, h, w, scale=3.0), rand(b, size.image_channels, h, w),
                   randn(b, size.channels, h, w)]
    else:
        tensors = [randn(b, size.landmarks, h, w, scale=3.0)]
    return [t.requires_grad_(requires_grad) for t in tensors]


_COMPILED: dict[str, Callable] = {}


def op_function(op: str, backend: str, size: measure.BenchSize) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The callable to time for (op, backend), returning a tuple of tensors. For reference, cpp, triton
    and cuda the backend is selected globally (ops.set_backend) by the test."""
    if backend == "compiled":
        if op not in _COMPILED:  # one compiled function per op for the session: recompiles reuse its cache
            _COMPILED[op] = torch.compile(getattr(reference, op))
        fn = _COMPILED[op]
    elif backend == "kornia":
        from kornia.geometry.subpix import spatial_soft_argmax2d, spatial_softmax2d

        if op == "spatial_softmax":
            return lambda t: (spatial_softmax2d(t, temperature=1.0),)
        return lambda t: (spatial_soft_argmax2d(t, temperature=1.0, normalized_coordinates=False),)
    else:
        fn = getattr(ops, op)
    if op in ("fuse", "decafa_head"):
        mode = size.mode
        return lambda *args: _as_tuple(fn(*args, mode=mode))
    return lambda *args: _as_tuple(fn(*args))


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# The reference's forward outputs of the group being run (one group at a time, to bound memory).
_REFERENCE_OUT: dict[tuple, tuple[torch.Tensor, ...]] = {}


def check_against_reference(case: Case, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...],
                            size: measure.BenchSize) -> None:
    group = (case.op, case.dtype, case.batch)
    if case.backend == "reference":
        _REFERENCE_OUT.clear()
        _REFERENCE_OUT[group] = tuple(o.detach() for o in outputs)
        return
    expected = _REFERENCE_OUT.get(group)
    if expected is None:
        with torch.no_grad():
            kwargs = {"mode": size.mode} if case.op in ("fuse", "decafa_head") else {}
            expected = _as_tuple(getattr(reference, case.op)(*[t.detach() for t in inputs], **kwargs))
    tol = TOLERANCE[DTYPES[case.dtype]]
    for got, want in zip(outputs, expected):
        scale = max(float(want.detach().abs().max().float()), 1e-30) if want.numel() else 1.0
        torch.testing.assert_close(got.detach().float(), want.float(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{case}: output differs from the reference before timing: {m}")


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
def test_op(benchmark, case: Case, device, bench_size, copy_bw, time_budget, min_rounds, reference_times,
            record_row, use_backend, pytestconfig):
    reason = measure.backend_skip_reason(case.backend, device)
    if reason:
        pytest.skip(reason)
    dtypes, batches = COMPILED_DEFAULT[device.type]
    if pytestconfig.getoption("--decafa-quick"):
        dtypes = dtypes[:1]  # float32 only: each compiled graph costs seconds to minutes
    if (case.backend == "compiled" and not pytestconfig.getoption("--decafa-full")
            and (case.dtype not in dtypes or case.batch not in batches)):
        pytest.skip(f"torch.compile of the reference runs at {'/'.join(dtypes)}, B = {batches[0]} by default on "
                    f"{device.type} (each graph takes seconds to minutes to compile); --decafa-full runs it everywhere")
    if case.backend in ("reference", "cpp", "triton", "cuda"):
        use_backend(case.backend)

    dtype = DTYPES[case.dtype]
    backward = case.pass_ == "fwd+bwd"
    fn = op_function(case.op, case.backend, bench_size)
    inputs = make_inputs(case.op, case.batch, dtype, device, bench_size, requires_grad=backward)

    # dry run: compiles / autotunes, checks the values, gives output shapes and a first time
    measure.synchronize(device)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        outputs = fn(*inputs)
    check_against_reference(case, inputs, outputs, bench_size)
    if backward:
        grad_outputs = [torch.randn_like(o) for o in outputs]
        torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    measure.synchronize(device)
    first = time.perf_counter() - start
    outputs = tuple(o.detach() for o in outputs)

    def call():
        if backward:
            result = torch.autograd.grad(fn(*inputs), inputs, grad_outputs, allow_unused=True)
        else:
            with torch.no_grad():
                result = fn(*inputs)
        measure.synchronize(device)
        return result

    estimate = first
    if case.backend == "compiled" or device.type == "cuda" or first < 1.0:
        start = time.perf_counter()
        call()
        estimate = time.perf_counter() - start
    peak, peak_method = measure.peak_memory(call, device)

    rounds, iterations = measure.choose_rounds(estimate, device, time_budget, min_rounds)
    benchmark.pedantic(call, rounds=rounds, iterations=iterations, warmup_rounds=1 if device.type == "cuda" else 0)

    moved = measure.floor_bytes(inputs, outputs, backward, grad_inputs=inputs if backward else ())
    t = measure.fastest_time(benchmark)
    info = benchmark.extra_info
    info.update(
        suite="ops", op=case.op, backend=case.backend, dtype=case.dtype, batch=case.batch, **{"pass": case.pass_},
        device=str(device), L=bench_size.landmarks, H=bench_size.height, W=bench_size.width,
        C=bench_size.channels, Ci=bench_size.image_channels, mode=bench_size.mode,
        floor_bytes=moved, copy_gbps=copy_bw / 1e9, peak_bytes=peak, peak_method=peak_method,
        **measure.device_snapshot(device),
    )
    if t is not None:
        info.update(time_s=t, gbps=moved / t / 1e9, floor_pct=100.0 * (moved / copy_bw) / t)
        if case.backend == "reference":
            reference_times[case.key] = t
        elif case.key in reference_times:
            info["speedup"] = reference_times[case.key] / t
        record_row(info)
