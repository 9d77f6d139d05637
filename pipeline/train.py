"""Training: a plain PyTorch loop, a thin Ray Train worker around it, and the driver.

Read top to bottom: :func:`train_one_epoch` and :func:`evaluate` are ordinary PyTorch;
:func:`train_worker` is what each Ray Train worker runs (DDP set up by Ray, gloo on CPU,
NCCL on GPU); :func:`fit` is the driver: it checks every input before any work starts,
opens the MLflow run, and launches a ``TorchTrainer``. Ray calls live here and in
``pipeline/tune.py`` only.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import time
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import models
from models import LogitsOnly
from pipeline import tracking
from pipeline.cluster import check_resources, connect_ray
from pipeline.checkpoint import build_model, load_checkpoint, save_checkpoint
from pipeline.config import Config, ConfigError, LossConfig
from pipeline.data import eval_loader, steps_per_epoch, train_loader
from pipeline.losses import joint_loss
from pipeline.metrics import ConfusionMeter, format_iou_table, iou_per_class, mean_iou, pixel_accuracy
from pipeline.optim import build_optimizer, set_lr
from sharding.manifest import Manifest, ManifestError, read_manifest


# ----------------------------------------------------------------------------- plain PyTorch


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_cfg: LossConfig,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One SGD step on Eq. 12's joint loss (under autocast when ``amp_dtype`` is given).

    Returns the (detached) joint loss and its parts; the learning rate is the caller's.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(images)
        loss, parts = joint_loss(outputs, labels, loss_cfg.lambda_c, loss_cfg.lambda_s, loss_cfg.ignore_index)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), parts


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    *,
    epoch: int,
    steps: int,
    max_iter: int,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """One pass of ``steps`` SGD steps with the poly LR (per iteration) and Eq. 12's loss."""
    model.train()
    amp_dtype = torch.float16 if cfg.train.amp and device.type == "cuda" else None
    totals = {"loss": 0.0, "loss_p": 0.0, "loss_c": 0.0, "loss_s": 0.0}
    seen, start, lr, step = 0, time.perf_counter(), 0.0, 0
    for step, (images, labels) in enumerate(batches, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        lr = set_lr(optimizer, cfg.optim.lr, epoch * steps + step - 1, max_iter, cfg.optim.poly_power)
        try:
            loss, parts = train_step(model, images, labels, optimizer, scaler, cfg.loss, amp_dtype)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} at epoch {epoch + 1} step {step}: lower optim.lr") from None
        totals["loss"] += loss.item()
        for k, v in parts.items():
            totals[k] += v.item()
        seen += images.shape[0]
        if log is not None and (step % cfg.train.log_every == 0 or step == steps):
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (steps - step)
            log(f"epoch {epoch + 1}/{cfg.train.epochs} step {step}/{steps} loss {totals['loss'] / step:.4f} "
                f"lr {lr:.5f} {seen / elapsed:.1f} img/s/worker ETA {eta:.0f}s")
    if step == 0:
        raise RuntimeError("the training loader yielded no batch: check the shards and data.batch_size")
    elapsed = time.perf_counter() - start
    return {**{k: v / step for k, v in totals.items()}, "lr": lr, "images_per_s": seen / elapsed}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
             ignore_index: int = 255) -> torch.Tensor:
    """Confusion matrix (K x K, rows = ground truth) of ``model``'s predictions over ``batches``.

    Pass the model unwrapped from DDP: evaluation runs no collective; the caller sums the
    matrices of all ranks once.
    """
    model.eval()
    meter = ConfusionMeter(num_classes, ignore_index=ignore_index, device=device)
    for images, labels, *_ in batches:
        out = model(images.to(device))
        logits = out["out"] if isinstance(out, dict) else out  # (B, K, H, W); MLflow models give logits
        meter.update(logits.argmax(1), labels.to(device))
    return meter.matrix


def epoch_metrics(cm: torch.Tensor, class_names: list[str]) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU (``val_iou/<class>``) from a summed matrix."""
    ious = iou_per_class(cm)
    out = {"val_miou": mean_iou(cm), "val_pixel_acc": pixel_accuracy(cm)}
    for name, value in zip(class_names, ious.tolist()):
        if not math.isnan(value):
            out[f"val_iou/{name}"] = value
    return out


def dataset_info(manifest: Manifest) -> dict[str, Any]:
    return {
        "dataset": manifest.dataset,
        "num_classes": manifest.num_classes,
        "class_names": list(manifest.class_names),
        "palette": [list(c) for c in manifest.palette],
        "ignore_index": manifest.ignore_index,
    }


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


# ----------------------------------------------------------------------------- Ray Train worker


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: data shard, DDP model, epochs, checkpoints, reports.

    Every rank calls ``ray.train.report`` once per epoch (it is a barrier); rank 0 attaches
    the checkpoint and writes to MLflow. The confusion matrix is all-reduced once per epoch,
    so every rank reports the same metrics.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = Config.from_dict(loop_config["config"])
    # Ray Train sends the root logger to the driver's console (print would appear twice);
    # its own per-report INFO lines stay out of it.
    log = logging.getLogger("dfdam.train").info
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    uri, run_id = loop_config["tracking_uri"], loop_config["run_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    torch.manual_seed(cfg.train.seed)

    shards = Path(cfg.data.shards)
    train_manifest = read_manifest(shards, cfg.data.train_split)
    val_manifest = read_manifest(shards, cfg.data.val_split)
    info = dataset_info(train_manifest)
    steps = steps_per_epoch(train_manifest, cfg.data.batch_size)
    max_iter = steps * cfg.train.epochs

    model = build_model(cfg.model, info["num_classes"])
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")
    start_epoch, best = 0, -1.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        best = state["metrics"].get("best_val_miou", -1.0)
        if rank == 0:
            log(f"resuming from the checkpoint of epoch {state['epoch'] + 1}")
    if cfg.train.sync_bn and world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1; moves to device
    net = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    for epoch in range(start_epoch, cfg.train.epochs):
        loader = train_loader(train_manifest, cfg.data, rank=rank, world_size=world, epoch=epoch, seed=cfg.train.seed)
        stats = train_one_epoch(ddp_model, loader, optimizer, cfg, epoch=epoch, steps=steps, max_iter=max_iter,
                                device=device, scaler=scaler, log=log if rank == 0 else None)
        if world > 1:  # the mean over ranks, so the reported training loss is the whole batch's
            names = sorted(stats)
            values = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=device)
            dist.all_reduce(values)
            stats = dict(zip(names, (values / world).tolist()))
        cm = evaluate(net, eval_loader(val_manifest, cfg.data, rank=rank, world_size=world),
                      info["num_classes"], device, cfg.loss.ignore_index)
        if world > 1:
            dist.all_reduce(cm)  # the one collective of evaluation
        metrics = {f"train_{k}": v for k, v in stats.items()} | epoch_metrics(cm.cpu(), info["class_names"])
        best = max(best, metrics["val_miou"])
        metrics |= {"epoch": epoch + 1, "best_val_miou": best}
        if rank == 0:
            log(f"epoch {epoch + 1}/{cfg.train.epochs}: val mIoU {metrics['val_miou']:.4f} "
                f"(best {best:.4f}), pixel acc {metrics['val_pixel_acc']:.4f}")
            tracking.log_metrics(uri, run_id, metrics, step=epoch + 1)
        if rank == 0 and epoch + 1 == cfg.train.epochs:
            # Before the last report: a Tune scheduler may stop the trial as soon as it sees it.
            _log_final(uri, run_id, net, cm.cpu(), val_manifest, cfg, device, info)
        with tempfile.TemporaryDirectory(prefix="dfdam-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, model=net, optimizer=optimizer, scaler=scaler, epoch=epoch,
                                step=(epoch + 1) * steps, config=cfg, dataset=info, metrics=metrics)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def _log_final(uri: str, run_id: str, net: nn.Module, cm: torch.Tensor, manifest: Manifest, cfg: Config,
               device: torch.device, info: dict[str, Any]) -> None:
    """Rank 0, after the last epoch: confusion matrix, per-class table, overlays, model."""
    from pipeline.visualize import confusion_matrix_figure

    tracking.log_json(uri, run_id, {"class_names": info["class_names"], "matrix": cm.tolist()}, "eval/confusion_matrix.json")
    tracking.log_figure(uri, run_id, confusion_matrix_figure(cm.numpy(), info["class_names"]), "eval/confusion_matrix.png")
    tracking.log_text(uri, run_id, format_iou_table(cm, info["class_names"]), "eval/per_class_iou.txt")
    for key, panel in prediction_overlays(net, manifest, cfg, device, cfg.tracking.overlays):
        tracking.log_image(uri, run_id, panel, f"eval/overlays/{key}.png")
    if cfg.tracking.log_model:
        cpu_model = build_model(cfg.model, info["num_classes"], pretrained=False)
        cpu_model.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
        tracking.log_model(uri, run_id, LogitsOnly(cpu_model).eval(), info["num_classes"],
                           code_path=Path(models.__file__).parent, metadata=info)


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class TrainResult:
    name: str
    run_id: str
    tracking_uri: str
    checkpoint: str | None  # folder of the latest checkpoint
    metrics: dict[str, float]
    storage: str


def check_inputs(cfg: Config) -> tuple[Manifest, Manifest]:
    """Everything that can be checked before Ray starts: shards, manifests, preset."""
    if not cfg.data.shards:
        raise ConfigError("no shards given: pass --data SHARD_DIR (a folder written by `run.py shard`)")
    shards = Path(cfg.data.shards)
    if not shards.is_dir():
        raise FileNotFoundError(f"shard folder {shards} does not exist: expected the --out folder of `run.py shard`")
    train_manifest = read_manifest(shards, cfg.data.train_split)
    val_manifest = read_manifest(shards, cfg.data.val_split)
    if train_manifest.num_classes != val_manifest.num_classes:
        raise ManifestError(f"{shards}: splits {cfg.data.train_split!r} and {cfg.data.val_split!r} disagree on the "
                            f"number of classes ({train_manifest.num_classes} vs {val_manifest.num_classes})")
    if cfg.dataset in ("cityscapes", "voc") and train_manifest.dataset != cfg.dataset:
        raise ConfigError(f"preset {cfg.preset!r} is made for {cfg.dataset} but {shards} holds "
                          f"{train_manifest.dataset} shards: use --preset {train_manifest.dataset} (or synthetic)")
    return train_manifest, val_manifest


def worker_resources(cfg: Config) -> dict[str, float]:
    return {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.gpu else {})


def make_trainer(cfg: Config, *, name: str, tracking_uri: str, run_id: str, callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` (paths in ``cfg`` already absolute); Tune reuses it per trial."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": tracking_uri, "run_id": run_id},
        torch_config=TorchConfig(timeout_s=cfg.train.timeout_s),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            name=name,
            storage_path=cfg.train.storage,
            # Bounded: by default the controller retries forever when resources never come.
            failure_config=FailureConfig(max_failures=cfg.train.max_failures, controller_failure_limit=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_miou",
                                               checkpoint_score_order="max"),
            callbacks=callbacks or [],
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's own INFO lines stay in its log files
        ),
    )


def absolute_paths(cfg: Config) -> Config:
    """Shards and storage as absolute paths: Ray workers run in their own working directories."""
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, shards=str(Path(cfg.data.shards).resolve())),
        train=dataclasses.replace(cfg.train, storage=str(Path(cfg.train.storage).resolve())),
    )


def fit(cfg: Config, *, name: str | None = None, resume: bool = False, address: str | None = None) -> TrainResult:
    """Train ``cfg`` with Ray Train; every input is checked before any work starts."""
    train_manifest, _ = check_inputs(cfg)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    storage = Path(cfg.train.storage).resolve()
    name = name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = storage / name
    if resume and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: no run named {name!r} under {storage}")
    if not resume and run_dir.exists():
        raise FileExistsError(f"a run named {name!r} already exists under {storage}: pass --resume to continue it "
                              "or choose another --name")
    connect_ray(address)
    check_resources(cfg.train.workers, worker_resources(cfg))
    cfg = absolute_paths(cfg)
    experiment = cfg.tracking.experiment or f"dfdam-{cfg.dataset}"
    run_id = tracking.start_run(uri, experiment, name, cfg.flat(), tags={"dfdam.preset": cfg.preset})
    if not resume:
        tracking.log_json(uri, run_id, _manifest_summary(train_manifest), "data/train_manifest_summary.json")

    trainer = make_trainer(cfg, name=name, tracking_uri=uri, run_id=run_id)
    try:
        result = trainer.fit()
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id, "FINISHED")
    return TrainResult(name=name, run_id=run_id, tracking_uri=uri,
                       checkpoint=result.checkpoint.path if result.checkpoint else None,
                       metrics=dict(result.metrics or {}), storage=str(storage))


def _manifest_summary(manifest: Manifest) -> dict[str, Any]:
    pixels = np.array(manifest.table.column("class_pixels").to_pylist(), dtype=np.int64).sum(axis=0)
    return {
        "root": str(manifest.root),
        "split": manifest.split,
        "dataset": manifest.dataset,
        "samples": manifest.num_samples,
        "shards": len(manifest.shards),
        "class_pixels": dict(zip(manifest.class_names, pixels.tolist())),
    }


def print_result(result: TrainResult, stream=sys.stdout) -> None:
    m = result.metrics
    print(f"\nrun {result.name}: val mIoU {m.get('val_miou', float('nan')):.4f} after epoch {m.get('epoch', '?')} "
          f"(best {m.get('best_val_miou', float('nan')):.4f})", file=stream)
    print(f"  checkpoint: {result.checkpoint}", file=stream)
    print(f"  MLflow run: {result.run_id} in {result.tracking_uri}", file=stream)
    print(f"  look:       mlflow ui --backend-store-uri {result.tracking_uri}", file=stream)
