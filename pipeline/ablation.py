"""The paper's ablation (section 4.2) as the report of a grid search, beside the paper's figures.

Section 4.2 builds a baseline that fuses the trunk's stages by plain summation, adds the
Dual Attention Fusion Module (DAFM), then the 2D Position Attention Module (2DPAM) too,
and reports the validation mean IoU of each: Table 1 on PASCAL VOC 2012 val (ResNet-50
and ResNet-101), Table 2 on Cityscapes val (ResNet-18). ``run.py tune --grid
model.variant=sum,dafm,dafm+2dpam`` trains the same three variants (``models.names.VARIANTS``);
:func:`ablation_table` lays its trials out like those tables, one row per backbone and
variant (and per value of any other grid field), with the paper's mIoU for the same row
beside, or ``-`` where the paper has none. Nothing here imports Ray or MLflow.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from models.names import BACKBONES, VARIANTS
from pipeline.search_space import Dimension
from pipeline.trials import TrialRow
from sharding.text import format_table


@dataclass(frozen=True)
class PaperResult:
    """One row of the paper's Tables 1-2: validation mean IoU in percent."""

    table: int
    dataset: str  # the config's dataset name: voc | cityscapes
    backbone: str
    variant: str
    miou: float


# Section 4.2, Table 1 ("Ablation study for modules on PASCAL VOC 2012 val set") and
# Table 2 ("Ablation study for modules on Cityscapes val set"), as printed.
PAPER_ABLATION: tuple[PaperResult, ...] = (
    PaperResult(1, "voc", "resnet50", "sum", 68.2),
    PaperResult(1, "voc", "resnet50", "dafm", 73.7),
    PaperResult(1, "voc", "resnet50", "dafm+2dpam", 74.6),
    PaperResult(1, "voc", "resnet101", "sum", 72.9),
    PaperResult(1, "voc", "resnet101", "dafm", 76.8),
    PaperResult(1, "voc", "resnet101", "dafm+2dpam", 77.9),
    PaperResult(2, "cityscapes", "resnet18", "sum", 70.3),
    PaperResult(2, "cityscapes", "resnet18", "dafm", 72.8),
    PaperResult(2, "cityscapes", "resnet18", "dafm+2dpam", 73.1),
)
PAPER_TABLES = {"cityscapes": "Table 2, Cityscapes val", "voc": "Table 1, VOC 2012 val"}
METHODS = {"sum": "Sum (baseline)", "dafm": "DAFM", "dafm+2dpam": "DAFM + 2DPAM"}  # the tables' names
CHECK = "✓"


def paper_miou(dataset: str, backbone: str, variant: str) -> float | None:
    """The paper's mIoU (%) for this dataset, backbone and variant, or None where it has none."""
    found = [r.miou for r in PAPER_ABLATION if (r.dataset, r.backbone, r.variant) == (dataset, backbone, variant)]
    return found[0] if found else None


def ablation_table(rows: Sequence[TrialRow], grid: Sequence[Dimension], *, dataset: str, backbone: str,
                   variant: str, epochs: int) -> str:
    """The grid search's trials as the paper's Tables 1-2, with a note on what is compared.

    ``grid`` holds the search's grid dimensions; a field outside it (the backbone, when only
    the variant is varied) takes the value the search ran with (``backbone``, ``variant``).
    One row per backbone, variant and value of every other grid field but ``train.seed``
    (seeds are repeats, and are pooled). "mIoU %" is the final-epoch validation mIoU of the
    row's finished trials (their mean and best when a row has several); "trials" counts the
    finished ones of all. The paper's column is the table for ``dataset``; for data the
    paper did not use (the synthetic set), each table that has a row like ours, labelled.
    """
    by_key = {d.key: d for d in grid}
    shown = [d for d in grid if d.key not in ("model.backbone", "model.variant", "train.seed")]

    def value(row: TrialRow, key: str, default: str) -> str:
        return str(row.params[by_key[key].name]) if key in by_key else default

    groups: dict[tuple[str, ...], list[TrialRow]] = {}
    for row in rows:
        point = (value(row, "model.backbone", backbone), value(row, "model.variant", variant),
                 *(str(row.params.get(d.name, "")) for d in shown))
        groups.setdefault(point, []).append(row)

    def order(point: tuple[str, ...]) -> tuple[int, ...]:
        ranks = [BACKBONES.index(point[0]) if point[0] in BACKBONES else len(BACKBONES),
                 VARIANTS.index(point[1]) if point[1] in VARIANTS else len(VARIANTS)]
        ranks += [d.values.index(v) if v in d.values else len(d.values) for d, v in zip(shown, point[2:])]
        return tuple(ranks)

    finished = {p: [r.val_miou for r in g if r.status == "finished" and not math.isnan(r.val_miou)]
                for p, g in groups.items()}
    pooled = any(len(m) > 1 for m in finished.values())
    papers = ([dataset] if dataset in PAPER_TABLES else  # else the tables with a row like ours
              [p for p in PAPER_TABLES if any(paper_miou(p, *point[:2]) is not None for point in groups)])
    header = ["backbone", "method", "DAFM", "2DPAM", *(d.name for d in shown), "trials",
              *(("mIoU % mean", "mIoU % best") if pooled else ("mIoU %",)),
              *(f"paper mIoU % ({PAPER_TABLES[p]})" for p in papers)]
    body = []
    for point in sorted(groups, key=order):
        net, var, *others = point
        mious = finished[point]
        ours = ([_percent(statistics.fmean(mious)) if mious else "-", _percent(max(mious)) if mious else "-"]
                if pooled else [_percent(mious[0]) if mious else "-"])
        body.append([net, METHODS.get(var, var), CHECK if var in ("dafm", "dafm+2dpam") else "",
                     CHECK if var == "dafm+2dpam" else "", *others, f"{len(mious)}/{len(groups[point])}", *ours,
                     *(_percent(paper_miou(p, net, var), scale=1) for p in papers)])
    align = "l" * (4 + len(shown)) + "r" * (1 + (2 if pooled else 1) + len(papers))
    notes = [f"mIoU %: validation mIoU after the last of {epochs} epochs, {dataset} data"
             + ("; mean and best over each row's finished trials" if pooled else "") + "."]
    if dataset in PAPER_TABLES:
        notes.append(f"paper: section 4.2, {PAPER_TABLES[dataset]}, the paper's own training (section 4.1); "
                     "'-' where the paper has no such row.")
    else:
        shown_tables = " and ".join(PAPER_TABLES[p] for p in papers) or "no table with these rows"
        notes.append(f"paper: section 4.2, {shown_tables}: real data and the paper's own training (section 4.1); "
                     f"the {dataset} data is not the paper's, so its figures stand beside ours for reference only.")
    return format_table(header, body, align=align) + "\n" + "\n".join(notes)


def _percent(miou: float | None, scale: float = 100.0) -> str:
    return "-" if miou is None or math.isnan(miou) else f"{miou * scale:.1f}"
