"""DF-DAM model: ResNet trunk, DAFM, 2DPAM, heads. Imports only torch and torchvision.

:mod:`models.names` (the backbone and variant names) imports nothing at all, so the
configuration and ``run.py --help`` read the names without loading torch. For that, the
classes and builders below are imported on first use (``from models import build_dfdam``
or ``models.build_dfdam``), not when this package is.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.names import BACKBONES, VARIANTS

if TYPE_CHECKING:
    from models.attention import DualAttentionFusion, PositionAttention2D, SumFusion
    from models.backbone import FeatureInfo, ResNetStages, resnet_stages
    from models.dfdam import DFDAM, LogitsOnly, build_dfdam

_MODULE_OF = {
    "DualAttentionFusion": "models.attention",
    "PositionAttention2D": "models.attention",
    "SumFusion": "models.attention",
    "FeatureInfo": "models.backbone",
    "ResNetStages": "models.backbone",
    "resnet_stages": "models.backbone",
    "DFDAM": "models.dfdam",
    "LogitsOnly": "models.dfdam",
    "build_dfdam": "models.dfdam",
}

__all__ = ["BACKBONES", "VARIANTS", *sorted(_MODULE_OF)]


def __getattr__(name: str) -> Any:
    """Import the torch-side name ``name`` from its module on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value
