"""Every call decafa_fast makes to a private torch API (torch._C, torch._library), in one place.

torch does not promise these across releases, so each is reached only from here (some with a fallback where
torch lacks them), and tests/ops/test_torch_private.py checks each against the running torch: PRIVATE_APIS
lists them and CHECKED_ON the torch versions (major.minor) on which that test passed. A torch outside CHECKED_ON fails
the test until someone has run it there and added the version. Imports torch only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad

CHECKED_ON = ("2.11", "2.13")  # 2.11: CI runs tests/ops there too (.ci/ops-on-torch.sh)

# The dotted names this module reaches, each with the wrapper that uses it (autograd_kernel also reads the
# instance attribute CustomOpDef._lib, which test_autograd_kernel_of_a_custom_op exercises).
PRIVATE_APIS: dict[str, str] = {
    "torch._C._functorch.peek_interpreter_stack": "in_functorch_transform",
    "torch._C._dispatch_has_kernel_for_dispatch_key": "has_kernel",
    "torch._library.triton.is_wrap_triton_enabled": "is_wrap_triton_enabled",
    "torch._library.custom_ops._maybe_get_opdef": "autograd_kernel",
    "torch._library.custom_ops.CustomOpDef": "autograd_kernel",
    "torch._library.autograd.make_autograd_impl": "autograd_kernel",
    "torch._library.autograd.Info": "autograd_kernel",
    "torch._library.utils.lookup_op": "autograd_kernel",
    "torch.autograd.forward_ad._current_level": "has_tangent",
}


def resolve(dotted: str):
    """The object at a dotted name under torch (importing submodules on the way), or None when torch lacks it."""
    import importlib

    parts = dotted.split(".")
    obj = torch
    for n, part in enumerate(parts[1:], 2):
        if not hasattr(obj, part):
            try:
                importlib.import_module(".".join(parts[:n]))
            except ImportError:
                return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def in_functorch_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, jacfwd, vmap, jvp) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def has_tangent(tensors) -> bool:
    """Whether any of `tensors` (None and non-tensors skipped) is a dual tensor of forward-mode AD."""
    if torch.autograd.forward_ad._current_level < 0:  # no dual level entered: the common case, no unpacking
        return False
    return any(isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether op `qualname` ("ns::name") has a kernel registered for `dispatch_key` ("CUDA", "CPU")."""
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key))


_WRAP_TRITON_ENABLED = resolve("torch._library.triton.is_wrap_triton_enabled")


def is_wrap_triton_enabled() -> bool:
    """torch's switch for tracing Triton kernels through wrap_triton; True on a torch without the switch."""
    return True if _WRAP_TRITON_ENABLED is None else bool(_WRAP_TRITON_ENABLED())


def autograd_kernel(qualname: str, backward: Callable, setup_context: Callable):
    """torch's own Autograd kernel for op `qualname` with this backward and setup_context, as
    torch.library.register_autograd builds it, for a caller that wraps it: (kernel, lib, is_custom_op).
    For an op made by torch.library.custom_op / triton_op the backward is registered on the op first and `lib`
    is the op's own library; for an op defined from a schema `lib` is None. None when torch lacks the pieces."""
    pieces = [resolve(name) for name in (
        "torch._library.custom_ops._maybe_get_opdef", "torch._library.autograd.make_autograd_impl",
        "torch._library.autograd.Info", "torch._library.utils.lookup_op", "torch._library.custom_ops.CustomOpDef")]
    if any(p is None for p in pieces):
        return None
    get_opdef, make_kernel, info, lookup_op, custom_op_def = pieces
    opdef, op = get_opdef(qualname), lookup_op(qualname)
    if isinstance(opdef, custom_op_def):
        torch.library.register_autograd(qualname, backward, setup_context=setup_context)
        return make_kernel(op, opdef), opdef._lib, True
    return make_kernel(op, info(backward, setup_context)), None, False
