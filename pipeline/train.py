"""Training with Ray Train: the driver.

:func:`fit` checks every input before any work starts (shards, manifests, weights, the
tracking store, the cluster's resources), opens the MLflow run, and launches a
``TorchTrainer`` whose workers run ``pipeline/worker.py`` (itself a thin layer over the
plain PyTorch loop of ``pipeline/loop.py``). While it runs, the driver prints what rank 0
posts (``pipeline/console.py``): one line per epoch, a progress bar inside it on a terminal.
A failed run ends in one :class:`TrainingError` naming each rank's cause and the checkpoint
to resume from. Ray calls live here, in ``pipeline/worker.py``, ``pipeline/cluster.py`` and
``pipeline/tune.py`` only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np

from models.names import PRETRAINED
from pipeline import tracking
from pipeline.checkpoint import RECORD_FILE, latest_checkpoint, load_checkpoint
from pipeline.cluster import check_resources, connect_ray
from pipeline.config import Config, ConfigError
from pipeline.console import ProgressBoard, TrainingConsole
from pipeline.worker import epoch_logger, train_worker
from sharding import storage
from sharding.classes import DATASETS
from sharding.manifest import Manifest, ManifestError, missing_shard_folder, read_manifest


class TrainingError(RuntimeError):
    """A training run failed and Ray Train could not (or may not) restore it."""


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class TrainResult:
    name: str
    run_id: str
    tracking_uri: str
    checkpoint: str | None  # folder of the latest checkpoint (a URL under remote storage)
    metrics: dict[str, float]
    storage: str  # train.storage: an absolute folder, or an s3:// / gs:// URI


def check_inputs(cfg: Config) -> tuple[Manifest, Manifest]:
    """Everything that can be checked before Ray starts: shards, manifests, preset, backbone weights
    (ImageNet weights are fetched into torch's cache here; :class:`models.backbone.WeightsUnavailable`
    where they cannot be)."""
    if not cfg.data.shards:
        raise ConfigError("no shards given: pass --data SHARD_DIR (a folder written by `run.py shard`)")
    shards = cfg.data.shards  # a folder, or a URL of one (sharding/storage.py): read_manifest checks either
    if not storage.is_folder(shards):
        raise missing_shard_folder(shards)
    # The validation split first: every preset names it 'val', so shards of another dataset (whose
    # training split has another name) are told apart by their dataset, not by a missing split.
    val_manifest = read_manifest(shards, cfg.data.val_split)
    if cfg.dataset in DATASETS and val_manifest.dataset != cfg.dataset:
        raise ConfigError(f"preset {cfg.preset!r} is made for {cfg.dataset} but {shards} holds "
                          f"{val_manifest.dataset} shards: use --preset {val_manifest.dataset} (or synthetic)")
    train_manifest = read_manifest(shards, cfg.data.train_split)
    if train_manifest.num_classes != val_manifest.num_classes:
        raise ManifestError(f"{shards}: splits {cfg.data.train_split!r} and {cfg.data.val_split!r} disagree on the "
                            f"number of classes ({train_manifest.num_classes} vs {val_manifest.num_classes})")
    check_crop(cfg, train_manifest)
    weights = cfg.model.weights
    if weights in PRETRAINED:
        # Into torch's cache on this node now (workers here then read it; workers elsewhere fetch
        # their own): no internet is an error before Ray starts, not one per worker after.
        from models.backbone import fetch_imagenet_weights

        fetch_imagenet_weights(cfg.model.backbone, weights)
    elif weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"model.weights {weights!r}: no such file; expected "
                                f"{' or '.join(map(repr, PRETRAINED))} or the path of a torchvision ResNet "
                                "state_dict (.pth) readable from every node")
    return train_manifest, val_manifest


def check_crop(cfg: Config, manifest: Manifest) -> None:
    """Refuse a training crop (section 4.1: random scale, then a ``data.crop_size`` crop, padded
    where the scaled image is smaller) larger than every image of the split, in height and width,
    even at the largest scale: every crop would then be a whole image framed by padding, never a
    random window of one. (A crop taller or wider than the images only is padded on that side,
    as the paper's crops of small VOC images are.)"""
    if manifest.num_samples == 0:
        return
    scale = max(cfg.data.scales)
    largest = [int(max(manifest.table.column(side).to_pylist()) * scale) for side in ("height", "width")]
    crop = cfg.data.crop_size
    if crop[0] > largest[0] and crop[1] > largest[1]:
        raise ConfigError(f"data.crop_size {crop[0]}x{crop[1]} is larger than every image of split "
                          f"{manifest.split!r} in {storage.display(manifest.root)} even at the largest scale {scale:g} "
                          f"(at most {largest[0]}x{largest[1]}): each crop would be a whole image and padding; expected "
                          f"a crop within {largest[0]}x{largest[1]} in height or width (--set data.crop_size=HxW)")


def worker_resources(cfg: Config) -> dict[str, float]:
    return {"CPU": cfg.train.cpus_per_worker} | ({"GPU": 1} if cfg.train.gpu else {})


def make_trainer(cfg: Config, *, name: str, tracking_uri: str, run_id: str, callbacks: list | None = None,
                 board: Any = None, outbox: tracking.Outbox | None = None):
    """The ``TorchTrainer`` for ``cfg`` (paths in ``cfg`` already absolute); Tune reuses it per trial.

    ``callbacks`` run after the MLflow :func:`~pipeline.worker.epoch_logger` (Tune's report
    callback must come after it: a scheduler may stop the trial as soon as it sees a result).
    ``board``: the actor rank 0 posts console events to (:func:`progress_board`), or None.
    ``outbox``: where MLflow calls wait while the tracking server is away (the run folder's file).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": tracking_uri, "run_id": run_id, "board": board,
                           "outbox": outbox.path if outbox else None},
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
            callbacks=[epoch_logger(tracking_uri, run_id, outbox), *(callbacks or [])],
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's own INFO lines stay in its log files
        ),
    )


def progress_board():
    """A :class:`~pipeline.console.ProgressBoard` actor on this driver's node, holding no CPU."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=here).remote()


@contextlib.contextmanager
def printing(board: Any, console: TrainingConsole, every_s: float = 1.0) -> Iterator[None]:
    """Hand the board's events to ``console`` from a thread while the block (``trainer.fit()``) runs."""
    import ray

    stop = threading.Event()

    def pump() -> None:
        while True:
            last = stop.wait(every_s)
            try:
                events = ray.get(board.take.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the console is never worth failing a run
                events = []
            for event in events:
                console.handle(event)
            if last:
                return

    thread = threading.Thread(target=pump, name="dfdam-console", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
        console.close()
        with contextlib.suppress(Exception):
            ray.kill(board)


def absolute_paths(cfg: Config) -> Config:
    """Shards, storage and weights as absolute paths (URLs as they are): Ray workers run in their
    own working directories, and open a URL themselves."""
    weights = cfg.model.weights
    if weights is not None and weights not in PRETRAINED:
        weights = str(Path(weights).resolve())
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, weights=weights),
        data=dataclasses.replace(cfg.data, shards=storage.absolute(cfg.data.shards)),
        train=dataclasses.replace(cfg.train, storage=storage.absolute(cfg.train.storage)),
    )


def fit(cfg: Config, *, name: str | None = None, resume: bool = False, address: str | None = None,
        stream: IO[str] | None = None) -> TrainResult:
    """Train ``cfg`` with Ray Train; every input is checked before any work starts.

    Progress goes to ``stream`` (default stdout): where Ray's own output goes, then one line
    per epoch (a progress bar inside it on a terminal).
    """
    stream = stream or sys.stdout
    train_manifest, _ = check_inputs(cfg)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    root = storage.absolute(cfg.train.storage)  # a folder, or s3:// / gs:// as Ray Train takes it
    name = name or f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = storage.join(root, name)
    found = storage.storage_exists(run_dir)
    if resume and not found:
        raise FileNotFoundError(f"--resume: no run named {name!r} under {storage.display(root)}")
    if not resume and found:
        raise FileExistsError(f"a run named {name!r} already exists under {storage.display(root)}: pass --resume "
                              "to continue it or choose another --name")
    if resume:
        check_resume(run_dir, cfg)
    ray_logs = connect_ray(address)
    check_resources(cfg.train.workers, worker_resources(cfg))
    cfg = absolute_paths(cfg)
    print(f"{'resuming' if resume else 'training'} {name}: {cfg.train.workers} worker(s), {cfg.train.epochs} epochs, "
          f"{train_manifest.num_samples} training images; Ray's own output: {ray_logs}", file=stream, flush=True)
    experiment = cfg.tracking.experiment or f"dfdam-{cfg.dataset}"
    run_id = tracking.start_run(uri, experiment, name, cfg.flat(), tags={"dfdam.preset": cfg.preset})
    if not resume:
        tracking.log_json(uri, run_id, _manifest_summary(train_manifest), "data/train_manifest_summary.json")

    outbox = tracking.Outbox.for_run(run_dir)
    with tracking.run_status(uri, run_id, outbox=outbox):
        board = progress_board()
        trainer = make_trainer(cfg, name=name, tracking_uri=uri, run_id=run_id, board=board, outbox=outbox)
        try:
            with printing(board, TrainingConsole(cfg.train.epochs, stream)):
                result = trainer.fit()
        except BaseException as exc:
            _raise_training_error(exc, name, run_dir, cfg)
            raise
        untracked, lost = _send_outbox(outbox, run_dir, uri, cfg.tracking.outbox_wait_s)
    if untracked:
        print(f"MLflow server {uri} was away at the end of run {name}: its MLflow run {run_id} is left RUNNING; not "
              f"uploaded: {'; '.join(untracked)}. They are kept in {outbox.path or 'the checkpoints'}; once the "
              f"server is back, complete the run with: python run.py track sync {storage.display(run_dir)}",
              file=stream, flush=True)
    if lost:
        print(f"MLflow run {run_id}: not uploaded while the server was away, and not kept: {'; '.join(lost)} "
              "(`run.py predict` draws overlays again)", file=stream, flush=True)
    return TrainResult(name=name, run_id=run_id, tracking_uri=uri,
                       checkpoint=_checkpoint_location(result.checkpoint, run_dir),
                       metrics=dict(result.metrics or {}), storage=root)


def _send_outbox(outbox: tracking.Outbox, run_dir: str, uri: str, wait_s: float) -> tuple[list[str], list[str]]:
    """At a run's end, what its outbox kept while the tracking server was away is sent (waiting
    up to ``wait_s`` seconds for the server, :func:`pipeline.track_sync.sync_run`); returns, in
    words, what still waits (empty: the run is complete in MLflow) and what was not kept."""
    if outbox.path is None or not Path(outbox.path).is_file():
        return [], []
    from pipeline.track_sync import sync_run

    report = sync_run(run_dir, uri, wait_s=wait_s, statuses=False)  # a resumed run's earlier end is not this one's
    if not report.complete:
        outbox.away = True  # the run's status joins the rest in the outbox without another wait
    return report.waiting, report.lost


def _checkpoint_location(checkpoint: Any, run_dir: str) -> str | None:
    """Ray's checkpoint as a location: its path on local storage; under remote storage, the URL
    (Ray's ``Checkpoint.path`` there is bucket/key, without the scheme)."""
    if checkpoint is None:
        return None
    if not storage.is_remote(run_dir):
        return checkpoint.path
    return storage.join(run_dir, PurePosixPath(checkpoint.path).name)


def latest_trained(run_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(the newest complete checkpoint's folder, its record ``checkpoint.json``) of a run, or None.

    Local storage: :func:`~pipeline.checkpoint.latest_checkpoint` (sizes and sha256 checked).
    Remote storage: the checkpoint records (``checkpoint.json``) read where they are; Ray Train
    registers a checkpoint only once its upload is complete.
    """
    if not storage.is_remote(run_dir):
        latest = latest_checkpoint(run_dir)
        return None if latest is None else (str(latest), json.loads((latest / RECORD_FILE).read_text()))
    newest: tuple[int, str, dict[str, Any]] | None = None
    for folder in storage.storage_folders(run_dir):
        try:
            record = json.loads(storage.storage_read_text(storage.join(folder, RECORD_FILE)))
        except (FileNotFoundError, ValueError):
            continue  # not a checkpoint folder, or a record cut short
        if newest is None or int(record["step"]) > newest[0]:
            newest = (int(record["step"]), folder, record)
    return None if newest is None else (newest[1], newest[2])


def check_resume(run_dir: str | Path, cfg: Config) -> None:
    """Refuse a resume that has nothing left to train (``--epochs`` is the new total)."""
    latest = latest_trained(run_dir)
    if latest is None:
        return  # killed before its first checkpoint: Ray Train starts it from the beginning
    folder, record = latest
    done = int(record["epoch"])
    saved = _trained_model(folder, record)
    if saved is not None:
        changed = [f"model.{k}={saved.get(k)} (now {v})" for k, v in dataclasses.asdict(cfg.model).items()
                   if k != "weights" and saved.get(k) != v]  # weights only initialise: the checkpoint holds them
        if changed:
            raise ConfigError(f"--resume: run {storage.name(run_dir)!r} was trained as {', '.join(changed)} (checkpoint "
                              f"{storage.display(folder)}); expected the model it holds: drop those --set overrides, "
                              "or start a new --name")
    if done >= cfg.train.epochs:
        raise ConfigError(f"--resume: run {storage.name(run_dir)!r} has already trained {done} epoch(s) "
                          f"(checkpoint {storage.display(folder)}); --epochs is the new total, so pass more than "
                          f"{done} to train longer")


def _trained_model(folder: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The model section a checkpoint was trained with: from its record (``checkpoint.json``), so
    the weights are not read; from the checkpoint itself for a local one whose record predates
    that field; None for such a remote one."""
    if "model" in record:
        return record["model"]
    return None if storage.is_remote(folder) else load_checkpoint(folder)["config"]["model"]


def _raise_training_error(exc: BaseException, name: str, run_dir: str, cfg: Config) -> None:
    """Turn Ray Train's failure into one clear :class:`TrainingError` (other exceptions pass)."""
    from ray.train import TrainingFailedError

    if not isinstance(exc, TrainingFailedError):
        return
    causes = getattr(exc, "worker_failures", None)
    summary = ("; ".join(f"rank {rank}: {_first_line(error)}" for rank, error in sorted(causes.items())) if causes
               else _first_line(getattr(exc, "controller_failure", None) or exc))
    try:
        latest = latest_trained(run_dir)
    except OSError:  # remote storage gone too: say where to look instead
        latest = None
    where = (f"its latest complete checkpoint is {storage.display(latest[0])}" if latest
             else "it wrote no checkpoint")
    raise TrainingError(
        f"training run {name!r} failed after {cfg.train.max_failures} restart(s) allowed "
        f"(train.max_failures / --max-failures): {summary}. "
        f"{where.capitalize()}; continue with `run.py train --resume --name {name}` once the cause is fixed"
    ) from exc


def _first_line(error: BaseException, limit: int = 400) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _manifest_summary(manifest: Manifest) -> dict[str, Any]:
    pixels = np.array(manifest.table.column("class_pixels").to_pylist(), dtype=np.int64).sum(axis=0)
    return {
        "root": storage.display(manifest.root),
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
    look = (f"open {result.tracking_uri} in a browser" if result.tracking_uri.startswith(("http://", "https://"))
            else f"mlflow ui --host 127.0.0.1 --backend-store-uri {result.tracking_uri}")  # this machine only
    print(f"  look:       {look}", file=stream)
