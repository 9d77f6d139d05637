"""Ray-free evaluation: a model's confusion matrix over batches, epoch metrics, overlays,
and ``run.py evaluate`` (a trained model against a shard split).

Training imports this module, never the reverse. The model for ``run.py evaluate`` can be
named five ways: a checkpoint file, a folder holding ``checkpoint.pt`` (a Ray Train
checkpoint), a Ray Train run folder (its newest complete checkpoint), an MLflow run id, or
an MLflow model URI (``models:/dfdam-synthetic@champion``, ``runs:/<id>/model``).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import LogitsOnly
from pipeline import tracking
from pipeline.checkpoint import CHECKPOINT_FILE, latest_checkpoint, load_checkpoint, model_from_checkpoint
from pipeline.config import Config, DataConfig, InferenceConfig
from pipeline.data import eval_loader
from pipeline.inference import segment
from pipeline.metrics import ConfusionMeter, format_iou_table, iou_per_class, mean_iou, pixel_accuracy
from sharding.classes import IGNORE_INDEX
from sharding.manifest import Manifest, read_manifest


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
             ignore_index: int = IGNORE_INDEX, settings: InferenceConfig = InferenceConfig()) -> torch.Tensor:
    """Confusion matrix (K x K, rows = ground truth) of ``model``'s predictions over ``batches``.

    Predictions as ``settings`` say (:func:`pipeline.inference.segment`: whole image, one
    scale by default; multi-scale, flip, sliding window). Pass the model unwrapped from DDP:
    evaluation runs no collective; the caller sums the matrices of all ranks once.
    """
    model.eval()
    meter = ConfusionMeter(num_classes, ignore_index=ignore_index, device=device)
    for images, labels, *_ in batches:
        meter.update(segment(model, images.to(device), settings), labels.to(device))
    return meter.matrix


def epoch_metrics(cm: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU (``val_iou/<class>``) from a summed matrix."""
    ious = iou_per_class(cm)
    out = {"val_miou": mean_iou(cm), "val_pixel_acc": pixel_accuracy(cm)}
    for name, value in zip(class_names, ious.tolist()):
        if not math.isnan(value):
            out[f"val_iou/{name}"] = value
    return out


def prediction_overlays(model: nn.Module, manifest: Manifest, cfg: Config, device: torch.device,
                        count: int) -> list[tuple[str, np.ndarray]]:
    """Colourised (image | ground truth | prediction | beta) panels for the first ``count`` samples."""
    from pipeline.transforms import denormalize
    from pipeline.visualize import prediction_panel

    if count <= 0:
        return []
    panels = []
    model.eval()
    single = dataclasses.replace(cfg.data, eval_batch_size=1, loader_workers=0)
    with torch.no_grad():
        for images, labels, keys in eval_loader(manifest, single):
            out = model(images.to(device), return_attention=True)
            image = denormalize(images[0], cfg.data.mean, cfg.data.std)
            beta = out["beta"][0, 0].float().cpu().numpy() if "beta" in out else None
            panel = prediction_panel(image, labels[0].numpy(), out["out"][0].argmax(0).cpu().numpy(),
                                     manifest.palette, ignore_index=manifest.ignore_index, beta=beta)
            panels.append((keys[0], panel))
            if len(panels) >= count:
                break
    return panels


# ----------------------------------------------------------------------------- run.py evaluate


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


def load_any_model(reference: str, tracking_uri: str | None = None) -> tuple[nn.Module, str]:
    """A logits-returning eval-mode model from any of the references the module doc lists."""
    path = Path(reference)
    if path.exists():
        if path.is_dir() and not (path / CHECKPOINT_FILE).exists():
            newest = latest_checkpoint(path)
            if newest is None:
                raise FileNotFoundError(f"{path} holds no complete checkpoint (epoch_*/{CHECKPOINT_FILE})")
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
