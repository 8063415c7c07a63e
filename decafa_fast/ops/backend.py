"""Backend choice and resolution: the process default (`set_backend`, DECAFA_BACKEND), a scoped choice
(`use_backend`) and the concrete backend for one call (`resolve`).

A `use_backend` block belongs to the context it runs in (contextvars): each thread, and each asyncio task,
sees its own blocks and none of another's. Blocks are kept as a stack of entries and a block that ends takes
out its own entry, so blocks that end out of order (a generator suspended inside one, resumed and finished
inside the caller's) leave every other block's choice as it was. What contextvars cannot give: a generator
shares its caller's context, so while one is suspended inside a `with` block of its own, the caller's code
outside any block of its own runs on the generator's choice (as with torch.no_grad; the innermost block
entered last wins). That is what contextlib.contextmanager and pytest's yield fixtures rely on: a generator
that wraps a block and yields once is a context manager whose block must hold over the caller's `with` body.
A generator function decorated with `use_backend` holds its block only while it runs.

The choice is made when an op's forward runs; its backward runs the same backend's kernels whatever the
context that runs it has chosen."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch

from .. import settings
from . import auto, status

BACKENDS = settings.BACKEND_NAMES

_default: str = settings.backend()  # the process default: DECAFA_BACKEND (a bad value warns and gives "auto")
if _default != "auto" and not status.STATUS[_default].startswith("available"):
    # a backend this machine cannot run: say why in one line and go on with "auto", as for a bad value
    settings.warn(f"DECAFA_BACKEND={_default!r} is not available here ({status.STATUS[_default]}); using 'auto'")
    _default = "auto"

# The innermost block's backend in the running context (unset: no block), and the blocks themselves.
_CHOICE: contextvars.ContextVar[str | None] = contextvars.ContextVar("decafa_backend_choice")
_BLOCKS: contextvars.ContextVar[tuple[tuple[object, str], ...]] = contextvars.ContextVar("decafa_backend_blocks",
                                                                                        default=())


class _Scope:
    """The running context's choice as an attribute. torch.compile cannot trace ContextVar.get, but it reads a
    property whose getter is a C function while tracing and guards on the value, and the guard reads it again
    in the caller's context at every call: a call from another block runs (or compiles) its own graph."""

    __slots__ = ()
    # ContextVar.get(self): the value, or this instance where the context has none
    choice = property(_CHOICE.get)


_scope = _Scope()
# use_backend blocks inside a function that torch.compile is tracing (ContextVar.set cannot be traced; a list
# is, and it is back to empty when the traced block ends)
_TRACED: list[str] = []


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        reason = status.STATUS[name]
        if not reason.startswith("available"):
            raise RuntimeError(f"backend {name!r} is not available: {reason}")


def set_backend(name: str) -> None:
    """Set the process default backend: "auto", "triton", "cuda", "cpp" or "reference". Code inside a
    `use_backend` block keeps the block's choice until the block ends."""
    global _default
    _check_name(name)
    _default = name


class use_backend(contextlib.ContextDecorator):  # lower case: used like a function, as `with use_backend(...)`
    """`with use_backend("reference"): ...` runs the block's ops on `name` in this context only (this thread,
    this asyncio task); others keep theirs. Blocks nest; the previous choice comes back when the block exits,
    also by an exception. As a decorator: a function's call runs inside the block; a coroutine function's
    body too, in the task that awaits it; a generator function's body runs inside the block each time it is
    resumed and leaves it at each yield, so the code it yields to keeps its own choice."""

    def __init__(self, name: str) -> None:
        _check_name(name)
        self.name = name
        self._entries: list[tuple[object, str]] = []

    def __enter__(self) -> str:
        if torch.compiler.is_compiling():
            _TRACED.append(self.name)
            return self.name
        entry = (object(), self.name)
        self._entries.append(entry)
        _BLOCKS.set((*_BLOCKS.get(), entry))
        _CHOICE.set(self.name)
        return self.name

    def __exit__(self, *exc_info) -> None:
        if torch.compiler.is_compiling():
            _TRACED.pop()
            return
        entry = self._entries.pop()
        blocks = tuple(b for b in _BLOCKS.get() if b is not entry)
        _BLOCKS.set(blocks)
        _CHOICE.set(blocks[-1][1] if blocks else None)

    def _recreate_cm(self) -> use_backend:
        return use_backend(self.name)

    def __call__(self, func):
        if inspect.isasyncgenfunction(func):
            raise TypeError("use_backend cannot decorate an async generator function; put `with "
                            "ops.use_backend(...)` inside it")
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def run_coroutine(*args, **kwargs):
                with self._recreate_cm():
                    return await func(*args, **kwargs)
            return run_coroutine
        if inspect.isgeneratorfunction(func):
            @functools.wraps(func)
            def run_generator(*args, **kwargs):
                gen = func(*args, **kwargs)
                step = functools.partial(gen.send, None)
                while True:
                    with self._recreate_cm():
                        try:
                            item = step()
                        except StopIteration as stop:
                            return stop.value
                    try:
                        sent = yield item
                    except GeneratorExit:
                        with self._recreate_cm():
                            gen.close()
                        raise
                    except BaseException as exc:  # noqa: BLE001 - thrown into the generator, inside the block
                        step = functools.partial(gen.throw, exc)
                    else:
                        step = functools.partial(gen.send, sent)
            return run_generator
        return super().__call__(func)


def get_backend() -> str:
    """The backend this context's ops use: its innermost `use_backend` choice, else the process default."""
    if _TRACED:
        return _TRACED[-1]
    choice = _scope.choice
    return _default if choice is None or choice is _scope else choice


def resolve(device: torch.device, op: str = "", inputs: tuple[torch.Tensor, ...] = ()) -> str:
    """The concrete backend for `op` on `inputs` (all on `device`), from this context's choice."""
    name = get_backend()
    if name == "auto":
        if device.type == "cuda":
            name = auto.auto_cuda(op, inputs)
        else:
            name = "cpp" if status.STATUS["cpp"] == "available" else "reference"
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if name == "cpp" and device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on CPU tensors, got tensors on {device}; use 'cuda' or 'auto'")
    return name


def namespace(backend: str):
    return torch.ops.decafa_triton if backend == "triton" else torch.ops.decafa
