"""The plain PyTorch training loop: nothing here knows about Ray or MLflow.

Read top to bottom, as one would read nanoGPT's loop: :func:`setup_training` builds the
model, optimizer, grad scaler and poly schedule on a device (fresh or from a checkpoint);
:func:`train_step` is one SGD step on Eq. 12's joint loss; :func:`train_one_epoch` runs the
poly learning rate (section 4.1) over one epoch; :func:`average_buffers` makes every
distributed rank hold one set of BatchNorm statistics before evaluation. The Ray Train
worker (``pipeline/worker.py``) and the GPU check call these and nothing else.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import build_model
from pipeline.config import Config, LossConfig
from pipeline.losses import joint_loss
from pipeline.optim import PolySchedule, build_optimizer, set_lr
from pipeline.transforms import normalize_batch
from sharding.manifest import Manifest


@dataclass
class TrainingState:
    """Everything a training loop carries from epoch to epoch, on one device."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: PolySchedule
    start_epoch: int = 0  # the first epoch still to run (0-based)
    best: float = -1.0  # best validation mIoU so far


def setup_training(cfg: Config, num_classes: int, steps: int, device: torch.device,
                   state: dict[str, Any] | None = None) -> TrainingState:
    """Model, optimizer, grad scaler and poly schedule on ``device``, fresh or from a checkpoint.

    The model is moved to ``device`` *before* the optimizer is built and its state loaded,
    so SGD's momentum buffers (and the scaler's state) land on the parameters' device:
    ``Optimizer.load_state_dict`` casts each state tensor to its parameter's device. A resume
    continues the checkpoint's :class:`PolySchedule` step for step; a new ``train.epochs``
    retargets it from the rate already reached (:meth:`PolySchedule.retarget`), never back up.
    """
    model = build_model(cfg.model, num_classes, pretrained=state is None).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda")
    end = steps * cfg.train.epochs
    if state is None:
        return TrainingState(model, optimizer, scaler, PolySchedule(cfg.optim.lr, end, cfg.optim.poly_power))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    done = int(state["step"])
    if state.get("schedule"):
        schedule = PolySchedule(**state["schedule"])
    else:  # a checkpoint from before schedules were saved: the poly policy of its own config
        saved = Config.from_dict(state["config"])
        schedule = PolySchedule(saved.optim.lr, steps * saved.train.epochs, saved.optim.poly_power)
    return TrainingState(model, optimizer, scaler, schedule.retarget(done, end), start_epoch=int(state["epoch"]) + 1,
                         best=float(state.get("metrics", {}).get("best_val_miou", -1.0)))


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
    schedule: PolySchedule,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """One pass of ``steps`` SGD steps with the poly LR (per iteration) and Eq. 12's loss.

    ``batches`` yields :func:`~pipeline.data.train_loader`'s uint8 ``(B, H, W, 3)`` images and
    ``(B, H, W)`` labels; they are copied to ``device`` and normalised there.

    Returns the epoch's mean losses (joint and its three parts), the last learning rate, the
    images per second of this process, ``data_wait_share``: the share of the epoch spent
    waiting for the loader, so a starved GPU shows in the metrics, and ``cpu_share``: this
    process's CPU seconds (all its threads) per second of the epoch, about
    ``train.cpus_per_worker`` for a CPU worker that has its cores to itself and less when other
    work takes them, so a contended machine shows too; ``data_skipped``: the damaged samples the
    loader skipped (:class:`~pipeline.data.TrainBatches`; 0 for a plain iterable). ``progress`` is called
    every ``train.log_every`` steps and after the last one with ``epoch`` (1-based),
    ``step``, ``steps``, the running mean ``loss``, ``lr`` and ``images_per_s``.
    """
    model.train()
    amp_dtype = torch.float16 if cfg.train.amp and device.type == "cuda" else None
    totals = {"loss": 0.0, "loss_p": 0.0, "loss_c": 0.0, "loss_s": 0.0}
    seen, start, lr, step = 0, time.perf_counter(), 0.0, 0
    cpu_start = time.process_time()
    waited = 0.0
    source, batches = batches, iter(batches)
    while True:
        fetch = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - fetch
        step += 1
        # uint8 crosses to the device (a quarter of float32's bytes); normalised there.
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images, labels = normalize_batch(images, cfg.data.mean, cfg.data.std), labels.long()
        lr = set_lr(optimizer, schedule, epoch * steps + step - 1)
        try:
            loss, parts = train_step(model, images, labels, optimizer, scaler, cfg.loss, amp_dtype)
        except FloatingPointError as exc:
            raise FloatingPointError(f"{exc} at epoch {epoch + 1} step {step}: lower optim.lr") from None
        totals["loss"] += loss.item()
        for k, v in parts.items():
            totals[k] += v.item()
        seen += images.shape[0]
        if progress is not None and (step % cfg.train.log_every == 0 or step == steps):
            progress({"epoch": epoch + 1, "step": step, "steps": steps, "loss": totals["loss"] / step, "lr": lr,
                      "images_per_s": seen / (time.perf_counter() - start)})
    if step == 0:
        raise RuntimeError("the training loader yielded no batch: check the shards and data.batch_size")
    elapsed = time.perf_counter() - start
    return {**{k: v / step for k, v in totals.items()}, "lr": lr, "images_per_s": seen / elapsed,
            "data_wait_share": waited / elapsed, "cpu_share": (time.process_time() - cpu_start) / elapsed,
            "data_skipped": float(getattr(source, "skipped", 0))}


@torch.no_grad()
def average_buffers(model: nn.Module, world_size: int) -> None:
    """Make every rank hold the same BatchNorm statistics: the mean over ranks, bit-identical.

    DDP broadcasts rank 0's buffers only at the start of a forward pass, so after the last
    step each rank's running mean and variance have moved with its own batch, and ranks
    evaluating with their own buffers would report the mIoU of no single model. Of the two
    remedies, broadcasting rank 0's buffers or averaging them (timm's ``distribute_bn``),
    averaging is chosen: it keeps the statistics of every rank's data, as SyncBatchNorm would.
    The average is then broadcast from rank 0, so the buffers are identical by construction
    whatever the backend's reduction order, and rank 0's checkpoint and logged model hold
    exactly the weights and buffers that every rank evaluated. (With SyncBatchNorm on GPUs
    the statistics already agree; this costs one small collective.) Integer buffers
    (``num_batches_tracked``) are equal on every rank and are left alone.
    """
    import torch.distributed as dist

    if world_size <= 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    for buffer in buffers:
        dist.all_reduce(buffer)
        buffer.div_(world_size)
    for buffer in buffers:
        dist.broadcast(buffer, src=0)


def dataset_info(manifest: Manifest) -> dict[str, Any]:
    return {
        "dataset": manifest.dataset,
        "num_classes": manifest.num_classes,
        "class_names": list(manifest.class_names),
        "palette": [list(c) for c in manifest.palette],
        "ignore_index": manifest.ignore_index,
    }
