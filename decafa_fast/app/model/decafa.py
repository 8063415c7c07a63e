"""DeCaFA: a cascade of full-resolution U-Net stages joined by landmark-attention fusion (paper section 3).

Stage i maps its input I_i to an embedding E_i; K transfer layers give landmark logits T_i^k per markup;
soft-argmax of each gives z_i^k. Between stages, the attention mask M_i (the sum of the spatial softmax
maps of markup k0) fuses the original image I and E_i into the next stage's input (F1-F5, eqs. 4-8).
`decafa_fast.ops.decafa_head` does softmax + moments + mask + fusion in one op, so the model does not
care which ops backend runs.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ... import ops
from ...ops import FUSION_MODES
from ...reference import fused_channels
from ..data.markups import get_markup
from .transfer import TRANSFER_MODES, TransferLayers
from .unet import UNet

__all__ = ["DeCaFAConfig", "DeCaFA", "LAMBDA_SCHEMES", "stage_lambdas"]

LAMBDA_SCHEMES = ("increasing", "constant", "decreasing")


def stage_lambdas(lambdas: str | list[float] | tuple[float, ...], stages: int) -> list[float]:
    """Per-stage loss weights: "increasing" 1/2^(S-1) .. 1/4, 1/2, 1; "constant" all 1; "decreasing" the
    reverse of increasing; or an explicit list of S weights."""
    if isinstance(lambdas, str):
        if lambdas not in LAMBDA_SCHEMES:
            raise ValueError(f"lambdas must be one of {LAMBDA_SCHEMES} or a list of {stages} floats, got {lambdas!r}")
        inc = [2.0 ** -(stages - 1 - i) for i in range(stages)]
        return {"increasing": inc, "constant": [1.0] * stages, "decreasing": inc[::-1]}[lambdas]
    values = [float(v) for v in lambdas]
    if len(values) != stages:
        raise ValueError(f"lambdas must have one weight per stage ({stages}), got {len(values)}")
    if any(v < 0 for v in values):
        raise ValueError(f"lambdas must be non-negative, got {values}")
    return values


@dataclass
class DeCaFAConfig:
    """Model hyper-parameters; the defaults are the paper's (S = 4, 98/68/5 chained, F5, increasing)."""

    stages: int = 4
    markups: tuple[str, ...] = ("wflw98", "300w68", "celeba5")
    transfer: str = "chained"
    fusion: str = "F5"
    lambdas: str | tuple[float, ...] = "increasing"
    attention_markup: int = 0  # k0: index into `markups` of the markup whose maps form the mask
    image_channels: int = 1
    image_size: int = 128
    embedding_channels: int = 64
    widths: tuple[int, int, int] = (64, 128, 256)
    beta: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.markups, str) or isinstance(self.widths, str):
            raise ValueError(f"markups and widths must be lists, got {self.markups!r} and {self.widths!r}")
        self.markups = tuple(self.markups)
        if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in self.widths):
            raise ValueError(f"widths must be three integers, got {list(self.widths)}")
        self.widths = tuple(int(w) for w in self.widths)
        if not isinstance(self.lambdas, str):
            self.lambdas = tuple(float(v) for v in self.lambdas)
        self.validate()

    def validate(self) -> None:
        for name in ("stages", "attention_markup", "image_channels", "image_size", "embedding_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real):
            raise ValueError(f"beta must be a number, got {self.beta!r}")
        if self.stages < 1:
            raise ValueError(f"stages must be a positive int, got {self.stages!r}")
        if not self.markups:
            raise ValueError("markups must name at least one markup")
        counts = [get_markup(m).n_points for m in self.markups]
        if len(set(self.markups)) != len(self.markups):
            raise ValueError(f"markups must be distinct, got {self.markups}")
        if self.transfer == "chained" and counts != sorted(counts, reverse=True):
            raise ValueError(f"chained transfer needs markups in decreasing landmark count, got {self.markups}")
        if self.transfer not in TRANSFER_MODES:
            raise ValueError(f"transfer must be one of {TRANSFER_MODES}, got {self.transfer!r}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        stage_lambdas(self.lambdas, self.stages)
        if not 0 <= self.attention_markup < len(self.markups):
            raise ValueError(f"attention_markup must index markups (0..{len(self.markups) - 1}), "
                             f"got {self.attention_markup}")
        if self.image_channels < 1 or self.image_size < 4 or self.embedding_channels < 1:
            raise ValueError("image_channels, embedding_channels must be >= 1 and image_size >= 4")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths must be three positive ints, got {self.widths}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")

    @property
    def n_points(self) -> tuple[int, ...]:
        return tuple(get_markup(m).n_points for m in self.markups)

    def stage_lambdas(self) -> list[float]:
        return stage_lambdas(self.lambdas, self.stages)

    def to_dict(self) -> dict:
        """Plain python types only (lists for tuples), safe for torch.load(weights_only=True) and JSON."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> DeCaFAConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DeCaFAConfig keys: {sorted(unknown)}")
        return cls(**d)


class DeCaFA(nn.Module):
    """images (B, image_channels, H, W) -> list over stages of list over markups of z (B, L_k, 2).

    z is in pixel coordinates of the input: x = column, y = row, 0-based.
    """

    def __init__(self, config: DeCaFAConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else DeCaFAConfig()
        c = config.embedding_channels
        fused = fused_channels(config.fusion, config.image_channels, c)
        self.stages = nn.ModuleList(
            UNet(config.image_channels if i == 0 else fused, c, config.widths) for i in range(config.stages)
        )
        self.transfers = nn.ModuleList(
            TransferLayers(c, config.n_points, config.transfer) for _ in range(config.stages)
        )

    @property
    def markups(self) -> tuple[str, ...]:
        return self.config.markups

    def forward(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        cfg = self.config
        if images.dim() != 4 or images.shape[1] != cfg.image_channels:
            raise ValueError(
                f"images must have shape (B, {cfg.image_channels}, H, W), got {tuple(images.shape)}"
            )
        x = images
        outputs: list[list[torch.Tensor]] = []
        for i, (unet, transfer) in enumerate(zip(self.stages, self.transfers)):
            embedding = unet(x)
            last = i == cfg.stages - 1
            if last:
                # The last stage's coordinates are the model's answer and go into the loss: its transfer
                # layers and soft-argmax run in float32 even under autocast (bf16 logits would cost their
                # 8-bit mantissa; a bf16 coordinate moves in 0.25-0.5 px steps at 128 px). A model whose
                # weights were cast to bf16 keeps them: its input follows the weights' dtype.
                weight_dtype = next(transfer.parameters()).dtype
                with torch.autocast(embedding.device.type, enabled=False):
                    logits = transfer(embedding.to(weight_dtype))
            else:
                logits = transfer(embedding)
            zs: list[torch.Tensor] = []
            for k, t in enumerate(logits):
                if k == cfg.attention_markup and not last:
                    # Under autocast the embedding is bf16/fp16 while the image stays fp32; the fused op
                    # wants one dtype, and the next stage's convs run in low precision anyway.
                    z, x = ops.decafa_head(t, images.to(embedding.dtype), embedding, mode=cfg.fusion, beta=cfg.beta)
                else:
                    # Coordinates in float32 (the last stage's logits are float32 already).
                    z = ops.soft_argmax(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t, beta=cfg.beta)
                zs.append(z)
            outputs.append(zs)
        return outputs

    def predict(self, images: torch.Tensor, markup: str | None = None) -> torch.Tensor:
        """The last stage's coordinates for `markup` (default the first, finest): (B, L, 2)."""
        k = 0 if markup is None else self.markups.index(markup)
        return self.forward(images)[-1][k]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
