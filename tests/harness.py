"""The one harness every backend's op tests share: tolerances per dtype (values and gradients), input makers,
the set of all ops with a loss over them, and the comparison against decafa_fast.reference.

A comparison passes when, elementwise, |out - ref| <= rtol |ref| + max(atol, scaled_atol * max |ref|):
`atol` is absolute, `scaled_atol` is relative to the reference's largest magnitude (so a tensor of large
gradients is not held to the absolute error of a tensor of probabilities).

The tolerances are grouped in named profiles. A profile differs from another only for a stated reason
(what the reference is rounded to, an approximate exp in the kernels), never to let a backend pass.

Imports torch alone: the Triton tests import this after choosing the interpreter.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Tolerance:
    """|out - ref| <= rtol |ref| + max(atol, scaled_atol * max |ref|), elementwise."""

    rtol: float
    atol: float = 0.0
    scaled_atol: float = 0.0

    def atol_for(self, expected: torch.Tensor) -> float:
        scale = expected.detach().abs().max().item() if expected.numel() else 1.0
        return max(self.atol, self.scaled_atol * scale)


def _relative(tol: float) -> Tolerance:
    """rtol = tol, and atol = tol times the reference's largest magnitude (at least tol * 1e-6 absolute)."""
    return Tolerance(rtol=tol, atol=tol * 1e-6, scaled_atol=tol)


@dataclass(frozen=True)
class Profile:
    """Tolerances per dtype for values and for gradients, and why they are what they are."""

    name: str
    why: str
    values: dict[torch.dtype, Tolerance]
    grads: dict[torch.dtype, Tolerance]

    def tolerance(self, dtype: torch.dtype, grad: bool = False) -> Tolerance:
        table = self.grads if grad else self.values
        if dtype not in table:
            raise KeyError(f"profile {self.name!r} states no tolerance for {dtype}")
        return table[dtype]

    def assert_close(self, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, grad: bool = False,
                     what: str = "") -> None:
        """`actual` (a backend's output, or gradient when `grad`, in `dtype`) against `expected` (the
        reference's), compared in float64 on the CPU with this profile's tolerance for `dtype`."""
        tol = self.tolerance(dtype, grad)
        expected = expected.detach().double().cpu()
        torch.testing.assert_close(
            actual.detach().double().cpu(),
            expected,
            rtol=tol.rtol,
            atol=tol.atol_for(expected),
            msg=lambda m: f"{what} [{self.name}, {dtype}{', grad' if grad else ''}]: {m}",
        )


_ROUNDED = {
    torch.float32: _relative(1e-5),
    torch.float16: _relative(1e-2),
    torch.bfloat16: _relative(2e-2),
    torch.float64: _relative(1e-10),
}

# Compiled backends against the float32 reference rounded to the tested dtype (tests/ops). Both sides
# accumulate in float32, so what is left is summation order and the final rounding to the output dtype;
# gradients are held to the same bounds as values.
ROUNDED_REFERENCE = Profile(
    name="rounded_reference",
    why="float32 accumulation on both sides, the reference rounded to the tested dtype",
    values=_ROUNDED,
    grads=_ROUNDED,
)

# The Triton kernels against the float32 reference on the same (rounded) inputs, not rounded to the output
# dtype: the half-precision bounds include the output's own rounding (float16 keeps 11 significant bits,
# bfloat16 8). float32 values get an absolute atol; float32 gradients are looser because tl.exp lowers to an
# approximate exp2 on NVIDIA GPUs, and a gradient sums many such terms.
_TRITON_HALVES = {torch.float16: Tolerance(2e-3, 2e-3, 2e-3), torch.bfloat16: Tolerance(1.6e-2, 1e-2, 1e-2)}
TRITON_KERNELS = Profile(
    name="triton_kernels",
    why="float32 reference not rounded to the dtype; approximate exp2 on GPU",
    values={torch.float32: Tolerance(1e-5, 1e-6), **_TRITON_HALVES},
    grads={torch.float32: Tolerance(1e-4, 1e-5, 1e-5), **_TRITON_HALVES},
)

# The CUDA C++ kernels against the float64 reference rounded to the tested dtype. float32 is 10x looser
# than ROUNDED_REFERENCE because the kernels are built with fast-math exp (__expf); halves as there.
_CUDA = {**_ROUNDED, torch.float32: Tolerance(rtol=1e-4, atol=1e-11, scaled_atol=1e-5)}
CUDA_FAST_MATH = Profile(
    name="cuda_fast_math",
    why="float64 reference rounded to the dtype; fast-math exp in the kernels",
    values=_CUDA,
    grads=_CUDA,
)


def make_inputs(b: int, l: int, h: int, w: int, ci: int = 1, c: int = 3, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", seed: int = 0, logit_scale: float = 3.0,
                signed_image: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits T (B, L, H, W) ~ logit_scale * N(0, 1), image I (B, Ci, H, W) ~ U[0, 1) (N(0, 1) when
    `signed_image`), embedding E (B, C, H, W) ~ N(0, 1); drawn in float32 on the CPU from `seed`, then cast."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, l, h, w, generator=g) * logit_scale
    image = (torch.randn if signed_image else torch.rand)(b, ci, h, w, generator=g)
    embedding = torch.randn(b, c, h, w, generator=g)
    return tuple(t.to(dtype).to(device) for t in (logits, image, embedding))


def opcheck_args(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 per_map_beta: bool = False, channels_last: bool = False, seed: int = 9) -> dict[str, tuple]:
    """Valid arguments of every raw op of the op contract (decafa_fast/contract/schemas.py) at a tiny shape (B 2,
    L 3, 4 x 5, Ci 1, C 2), for torch.library.opcheck: fuse in F4, the head in F5, stats computed as the
    contract defines them. per_map_beta: every op that takes beta also gets a (B, L) beta_map.
    channels_last: the forward ops get a channels_last embedding (F must follow its memory format)."""
    t, i, e = make_inputs(2, 3, 4, 5, ci=1, c=2, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    beta = 0.7
    beta_map = (torch.rand(2, 3, generator=g) + 0.5).to(acc).to(device) if per_map_beta else None
    s = t.to(acc).flatten(2) * (beta if beta_map is None else beta_map[..., None])
    top = s.max(-1).values
    stats = torch.stack([top, (s - top[..., None]).exp().sum(-1)], -1)
    mask = torch.rand(2, 1, 4, 5, generator=g).to(dtype).to(device)
    grad_z = randn(2, 3, 2)
    e_forward = e.contiguous(memory_format=torch.channels_last) if channels_last else e
    return {
        "spatial_softmax": (t, beta, beta_map),
        "spatial_softmax_backward": (randn(2, 3, 4, 5), t, stats, beta, beta_map),
        "soft_argmax": (t, beta, beta_map, True),
        "attention_mask": (t, beta, beta_map),
        "landmark_attention": (t, beta, beta_map, False),
        "landmark_attention_backward": (grad_z, randn(2, 1, 4, 5), t, stats, beta, beta_map, True),
        "fuse": (i, e_forward, mask, 4),
        "fuse_backward": (randn(2, 4, 4, 5), i, e, mask, 4),
        "decafa_head": (t, i, e_forward, 5, beta, beta_map, True),
        "decafa_head_backward": (grad_z, randn(2, 6, 4, 5), t, i, e, mask, stats, 5, beta, beta_map, False),
    }


def reference_copies(tensors: Iterable[torch.Tensor], dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Copies in the reference's dtype: the reference runs on the same (already rounded) inputs as the kernels."""
    return tuple(t.detach().to(dtype) for t in tensors)


def all_ops(impl: ModuleType, logits: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor, mode: str,
            beta: float, normalized: bool) -> dict[str, torch.Tensor]:
    """Every public op of `impl` (decafa_fast.ops or decafa_fast.reference) on one set of inputs; the fusion
    uses the mask of landmark_attention."""
    la_z, la_mask = impl.landmark_attention(logits, beta, normalized)
    head_z, head_fused = impl.decafa_head(logits, image, embedding, mode, beta, normalized)
    return {
        "phi": impl.spatial_softmax(logits, beta),
        "z": impl.soft_argmax(logits, beta, normalized),
        "mask": impl.attention_mask(logits, beta),
        "la_z": la_z,
        "la_mask": la_mask,
        "fused": impl.fuse(image, embedding, la_mask, mode),
        "head_z": head_z,
        "head_fused": head_fused,
    }


def weighted_loss(outputs: dict | Sequence[torch.Tensor]) -> torch.Tensor:
    """A float32 loss that gives every output a different, non-uniform gradient (a ramp times its position)."""
    values = outputs.values() if isinstance(outputs, dict) else outputs
    total = 0
    for i, t in enumerate(values):
        w = torch.linspace(-1, 1, t.numel(), device=t.device, dtype=torch.float32).reshape(t.shape)
        total = total + ((i + 1) * w * t.float()).sum()
    return total


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], seed: int = 1
                      ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
    """fn's outputs and the gradients of sum(out * N(0, 1) weights drawn from `seed`) with respect to each
    input (zeros for an input the outputs do not depend on)."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*xs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return outs, [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, xs)]


def grad_or_zeros(leaf: torch.Tensor) -> torch.Tensor:
    """A leaf's gradient, or zeros where the loss does not depend on it (F1 uses no image)."""
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
