"""Autograd of every compiled op: the forward saves the inputs and the per-map statistics, the backward
calls the op's fused backward kernel of the same namespace."""
from __future__ import annotations

import torch

def register_autograd(ns_name: str) -> None:
    ns = getattr(torch.ops, ns_name)
    lib = f"{ns_name}::"

    # spatial_softmax ---------------------------------------------------------------------------
    def softmax_setup(ctx, inputs, output):
        logits, beta = inputs
        ctx.beta = beta
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(logits, output[1])

    def softmax_backward(ctx, grad_phi, _grad_lse):
        logits, lse = ctx.saved_tensors
        return ns.spatial_softmax_backward(grad_phi, logits, lse, ctx.beta), None

    torch.library.register_autograd(lib + "spatial_softmax", softmax_backward, setup_context=softmax_setup)

    # soft_argmax / attention_mask / landmark_attention share one backward --------------------------
    def stats_setup(ctx, inputs, output):
        logits, beta = inputs[0], inputs[1]
        ctx.beta = beta
        ctx.normalized = inputs[2] if len(inputs) > 2 else False
        lse = output[-1]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, lse)

    def _stats_grad(ctx, grad_z, grad_mask):
        logits, lse = ctx.saved_tensors
        return ns.landmark_attention_backward(grad_z, grad_mask, logits, lse, ctx.beta, ctx.normalized)

    def soft_argmax_backward(ctx, grad_z, _grad_lse):
        return _stats_grad(ctx, grad_z, None), None, None

    def attention_mask_backward(ctx, grad_mask, _grad_lse):
        return _stats_grad(ctx, None, grad_mask), None

    def landmark_attention_backward(ctx, grad_z, grad_mask, _grad_lse):
        return _stats_grad(ctx, grad_z, grad_mask), None, None

    torch.library.register_autograd(lib + "soft_argmax", soft_argmax_backward, setup_context=stats_setup)
    torch.library.register_autograd(lib + "attention_mask", attention_mask_backward, setup_context=stats_setup)
    torch.library.register_autograd(
        lib + "landmark_attention", landmark_attention_backward, setup_context=stats_setup
    )

    # fuse -------------------------------------------------------------------------------------------
    def fuse_setup(ctx, inputs, output):
        image, embedding, mask, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(image, embedding, mask)

    def fuse_backward(ctx, grad_fused):
        image, embedding, mask = ctx.saved_tensors
        gi, ge, gm = ns.fuse_backward(grad_fused, image, embedding, mask, ctx.mode)
        return gi, ge, gm, None

    torch.library.register_autograd(lib + "fuse", fuse_backward, setup_context=fuse_setup)

    # decafa_head ------------------------------------------------------------------------------------
    def head_setup(ctx, inputs, output):
        logits, image, embedding, mode, beta, normalized = inputs
        ctx.mode, ctx.beta, ctx.normalized = mode, beta, normalized
        lse = output[2]
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(logits, image, embedding, lse)

    def head_backward(ctx, grad_z, grad_fused, _grad_lse):
        logits, image, embedding, lse = ctx.saved_tensors
        gt, gi, ge = ns.decafa_head_backward(
            grad_z, grad_fused, logits, image, embedding, lse, ctx.mode, ctx.beta, ctx.normalized
        )
        return gt, gi, ge, None, None, None

    torch.library.register_autograd(lib + "decafa_head", head_backward, setup_context=head_setup)


