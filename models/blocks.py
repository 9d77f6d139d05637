"""Small convolutional blocks shared by DF-DAM's modules and heads."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ConvBNReLU(nn.Sequential):
    """``k x k`` convolution (no bias) -> BatchNorm -> ReLU, padding keeps the size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class SegmentationHead(nn.Module):
    """Refine block and classifier: ``[3x3 ConvBNReLU] -> 1x1 conv -> bilinear to input size``.

    DF-DAM's "simple refine block" (section 3.4) restores the fused features to the
    input size; the same shape, narrower, serves the two auxiliary heads that give
    y_c and y_s of Eq. 12. ``hidden=0`` drops the 3x3 block (a bare classifier).
    """

    def __init__(self, in_channels: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.refine = ConvBNReLU(in_channels, hidden, 3) if hidden > 0 else nn.Identity()
        self.classifier = nn.Conv2d(hidden if hidden > 0 else in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.refine(x))  # (B, K, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)  # (B, K, H, W)
