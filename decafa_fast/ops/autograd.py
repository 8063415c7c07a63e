"""Autograd of every compiled op (the op contract), registered for each namespace (`decafa`, `decafa_triton`).

The forward saves the inputs, the per-map stats and, for the head, the mask M (all small beside the
inputs; Phi is never stored). Plain reverse mode (`.backward()`, grad mode off inside the backward) calls
the op's fused backward kernel of the same namespace, and skips what `ctx.needs_input_grad` says nobody
needs. A backward that builds a graph (create_graph=True: double backward, gradient penalties,
gradgradcheck) instead differentiates the reference formulation on the saved inputs, so gradients of any
order are exact on every backend. A tensor beta reaches the op as `beta_map` (B, L) and gets grad_beta.

All of it is derived from the op table (decafa_fast.contract.table): which inputs take gradients, which outputs
are saved and marked non-differentiable, which backward op runs and with which arguments (by name), and the
reference function (decafa_fast.reference.<op>) the graph-building backward differentiates.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch

from .. import _torch_private, reference
from ..contract.layout import FUSION_MODES
from ..contract.table import OPS, OPS_BY_NAME, Op
from .validation import reference_beta

Tensor = torch.Tensor


def _graph_gradients(fn: Callable, inputs: Sequence[Tensor | None], needed: Sequence[bool],
                     grad_outputs: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Gradients of fn(*inputs) (a tuple of outputs) for the inputs marked `needed`, as a graph (so they can
    be differentiated again). Outputs whose gradient is None do not contribute."""
    with torch.enable_grad():
        # Differentiate with respect to fresh aliases: the gradient with respect to an input itself would also
        # count the paths through the others when one depends on another (image = x, logits = conv(x)).
        xs = [
            x if x is None or not need else (x.view_as(x) if x.requires_grad else x.detach().requires_grad_())
            for x, need in zip(inputs, needed)
        ]
        outputs = fn(*xs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None]
        wrt = [x for x, need in zip(xs, needed) if need]
        if not pairs or not wrt:
            return [None] * len(inputs)
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in needed]


_LIBRARIES: dict[str, torch.library.Library] = {}


def _register(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """torch.library.register_autograd, plus a clear error for forward-mode AD (torch.autograd.forward_ad,
    torch.func.jvp/jacfwd) on the raw op: torch would silently drop the tangent when no input requires grad.
    The public decafa_fast.ops functions run the reference formulation there instead.
    Ops made by torch.library.custom_op / triton_op (decafa_triton) get the same guard around their kernel."""
    made = _torch_private.autograd_kernel(qualname, backward, setup_context)
    if made is None:  # another torch: the plain registration (forward AD then is torch's behaviour)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    kernel, lib, is_custom_op = made
    namespace, name = qualname.split("::")
    public = f"decafa_fast.ops.{name}" if OPS_BY_NAME[name].public else "decafa_fast.ops"

    def autograd_kernel(keyset, *args, **kwargs):
        if _torch_private.has_tangent(args):
            raise RuntimeError(
                f"{qualname} has no forward-mode AD (jvp) rule: call {public}, which runs the reference "
                f"formulation under forward-mode AD and torch.func transforms, or decafa_fast.reference"
            )
        return kernel(keyset, *args, **kwargs)

    if not is_custom_op:
        if namespace not in _LIBRARIES:
            _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
        lib = _LIBRARIES[namespace]
        keys = ("Autograd",)
    else:
        # A custom_op already holds the Autograd (alias) key from Python, and torch < 2.13 refuses a second
        # Python kernel there; a kernel on the per-backend keys takes precedence over the alias one.
        keys = ("AutogradCPU", "AutogradCUDA")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        for key in keys:
            lib.impl(name, autograd_kernel, key, with_keyset=True)


def reference_call(op: Op, args: dict) -> tuple[Tensor, ...]:
    """The differentiable outputs of `op` by the reference formulation (decafa_fast.reference.<op>) on the op's
    arguments by name: beta_map folded into beta, the fusion number as its name."""
    kwargs = {}
    for name, value in args.items():
        if name == "beta_map":
            continue
        if name == "beta":
            value = reference_beta(value, args.get("beta_map"))
        elif name == "mode":
            value = FUSION_MODES[value - 1]
        kwargs[name] = value
    out = getattr(reference, op.name)(**kwargs)
    return out if isinstance(out, tuple) else (out,)


class _Rule:
    """The autograd rule of forward op `op`: saves the tensor inputs and the outputs its backward op takes,
    marks op.nondiff outputs non-differentiable, and computes the gradients of op.grads."""

    def __init__(self, namespace: str, op: Op, shortcut: Callable | None = None) -> None:
        self.ns, self.op, self.shortcut = getattr(torch.ops, namespace), op, shortcut
        self.back = OPS_BY_NAME[op.backward]
        self.saved_inputs = op.tensor_inputs
        self.saved_outputs = tuple(o for o in op.outputs if o in self.back.input_names)
        self.grad_index = [op.input_names.index(g) for g in op.grads]
        self.outputs_used = [i for i, o in enumerate(op.outputs) if o in op.differentiable_outputs]

    def setup_context(self, ctx, inputs, output) -> None:
        outputs = output if isinstance(output, tuple) else (output,)
        named = dict(zip(self.op.outputs, outputs))
        ctx.constants = {n: v for n, v in zip(self.op.input_names, inputs) if n not in self.saved_inputs}
        nondiff = [named[o] for o in self.op.nondiff]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        tensors = dict(zip(self.op.input_names, inputs))
        ctx.save_for_backward(*(tensors[n] for n in self.saved_inputs), *(named[o] for o in self.saved_outputs))

    def backward(self, ctx, *grad_outputs):
        op = self.op
        n_inputs = len(op.inputs)
        args = dict(ctx.constants)
        saved = dict(zip(self.saved_inputs + self.saved_outputs, ctx.saved_tensors))
        args.update((n, saved[n]) for n in self.saved_inputs)
        grads_out = dict(zip(op.outputs, grad_outputs))
        needed = [bool(ctx.needs_input_grad[i]) for i in self.grad_index]
        if all(grads_out[o] is None for o in op.differentiable_outputs) or not any(needed):
            return (None,) * n_inputs
        if torch.is_grad_enabled():
            def fn(*xs):
                return reference_call(op, {**args, **dict(zip(op.grads, xs))})

            grads = _graph_gradients(fn, [args[g] for g in op.grads], needed,
                                     [grads_out[o] for o in op.differentiable_outputs])
        else:
            grads = self.shortcut(self, args, saved, grads_out, needed) if self.shortcut else None
            if grads is None:
                values = {**op.backward_args, **args, **{o: saved[o] for o in self.saved_outputs},
                          **{f"grad_{o}": g for o, g in grads_out.items()}}
                out = getattr(self.ns, self.back.name)(*(values.get(n) for n in self.back.input_names))
                grads = out if isinstance(out, tuple) else (out,)
        result = [None] * n_inputs
        for index, grad, need in zip(self.grad_index, grads, needed):
            result[index] = grad if need else None
        return tuple(result)


def _head_without_logits(rule: _Rule, args: dict, saved: dict, grads_out: dict, needed: list[bool]):
    """decafa_head when only image and embedding need gradients: the saved M is all they need, so the fusion
    backward runs alone and the logits are not read."""
    need = dict(zip(rule.op.grads, needed))
    if need["logits"] or need["beta_map"]:
        return None
    if grads_out["fused"] is None:
        return None, None, None, None
    gi, ge, _ = rule.ns.fuse_backward(grads_out["fused"], args["image"], args["embedding"], saved["mask"],
                                      args["mode"])
    return None, gi, ge, None


# Optional faster paths of the fused backward for some patterns of needed gradients (not needed to add an op).
_SHORTCUTS: dict[str, Callable] = {"decafa_head": _head_without_logits}


def _no_derivative(namespace: str, name: str) -> Callable:
    """The backward ops have no derivative of their own (the forward ops' double backward differentiates the
    reference formulation instead), so differentiating one, or feeding it dual tensors, raises."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{namespace}::{name} has no derivative of its own: differentiate the decafa_fast.ops function "
            f"(its backward with create_graph=True runs a differentiable formulation) or decafa_fast.reference"
        )
    return backward


def register_autograd(namespace: str) -> None:
    """Registers the autograd of every op of the table in `namespace` (whose ops already exist)."""
    for op in OPS:
        qualname = f"{namespace}::{op.name}"
        if op.backward is None:
            _register(qualname, _no_derivative(namespace, op.name), setup_context=lambda ctx, inputs, output: None)
        else:
            rule = _Rule(namespace, op, _SHORTCUTS.get(op.name))
            _register(qualname, rule.backward, setup_context=rule.setup_context)
