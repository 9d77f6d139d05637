"""DF-DAM's two dedicated attention modules and the plain-sum baseline they replace.

* :class:`DualAttentionFusion` (DAFM, section 3.2, Eq. 1-8): two channel-weight vectors
  alpha_H and alpha_L, both learned from the high-level (stage 4) features, re-weight the
  high- and low-level (stage 3) features before they are added.
* :class:`PositionAttention2D` (2DPAM, section 3.3, Eq. 9-10): a 1xHxW confidence map beta,
  learned from the concatenated spatial features and fused context, gates the stage-1
  features.
* :class:`SumFusion`: the ablation baseline of Tables 1-2, where plain summation replaces
  DAFM (and, with no gate, 2DPAM).

Each module returns its output and a dict of its attention tensors, so that the model can
expose them for visualisation (Figures 7-8).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import ConvBNReLU


def _resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` (B, C, h, w) to ``ref``'s spatial size."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class SumFusion(nn.Module):
    """Baseline context fusion: ``X_CI = X^L + up(X^H)``, no weights (Tables 1-2, "Sum")."""

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return low + _resize_to(high, low), {}


class DualAttentionFusion(nn.Module):
    """Dual Attention Fusion Module (DAFM), section 3.2.

    Given low-level features ``X^L`` (stage 3, B x C x H x W) and high-level features ``X^H``
    (stage 4, B x C x H/2 x W/2), both already projected to C channels:

    * ``alpha = Sigmoid(X; omega)`` twice over the *high-level* features: global average
      pooling -> 1x1 convolution -> sigmoid gives ``alpha^H`` and ``alpha^L``, each in
      ``R^{C x 1 x 1}`` and in [0, 1] (the two "identical structures" of Figure 3).
    * ``X^H`` is bilinearly enlarged to the size of ``X^L``.
    * Output ``alpha^L * X^L + alpha^H * up(X^H)``: each channel's difference between two
      positions is scaled as in Eq. 3-4 and 7-8, so discriminative channels are kept and
      common ones weakened.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight_high = nn.Conv2d(channels, channels, 1)  # omega for alpha^H
        self.weight_low = nn.Conv2d(channels, channels, 1)  # omega for alpha^L

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pooled = F.adaptive_avg_pool2d(high, 1)  # (B, C, 1, 1): global information of X^H
        alpha_high = torch.sigmoid(self.weight_high(pooled))  # (B, C, 1, 1)
        alpha_low = torch.sigmoid(self.weight_low(pooled))  # (B, C, 1, 1)
        fused = alpha_low * low + alpha_high * _resize_to(high, low)  # Eq. 7-8, (B, C, H, W)
        return fused, {"alpha_high": alpha_high, "alpha_low": alpha_low}


class PositionAttention2D(nn.Module):
    """2D Position Attention Module (2DPAM), section 3.3.

    ``beta = sigmoid(conv1x1(ReLU(BN(conv3x3(concat(X^SI, X^CI))))))`` is a confidence map
    in ``R^{1 x H x W}`` with values in [0, 1]; the module returns the filtered spatial
    information ``beta * X^SI`` of Eq. 9. The caller adds the context, giving Eq. 10's
    ``X^F = beta * X^SI + X^CI``.

    ``x_ci`` is the DAFM output, enlarged to the size of the stage-1 features ``x_si``.
    """

    def __init__(self, channels: int, hidden: int = 32) -> None:
        super().__init__()
        self.confidence = nn.Sequential(
            ConvBNReLU(2 * channels, hidden, 3),
            nn.Conv2d(hidden, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x_si: torch.Tensor, x_ci: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        beta = self.confidence(torch.cat([x_si, x_ci], dim=1))  # (B, 1, H, W)
        return beta * x_si, {"beta": beta}  # Eq. 9: broadcast over the C channels
