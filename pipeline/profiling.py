"""Parameter and multiply-accumulate counts for DF-DAM and reference models.

Counting runs on the ``meta`` device: the model is built without storage and
``torch.utils.flop_counter.FlopCounterMode`` records the FLOPs of every convolution and
matrix product of one forward pass, without computing anything. MACs = FLOPs / 2. As in
the paper's Tables 4 and 6, the auxiliary heads are excluded (DF-DAM is built without
them, and the torchvision references without their aux classifier).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import segmentation

from models import build_dfdam
from sharding.text import format_table

# (backbone) -> (table, params, MACs) as printed in the paper, input 3x320x640.
PAPER_DFDAM = {
    "resnet18": ("Table 4", 11.57e6, 10.31e9),
    "resnet101": ("Table 6", 43.24e6, 35.52e9),
}
# The paper's other rows, for scale (Table 4: Cityscapes, Table 6: VOC).
PAPER_OTHERS = [
    ("FCN-8s-heavy", "Table 4", 134.46e6, 188.93e9),
    ("DeepLab (Res101)", "Table 4", 43.90e6, 148.73e9),
    ("RefineNet (Res101)", "Table 4", 118.01e6, 659.14e9),
    ("DUC (Res101)", "Table 4", 148.04e6, 95.87e9),
    ("PSPNet (Res101)", "Table 4", 75.04e6, 230.01e9),
]


@dataclass(frozen=True)
class ProfileRow:
    model: str
    source: str  # "measured" or the paper's table
    params: int
    macs: int
    input: str  # "3x320x640"
    params_vs_paper: float | None = None  # relative difference to the paper's figure
    macs_vs_paper: float | None = None


def count(build: Callable[[], nn.Module], size: tuple[int, int]) -> tuple[int, int]:
    """Return ``(parameters, MACs)`` of ``build()`` for one 3 x H x W input, on the meta device."""
    with torch.device("meta"):
        model = build().eval()
        x = torch.empty(1, 3, *size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() // 2


def profile_rows(
    backbone: str,
    size: tuple[int, int],
    num_classes: int = 19,
    variant: str = "dafm+2dpam",
    references: bool = True,
) -> list[ProfileRow]:
    """DF-DAM's row first, then torchvision references at the same input, then the paper's rows."""
    shape = f"3x{size[0]}x{size[1]}"
    params, macs = count(
        lambda: build_dfdam(num_classes, backbone, variant=variant, aux_heads=False), size
    )
    paper = PAPER_DFDAM.get(backbone) if variant == "dafm+2dpam" and num_classes == 19 else None
    rows = [
        ProfileRow(
            f"DF-DAM ({backbone}, {variant})", "measured", params, macs, shape,
            params / paper[1] - 1 if paper else None,
            macs / paper[2] - 1 if paper else None,
        )
    ]
    if references:
        for name, builder in (
            ("fcn_resnet101", segmentation.fcn_resnet101),
            ("deeplabv3_resnet101", segmentation.deeplabv3_resnet101),
        ):
            p, m = count(
                lambda b=builder: b(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False),
                size,
            )
            rows.append(ProfileRow(f"torchvision {name}", "measured", p, m, shape))
    for bb, (table, p, m) in PAPER_DFDAM.items():
        rows.append(ProfileRow(f"DF-DAM ({bb})", f"paper {table}", int(p), int(m), "3x320x640"))
    for name, table, p, m in PAPER_OTHERS:
        rows.append(ProfileRow(name, f"paper {table}", int(p), int(m), "3x320x640"))
    return rows


def format_rows(rows: list[ProfileRow], fmt: str = "table") -> str:
    """Render rows as an aligned text table or as JSON (a list of objects)."""
    if fmt == "json":
        return json.dumps([asdict(r) for r in rows], indent=2)
    if fmt != "table":
        raise ValueError(f"format must be 'table' or 'json', got {fmt!r}")

    def pct(v: float | None) -> str:
        return "" if v is None else f"{v * 100:+.2f}%"

    header = ("model", "source", "input", "params (M)", "MACs (G)", "params vs paper", "MACs vs paper")
    body = [
        (r.model, r.source, r.input, f"{r.params / 1e6:.2f}", f"{r.macs / 1e9:.2f}",
         pct(r.params_vs_paper), pct(r.macs_vs_paper))
        for r in rows
    ]
    table = format_table(header, body, align="l" * len(header))
    return table + "\nMACs = multiply-accumulates (the paper's 'GFLOPs'); auxiliary heads excluded."
