"""The backbones and variants DF-DAM can be built with: the one list of their names.

This module imports nothing (no torch), so that the configuration
(:func:`pipeline.config.validate`) and the command line (``run.py``'s choices) read the
same names that :func:`models.build_dfdam` accepts without loading the model code.
"""
from __future__ import annotations

from typing import Literal, get_args

BackboneName = Literal["resnet18", "resnet50", "resnet101"]
BACKBONES: tuple[str, ...] = get_args(BackboneName)
"""torchvision ResNets the trunk is cut from (section 3.1; Tables 4 and 6 use 18 and 101)."""

Variant = Literal["sum", "dafm", "dafm+2dpam"]
VARIANTS: tuple[str, ...] = get_args(Variant)
"""The paper's ablation (Tables 1-2): plain sums, DAFM alone, the full model."""

PretrainedName = Literal["imagenet", "imagenet_v1"]
PRETRAINED: tuple[str, ...] = get_args(PretrainedName)
"""``model.weights`` keywords for torchvision's ImageNet weights (section 4.1: "ResNet series
pre-trained on ImageNet"). ``imagenet``: IMAGENET1K_V2 for ResNet-50/101 (torchvision's newer,
better recipe) and IMAGENET1K_V1 for ResNet-18 (its only one); ``imagenet_v1``: IMAGENET1K_V1
for all three, the weights that existed when the paper was written. Any other value is the
path of a local torchvision ResNet ``state_dict``; see :func:`models.backbone.resnet_stages`."""
