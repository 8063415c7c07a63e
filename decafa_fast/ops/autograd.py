"""Autograd of every compiled op (the op contract), registered for each namespace (`decafa`, `decafa_triton`).

The forward saves the inputs, the per-map stats and, for the head, the mask M (all small beside the
inputs; Phi is never stored). Plain reverse mode (`.backward()`, grad mode off inside the backward) calls
the op's fused backward kernel of the same namespace, and skips what `ctx.needs_input_grad` says nobody
needs. A backward that builds a graph (create_graph=True: double backward, gradient penalties,
gradgradcheck) instead differentiates the reference formulation on the saved inputs, so gradients of any
order are exact on every backend. A tensor beta reaches the op as `beta_map` (B, L) and gets grad_beta.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch._library.autograd
import torch._library.custom_ops
import torch._library.utils
import torch.autograd.forward_ad as _forward_ad

from .. import reference
from ..contract.layout import FUSION_MODES
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




def _has_tangent(args) -> bool:
    return _forward_ad._current_level >= 0 and any(
        isinstance(a, Tensor) and _forward_ad.unpack_dual(a).tangent is not None for a in args
    )


_LIBRARIES: dict[str, torch.library.Library] = {}


def _register(qualname: str, backward: Callable, setup_context: Callable) -> None:
    """torch.library.register_autograd, plus a clear error for forward-mode AD (torch.autograd.forward_ad,
    torch.func.jvp/jacfwd) on the raw op: torch would silently drop the tangent when no input requires grad.
    The public decafa_fast.ops functions run the reference formulation there instead.
    Ops made by torch.library.custom_op / triton_op (decafa_triton) get the same guard around their kernel."""
    try:  # torch's own autograd kernel maker (private): the guard below wraps it
        opdef = torch._library.custom_ops._maybe_get_opdef(qualname)
        make_kernel, info = torch._library.autograd.make_autograd_impl, torch._library.autograd.Info
    except AttributeError:  # another torch: the plain registration (forward AD then is torch's behaviour)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return
    op = torch._library.utils.lookup_op(qualname)
    if isinstance(opdef, torch._library.custom_ops.CustomOpDef):
        # custom_op / triton_op (decafa_triton): its own registration, then its kernel replaced by the guarded one
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        kernel, lib = make_kernel(op, opdef), opdef._lib
    else:
        kernel, lib = make_kernel(op, info(backward, setup_context)), None
    namespace, name = qualname.split("::")
    public = f"decafa_fast.ops.{name}" if not name.endswith("_backward") else "decafa_fast.ops"

    def autograd_kernel(keyset, *args, **kwargs):
        if _has_tangent(args):
            raise RuntimeError(
                f"{qualname} has no forward-mode AD (jvp) rule: call {public}, which runs the reference "
                f"formulation under forward-mode AD and torch.func transforms, or decafa_fast.reference"
            )
        return kernel(keyset, *args, **kwargs)

    if lib is None:
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


def register_autograd(namespace: str) -> None:
    ns = getattr(torch.ops, namespace)
    lib = f"{namespace}::"

    # spatial_softmax(logits, beta, beta_map) -> (phi, stats) ----------------------------------------------
    def softmax_setup(ctx, inputs, output):
        logits, beta, beta_map = inputs
        ctx.beta = beta
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, output[1], beta_map)

    def softmax_backward(ctx, grad_phi, _grad_stats):
        logits, stats, beta_map = ctx.saved_tensors
        need_t, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if grad_phi is None or not (need_t or need_b):
            return None, None, None
        if torch.is_grad_enabled():
            gt, gb = _graph_gradients(
                lambda t, bm: (reference.spatial_softmax(t, reference_beta(ctx.beta, bm)),),
                (logits, beta_map), (need_t, need_b), (grad_phi,))
        else:
            gt, gb = ns.spatial_softmax_backward(grad_phi, logits, stats, ctx.beta, beta_map)
        return (gt if need_t else None), None, (gb if need_b else None)

    _register(lib + "spatial_softmax", softmax_backward, setup_context=softmax_setup)

    # soft_argmax / attention_mask / landmark_attention share one backward -------------------------------
    def stats_setup(ctx, inputs, output):
        logits, beta, beta_map = inputs[:3]
        ctx.beta = beta
        ctx.normalized = inputs[3] if len(inputs) > 3 else False
        ctx.n_inputs = len(inputs)
        stats = output[-1]
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, stats, beta_map)

    def stats_grad(ctx, grad_z, grad_mask):
        logits, stats, beta_map = ctx.saved_tensors
        need_t, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        nothing = (None,) * ctx.n_inputs
        if (grad_z is None and grad_mask is None) or not (need_t or need_b):
            return nothing
        if torch.is_grad_enabled():
            gt, gb = _graph_gradients(
                lambda t, bm: reference.landmark_attention(t, reference_beta(ctx.beta, bm), ctx.normalized),
                (logits, beta_map), (need_t, need_b), (grad_z, grad_mask))
        else:
            gt, gb = ns.landmark_attention_backward(grad_z, grad_mask, logits, stats, ctx.beta, beta_map,
                                                    ctx.normalized)
        return ((gt if need_t else None), None, (gb if need_b else None)) + nothing[3:]

    def soft_argmax_backward(ctx, grad_z, _grad_stats):
        return stats_grad(ctx, grad_z, None)

    def attention_mask_backward(ctx, grad_mask, _grad_stats):
        return stats_grad(ctx, None, grad_mask)

    def landmark_attention_backward(ctx, grad_z, grad_mask, _grad_stats):
        return stats_grad(ctx, grad_z, grad_mask)

    _register(lib + "soft_argmax", soft_argmax_backward, setup_context=stats_setup)
    _register(lib + "attention_mask", attention_mask_backward, setup_context=stats_setup)
    _register(lib + "landmark_attention", landmark_attention_backward, setup_context=stats_setup)

    # fuse(image, embedding, mask, mode) -> fused ------------------------------------------------------------
    def fuse_setup(ctx, inputs, output):
        image, embedding, mask, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(image, embedding, mask)

    def fuse_backward(ctx, grad_fused):
        image, embedding, mask = ctx.saved_tensors
        needed = ctx.needs_input_grad[:3]
        if grad_fused is None or not any(needed):
            return None, None, None, None
        if torch.is_grad_enabled():
            grads = _graph_gradients(
                lambda i, e, m: (reference.fuse(i, e, m, FUSION_MODES[ctx.mode - 1]),),
                (image, embedding, mask), needed, (grad_fused,))
        else:
            grads = ns.fuse_backward(grad_fused, image, embedding, mask, ctx.mode)
        return tuple(g if need else None for g, need in zip(grads, needed)) + (None,)

    _register(lib + "fuse", fuse_backward, setup_context=fuse_setup)

    # decafa_head(logits, image, embedding, mode, beta, beta_map, normalized) -> (z, fused, mask, stats) -----
    def head_setup(ctx, inputs, output):
        logits, image, embedding, mode, beta, beta_map, normalized = inputs
        ctx.mode, ctx.beta, ctx.normalized = mode, beta, normalized
        _z, _fused, mask, stats = output
        ctx.mark_non_differentiable(mask, stats)
        ctx.save_for_backward(logits, image, embedding, mask, stats, beta_map)

    def head_backward(ctx, grad_z, grad_fused, _grad_mask, _grad_stats):
        logits, image, embedding, mask, stats, beta_map = ctx.saved_tensors
        n = ctx.needs_input_grad
        need_t, need_i, need_e, need_b = n[0], n[1], n[2], n[5]
        if (grad_z is None and grad_fused is None) or not (need_t or need_i or need_e or need_b):
            return (None,) * 7
        if torch.is_grad_enabled():
            gt, gi, ge, gb = _graph_gradients(
                lambda t, i, e, bm: reference.decafa_head(t, i, e, FUSION_MODES[ctx.mode - 1],
                                                          reference_beta(ctx.beta, bm), ctx.normalized),
                (logits, image, embedding, beta_map), (need_t, need_i, need_e, need_b), (grad_z, grad_fused))
        elif not (need_t or need_b):
            # image / embedding only: the saved M is all they need, the logits are not read
            if grad_fused is None:
                return (None,) * 7
            gt, gb = None, None
            gi, ge, _ = ns.fuse_backward(grad_fused, image, embedding, mask, ctx.mode)
        else:
            gt, gi, ge, gb = ns.decafa_head_backward(grad_z, grad_fused, logits, image, embedding, mask, stats,
                                                     ctx.mode, ctx.beta, beta_map, ctx.normalized)
        return ((gt if need_t else None), (gi if need_i else None), (ge if need_e else None), None, None,
                (gb if need_b else None), None)

    _register(lib + "decafa_head", head_backward, setup_context=head_setup)

    # The backward ops: no derivative of their own (the forward ops' double backward differentiates the
    # reference formulation instead), so differentiating one, or feeding it dual tensors, raises.
    def no_derivative(name):
        def backward(ctx, *grads):
            raise RuntimeError(
                f"{namespace}::{name} has no derivative of its own: differentiate the decafa_fast.ops function "
                f"(its backward with create_graph=True runs a differentiable formulation) or decafa_fast.reference"
            )
        return backward

    for name in ("spatial_softmax_backward", "landmark_attention_backward", "fuse_backward",
                 "decafa_head_backward"):
        _register(lib + name, no_derivative(name), setup_context=lambda ctx, inputs, output: None)
