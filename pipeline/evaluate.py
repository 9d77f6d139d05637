"""Ray-free evaluation: a model's confusion matrix over batches, epoch metrics, overlays,
and ``run.py evaluate`` (a trained model against a shard split).

Training imports this module, never the reverse. The model for ``run.py evaluate`` can be
named five ways: a checkpoint file, a folder holding ``checkpoint.pt`` (a Ray Train
checkpoint), a Ray Train run folder (its newest complete checkpoint), an MLflow run id, or
an MLflow model URI (``models:/dfdam-synthetic@champion``, ``runs:/<id>/model``).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models import LogitsOnly
from pipeline import tracking
from pipeline.checkpoint import CHECKPOINT_FILE, latest_checkpoint, load_checkpoint, model_from_checkpoint
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, Config, DataConfig, InferenceConfig
from pipeline.data import DamagedSampleError, eval_loader, shard_loader
from pipeline.inference import segment
from pipeline.metrics import ConfusionMeter, format_iou_table, iou_per_class, mean_iou, pixel_accuracy
from sharding.classes import IGNORE_INDEX
from sharding.manifest import Manifest, read_manifest
from sharding.text import bar_disabled


log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """A model and data that cannot be evaluated together, or data that disagrees with its manifest."""


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
    settings: InferenceConfig = InferenceConfig()
    workers: int = 0  # Ray workers; 0: this process
    seconds: float = 0.0  # wall time of the predictions (the model loaded, the cluster up)
    logged_to: str | None = None  # the MLflow run the metrics went to

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else float("nan")

    def metrics(self) -> dict[str, float]:
        """``<split>_miou_<protocol>``, ``<split>_pixel_acc_<protocol>``, ``<split>_images_per_s_<protocol>``:
        names that say how the predictions were made (see :func:`metric_suffix`)."""
        suffix = metric_suffix(self.settings)
        return {f"{self.split}_miou_{suffix}": self.miou, f"{self.split}_pixel_acc_{suffix}": self.pixel_acc,
                f"{self.split}_images_per_s_{suffix}": self.images_per_s}


def metric_suffix(settings: InferenceConfig) -> str:
    """``ms_flip``, ``slide``, ... (:attr:`InferenceConfig.protocol`); ``single`` for one whole-image
    pass, so that an evaluation never writes into training's per-epoch ``val_miou`` history."""
    return settings.protocol or "single"


@dataclass(frozen=True)
class LoadedModel:
    """A trained model ready to predict, and what is known of the data it was trained on."""

    model: nn.Module  # LogitsOnly-like, eval mode: (B, 3, H, W) normalised -> (B, K, H, W) logits
    source: str  # the checkpoint file or the MLflow model URI it was read from
    dataset: dict[str, Any]  # pipeline.loop.dataset_info: dataset, num_classes, class_names, palette, ignore_index
    mean: tuple[float, float, float]  # the normalisation it was trained with
    std: tuple[float, float, float]
    run_id: str | None = None  # the MLflow run that logged it (MLflow references only)
    tracking_uri: str | None = None


def load_model(reference: str, tracking_uri: str | None = None) -> LoadedModel:
    """A model from any of the references the module doc lists, with its dataset and normalisation.

    Checkpoints carry their config and dataset; an MLflow model carries them as metadata
    (models logged before the normalisation was recorded fall back to ImageNet's statistics,
    the only ones the pipeline has trained with).
    """
    path = Path(reference)
    if path.exists():
        if path.is_dir() and not (path / CHECKPOINT_FILE).exists():
            newest = latest_checkpoint(path)
            if newest is None:
                raise FileNotFoundError(f"{path} holds no complete checkpoint (epoch_*/{CHECKPOINT_FILE})")
            path = newest
        state = load_checkpoint(path)
        data = Config.from_dict(state["config"]).data
        return LoadedModel(LogitsOnly(model_from_checkpoint(state, path)).eval(), str(path), dict(state["dataset"]),
                           data.mean, data.std)
    if not reference.startswith(("models:/", "runs:/")) and ("/" in reference or path.suffix in (".pt", ".pth")):
        # A path, not a run id: said so here rather than asked of (and, for SQLite, created in) MLflow.
        raise FileNotFoundError(f"no checkpoint at {reference}: expected a checkpoint file or folder, a Ray Train run "
                                "folder, an MLflow run id or a models:/ URI")
    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    model_uri = tracking.resolve_model_uri(uri, reference)
    metadata, run_id = tracking.model_details(uri, model_uri)
    model = tracking.load_model(uri, model_uri).eval()
    mean = tuple(metadata.get("mean", IMAGENET_MEAN))
    std = tuple(metadata.get("std", IMAGENET_STD))
    dataset = {k: metadata[k] for k in ("dataset", "num_classes", "class_names", "palette", "ignore_index") if k in metadata}
    return LoadedModel(model, model_uri, dataset, mean, std, run_id, uri)  # type: ignore[arg-type]


def load_any_model(reference: str, tracking_uri: str | None = None) -> tuple[nn.Module, str]:
    """A logits-returning eval-mode model and where it was read from (see :func:`load_model`)."""
    loaded = load_model(reference, tracking_uri)
    return loaded.model, loaded.source


@dataclass(frozen=True)
class ShardJob:
    """What one evaluation task needs besides the model: a shard, how to read and score it."""

    shard: str
    data: DataConfig
    settings: InferenceConfig
    num_classes: int
    ignore_index: int


def evaluate_shard(model: nn.Module, job: ShardJob, device: torch.device) -> tuple[torch.Tensor, int]:
    """Confusion matrix (on the CPU) and image count of one shard: one Ray task's work."""
    images = 0

    def counted(batches: Iterable) -> Iterator:
        nonlocal images
        for batch in batches:
            images += len(batch[0])
            yield batch

    try:
        cm = evaluate(model, counted(shard_loader([job.shard], job.data)), job.num_classes, device,
                      job.ignore_index, job.settings)
    except DamagedSampleError as exc:  # never skipped: the mIoU would be of another set than the manifest's
        raise EvaluationError(str(exc)) from None
    return cm.cpu(), images


def evaluate_model(reference: str, shards: str | Path, split: str = "val", data: DataConfig | None = None,
                   tracking_uri: str | None = None, *, settings: InferenceConfig = InferenceConfig(),
                   workers: int = 0, gpu: bool = False, address: str | None = None,
                   log_run: str | None = None, log: bool = True, show_progress: bool = False) -> EvalReport:
    """Evaluate a trained model on a shard split as ``settings`` say (the paper's protocol:
    ``InferenceConfig(scales=PAPER_EVAL_SCALES, flip=True)``).

    ``workers=0`` predicts in this process; ``workers=N`` spreads the shards over N Ray
    workers (``pipeline/ray_map.py``; ``gpu`` gives each one GPU), each shard read once and
    the confusion matrices summed once on the driver, as training's evaluation does. With
    ``log`` the metrics (:meth:`EvalReport.metrics`) and the per-class table go to the MLflow
    run that logged the model, or to ``log_run``.
    """
    manifest = read_manifest(shards, split)  # a folder or a URL (sharding/storage.py)
    loaded = load_model(reference, tracking_uri)
    num_classes = int(loaded.dataset.get("num_classes", manifest.num_classes))
    if num_classes != manifest.num_classes:
        raise EvaluationError(f"{loaded.source} predicts {num_classes} classes, but split {split!r} of {shards} "
                         f"has {manifest.num_classes} ({manifest.dataset}): evaluate it on the data it was trained for")
    cfg = data or DataConfig(eval_batch_size=1, loader_workers=0, mean=loaded.mean, std=loaded.std)
    jobs = [ShardJob(str(shard), cfg, settings, manifest.num_classes, manifest.ignore_index)
            for shard in manifest.shards]
    if workers > len(jobs):
        log.warning("split %r has %d shard(s), so only %d of the %d workers have work (one task per shard, "
                    "each shard read once): write it with a smaller `run.py shard --shard-size` to spread it wider",
                    split, len(jobs), len(jobs), workers)
    counts = list(manifest.shard_counts)
    cm = torch.zeros(manifest.num_classes, manifest.num_classes, dtype=torch.int64)
    images = 0
    bar = tqdm(total=manifest.num_samples, unit="img", desc=f"evaluate {split}", disable=bar_disabled(show_progress))
    start = time.perf_counter()
    if workers:
        from pipeline.ray_map import map_with_model

        results = map_with_model(evaluate_shard, loaded.model, jobs, workers=workers, gpu=gpu, address=address,
                                 passthrough=(EvaluationError,))
    else:
        device = torch.device("cuda") if gpu else torch.device("cpu")
        model = loaded.model.to(device)
        results = ((i, evaluate_shard(model, job, device)) for i, job in enumerate(jobs))
    for index, (shard_cm, shard_images) in results:
        if shard_images != counts[index]:
            raise EvaluationError(f"{jobs[index].shard}: read {shard_images} images, the manifest records {counts[index]}")
        cm += shard_cm
        images += shard_images
        bar.update(shard_images)
    seconds = time.perf_counter() - start
    bar.close()
    ious = iou_per_class(cm)
    report = EvalReport(
        model=loaded.source,
        split=split,
        samples=images,
        miou=mean_iou(cm),
        pixel_acc=pixel_accuracy(cm),
        per_class=dict(zip(manifest.class_names, ious.tolist())),
        matrix=cm,
        table=format_iou_table(cm, list(manifest.class_names)),
        settings=settings,
        workers=workers,
        seconds=seconds,
    )
    run_id = log_run or loaded.run_id
    if log and run_id:
        uri = loaded.tracking_uri or tracking.resolve_uri(tracking_uri)
        suffix = metric_suffix(settings)
        tracking.log_metrics(uri, run_id, report.metrics(), step=0)
        tracking.log_json(uri, run_id, {"model": loaded.source, "split": split, "samples": images,
                                        "settings": dataclasses.asdict(settings), "miou": report.miou,
                                        "pixel_acc": report.pixel_acc, "per_class": report.per_class,
                                        "class_names": list(manifest.class_names), "matrix": cm.tolist()},
                          f"eval/{split}_{suffix}.json")
        report = dataclasses.replace(report, logged_to=run_id)
    return report
