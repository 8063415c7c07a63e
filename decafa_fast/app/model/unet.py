"""One DeCaFA stage backbone: a fully-convolutional U-Net that keeps the input resolution.

Twelve conv3x3 + BatchNorm + ReLU layers. Down: w0-w0 (full res), max-pool, w1-w1 (1/2), max-pool,
w2-w2 (1/4), with (w0, w1, w2) = (64, 128, 256) in the paper. Up, the reverse: w2-w1 at 1/4, bilinear
upsample, concat the 1/2 skip, w1-w0, bilinear upsample, concat the full-resolution skip, w0-E, where E
is the embedding width (64). Bilinear upsampling followed by a 3x3 conv (no transposed conv) keeps the
maps smooth. Input sizes need not be multiples of 4: upsampling goes to the skip's exact size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNReLU", "UNet"]


class ConvBNReLU(nn.Sequential):
    """conv3x3 (no bias, BN follows) + BatchNorm + ReLU: (B, cin, H, W) -> (B, cout, H, W)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """(B, in_channels, H, W) -> embedding (B, out_channels, H, W)."""

    def __init__(self, in_channels: int, out_channels: int = 64, widths: tuple[int, int, int] = (64, 128, 256)) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths}")
        w0, w1, w2 = widths
        self.down0 = nn.Sequential(ConvBNReLU(in_channels, w0), ConvBNReLU(w0, w0))
        self.down1 = nn.Sequential(ConvBNReLU(w0, w1), ConvBNReLU(w1, w1))
        self.down2 = nn.Sequential(ConvBNReLU(w1, w2), ConvBNReLU(w2, w2))
        self.up2 = nn.Sequential(ConvBNReLU(w2, w2), ConvBNReLU(w2, w1))
        self.up1 = nn.Sequential(ConvBNReLU(2 * w1, w1), ConvBNReLU(w1, w0))
        self.up0 = nn.Sequential(ConvBNReLU(2 * w0, w0), ConvBNReLU(w0, out_channels))

    @staticmethod
    def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.down0(x)
        s1 = self.down1(F.max_pool2d(s0, 2, ceil_mode=True))
        y = self.up2(self.down2(F.max_pool2d(s1, 2, ceil_mode=True)))
        y = self.up1(torch.cat([self._upsample_to(y, s1), s1], dim=1))
        return self.up0(torch.cat([self._upsample_to(y, s0), s0], dim=1))
