"""The op table: every compiled op described once, by its name, inputs, outputs, the inputs that take gradients,
the op that computes them and its fake (shape) rule; with one table of tensor arguments (rank and shape) by name.

Derived from it: the schemas (`schemas.SCHEMAS`, defined for `decafa` by `schemas.define_schemas`), the fakes
(`fakes.FAKES`, `fakes.register_fakes`), the autograd registration (decafa_fast.ops.autograd), the Triton
registration (decafa_fast.triton.ops: the body of op `x` is its function `x`), the rank and shape wording of
the Python argument checks (decafa_fast.ops.validation) and the C++ op list from which the CPU and CUDA glue
declare and register their kernels (csrc/common/op_list.h, written by `op_list`). CONTRIBUTING.md says how to
add an op.

Conventions (the autograd registration relies on them): a backward op takes `grad_<output>` for each
differentiable output (optional when the forward op has several), then inputs and saved outputs by their names,
and returns `grad_<input>` for each input in `grads`, in the order of `grads`, except that the gradient of
`beta_map` is named `grad_beta`. `mode` is the fusion number 1..5 (F1..F5, see layout.py). `beta_map` (B, L),
when given, replaces the float `beta`. Forward ops return the per-map `stats` (B, L, 2) = (max, sum of
exp(s - max)) of s = beta * T; backward ops take them and recompute Phi = exp(s - max) / sum instead of storing
it. A leaf of the import graph: imports torch and contract.layout only.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .layout import fused_memory_format, fusion_layout

Tensor = torch.Tensor

SCHEMA_TYPES = ("Tensor", "Tensor?", "float", "int", "bool")


class TensorArg(NamedTuple):
    """A tensor argument's shape, as its checks word it: `dims` names each dimension (a number is a fixed size)."""

    dims: tuple[str, ...]

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def what(self) -> str:
        return "of shape (" + ", ".join(self.dims) + ")"


def _shape(text: str) -> TensorArg:
    return TensorArg(tuple(text.split()))


# Every tensor argument of every op, by name: one name means one shape across the ops.
TENSOR_ARGS: dict[str, TensorArg] = {
    "logits": _shape("B L H W"),
    "image": _shape("B Ci H W"),
    "embedding": _shape("B C H W"),
    "mask": _shape("B 1 H W"),
    "beta_map": _shape("B L"),
    "stats": _shape("B L 2"),
    "grad_phi": _shape("B L H W"),
    "grad_z": _shape("B L 2"),
    "grad_mask": _shape("B 1 H W"),
    "grad_fused": _shape("B Cf H W"),
}


class Arg(NamedTuple):
    name: str
    type: str  # a schema type, one of SCHEMA_TYPES


@dataclass(frozen=True)
class Op:
    """One compiled op. `grads` empty: the op has no derivative of its own (the backward ops)."""

    name: str
    inputs: tuple[Arg, ...]
    outputs: tuple[str, ...]  # every output is a Tensor
    fake: Callable
    grads: tuple[str, ...] = ()  # inputs that take gradients, in input order
    backward: str | None = None  # the op that computes them
    nondiff: tuple[str, ...] = ()  # outputs without a gradient
    backward_args: dict = field(default_factory=dict)  # values of backward arguments the op does not have

    @property
    def schema(self) -> str:
        args = ", ".join(f"{a.type} {a.name}" for a in self.inputs)
        outs = [f"Tensor {o}" for o in self.outputs]
        returns = "Tensor" if len(outs) == 1 else "(" + ", ".join(outs) + ")"
        return f"({args}) -> {returns}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.inputs)

    @property
    def tensor_inputs(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.inputs if a.type.startswith("Tensor"))

    @property
    def differentiable_outputs(self) -> tuple[str, ...]:
        return tuple(o for o in self.outputs if o not in self.nondiff)

    @property
    def public(self) -> bool:
        """A forward op, with a function of the same name in decafa_fast.ops."""
        return self.backward is not None


def grad_name(input_name: str) -> str:
    """The name of the gradient of an input, as a backward op returns it."""
    return "grad_beta" if input_name == "beta_map" else f"grad_{input_name}"


# --------------------------------------------------------------------------------------------------
# Fake (shape) rules: output shapes, dtypes and memory formats
# --------------------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype (of stats, beta_map and grad_beta): float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_like(logits: Tensor) -> Tensor:
    return logits.new_empty((*logits.shape[:2], 2), dtype=acc_dtype(logits.dtype))


def _grad_beta_like(logits: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[:2], dtype=acc_dtype(logits.dtype))


def _z_like(logits: Tensor) -> Tensor:
    return logits.new_empty((*logits.shape[:2], 2))


def _mask_like(logits: Tensor) -> Tensor:
    b, _, h, w = logits.shape
    return logits.new_empty((b, 1, h, w))


def _contiguous_like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


def _fused_like(image: Tensor, embedding: Tensor, mode: int) -> Tensor:
    channels = fusion_layout(mode, image.shape[1], embedding.shape[1]).channels
    return torch.empty(
        (image.shape[0], channels, *image.shape[2:]),
        dtype=image.dtype,
        device=image.device,
        memory_format=fused_memory_format(embedding),
    )


def spatial_softmax(logits, beta, beta_map):
    return _contiguous_like(logits), _stats_like(logits)


def spatial_softmax_backward(grad_phi, logits, stats, beta, beta_map):
    return _contiguous_like(logits), _grad_beta_like(logits)


def soft_argmax(logits, beta, beta_map, normalized):
    return _z_like(logits), _stats_like(logits)


def attention_mask(logits, beta, beta_map):
    return _mask_like(logits), _stats_like(logits)


def landmark_attention(logits, beta, beta_map, normalized):
    return _z_like(logits), _mask_like(logits), _stats_like(logits)


def landmark_attention_backward(grad_z, grad_mask, logits, stats, beta, beta_map, normalized):
    return _contiguous_like(logits), _grad_beta_like(logits)


def fuse(image, embedding, mask, mode):
    return _fused_like(image, embedding, mode)


def fuse_backward(grad_fused, image, embedding, mask, mode):
    return _contiguous_like(image), _contiguous_like(embedding), _contiguous_like(mask)


def decafa_head(logits, image, embedding, mode, beta, beta_map, normalized):
    return _z_like(logits), _fused_like(image, embedding, mode), _mask_like(logits), _stats_like(logits)


def decafa_head_backward(grad_z, grad_fused, logits, image, embedding, mask, stats, mode, beta, beta_map,
                         normalized):
    return (_contiguous_like(logits), _contiguous_like(image), _contiguous_like(embedding),
            _grad_beta_like(logits))


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def _op(fake: Callable, inputs: str, outputs: str, grads: str = "", backward: str | None = None,
        nondiff: str = "stats", **backward_args) -> Op:
    """An Op named after its fake rule. inputs: "Tensor logits, float beta, ..." as in a schema; outputs, grads
    and nondiff: names separated by spaces (a backward op has no grads, and its outputs are all gradients)."""
    args = tuple(Arg(*reversed(part.split())) for part in inputs.split(","))
    return Op(fake.__name__, args, tuple(outputs.split()), fake, tuple(grads.split()), backward,
              tuple(nondiff.split()) if backward else (), backward_args)


OPS: tuple[Op, ...] = (
    _op(spatial_softmax, "Tensor logits, float beta, Tensor? beta_map", "phi stats",
        grads="logits beta_map", backward="spatial_softmax_backward"),
    _op(spatial_softmax_backward, "Tensor grad_phi, Tensor logits, Tensor stats, float beta, Tensor? beta_map",
        "grad_logits grad_beta"),
    _op(soft_argmax, "Tensor logits, float beta, Tensor? beta_map, bool normalized", "z stats",
        grads="logits beta_map", backward="landmark_attention_backward"),
    _op(attention_mask, "Tensor logits, float beta, Tensor? beta_map", "mask stats",
        grads="logits beta_map", backward="landmark_attention_backward", normalized=False),
    _op(landmark_attention, "Tensor logits, float beta, Tensor? beta_map, bool normalized", "z mask stats",
        grads="logits beta_map", backward="landmark_attention_backward"),
    _op(landmark_attention_backward,
        "Tensor? grad_z, Tensor? grad_mask, Tensor logits, Tensor stats, float beta, Tensor? beta_map, bool normalized",
        "grad_logits grad_beta"),
    _op(fuse, "Tensor image, Tensor embedding, Tensor mask, int mode", "fused",
        grads="image embedding mask", backward="fuse_backward", nondiff=""),
    _op(fuse_backward, "Tensor grad_fused, Tensor image, Tensor embedding, Tensor mask, int mode",
        "grad_image grad_embedding grad_mask"),
    _op(decafa_head,
        "Tensor logits, Tensor image, Tensor embedding, int mode, float beta, Tensor? beta_map, bool normalized",
        "z fused mask stats", grads="logits image embedding beta_map", backward="decafa_head_backward",
        nondiff="mask stats"),
    _op(decafa_head_backward,
        "Tensor? grad_z, Tensor? grad_fused, Tensor logits, Tensor image, Tensor embedding, Tensor mask,"
        " Tensor stats, int mode, float beta, Tensor? beta_map, bool normalized",
        "grad_logits grad_image grad_embedding grad_beta"),
)

OPS_BY_NAME: dict[str, Op] = {op.name: op for op in OPS}


def check_table(ops: tuple[Op, ...] = OPS) -> None:
    """Raises ValueError where an entry breaks a convention the derived registrations rely on."""
    by_name = {op.name: op for op in ops}
    for op in ops:
        where = f"op table, {op.name}"
        for a in op.inputs:
            if a.type not in SCHEMA_TYPES:
                raise ValueError(f"{where}: input {a.name} has type {a.type!r}, not one of {SCHEMA_TYPES}")
            if a.type.startswith("Tensor") and a.name not in TENSOR_ARGS:
                raise ValueError(f"{where}: tensor input {a.name} has no entry in TENSOR_ARGS")
        params = tuple(inspect.signature(op.fake).parameters)
        if params != op.input_names:
            raise ValueError(f"{where}: the fake takes {params}, the op {op.input_names}")
        if not set(op.grads) <= set(op.tensor_inputs):
            raise ValueError(f"{where}: grads {op.grads} must be tensor inputs of {op.tensor_inputs}")
        if op.backward is None:
            continue
        back = by_name.get(op.backward)
        if back is None or back.backward is not None:
            raise ValueError(f"{where}: its backward {op.backward!r} is not a backward op of the table")
        want = tuple(grad_name(g) for g in op.grads)
        if back.outputs != want:
            raise ValueError(f"{where}: {back.name} must return {want}, returns {back.outputs}")
        known = set(op.input_names) | set(op.nondiff) | set(op.backward_args)
        for a in back.inputs:
            if a.name.startswith("grad_"):
                if a.name[5:] not in op.differentiable_outputs and a.type != "Tensor?":
                    raise ValueError(f"{where}: {back.name} takes {a.name}, not a gradient of its outputs")
                if len(op.differentiable_outputs) > 1 and a.type != "Tensor?":
                    raise ValueError(f"{where}: {back.name}'s {a.name} must be optional (Tensor?)")
            elif a.name not in known:
                raise ValueError(f"{where}: {back.name} takes {a.name}, which {op.name} neither takes nor returns")


check_table()
