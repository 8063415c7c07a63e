"""The raw-op fuzz of tests/ops/test_raw_ops_fuzz.py run through the CUDA glue (csrc/cuda/decafa_cuda.cu): every
bad call of `torch.ops.decafa.*` from that file's case list (rank, dtype, sizes, empty maps, mode, layouts,
storage offsets) with its tensors on the GPU, and each "on cuda" case turned around (that one tensor left on the
CPU beside CUDA ones). Same verdicts: a RuntimeError naming an argument involved, or, for a layout or an
incoming gradient's dtype, the result of the valid call (here within the CUDA kernels' fast-math tolerance,
rtol 1e-4 / atol 1e-5: another layout may take another kernel path, so another summation order); never a crash.

The calls run in a subprocess, so a segfault names its case instead of killing pytest (GPU run 1 lost a pytest
worker to a segfault in a raw CUDA call); after a crash the remaining cases run in a fresh subprocess.
Skipped without a GPU and the CUDA build of decafa_fast._C.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "ops"))
import test_raw_ops_fuzz as fuzz  # noqa: E402  (tests/ops is not on the path of this directory's tests)

from decafa_fast import ops  # noqa: E402

_STATUS = ops.backends()["cuda"]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _STATUS.startswith("available"), reason=f"CUDA backend: {_STATUS}"),
]


def moved(v: torch.Tensor, device: str) -> torch.Tensor:
    """`v` on `device` with the same sizes, strides and storage offset (a channels_last, transposed or
    misaligned tensor stays so)."""
    extent = v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride())) + 1 if v.numel() else 0
    flat = torch.empty(max(extent, v.storage_offset() + 1), dtype=v.dtype, device=device)
    return flat.as_strided(v.shape, v.stride(), v.storage_offset()).copy_(v)


def cuda_case(case: fuzz.Case) -> fuzz.Case:
    """The case with its tensors on the GPU; the tensor a case put on "cuda" (the other device) stays on the
    CPU instead, so the case still has one tensor on the wrong device."""

    def place(args: dict | None) -> dict | None:
        if args is None:
            return None
        return {n: (v.cpu() if v.is_cuda else moved(v, "cuda")) if isinstance(v, torch.Tensor) else v
                for n, v in args.items()}

    name = case.name.replace(" on cuda", " on cpu beside cuda tensors")
    return fuzz.Case(case.op, name, place(case.args), case.names, place(case.equivalent), case.may_return)


def _same(a, b) -> bool:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device
        and torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True)
        for x, y in zip(a, b)
    )


def run_cases(start: int, out) -> None:
    """The subprocess: every case from `start`, one JSON line before (start) and after (outcome) each call."""
    expected: dict[str, object] = {}
    for index, case in enumerate(fuzz.cases("decafa")):
        if index < start:
            continue
        case = cuda_case(case)
        print(json.dumps({"start": index}), file=out, flush=True)
        fn = getattr(torch.ops.decafa, case.op)
        outcome, message = "returned", ""
        try:
            result = fn(**case.args)
            torch.cuda.synchronize()
            if case.equivalent is not None:
                if case.op not in expected:
                    expected[case.op] = fn(**case.equivalent)
                outcome = "same" if _same(result, expected[case.op]) else "returned a result that differs from " \
                    "the call with the same values in the expected dtype and layout"
        except Exception as exc:  # noqa: BLE001 - the type is the verdict, reported to the parent
            outcome, message = type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else ""
        print(json.dumps({"index": index, "outcome": outcome, "message": message}), file=out, flush=True)
    print(json.dumps({"done": True}), file=out, flush=True)


def _child(start: int) -> tuple[list[dict], int | None, int, str]:
    """Runs the cases from `start` in a subprocess: (results, index of the case it died in or None, rc, stderr)."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_raw_ops_cuda_fuzz as f; "
            f"f.run_cases({start}, sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    results, crashed_at = fuzz.read_child_output(proc, "the CUDA fuzz subprocess")
    return results, crashed_at, proc.returncode, proc.stderr


def test_raw_cuda_ops_reject_bad_arguments():
    all_cases = [cuda_case(c) for c in fuzz.cases("decafa")]
    results: dict[int, dict] = {}
    start = 0
    while start < len(all_cases):
        got, crashed_at, rc, stderr = _child(start)
        results.update({r["index"]: r for r in got})
        if crashed_at is None:
            break
        results[crashed_at] = {"index": crashed_at, "outcome": f"crashed the process (exit status {rc})",
                               "message": stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""}
        start = crashed_at + 1
    fuzz.assert_every_case_refused(all_cases, results, lambda case: f"torch.ops.decafa.{case.op} (CUDA): {case.name}")
