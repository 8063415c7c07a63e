"""Backend choice per context: `ops.use_backend` (scoped to a thread or an asyncio task, nestable, restored on
exceptions, left out of order without harm) beside the process default (`set_backend`, DECAFA_BACKEND),
traced by torch.compile, and the ONNX export's `standard_ops()` built on it (overlapping or concurrent
exports leave nothing replaced)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from decafa_fast import ops
from decafa_fast.app import export

OPS_FUNCTIONS = ("spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention", "fuse", "decafa_head")


class CustomOpRecorder(TorchDispatchMode):
    """Records the namespaces of the ops that reach the kernels (dispatch modes are per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.namespaces: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def ran_compiled_kernel(fn) -> bool:
    """True when fn() ran a torch.ops.decafa* kernel, False when it ran plain PyTorch (the reference)."""
    with CustomOpRecorder() as recorder:
        fn()
    return bool(recorder.namespaces & {"decafa", "decafa_triton"})


def run_threads(*targets) -> None:
    """Runs each target in its own thread and re-raises here the first exception any of them raised."""
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def logits() -> torch.Tensor:
    return torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def auto_default():
    """Every test starts and ends with the process default "auto" and no thread choice."""
    assert ops.get_backend() == "auto"
    yield
    ops.set_backend("auto")


def test_scoped_choice_nests_and_restores():
    t = logits()
    assert ran_compiled_kernel(lambda: ops.soft_argmax(t))  # auto on CPU: the C++ kernels
    with ops.use_backend("reference") as name:
        assert name == "reference" and ops.get_backend() == "reference"
        assert not ran_compiled_kernel(lambda: ops.soft_argmax(t))
        with ops.use_backend("cpp"):
            assert ops.get_backend() == "cpp"
            assert ran_compiled_kernel(lambda: ops.soft_argmax(t))
        assert ops.get_backend() == "reference"
        assert not ran_compiled_kernel(lambda: ops.soft_argmax(t))
    assert ops.get_backend() == "auto"


def test_exception_restores_the_previous_choice():
    with ops.use_backend("cpp"):
        with pytest.raises(ZeroDivisionError), ops.use_backend("reference"):
            assert ops.get_backend() == "reference"
            raise ZeroDivisionError
        assert ops.get_backend() == "cpp"
    assert ops.get_backend() == "auto"


def test_decorator_form():
    @ops.use_backend("reference")
    def inside() -> str:
        return ops.get_backend()

    assert inside() == "reference" and inside() == "reference"
    assert ops.get_backend() == "auto"


def test_bad_names_raise_and_change_nothing():
    with pytest.raises(ValueError, match="backend must be one of"), ops.use_backend("numba"):
        pass
    unavailable = [n for n, s in ops.backends().items() if not s.startswith("available")]
    for name in unavailable:  # e.g. "cuda" without a GPU: the reason is in the message
        with pytest.raises(RuntimeError, match=f"backend {name!r} is not available"), ops.use_backend(name):
            pass
    assert ops.get_backend() == "auto"


def test_scoped_choice_wins_over_the_process_default():
    with ops.use_backend("cpp"):
        ops.set_backend("reference")  # the process default changes; this thread keeps its choice
        assert ops.get_backend() == "cpp"
        assert ran_compiled_kernel(lambda: ops.soft_argmax(logits()))
    assert ops.get_backend() == "reference"
    assert not ran_compiled_kernel(lambda: ops.soft_argmax(logits()))
    with ops.use_backend("auto"):  # "auto" is a choice too, over a "reference" default
        assert ran_compiled_kernel(lambda: ops.soft_argmax(logits()))


def test_threads_keep_their_own_choice():
    """Two threads hold different backends at the same time (a barrier makes their blocks overlap) while a
    third uses the process default; each runs the ops of its own choice, many times over."""
    t = logits()
    barrier = threading.Barrier(3)
    seen: dict[str, set[tuple[str, bool]]] = {}

    def worker(label: str, choice: str | None):
        def body():
            scope = ops.use_backend(choice) if choice else contextlib.nullcontext()
            with scope:
                barrier.wait(timeout=30)
                seen[label] = {(ops.get_backend(), ran_compiled_kernel(lambda: ops.landmark_attention(t)))
                               for _ in range(20)}
                barrier.wait(timeout=30)
        return body

    run_threads(worker("reference", "reference"), worker("cpp", "cpp"), worker("default", None))
    assert seen == {"reference": {("reference", False)}, "cpp": {("cpp", True)}, "default": {("auto", True)}}
    assert ops.get_backend() == "auto"


def test_new_thread_starts_from_the_process_default():
    result = {}
    with ops.use_backend("reference"):
        th = threading.Thread(target=lambda: result.setdefault("backend", ops.get_backend()))
        th.start()
        th.join()
    assert result["backend"] == "auto"


@pytest.mark.slow
def test_environment_default_and_scoped_override():
    code = (
        "from decafa_fast import ops\n"
        "print(ops.get_backend())\n"
        "with ops.use_backend('cpp'):\n"
        "    print(ops.get_backend())\n"
        "print(ops.get_backend())\n"
    )
    env = dict(os.environ, DECAFA_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["reference", "cpp", "reference"]


def test_compile_traces_the_scoped_choice():
    """torch.compile(fullgraph=True) reads the thread's choice while tracing and guards on it: entering
    another backend's block recompiles instead of running the graph traced for the first one."""
    graphs: list[set[str]] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    def head(x):
        z, m = ops.landmark_attention(x * 2.0, 0.5, True)
        return z.sum() + m.sum()

    torch._dynamo.reset()
    compiled = torch.compile(head, backend=record, fullgraph=True)
    t = logits()
    with ops.use_backend("reference"):
        ref_value = compiled(t)
    with ops.use_backend("cpp"):
        cpp_value = compiled(t)
    compiled(t)  # process default ("auto" = cpp on CPU)
    torch._dynamo.reset()
    assert len(graphs) >= 2, graphs
    assert not any("decafa" in target for target in graphs[0]), graphs[0]
    assert any("decafa.landmark_attention" in target for target in graphs[1]), graphs[1]
    torch.testing.assert_close(cpp_value, ref_value, rtol=1e-5, atol=1e-5)


def test_compiled_function_follows_each_threads_choice():
    """One compiled function, called from a thread inside use_backend("reference") and then from a thread
    inside use_backend("cpp"): the guard on the thread's choice sends the second to a graph of its own."""
    graphs: list[set[str]] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ops.soft_argmax(x, 0.5, True), backend=record, fullgraph=True)
    t = logits()
    results: dict[str, torch.Tensor] = {}

    def call_in(choice: str):
        def body():
            with ops.use_backend(choice):
                results[choice] = compiled(t)
        return body

    run_threads(call_in("reference"))
    run_threads(call_in("cpp"))
    torch._dynamo.reset()
    assert len(graphs) == 2 and not any("decafa" in g for g in graphs[0]), graphs
    assert any("decafa.soft_argmax" in g for g in graphs[1]), graphs
    torch.testing.assert_close(results["cpp"], results["reference"], rtol=1e-5, atol=1e-6)


def test_scoped_choice_inside_a_compiled_function():
    """A use_backend block inside a torch.compile(fullgraph=True) function: the block's op is traced on its
    backend, the op after it on the thread's, and nothing is left chosen after the call."""
    graphs: list[set[str]] = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    def two_backends(x):
        with ops.use_backend("reference"):
            inside = ops.soft_argmax(x * 2.0, 0.5, True)
        return inside, ops.soft_argmax(x, 0.5, True)

    torch._dynamo.reset()
    t = logits()
    inside, after = torch.compile(two_backends, backend=record, fullgraph=True)(t)
    torch._dynamo.reset()
    assert ops.get_backend() == "auto"
    assert len(graphs) == 1 and sum("decafa.soft_argmax" in target for target in graphs[0]) == 1, graphs
    torch.testing.assert_close(inside, ops.soft_argmax(t * 2.0, 0.5, True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, ops.soft_argmax(t, 0.5, True), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The ONNX export borrows the reference backend through use_backend
# --------------------------------------------------------------------------------------------------
def _public_ops() -> dict[str, object]:
    return {name: getattr(ops, name) for name in OPS_FUNCTIONS}


def test_standard_ops_replaces_nothing_and_is_scoped():
    before = _public_ops()
    with export.standard_ops():
        assert ops.get_backend() == "reference"
        assert _public_ops() == before
        assert not ran_compiled_kernel(lambda: ops.decafa_head(logits(), torch.rand(2, 1, 5, 4),
                                                               torch.rand(2, 3, 5, 4)))
        with export.standard_ops():  # nested: an export inside an export
            assert ops.get_backend() == "reference"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto" and _public_ops() == before


def test_overlapping_exports_in_threads_leave_nothing_replaced():
    """Export blocks in two threads that enter and leave in crossed order (A enters, B enters, A leaves,
    B leaves), while a third thread runs ops on the process default the whole time."""
    before = _public_ops()
    plain_running, entered_a, entered_b, left_a, done = (threading.Event() for _ in range(5))
    seen: dict[str, list[str]] = {"a": [], "b": []}
    plain_seen: set[tuple[str, bool]] = set()

    def export_block(name: str, start: threading.Event, entered: threading.Event, hold: threading.Event,
                     left: threading.Event):
        """After `start`, an export block that sets `entered` and lasts until `hold`; sets `left` once out.
        Records the backend seen inside and after."""
        assert start.wait(30)
        with export.standard_ops():
            entered.set()
            assert hold.wait(30)
            seen[name].append(ops.get_backend())
        seen[name].append(ops.get_backend())
        left.set()

    def plain():
        t = logits()
        while not done.is_set():
            plain_seen.add((ops.get_backend(), ran_compiled_kernel(lambda: ops.soft_argmax(t))))
            plain_running.set()

    run_threads(lambda: export_block("a", plain_running, entered_a, entered_b, left_a),
                lambda: export_block("b", entered_a, entered_b, left_a, done), plain)
    assert seen == {"a": ["reference", "auto"], "b": ["reference", "auto"]}
    assert plain_seen == {("auto", True)}
    assert ops.get_backend() == "auto" and _public_ops() == before


# --------------------------------------------------------------------------------------------------
# Contexts: asyncio tasks each see their own blocks; blocks that end out of order leave the others intact
# --------------------------------------------------------------------------------------------------
def test_overlapping_asyncio_tasks_each_see_their_own_block():
    """Two tasks in one thread hold different backends at once, switching at every await; the caller's block
    is unaffected while they run and after they end."""
    import asyncio

    t = logits()

    async def task(choice: str, steps: int) -> set[tuple[str, bool]]:
        seen = set()
        with ops.use_backend(choice):
            for _ in range(steps):
                await asyncio.sleep(0)  # the other task runs here, inside its own block
                seen.add((ops.get_backend(), ran_compiled_kernel(lambda: ops.soft_argmax(t))))
        return seen

    async def main():
        with ops.use_backend("cpp"):
            results = await asyncio.gather(task("reference", 5), task("cpp", 7), task("reference", 3))
            return results, ops.get_backend()

    results, after_tasks = asyncio.run(main())
    assert results == [{("reference", False)}, {("cpp", True)}, {("reference", False)}]
    assert after_tasks == "cpp"
    assert ops.get_backend() == "auto"


def test_a_task_started_inside_a_block_inherits_it():
    import asyncio

    async def main():
        with ops.use_backend("reference"):
            task = asyncio.create_task(asyncio.sleep(0, result=None))
            inner = asyncio.create_task(_backend_after_a_step())
        await task
        return await inner, ops.get_backend()

    assert asyncio.run(main()) == ("reference", "auto")


async def _backend_after_a_step() -> str:
    import asyncio

    await asyncio.sleep(0.01)  # the creator has left its block by now; this task keeps the choice it started with
    return ops.get_backend()


def test_a_generator_suspended_in_its_block_does_not_undo_the_callers_block():
    """A generator enters a block, yields, and is resumed and finished inside the caller's own block: the
    generator's exit takes out its own block only, so the caller keeps its choice, and after both nothing is
    left chosen. (While the generator is suspended, the caller's code outside any block of its own runs on the
    generator's choice: a generator shares its caller's context, as with torch.no_grad.)"""
    t = logits()

    def producer():
        with ops.use_backend("reference"):
            yield ops.get_backend()
            yield ops.get_backend()

    gen = producer()
    assert next(gen) == "reference"
    with ops.use_backend("cpp"):
        assert ops.get_backend() == "cpp"  # the caller's innermost block wins
        assert next(gen) == "cpp"  # resumed inside the caller's block: the innermost block entered last
        with pytest.raises(StopIteration):
            next(gen)  # leaves the generator's block while the caller's is open
        assert ops.get_backend() == "cpp" and ran_compiled_kernel(lambda: ops.soft_argmax(t))
    assert ops.get_backend() == "auto"


def test_a_context_manager_generator_holds_its_block_over_the_with_body():
    """Why a generator's block is not taken out while it is suspended: a generator that wraps a block and
    yields once is how contextlib.contextmanager (and a pytest yield fixture) build a context manager, and its
    block must hold over the body of the caller's `with` (as torch.no_grad's does in the same place)."""
    t = logits()

    @contextlib.contextmanager
    def on_reference():
        with ops.use_backend("reference"):
            yield

    with on_reference():
        assert ops.get_backend() == "reference" and not ran_compiled_kernel(lambda: ops.soft_argmax(t))
    assert ops.get_backend() == "auto" and ran_compiled_kernel(lambda: ops.soft_argmax(t))


def test_blocks_left_in_crossed_order_restore_nothing_stale():
    outer, inner = ops.use_backend("reference"), ops.use_backend("cpp")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # the outer block ends first
    assert ops.get_backend() == "cpp"
    inner.__exit__(None, None, None)
    assert ops.get_backend() == "auto"


def test_compiled_function_follows_each_tasks_choice():
    """One compiled function called from two overlapping asyncio tasks inside different blocks: the guard on
    the context's choice sends each call to the graph of its own backend."""
    import asyncio

    graphs: list[set[str]] = []
    ran: list[int] = []  # the graph each call ran

    def record(gm: torch.fx.GraphModule, example_inputs):
        index = len(graphs)
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})

        def run(*args):
            ran.append(index)
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: ops.soft_argmax(x, 0.5, True), backend=record, fullgraph=True)
    t = logits()

    async def call_in(choice: str) -> list[tuple[str, bool, torch.Tensor]]:
        out = []
        with ops.use_backend(choice):
            for _ in range(3):
                await asyncio.sleep(0)  # the other task calls in between, inside its own block
                z = compiled(t)
                out.append((choice, any("decafa.soft_argmax" in target for target in graphs[ran[-1]]), z))
        return out

    async def main():
        return await asyncio.gather(call_in("reference"), call_in("cpp"))

    ref_out, cpp_out = asyncio.run(main())
    torch._dynamo.reset()
    assert [kernel for _, kernel, _ in ref_out] == [False] * 3 and [kernel for _, kernel, _ in cpp_out] == [True] * 3
    assert len(graphs) == 2, graphs
    torch.testing.assert_close(cpp_out[0][2], ref_out[0][2], rtol=1e-5, atol=1e-6)


def test_a_decorated_generator_holds_its_block_only_while_it_runs():
    """The way to give a generator a choice of its own: its body runs on the decorator's backend each time it
    is resumed, and the code it yields to keeps its own choice, also when that code is inside another block;
    a value sent, an exception thrown and closing it reach the body inside its block."""
    t = logits()

    @ops.use_backend("reference")
    def producer():
        try:
            sent = yield ops.get_backend(), ran_compiled_kernel(lambda: ops.soft_argmax(t))
            yield sent, ops.get_backend()
            yield ops.get_backend()
        except KeyError:
            yield "thrown", ops.get_backend()
        finally:
            closed.append(ops.get_backend())

    closed: list[str] = []
    gen = producer()
    assert next(gen) == ("reference", False)
    assert ops.get_backend() == "auto" and ran_compiled_kernel(lambda: ops.soft_argmax(t))  # the caller's own
    with ops.use_backend("cpp"):
        assert gen.send("hello") == ("hello", "reference")
        assert ops.get_backend() == "cpp"
        assert gen.throw(KeyError("x")) == ("thrown", "reference")
        assert ops.get_backend() == "cpp"
    gen.close()
    assert closed == ["reference"] and ops.get_backend() == "auto"

    gen = producer()
    next(gen)
    next(gen)
    assert next(gen) == "reference"
    with pytest.raises(StopIteration):
        next(gen)
    assert closed == ["reference", "reference"]


def test_a_decorated_coroutine_runs_inside_its_block_in_its_own_task():
    import asyncio

    async def backends_seen() -> list[str]:
        seen = []
        for _ in range(3):
            await asyncio.sleep(0)  # the other coroutine runs here
            seen.append(ops.get_backend())
        return seen

    worker = ops.use_backend("reference")(backends_seen)  # the same body, decorated

    async def main():
        with ops.use_backend("cpp"):
            return await asyncio.gather(worker(), backends_seen()), ops.get_backend()

    assert asyncio.run(main()) == ([["reference"] * 3, ["cpp"] * 3], "cpp")
    assert ops.get_backend() == "auto"


def test_an_async_generator_cannot_be_decorated():
    async def stream():
        yield 1

    with pytest.raises(TypeError, match="cannot decorate an async generator function"):
        ops.use_backend("reference")(stream)
