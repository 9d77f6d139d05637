"""Training: a plain PyTorch loop, a thin Ray Train worker around it, and the driver.

Read top to bottom: :func:`setup_training`, :func:`train_one_epoch` and
:func:`average_buffers` are ordinary PyTorch (evaluation is ``pipeline/evaluate.py``);
:func:`train_worker` is what each Ray Train worker runs (DDP set up by Ray, gloo on CPU,
NCCL on GPU); :class:`EpochLogger` writes each epoch's metrics to MLflow from the Ray Train
controller once the epoch's checkpoint is registered; :func:`fit` is the driver: it checks
every input before any work starts, opens the MLflow run, and launches a ``TorchTrainer``.
Ray calls live here, in ``pipeline/cluster.py`` and in ``pipeline/tune.py`` only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
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
from pipeline.checkpoint import RECORD_FILE, build_model, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.cluster import check_resources, connect_ray
from pipeline.config import Config, ConfigError, LossConfig
from pipeline.data import eval_loader, steps_per_epoch, train_loader
from pipeline.evaluate import epoch_metrics, evaluate, prediction_overlays
from pipeline.losses import joint_loss
from pipeline.metrics import format_iou_table
from pipeline.optim import PolySchedule, build_optimizer, set_lr
from sharding.manifest import Manifest, ManifestError, read_manifest


class TrainingError(RuntimeError):
    """A training run failed and Ray Train could not (or may not) restore it."""


# ----------------------------------------------------------------------------- plain PyTorch


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
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """One pass of ``steps`` SGD steps with the poly LR (per iteration) and Eq. 12's loss.

    Besides the mean losses it returns ``data_wait_s`` and ``step_s``: the seconds spent
    waiting for the loader and in the step itself, so a starved GPU shows in the metrics.
    """
    model.train()
    amp_dtype = torch.float16 if cfg.train.amp and device.type == "cuda" else None
    totals = {"loss": 0.0, "loss_p": 0.0, "loss_c": 0.0, "loss_s": 0.0}
    seen, start, lr, step = 0, time.perf_counter(), 0.0, 0
    waited = 0.0
    batches = iter(batches)
    while True:
        fetch = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        waited += time.perf_counter() - fetch
        step += 1
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        lr = set_lr(optimizer, schedule, epoch * steps + step - 1)
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
    return {**{k: v / step for k, v in totals.items()}, "lr": lr, "images_per_s": seen / elapsed,
            "data_wait_share": waited / elapsed}


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


# ----------------------------------------------------------------------------- Ray Train worker


def train_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: data shard, DDP model, epochs, checkpoints, reports.

    Every rank calls ``ray.train.report`` once per epoch (it is a barrier); rank 0 attaches
    the checkpoint. The metrics reach MLflow through :class:`EpochLogger` on the controller,
    only once Ray Train has registered the epoch's checkpoint: an epoch that a restore runs
    again was never logged, so a run's history holds one value per epoch. Before evaluation
    the ranks agree on one set of BatchNorm buffers (:func:`average_buffers`), and the
    confusion matrix is all-reduced once, so every rank reports the metrics of the very
    weights rank 0 checkpoints.
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

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        if rank == 0:
            log(f"resuming from the checkpoint of epoch {state['epoch'] + 1}")
            # The controller logs an epoch only after registering its checkpoint; had it died
            # in between, the restored epoch's metrics would be missing: add them once.
            tracking.log_metrics_once(uri, run_id, state["metrics"], step=state["epoch"] + 1)
    run = setup_training(cfg, info["num_classes"], steps, device, state)
    del state
    model = run.model
    if cfg.train.sync_bn and world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the optimizer's parameters
    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (already on the device)
    net = ddp_model.module if hasattr(ddp_model, "module") else ddp_model

    best = run.best
    for epoch in range(run.start_epoch, cfg.train.epochs):
        loader = train_loader(train_manifest, cfg.data, rank=rank, world_size=world, epoch=epoch, seed=cfg.train.seed)
        stats = train_one_epoch(ddp_model, loader, run.optimizer, cfg, epoch=epoch, steps=steps, schedule=run.schedule,
                                device=device, scaler=run.scaler, log=log if rank == 0 else None)
        if world > 1:  # the mean over ranks, so the reported training loss is the whole batch's
            names = sorted(stats)
            values = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=device)
            dist.all_reduce(values)
            stats = dict(zip(names, (values / world).tolist()))
        average_buffers(net, world)  # one model per evaluation: see its docstring
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
        if rank == 0 and epoch + 1 == cfg.train.epochs:
            # Before the last report: a Tune scheduler may stop the trial as soon as it sees it.
            _log_final(uri, run_id, net, cm.cpu(), val_manifest, cfg, device, info)
        with tempfile.TemporaryDirectory(prefix="dfdam-ckpt-") as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, model=net, optimizer=run.optimizer, scaler=run.scaler, epoch=epoch,
                                step=(epoch + 1) * steps, config=cfg, dataset=info, metrics=metrics,
                                schedule=run.schedule.to_dict())
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


def epoch_logger(tracking_uri: str, run_id: str):
    """A Ray Train callback that logs each epoch's metrics to MLflow on the controller.

    ``after_report`` runs once every rank has reported and after Ray Train has registered
    (and saved its record of) the epoch's checkpoint, so what reaches MLflow is exactly the
    history of checkpoints a restore can continue from.
    """
    from ray.train import UserCallback

    class EpochLogger(UserCallback):
        def __init__(self, uri: str, run: str) -> None:
            self.uri, self.run_id = uri, run

        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            reported = metrics[0]  # rank 0's; every rank reports the same all-reduced values
            tracking.log_metrics(self.uri, self.run_id, reported, step=int(reported["epoch"]))

    return EpochLogger(tracking_uri, run_id)


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
    weights = cfg.model.weights
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise FileNotFoundError(f"model.weights {weights!r}: no such file; expected 'imagenet' or the path of a "
                                "torchvision ResNet state_dict (.pth) readable from every node")
    if cfg.dataset in ("cityscapes", "voc") and train_manifest.dataset != cfg.dataset:
        raise ConfigError(f"preset {cfg.preset!r} is made for {cfg.dataset} but {shards} holds "
                          f"{train_manifest.dataset} shards: use --preset {train_manifest.dataset} (or synthetic)")
    return train_manifest, val_manifest


def worker_resources(cfg: Config) -> dict[str, float]:
    return {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.gpu else {})


def make_trainer(cfg: Config, *, name: str, tracking_uri: str, run_id: str, callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` (paths in ``cfg`` already absolute); Tune reuses it per trial.

    ``callbacks`` run after the MLflow :func:`epoch_logger` (Tune's report callback must come
    after it: a scheduler may stop the trial as soon as it sees a result).
    """
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
            callbacks=[epoch_logger(tracking_uri, run_id), *(callbacks or [])],
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's own INFO lines stay in its log files
        ),
    )


def absolute_paths(cfg: Config) -> Config:
    """Shards, storage and weights as absolute paths: Ray workers run in their own working directories."""
    weights = cfg.model.weights
    if weights not in (None, "imagenet"):
        weights = str(Path(weights).resolve())
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, weights=weights),
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
    if resume:
        check_resume(run_dir, cfg)
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
    except BaseException as exc:
        tracking.end_run(uri, run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        _raise_training_error(exc, name, run_dir, cfg)
        raise
    tracking.end_run(uri, run_id, "FINISHED")
    return TrainResult(name=name, run_id=run_id, tracking_uri=uri,
                       checkpoint=result.checkpoint.path if result.checkpoint else None,
                       metrics=dict(result.metrics or {}), storage=str(storage))


def check_resume(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume that has nothing left to train (``--epochs`` is the new total)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return  # killed before its first checkpoint: Ray Train starts it from the beginning
    done = json.loads((latest / RECORD_FILE).read_text())["epoch"]
    if done >= cfg.train.epochs:
        raise ConfigError(f"--resume: run {run_dir.name!r} has already trained {done} epoch(s) "
                          f"(checkpoint {latest}); --epochs is the new total, so pass more than {done} to train longer")


def _raise_training_error(exc: BaseException, name: str, run_dir: Path, cfg: Config) -> None:
    """Turn Ray Train's failure into one clear :class:`TrainingError` (other exceptions pass)."""
    from ray.train import TrainingFailedError

    if not isinstance(exc, TrainingFailedError):
        return
    causes = getattr(exc, "worker_failures", None)
    summary = ("; ".join(f"rank {rank}: {_first_line(error)}" for rank, error in sorted(causes.items())) if causes
               else _first_line(getattr(exc, "controller_failure", None) or exc))
    latest = latest_checkpoint(run_dir)
    where = f"its latest complete checkpoint is {latest}" if latest else "it wrote no checkpoint"
    raise TrainingError(
        f"training run {name!r} failed after {cfg.train.max_failures} restart(s) allowed "
        f"(train.max_failures / --max-failures): {summary}. "
        f"{where.capitalize()}; continue with `run.py train --resume --name {name}` once the cause is fixed"
    ) from exc


def _first_line(error: BaseException, limit: int = 160) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
