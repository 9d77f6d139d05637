"""What every Ray Train worker runs: set up, restore, the epoch loop, report.

:func:`train_worker` reads like Ray's own examples. Each rank builds its
:class:`WorkerJob` (config, rank, device, manifests), restores the run from Ray Train's
latest checkpoint if there is one, wraps the model in DDP (gloo on CPU, NCCL on GPU), and
then, per epoch, trains on its shard of the data (``pipeline/loop.py``), evaluates, and
reports. Every rank calls ``ray.train.report`` once per epoch (it is a barrier); rank 0
attaches the checkpoint. The metrics reach MLflow through :func:`epoch_logger` on the
controller, only once Ray Train has registered the epoch's checkpoint, so an epoch a
restore runs again was never logged and a run's history holds one value per epoch.
Rank 0 also posts progress events for the driver's console (``pipeline/console.py``).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline import tracking
from pipeline.checkpoint import build_model, load_checkpoint, save_checkpoint
from pipeline.config import Config, loader_workers
from pipeline.data import eval_loader, steps_per_epoch, train_loader
from pipeline.evaluate import epoch_metrics, evaluate, prediction_overlays
from pipeline.loop import TrainingState, average_buffers, dataset_info, setup_training, train_one_epoch
from pipeline.metrics import format_iou_table
from sharding.manifest import Manifest, read_manifest

Post = Callable[[dict[str, Any]], None]


@dataclass
class WorkerJob:
    """What one rank knows about its job: set once, read by every step below."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    train_manifest: Manifest
    val_manifest: Manifest
    info: dict[str, Any]  # dataset_info: classes, palette, ignore index
    steps: int  # optimizer steps per epoch
    tracking_uri: str
    run_id: str
    post: Post  # progress events for the driver's console (rank 0; a no-op elsewhere)
    outbox: tracking.Outbox  # what could not reach a tracking server that is away (rank 0 logs)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop: set up, restore, then train, evaluate and report every epoch."""
    job = _set_up(loop_config)
    run = _restore(job)
    ddp_model, net = _distribute(job, run.model)
    best = run.best
    for epoch in range(run.start_epoch, job.cfg.train.epochs):
        metrics, cm = _train_and_evaluate(job, run, ddp_model, net, epoch)
        best = max(best, metrics["val_miou"])
        metrics |= {"epoch": epoch + 1, "best_val_miou": best}
        job.post({"kind": "epoch", "metrics": metrics, "images_per_s": metrics["train_images_per_s"] * job.world})
        if job.rank == 0 and epoch + 1 == job.cfg.train.epochs:
            _log_final(job, net, cm)  # before the last report: a Tune scheduler may stop the trial once it sees it
        _report(job, run, net, epoch, metrics)


def _set_up(loop_config: dict[str, Any]) -> WorkerJob:
    import ray.train
    import ray.train.torch

    cfg = loader_workers(Config.from_dict(loop_config["config"]))  # -1: from train.cpus_per_worker
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # Ray Train's per-report lines stay out of the logs
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, cfg.train.cpus_per_worker))
    torch.manual_seed(cfg.train.seed)
    shards = cfg.data.shards  # a folder or a URL, opened here: every node reads it itself
    train_manifest = read_manifest(shards, cfg.data.train_split)
    return WorkerJob(
        cfg=cfg, rank=rank, world=ctx.get_world_size(), device=ray.train.torch.get_device(),
        train_manifest=train_manifest, val_manifest=read_manifest(shards, cfg.data.val_split),
        info=dataset_info(train_manifest), steps=steps_per_epoch(train_manifest, cfg.data.batch_size),
        tracking_uri=loop_config["tracking_uri"], run_id=loop_config["run_id"],
        post=_poster(loop_config.get("board") if rank == 0 else None),
        outbox=tracking.Outbox(loop_config.get("outbox")),
    )


def _poster(board: Any) -> Post:
    """Events to the driver's board actor, fire and forget: the console never stops training."""
    if board is None:
        return lambda event: None

    import ray

    def post(event: dict[str, Any]) -> None:
        try:
            posted = board.post.remote(event)
            if event["kind"] != "step":  # an epoch's line is on the board before the epoch is reported
                ray.get(posted, timeout=10)
        except Exception:  # noqa: BLE001 - a lost console is not worth a lost epoch
            pass

    return post


def _restore(job: WorkerJob) -> TrainingState:
    """A fresh :class:`TrainingState`, or the one of Ray Train's latest checkpoint."""
    import ray.train

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        if job.rank == 0:
            job.post({"kind": "message", "text": f"resuming from the checkpoint of epoch {state['epoch'] + 1}"})
            # The controller logs an epoch only after registering its checkpoint; had it died
            # in between, the restored epoch's metrics would be missing: add them once.
            job.outbox.log_metrics(job.tracking_uri, job.run_id, state["metrics"], step=state["epoch"] + 1, once=True)
    return setup_training(job.cfg, job.info["num_classes"], job.steps, job.device, state)


def _distribute(job: WorkerJob, model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the DDP-wrapped model to train, the plain module inside it to evaluate and save)."""
    import ray.train.torch

    if job.cfg.train.sync_bn and job.world > 1 and job.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the optimizer's parameters
    ddp_model = ray.train.torch.prepare_model(model)  # DDP when world > 1 (already on the device)
    return ddp_model, (ddp_model.module if hasattr(ddp_model, "module") else ddp_model)


def _train_and_evaluate(job: WorkerJob, run: TrainingState, ddp_model: nn.Module, net: nn.Module,
                        epoch: int) -> tuple[dict[str, float], torch.Tensor]:
    """One epoch on this rank's shard, then validation of one model: the metrics every rank
    reports, and the summed confusion matrix (on the CPU).

    Before evaluation the ranks agree on one set of BatchNorm buffers
    (:func:`~pipeline.loop.average_buffers`), and the confusion matrix is all-reduced once,
    so every rank reports the metrics of the very weights rank 0 checkpoints.
    """
    import torch.distributed as dist

    cfg, device = job.cfg, job.device
    loader = train_loader(job.train_manifest, cfg.data, rank=job.rank, world_size=job.world, epoch=epoch,
                          seed=cfg.train.seed, pin_memory=device.type == "cuda")
    stats = train_one_epoch(ddp_model, loader, run.optimizer, cfg, epoch=epoch, steps=job.steps, schedule=run.schedule,
                            device=device, scaler=run.scaler,
                            progress=lambda p: job.post({"kind": "step", **p}))
    if job.world > 1:  # the mean over ranks, so the reported training loss is the whole batch's
        names = sorted(stats)
        values = torch.tensor([stats[k] for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        stats = dict(zip(names, (values / job.world).tolist()))
    skipped = round(stats.pop("data_skipped") * job.world)  # damaged samples: the sum over ranks
    if skipped:
        job.post({"kind": "message", "text": f"epoch {epoch + 1}: {skipped} damaged sample(s) skipped (named in the "
                                             "workers' log); `run.py shard verify` lists them"})
    average_buffers(net, job.world)
    cm = evaluate(net, eval_loader(job.val_manifest, cfg.data, rank=job.rank, world_size=job.world),
                  job.info["num_classes"], device, cfg.loss.ignore_index)
    if job.world > 1:
        dist.all_reduce(cm)  # the one collective of evaluation
    cm = cm.cpu()
    return ({f"train_{k}": v for k, v in stats.items()} | {"data_skipped": skipped}
            | epoch_metrics(cm, job.info["class_names"])), cm


def _report(job: WorkerJob, run: TrainingState, net: nn.Module, epoch: int, metrics: dict[str, float]) -> None:
    """Every rank reports the epoch's metrics; rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="dfdam-ckpt-") as tmp:
        checkpoint = None
        if job.rank == 0:
            save_checkpoint(tmp, model=net, optimizer=run.optimizer, scaler=run.scaler, epoch=epoch,
                            step=(epoch + 1) * job.steps, config=job.cfg, dataset=job.info, metrics=metrics,
                            schedule=run.schedule.to_dict())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def _log_final(job: WorkerJob, net: nn.Module, cm: torch.Tensor) -> None:
    """Rank 0, after the last epoch: confusion matrix, per-class table, overlays, model.

    Through the run's outbox: with the tracking server away, the two small files wait there
    whole, the figure, overlays and model as names that ``run.py track sync`` rebuilds (the
    model from the checkpoint this epoch writes) or reports."""
    from pipeline.track_sync import CONFUSION_FIGURE, CONFUSION_JSON, log_trained_model
    from pipeline.visualize import confusion_matrix_figure

    uri, run_id, info, cfg, send = job.tracking_uri, job.run_id, job.info, job.cfg, job.outbox.send
    send(uri, run_id, {"kind": "json", "name": CONFUSION_JSON,
                       "data": {"class_names": info["class_names"], "matrix": cm.tolist()}})
    send(uri, run_id, {"kind": "missing", "name": CONFUSION_FIGURE},
         lambda: tracking.log_figure(uri, run_id, confusion_matrix_figure(cm.numpy(), info["class_names"]),
                                     CONFUSION_FIGURE))
    send(uri, run_id, {"kind": "text", "name": "eval/per_class_iou.txt",
                       "data": format_iou_table(cm, info["class_names"])})
    for key, panel in prediction_overlays(net, job.val_manifest, cfg, job.device, cfg.tracking.overlays):
        send(uri, run_id, {"kind": "missing", "name": f"eval/overlays/{key}.png"},
             lambda panel=panel, key=key: tracking.log_image(uri, run_id, panel, f"eval/overlays/{key}.png"))
    if cfg.tracking.log_model:
        cpu_model = build_model(cfg.model, info["num_classes"], pretrained=False)
        cpu_model.load_state_dict({k: v.cpu() for k, v in net.state_dict().items()})
        send(uri, run_id, {"kind": "missing", "name": "model"},
             lambda: log_trained_model(uri, run_id, cpu_model, cfg, info))


def epoch_logger(tracking_uri: str, run_id: str, outbox: tracking.Outbox | None = None):
    """A Ray Train callback that logs each epoch's metrics to MLflow on the controller.

    ``after_report`` runs once every rank has reported and after Ray Train has registered
    (and saved its record of) the epoch's checkpoint, so what reaches MLflow is exactly the
    history of checkpoints a restore can continue from. With the tracking server away, an
    epoch's metrics wait in ``outbox`` and go first at the next epoch's end.
    """
    from ray.train import UserCallback

    class EpochLogger(UserCallback):
        def __init__(self, uri: str, run: str, box: tracking.Outbox) -> None:
            self.uri, self.run_id, self.outbox = uri, run, box

        def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
            reported = metrics[0]  # rank 0's; every rank reports the same all-reduced values
            self.outbox.log_metrics(self.uri, self.run_id, reported, step=int(reported["epoch"]))

    return EpochLogger(tracking_uri, run_id, outbox or tracking.Outbox())
