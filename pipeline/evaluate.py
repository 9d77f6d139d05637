"""``run.py evaluate``: a trained model against a shard split, mIoU and a per-class table.

The model can be named four ways: a checkpoint file, a folder holding ``checkpoint.pt``
(a Ray Train checkpoint), a Ray Train run folder (its newest checkpoint), an MLflow run
id, or an MLflow model URI (``models:/dfdam-synthetic@champion``, ``runs:/<id>/model``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models import LogitsOnly
from pipeline import tracking
from pipeline.checkpoint import CHECKPOINT_FILE, load_checkpoint, model_from_checkpoint
from pipeline.config import DataConfig
from pipeline.data import eval_loader
from pipeline.metrics import format_iou_table, iou_per_class, mean_iou, pixel_accuracy
from pipeline.train import evaluate
from sharding.manifest import read_manifest


@dataclass(frozen=True)
class EvalReport:
    model: str
    split: str
    samples: int
    miou: float
    pixel_acc: float
    per_class: dict[str, float]
    matrix: torch.Tensor
    table: str


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint.pt`` below a Ray Train run folder (by epoch folder name)."""
    found = sorted(run_dir.glob(f"*/{CHECKPOINT_FILE}"))
    return found[-1] if found else None


def load_any_model(reference: str, tracking_uri: str | None = None) -> tuple[nn.Module, str]:
    """A logits-returning eval-mode model from any of the references the module doc lists."""
    path = Path(reference)
    if path.exists():
        if path.is_dir() and not (path / CHECKPOINT_FILE).exists():
            newest = newest_checkpoint(path)
            if newest is None:
                raise FileNotFoundError(f"{path} holds no {CHECKPOINT_FILE} (nor epoch_*/{CHECKPOINT_FILE})")
            path = newest
        return LogitsOnly(model_from_checkpoint(load_checkpoint(path))).eval(), str(path)
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    model_uri = tracking.resolve_model_uri(uri, reference)
    return tracking.load_model(uri, model_uri).eval(), model_uri


def evaluate_model(reference: str, shards: str | Path, split: str = "val", data: DataConfig | None = None,
                   tracking_uri: str | None = None) -> EvalReport:
    manifest = read_manifest(Path(shards), split)
    model, source = load_any_model(reference, tracking_uri)
    cfg = data or DataConfig(eval_batch_size=1, loader_workers=0)
    cm = evaluate(model, eval_loader(manifest, cfg), manifest.num_classes, torch.device("cpu"), manifest.ignore_index)
    ious = iou_per_class(cm)
    return EvalReport(
        model=source,
        split=split,
        samples=manifest.num_samples,
        miou=mean_iou(cm),
        pixel_acc=pixel_accuracy(cm),
        per_class=dict(zip(manifest.class_names, ious.tolist())),
        matrix=cm,
        table=format_iou_table(cm, list(manifest.class_names)),
    )
