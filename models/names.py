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
