"""`decafa-fast export --format onnx`: a checkpoint as an ONNX model made of standard operators only.

    decafa-fast export --format onnx --checkpoint runs/decafa.pt --out decafa.onnx

The fused landmark-attention head (a custom op in the C++ / CUDA / Triton backends) is exported through the
"reference" backend, i.e. as its plain-PyTorch definition, which the exporter decomposes into ONNX Softmax,
ReduceSum, Mul, MatMul and Concat nodes (the reference sums row and column marginals, which keeps the float32
soft-argmax within ~1e-4 px of float64). The graph has one input, "images" (B, 1, S, S) float32 in [0, 1]
with a dynamic batch B, and one output per markup, "landmarks_<markup>" (B, L, 2): the last stage's (x, y)
pixel coordinates on the input. After writing the file the command runs it with onnxruntime on a few
synthetic faces and prints the largest coordinate difference from PyTorch (it must stay below --atol).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import ops
from .errors import Interrupted
from .files import WriteError, write_atomically

__all__ = ["LastStage", "check_onnx", "export_onnx", "soft_argmax_standard", "standard_ops"]


class LastStage(nn.Module):
    """Wraps DeCaFA to return only the last stage's coordinates, one tensor per markup."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(images)[-1])


def soft_argmax_standard(logits: torch.Tensor, beta: float = 1.0, normalized: bool = False) -> torch.Tensor:
    """Soft-argmax from standard ops, accurate in float32: logits (B, L, H, W) -> z (B, L, 2).

    Same value as `reference.soft_argmax`, computed as softmax, then the column and row marginals (sums
    of H or W terms), then the expectation of coordinates centred on the map, which keeps a flat 128 x 128
    float32 map within ~1e-5 px of float64 (the reference's uncentred marginals: below 1e-4 px, which the
    export accepts: it runs the reference backend, see `standard_ops`).
    """
    b, l, h, w = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    phi = torch.softmax(logits.to(acc).reshape(b, l, h * w) * beta, dim=-1).reshape(b, l, h, w)
    z = []
    for marginal, n in ((phi.sum(dim=2), w), (phi.sum(dim=3), h)):  # x from columns, y from rows
        # the reference's coordinates: 0..n-1, or linspace(-1, 1, n) when normalized (a one-pixel axis is 0)
        first, last = ((-1.0, 1.0) if n > 1 else (0.0, 0.0)) if normalized else (0.0, float(n - 1))
        centre = (first + last) / 2
        offsets = torch.linspace(first - centre, last - centre, n, device=logits.device, dtype=acc)
        z.append((marginal * offsets).sum(-1) / marginal.sum(-1) + centre)
    return torch.stack(z, dim=-1).to(logits.dtype)


def standard_ops() -> contextlib.AbstractContextManager[str]:
    """Inside the block, this context's calls to decafa_fast.ops run the "reference" backend: plain-PyTorch
    code that the ONNX exporter turns into standard operators. Scoped to the context, a thread or an asyncio
    task (`ops.use_backend`): nothing is replaced, so overlapping or concurrent exports and other threads'
    and tasks' ops are unaffected."""
    return ops.use_backend("reference")


def export_onnx(model: nn.Module, path: str | Path, opset: int = 18, batch: int = 2) -> Path:
    """Export `model` (a DeCaFA) to `path` with a dynamic batch size; returns the path. The exporter writes into a
    temporary folder; the file then replaces `path` atomically (a failed write names `path`, see files.py)."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"--out {str(path)!r} is a folder; name the ONNX file to write, e.g. "
                         f"{str(path / 'decafa.onnx')!r}")
    config = model.config
    wrapper = LastStage(model).eval()
    example = torch.rand(batch, config.image_channels, config.image_size, config.image_size)
    names = [f"landmarks_{m}" for m in config.markups]
    log = io.StringIO()  # the exporter narrates its steps on stdout; keep them for when it fails
    with tempfile.TemporaryDirectory(prefix="decafa-export-") as folder:
        scratch = Path(folder) / path.name
        _export(wrapper, example, scratch, names, opset, log)
        data = scratch.read_bytes()
    return write_atomically(path, data, what="ONNX model")


def _export(wrapper: nn.Module, example: torch.Tensor, scratch: Path, names: list[str], opset: int,
            log: io.StringIO) -> None:
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notices are irrelevant here
    try:
        with standard_ops(), warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")  # the exporter's own deprecation / torchvision notices
            torch.onnx.export(
                wrapper, (example,), str(scratch), input_names=["images"], output_names=names, opset_version=opset,
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
                external_data=False, verbose=False,
            )
    except Exception:
        print(log.getvalue())
        raise
    finally:
        onnx_logger.setLevel(level)


def check_onnx(model: nn.Module, path: str | Path, images: torch.Tensor,
               exported_ops: bool = True) -> dict[str, float]:
    """Run the ONNX file with onnxruntime and the model in PyTorch on `images` (B, C, S, S); returns
    {output name: max |difference|} in pixels. PyTorch runs the exported computation (`standard_ops`), or,
    with exported_ops=False, the current decafa_fast.ops backend. Also checks that the graph uses standard
    ONNX operators only."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(path))
    custom = sorted({f"{n.domain}::{n.op_type}" for n in graph.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        raise RuntimeError(f"{path} uses non-standard operators: {custom}")
    onnx.checker.check_model(graph)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.float().cpu().numpy()})
    with torch.inference_mode(), standard_ops() if exported_ops else contextlib.nullcontext():
        expected = LastStage(model).eval()(images.float().to(next(model.parameters()).device))
    names = [o.name for o in session.get_outputs()]
    return {name: float(np.abs(g - e.cpu().numpy()).max()) for name, g, e in zip(names, got, expected)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default %(default)s)")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint (decafa-fast train)")
    parser.add_argument("--out", default="decafa.onnx", help="output file (default %(default)s)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default %(default)s)")
    parser.add_argument("--check-batch", type=int, default=3, help="synthetic faces for the onnxruntime check")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest coordinate difference allowed (pixels)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def run(args: argparse.Namespace) -> int:
    from .model.checkpoint import load_model

    try:
        model, config = load_model(args.checkpoint, map_location="cpu")
        path = export_onnx(model, args.out, opset=args.opset)
    except KeyboardInterrupt as interrupt:
        raise Interrupted(f"nothing was written ({args.out} appears only once the export is complete)") from interrupt
    size_mb = path.stat().st_size / 2**20
    outputs = ", ".join(f"landmarks_{m} (B, {n}, 2)" for m, n in zip(config.markups, config.n_points))
    print(f"wrote {path} ({size_mb:.1f} MiB, opset {args.opset}): input images (B, {config.image_channels}, "
          f"{config.image_size}, {config.image_size}), outputs {outputs}")
    try:
        return _check(args, model, config, path)
    except KeyboardInterrupt as interrupt:
        raise Interrupted(f"kept {path}; its onnxruntime check did not finish") from interrupt


def _check(args: argparse.Namespace, model: nn.Module, config, path: Path) -> int:
    from .data.synthetic import SyntheticFaces

    if args.no_check:
        return 0
    faces = SyntheticFaces(args.check_batch, size=config.image_size, seed=12345)
    images = torch.stack([faces[i]["image"] for i in range(len(faces))])
    if config.image_channels != 1:
        images = images.expand(-1, config.image_channels, -1, -1)
    diffs = check_onnx(model, path, images)
    backend_diffs = check_onnx(model, path, images, exported_ops=False)
    backend = ops.get_backend()
    if backend == "auto":  # what "auto" runs on the CPU
        backend = "cpp" if ops.backends().get("cpp", "").startswith("available") else "reference"
    worst = max(diffs.values())
    for name, d in diffs.items():
        print(f"  onnxruntime vs PyTorch, {name}: max |difference| = {d:.3g} px "
              f"(vs the {backend!r} ops backend: {backend_diffs[name]:.3g} px)")
    if not worst < args.atol:
        print(f"FAILED: max difference {worst:.3g} px is not below {args.atol:g} px")
        return 1
    print(f"OK: max coordinate difference {worst:.3g} px < {args.atol:g} px (batch {len(images)}, float32)")
    return 0
