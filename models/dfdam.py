"""DF-DAM: composition of a ResNet trunk, DAFM, 2DPAM, sum fusion and a refine block.

Data flow (Figure 2 of the paper, section 3.4); shapes for a B x 3 x H x W input::

    stage 1 (H/4)  --1x1 ConvBNReLU-->  X^SI (B,128,H/4,W/4) ------------------+
    stage 3 (H/16) --1x1 ConvBNReLU-->  X^L  (B,128,H/16,W/16) --+             |
    stage 4 (H/32) --1x1 ConvBNReLU-->  X^H  (B,128,H/32,W/32) --+-- DAFM --> context (H/16)
                                                                     | up to H/4 = X^CI
                                                   2DPAM(X^SI, X^CI) -> beta * X^SI
    X^F = beta * X^SI + X^CI  (Eq. 10)  --refine block--> y_p at H x W
    aux: context -> y_c,  beta * X^SI -> y_s            (Eq. 12's auxiliary outputs)

Variants of the paper's ablation (Tables 1-2): ``sum`` (plain summation in place of both
modules), ``dafm`` (DAFM, ungated spatial sum) and ``dafm+2dpam`` (the full model).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from models.attention import DualAttentionFusion, PositionAttention2D, SumFusion
from models.backbone import ResNetStages, resnet_stages
from models.blocks import ConvBNReLU, SegmentationHead
from models.names import VARIANTS, BackboneName, Variant


class DFDAM(nn.Module):
    """DF-DAM segmentation network, assembled from the parts it is given.

    ``forward(x)`` returns a dict of logits at the input size:

    * ``"out"``: the prediction y_p (always);
    * ``"aux_context"``, ``"aux_spatial"``: y_c and y_s of Eq. 12 (in training mode only);
    * with ``return_attention=True`` also ``"alpha_high"``, ``"alpha_low"`` (B x C x 1 x 1)
      and ``"beta"`` (B x 1 x H/4 x W/4), for the modules the variant has.
    """

    def __init__(
        self,
        backbone: ResNetStages,
        project_spatial: nn.Module,
        project_low: nn.Module,
        project_high: nn.Module,
        context_fusion: nn.Module,
        spatial_gate: PositionAttention2D | None,
        head: SegmentationHead,
        aux_context: SegmentationHead | None = None,
        aux_spatial: SegmentationHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.project_spatial = project_spatial
        self.project_low = project_low
        self.project_high = project_high
        self.context_fusion = context_fusion
        self.spatial_gate = spatial_gate
        self.head = head
        self.aux_context = aux_context
        self.aux_spatial = aux_spatial

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        feats = self.backbone(x)
        x_si = self.project_spatial(feats[1])  # (B, C, H/4, W/4)
        low = self.project_low(feats[3])  # (B, C, H/16, W/16)
        high = self.project_high(feats[4])  # (B, C, H/32, W/32)

        context, attention = self.context_fusion(low, high)  # (B, C, H/16, W/16)
        x_ci = F.interpolate(context, size=x_si.shape[-2:], mode="bilinear", align_corners=False)
        if self.spatial_gate is not None:
            spatial, gate = self.spatial_gate(x_si, x_ci)  # beta * X^SI, Eq. 9
            attention = {**attention, **gate}
        else:
            spatial = x_si
        fused = spatial + x_ci  # Eq. 10 (sum fusion)

        result = {"out": self.head(fused, size)}
        if self.training and self.aux_context is not None and self.aux_spatial is not None:
            result["aux_context"] = self.aux_context(context, size)
            result["aux_spatial"] = self.aux_spatial(spatial, size)
        if return_attention:
            result.update(attention)
        return result


def build_dfdam(
    num_classes: int,
    backbone: BackboneName = "resnet18",
    variant: Variant = "dafm+2dpam",
    weights: str | Path | None = None,
    channels: int = 128,
    gate_hidden: int = 32,
    refine_channels: int = 128,
    aux_channels: int = 64,
    aux_heads: bool = True,
) -> DFDAM:
    """Build DF-DAM; the one place where the variant and the small layers are chosen.

    Paper-fixed: ResNet stages 1, 3, 4; 1x1 projections to ``channels`` = 128 (section
    3.4); DAFM and 2DPAM as in sections 3.2-3.3; sum fusion; aux heads for Eq. 12.

    Where the paper is silent (defaults chosen so that ResNet-18 / -101 land within 1% of
    Tables 4 / 6 at 3x320x640): projections are 1x1 ConvBNReLU; each DAFM branch is
    GAP -> 1x1 conv -> sigmoid; 2DPAM is 3x3 ConvBNReLU (2C -> ``gate_hidden``) -> 1x1 conv
    -> sigmoid; the refine block is one 3x3 ConvBNReLU (C -> ``refine_channels``) at 1/4
    resolution, a 1x1 classifier and bilinear upsampling; the auxiliary heads are the same
    shape with ``aux_channels``. ``weights``: see :func:`models.backbone.resnet_stages`
    (``None``, the default, never downloads).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    trunk = resnet_stages(backbone, weights=weights, out_stages=(1, 3, 4))
    return DFDAM(
        backbone=trunk,
        project_spatial=ConvBNReLU(trunk.channels(1), channels, 1),
        project_low=ConvBNReLU(trunk.channels(3), channels, 1),
        project_high=ConvBNReLU(trunk.channels(4), channels, 1),
        context_fusion=SumFusion() if variant == "sum" else DualAttentionFusion(channels),
        spatial_gate=PositionAttention2D(channels, gate_hidden) if variant == "dafm+2dpam" else None,
        head=SegmentationHead(channels, refine_channels, num_classes),
        aux_context=SegmentationHead(channels, aux_channels, num_classes) if aux_heads else None,
        aux_spatial=SegmentationHead(channels, aux_channels, num_classes) if aux_heads else None,
    )


class LogitsOnly(nn.Module):
    """Inference wrapper: image batch (B, 3, H, W) -> prediction logits (B, K, H, W).

    What is logged to MLflow and served: always in eval mode, no auxiliary outputs, no
    dict, never the DDP wrapper.
    """

    def __init__(self, model: DFDAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]
