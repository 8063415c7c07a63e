"""Raw-op fuzz: every compiled entry point (`torch.ops.decafa.*`, `torch.ops.decafa_triton.*`, forward and
backward, the schemas of decafa_fast/contract/schemas.py) is called with bad arguments and must raise a
RuntimeError that names an argument involved (the op contract): never crash, never return.

The cases are derived from the schemas and a symbolic shape per argument (logits (B, L, H, W), stats (B, L, 2),
...), starting from one valid call (B, L, H, W = 2, 3, 4, 5, one image channel, two embedding channels,
F5, float32, a beta_map):
- rank: each tensor with one dimension more and one fewer;
- dtype: each tensor as int32, and in a floating dtype other than the one it must have (float64 data among
  float32 data; float16 or float64 stats and beta_map, which must be float32 here);
- size: each dimension that another argument fixes (B, L, H, W, C, the literal 1 of the mask and 2 of z and
  stats, the fused channel count) one larger;
- empty maps: H = 0 or W = 0 in every argument at once (the softmax of no pixels is undefined: the contract
  needs H, W >= 1);
- mode 0, 6 and -1; all floating tensors as int32 at once;
- device: each tensor on the other device, where a GPU is present.
Layouts must not be wrong either: each tensor as a non-contiguous view, channels_last (rank 4), and at a
storage offset of one element (misaligned for vector loads) must raise a RuntimeError or give the result of
the valid call (rtol 1e-5, atol 1e-6); so must an incoming gradient in float64 (a kernel may convert it).
Fusing maps with H = 0 or W = 0 may also return (an empty fusion is well defined).

Forward-mode AD, which the raw ops have no rule for, must raise a RuntimeError too (a dual input must not
come out without its tangent): `test_raw_ops_refuse_forward_mode_ad`, in this process.

The calls run in a subprocess (one per namespace), so a segfault fails this test, naming the case, instead of
killing pytest; after a crash the remaining cases run in a fresh subprocess. Deterministic (seeded inputs,
fixed case order).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

SIZES = {"B": 2, "L": 3, "H": 4, "W": 5, "Ci": 1, "C": 2}
MODE = 5  # F5: I | I*M | E | E*M
FUSED = ("Ci", "C")  # the fused channel count F = 2 Ci + 2 C depends on both
# Symbolic shape of every tensor argument of the schemas; "F" is the fused channel count, ints are literal.
SPECS: dict[str, tuple] = {
    "logits": ("B", "L", "H", "W"),
    "image": ("B", "Ci", "H", "W"),
    "embedding": ("B", "C", "H", "W"),
    "mask": ("B", 1, "H", "W"),
    "stats": ("B", "L", 2),
    "beta_map": ("B", "L"),
    "grad_phi": ("B", "L", "H", "W"),
    "grad_z": ("B", "L", 2),
    "grad_mask": ("B", 1, "H", "W"),
    "grad_fused": ("B", "F", "H", "W"),
}
ACCUMULATION_ARGS = ("stats", "beta_map")  # float32 for float32 data; the rest share the data dtype
NAMESPACES = ("decafa", "decafa_triton")


@dataclass
class Case:
    """One call: `name` says what is wrong; `names` are the arguments an error message may name. A case with
    an `equivalent` call may also return, when its result equals that call's; a `may_return` case may return
    anything well-formed (it may still raise nothing but a RuntimeError)."""

    op: str
    name: str
    args: dict
    names: tuple[str, ...]
    equivalent: dict | None = None
    may_return: bool = False


def _schemas() -> dict[str, list[tuple[str, str]]]:
    from decafa_fast.contract.schemas import SCHEMAS

    parsed = {}
    for op, schema in SCHEMAS.items():
        arguments = torch._C.parse_schema(op + schema).arguments
        parsed[op] = [(a.name, str(a.type)) for a in arguments]
    return parsed


def _dims(spec: tuple, sizes: dict[str, int]) -> list[int]:
    return [d if isinstance(d, int) else (2 * sizes["Ci"] + 2 * sizes["C"] if d == "F" else sizes[d]) for d in spec]


def _symbols(spec: tuple) -> set[str]:
    out = set()
    for d in spec:
        if d == "F":
            out.update(FUSED)
        elif isinstance(d, str):
            out.add(d)
    return out


def valid_args(op: str, arguments, sizes: dict[str, int], device: str = "cpu") -> dict:
    """A valid call of `op`: random data, consistent statistics (max, sum of exp(s - max)), beta = 1."""
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(_dims(spec, sizes), generator=gen) for name, spec in SPECS.items()}
    tensors["image"] = tensors["image"].abs() + 0.5
    tensors["mask"] = tensors["mask"].abs()
    tensors["beta_map"] = tensors["beta_map"].abs() + 0.5
    s = tensors["logits"] * tensors["beta_map"][..., None, None]
    if s.numel():
        top = s.amax(dim=(2, 3), keepdim=True)
        tensors["stats"] = torch.stack([top[..., 0, 0], (s - top).exp().sum(dim=(2, 3))], dim=-1)
    scalars = {"beta": 1.0, "normalized": True, "mode": MODE}
    return {name: (tensors[name].to(device) if name in tensors else scalars[name]) for name, _ in arguments}


def _replace(args: dict, **changes) -> dict:
    return {**args, **changes}


def cases(namespace: str) -> Iterator[Case]:
    """Every bad call for every op of `namespace`, in a fixed order."""
    other_device = "cuda" if torch.cuda.is_available() else None
    gen = torch.Generator().manual_seed(1)
    for op, arguments in _schemas().items():
        base = valid_args(op, arguments, SIZES)
        tensor_args = [n for n, t in arguments if "Tensor" in t]
        for name in tensor_args:
            v = base[name]
            spec = SPECS[name]
            yield Case(op, f"{name} with one more dimension", _replace(base, **{name: v.unsqueeze(0)}), (name,))
            yield Case(op, f"{name} with one dimension fewer", _replace(base, **{name: v[0]}), (name,))
            yield Case(op, f"{name} as int32", _replace(base, **{name: v.to(torch.int32)}), (name,))
            if name in ACCUMULATION_ARGS:
                for dtype in (torch.float16, torch.float64):
                    yield Case(op, f"{name} as {dtype}", _replace(base, **{name: v.to(dtype)}), (name,))
            elif name.startswith("grad_"):  # a kernel may convert an incoming gradient, if it does so right
                yield Case(op, f"{name} as float64 among float32 data", _replace(base, **{name: v.double()}),
                           tuple(tensor_args), equivalent=base)
            else:
                yield Case(op, f"{name} as float64 among float32 data", _replace(base, **{name: v.double()}),
                           tuple(tensor_args))
            # a size that another argument (or a literal of the contract) fixes, one larger
            for axis, symbol in enumerate(spec):
                fixed_by = [n for n in tensor_args if n != name and _symbols((symbol,)) & _symbols(SPECS[n])]
                if isinstance(symbol, str) and symbol != "F" and not fixed_by:
                    continue  # a free size (e.g. the image's channels in fuse): any value is valid
                shape = list(v.shape)
                shape[axis] += 1
                bad = torch.randn(shape, generator=gen).abs() + 0.5
                yield Case(op, f"{name} with size {shape[axis]} on axis {axis} ({symbol})",
                           _replace(base, **{name: bad}), (name, *fixed_by))
            if other_device:
                yield Case(op, f"{name} on {other_device}", _replace(base, **{name: v.to(other_device)}),
                           tuple(tensor_args))
            # layouts: valid values in other memory layouts
            if v.dim() >= 2 and v.shape[-1] > 1 and v.shape[-2] > 1:
                yield Case(op, f"{name} as a non-contiguous view", _replace(base, **{name: v.mT.contiguous().mT}),
                           (name,), equivalent=base)
            if v.dim() == 4:
                yield Case(op, f"{name} channels_last",
                           _replace(base, **{name: v.contiguous(memory_format=torch.channels_last)}), (name,),
                           equivalent=base)
            shifted = torch.empty(v.numel() + 1, dtype=v.dtype)[1:].view(v.shape).copy_(v)
            yield Case(op, f"{name} at a storage offset of one element", _replace(base, **{name: shifted}), (name,),
                       equivalent=base)
        for symbol in ("H", "W"):  # a softmax over no pixels is undefined; fusing no pixels is an empty result
            involved = [n for n in tensor_args if symbol in SPECS[n]]
            empty = valid_args(op, arguments, {**SIZES, symbol: 0})
            yield Case(op, f"{symbol} = 0 everywhere", empty, tuple(involved), may_return="logits" not in base)
        if "mode" in base:
            for mode in (0, 6, -1):
                yield Case(op, f"mode {mode}", _replace(base, mode=mode), ("mode",))
        all_int = {n: (v.to(torch.int32) if isinstance(v, torch.Tensor) else v) for n, v in base.items()}
        yield Case(op, "every tensor as int32", all_int, tuple(tensor_args))


# --------------------------------------------------------------------------------------------------
# The subprocess: runs the cases from a start index, one JSON line per case
# --------------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)
        for x, y in zip(a, b)
    )


def run_cases(namespace: str, start: int, out) -> None:
    import decafa_fast  # noqa: F401  (registers torch.ops.decafa*)

    ns = getattr(torch.ops, namespace)
    expected_results: dict[str, object] = {}  # the valid call's result, computed once per op
    for index, case in enumerate(cases(namespace)):
        if index < start:
            continue
        print(json.dumps({"start": index}), file=out, flush=True)
        fn: Callable = getattr(ns, case.op)
        outcome, message = "returned", ""
        try:
            result = fn(**case.args)
            if case.equivalent is not None:
                if case.op not in expected_results:  # every equivalent call of an op is its valid call
                    expected_results[case.op] = fn(**case.equivalent)
                expected = expected_results[case.op]
                outcome = "same" if _same(result, expected) else "returned a result that differs from the call " \
                    "with the same values in the expected dtype and layout"
        except Exception as exc:  # noqa: BLE001 - the type is the verdict, reported to the parent
            outcome, message = type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else ""
        print(json.dumps({"index": index, "outcome": outcome, "message": message}), file=out, flush=True)
    print(json.dumps({"done": True}), file=out, flush=True)


def _child(namespace: str, start: int) -> tuple[list[dict], int | None, int]:
    """Runs the cases from `start` in a subprocess: (results, index of the case it died in or None, rc)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_raw_ops_fuzz as f; "
            f"f.run_cases({namespace!r}, {start}, sys.stdout)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    results, crashed_at = read_child_output(proc, "the fuzz subprocess")
    return results, crashed_at, proc.returncode


def read_child_output(proc: subprocess.CompletedProcess, what: str) -> tuple[list[dict], int | None]:
    """The JSON lines a `run_cases` child printed: (results, index of the case it died in, or None if it
    finished). A child that died before its first case fails the test with its stderr."""
    results, started, done = [], None, False
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        elif "index" in record:
            results.append(record)
            started = None
        elif record.get("done"):
            done = True
    if not done and started is None:
        raise AssertionError(f"{what} failed before its first case (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return results, (None if done else started)


@pytest.mark.slow
@pytest.mark.parametrize("namespace", NAMESPACES)
def test_raw_ops_reject_bad_arguments(namespace):
    from decafa_fast import ops

    needed = "cpp" if namespace == "decafa" else "triton"
    status = ops.backends()[needed]
    if not status.startswith("available"):
        pytest.skip(f"torch.ops.{namespace} is not registered here: {status}")
    all_cases = list(cases(namespace))
    results: dict[int, dict] = {}
    start = 0
    while start < len(all_cases):
        got, crashed_at, rc = _child(namespace, start)
        results.update({r["index"]: r for r in got})
        if crashed_at is None:
            break
        results[crashed_at] = {"index": crashed_at, "outcome": f"crashed the process (exit status {rc})",
                               "message": ""}
        start = crashed_at + 1

    assert_every_case_refused(all_cases, results, lambda case: f"torch.ops.{namespace}.{case.op}: {case.name}")


def assert_every_case_refused(all_cases: list, results: dict[int, dict], where) -> None:
    """Each case's outcome must be a RuntimeError naming one of its arguments (or, for layouts, the valid
    call's result); `where(case)` names the call in the failure list."""
    failures = []
    for index, case in enumerate(all_cases):
        r = results.get(index, {"outcome": "never ran", "message": ""})
        outcome, message = r["outcome"], r["message"]
        if (case.equivalent is not None and outcome == "same") or (case.may_return and outcome == "returned"):
            continue
        if outcome != "RuntimeError":
            failures.append(f"{where(case)} -> {outcome} {message}".rstrip())
        elif not any(n in message for n in case.names):
            failures.append(f"{where(case)} -> RuntimeError naming none of {case.names}: {message}")
    assert not failures, f"{len(failures)} of {len(all_cases)} calls:\n" + "\n".join(failures)


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_raw_ops_refuse_forward_mode_ad(namespace):
    """Each op with a dual tensor (its first tensor argument) under torch.autograd.forward_ad: a RuntimeError,
    or outputs that carry tangents; never outputs that silently lost them."""
    import torch.autograd.forward_ad as fwAD

    from decafa_fast import ops

    needed = "cpp" if namespace == "decafa" else "triton"
    status = ops.backends()[needed]
    if not status.startswith("available"):
        pytest.skip(f"torch.ops.{namespace} is not registered here: {status}")
    failures = []
    for op, arguments in _schemas().items():
        args = valid_args(op, arguments, SIZES)
        name = next(n for n, t in arguments if "Tensor" in t)
        with fwAD.dual_level():
            args[name] = fwAD.make_dual(args[name], torch.ones_like(args[name]))
            try:
                result = getattr(getattr(torch.ops, namespace), op)(**args)
            except RuntimeError:
                continue
            outputs = result if isinstance(result, (tuple, list)) else (result,)
            # (statistics are not differentiable, so one output without a tangent may be right; none is not)
            if all(fwAD.unpack_dual(o).tangent is None for o in outputs):
                failures.append(f"torch.ops.{namespace}.{op} with a dual {name}: no output has a tangent, and no "
                                "error was raised")
    assert not failures, ("forward-mode AD through raw ops must raise a RuntimeError naming the public op (as "
                          "torch.ops.decafa.soft_argmax does), not drop the tangent:\n" + "\n".join(failures))
