#!/usr/bin/env python3
"""The GPU path, proven: training, kill-and-resume, throughput and evaluation on one GPU.

Run it through ``benchmarks/gpu_check.sh`` (which installs carried wheels, runs the stages
in order and prints the table); this file is one stage per call, all of them adding rows to
``<work>/rows.json``:

``--stage 1`` needs torch, torchvision, webdataset and cityscapesscripts, *not* Ray or MLflow
(``pipeline.loop``, the plain PyTorch loop, imports neither):

* **data**: a synthetic Cityscapes at the real size (``sharding.synthetic.make_cityscapes``,
  1024x2048 frames) packed into shards by ``sharding.write.shard_dataset``.
* **train DF-DAM-R18 / DF-DAM-R101 / DeepLabV3-R50**: ``pipeline.loop.setup_training`` +
  ``train_one_epoch`` (the real training step, fp16 autocast with a GradScaler on the GPU)
  on batches from ``pipeline.data.train_loader`` with ``data.loader_workers`` processes (8 on
  the GPU, what a 16-core node gives one worker): a short warm-up epoch, then a timed one.
  Figures: images/s over the timed epoch, the share of its time spent waiting for the loader
  (``data_wait_share``), images/s of the steps alone (images/s / (1 - wait)), and the peak of
  ``torch.cuda.max_memory_allocated``. torchvision's ``deeplabv3_resnet50`` (output stride 8,
  built by ``benchmarks/train_throughput.py``) runs in the same loop with the same optimizer
  recipe; an out-of-memory there is reported as ``OOM``, not as a failure.
  The timed epoch is ``Sizes.timed_steps`` batches (16 on the GPU) drawn, with replacement as
  the train loader always draws, from the generated frames: the manifest's table is repeated to
  that length, the shards themselves are the real ones. Like every epoch it includes the
  loader's start (worker processes, the first batch), which a real Cityscapes epoch (372 steps
  of 8) spreads thinner: read the data-wait share as an upper bound of the steady state's.
* **train DF-DAM-R18, lz4 shards**: the same run reading the train frames packed with
  ``run.py shard --image-encoding lz4`` (decoded pixels: no PNG decode in the loader), and
  **train DF-DAM-R18, VOC JPEG**: the VOC recipe (``voc`` preset with ResNet-18, 512x512 crops,
  batch 16, synthetic JPEG photos of VOC's sizes packed as ``train_aug``). Issue 11 asks that
  the data wait stay within 5% of the step time at these recipes with the loader workers a
  node gives one GPU: read it in the ``data wait`` figure.
* **resume onto the GPU**: the R18 run's state is saved with ``pipeline.checkpoint.save_checkpoint``,
  read back with ``load_checkpoint`` (onto the CPU, as a Ray worker reads it) and restored with
  ``setup_training(..., device, state)``, the function the Ray worker uses. Every optimizer
  state tensor must sit on its parameter's device, equal to what was saved, and one more step
  must train. On a GPU the row also shows the control: the order the bug had (optimizer state
  loaded before the model moves) leaves the momentum buffers on the CPU.

``--stage 2`` needs Ray and MLflow: ``run.py train --gpu --preset cityscapes`` on those shards
(1 worker, 1024x1024 crops, batch 8, AMP, 2 epochs, a private local Ray cluster and an SQLite
MLflow store in the work folder); as soon as Ray Train has registered epoch 1's checkpoint the
driver's whole process group gets SIGKILL; then ``run.py train --resume`` must train epoch 2
only, on the GPU (its checkpoint's optimizer state is read back without ``map_location`` to
show the device it was saved from); then ``run.py evaluate`` of the run folder.

``--report`` prints the one table (and writes it, with the rows as JSON, to ``--out-dir``).

``--cpu-smoke`` runs the same code at tiny sizes on the CPU (64x128 frames, 64x64 crops,
batch 2, 1 loader worker): ``tests/test_gpu_check.py`` runs it so that it cannot rot.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

ROWS_FILE = "rows.json"
RUN_NAME = "gpu-check"
NUM_CLASSES = 19
OK, FAIL, SKIP, OOM = "OK", "FAIL", "SKIP", "OOM"


@dataclass(frozen=True)
class Sizes:
    frame: tuple[int, int]  # synthetic frame (H, W)
    train: int  # synthetic train frames
    val: int
    crop: tuple[int, int]
    batch: int
    loader_workers: int
    warmup_steps: int  # stage 1: untimed epoch
    timed_steps: int  # stage 1: timed epoch
    shard_size: int
    timeout_s: int  # stage 2: each run.py call
    voc_sides: tuple[int, int]  # stage 1, VOC recipe: each synthetic photo's sides drawn from this range
    voc_crop: tuple[int, int]
    voc_batch: int


GPU = Sizes(frame=(1024, 2048), train=16, val=4, crop=(1024, 1024), batch=8, loader_workers=8,
            warmup_steps=3, timed_steps=16, shard_size=4, timeout_s=240,
            voc_sides=(333, 500), voc_crop=(512, 512), voc_batch=16)
CPU_SMOKE = Sizes(frame=(64, 128), train=8, val=2, crop=(64, 64), batch=2, loader_workers=1,
                  warmup_steps=1, timed_steps=2, shard_size=2, timeout_s=400,
                  voc_sides=(48, 80), voc_crop=(64, 64), voc_batch=2)


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    stage: int
    check: str
    result: str
    seconds: float
    figures: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_rows(work: Path) -> list[Row]:
    path = work / ROWS_FILE
    return [Row(**r) for r in json.loads(path.read_text())] if path.is_file() else []


def add_row(work: Path, row: Row) -> Row:
    rows = load_rows(work) + [row]
    tmp = work / (ROWS_FILE + ".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    os.replace(tmp, work / ROWS_FILE)
    print(f"[gpu_check] {row.result:4s} {row.check}: {row.figures}", flush=True)
    out = os.environ.get("OUT")
    if out:  # the table so far, in case the device call is cut short before --report
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_check.txt").write_text(format_table(rows) + "\n")
    return row


def time_left(limit: float) -> float:
    """Seconds a step may take: ``limit``, or less where $GPU_CHECK_DEADLINE (epoch seconds, set by
    gpu_check.sh so that the whole check ends in time) is nearer; 30 s stay for the table."""
    deadline = os.environ.get("GPU_CHECK_DEADLINE")
    if not deadline:
        return limit
    return max(10.0, min(limit, float(deadline) - time.time() - 30.0))


def run_check(work: Path, stage: int, check: str, body: Callable[[], tuple[str, str]]) -> Row:
    """Run ``body`` (-> (result, figures)) and record its row; an exception is a FAIL row."""
    print(f"[gpu_check] stage {stage}: {check} ...", flush=True)
    start = time.perf_counter()
    try:
        result, figures = body()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the next check still runs
        import traceback

        traceback.print_exc()
        lines = str(exc).strip().splitlines()
        result, figures = FAIL, f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
    return add_row(work, Row(stage, check, result, round(time.perf_counter() - start, 1), figures))


def format_table(rows: list[Row]) -> str:
    from sharding.text import format_table as aligned  # standard library only: no Ray, MLflow or torch

    lines = [[str(r.stage), r.check, r.result, f"{r.seconds:.1f}", r.figures] for r in rows]
    return aligned(["stage", "check", "result", "seconds", "figures"], lines, align="lllrl")


# ----------------------------------------------------------------------------- stage 1 (no Ray, no MLflow)


def _gib(n: int) -> float:
    return n / 2**30


def make_shards(work: Path, sizes: Sizes) -> tuple[Path, str]:
    from sharding.synthetic import make_cityscapes
    from sharding.write import shard_dataset

    raw, shards = work / "cityscapes", work / "shards"
    h, w = sizes.frame
    start = time.perf_counter()
    make_cityscapes(raw, seed=0, train=sizes.train, val=sizes.val, test=1, height=h, width=w)
    made = time.perf_counter() - start
    start = time.perf_counter()
    reports = shard_dataset("cityscapes", raw, shards, splits=["train", "val"], shard_size=sizes.shard_size,
                            workers=min(8, os.cpu_count() or 1), show_progress=False)
    packed = time.perf_counter() - start
    mb = sum(r.bytes for r in reports) / 1e6
    n = {r.split: r.samples for r in reports}
    if n != {"train": sizes.train, "val": sizes.val}:
        raise RuntimeError(f"expected {sizes.train} train + {sizes.val} val samples in the shards, got {n}")
    # The same train frames as decoded pixels (run.py shard --image-encoding lz4): the fast-decoding copy.
    (lz4,) = shard_dataset("cityscapes", raw, work / "shards-lz4", splits=["train"], shard_size=sizes.shard_size,
                           workers=min(8, os.cpu_count() or 1), show_progress=False, encoding="lz4")
    shutil.rmtree(raw, ignore_errors=True)
    return shards, (f"{sizes.train} train + {sizes.val} val frames {h}x{w} made in {made:.1f} s; "
                    f"{sum(r.shards for r in reports)} shards, {mb:.0f} MB, packed in {packed:.1f} s; "
                    f"train also as lz4 pixels: {lz4.bytes / 1e6:.0f} MB")


def make_voc_shards(work: Path, sizes: Sizes) -> Path:
    """A synthetic VOC (JPEG photos of VOC's sizes) packed as ``run.py shard`` packs VOC: train_aug."""
    from sharding.synthetic import make_voc
    from sharding.write import shard_dataset

    raw, shards = work / "voc", work / "shards-voc"
    make_voc(raw, seed=0, train_aug=sizes.train, val=2, test=0, min_size=sizes.voc_sides[0],
             max_size=sizes.voc_sides[1])
    shard_dataset("voc", raw, shards, splits=["train_aug"], shard_size=sizes.shard_size,
                  workers=min(8, os.cpu_count() or 1), show_progress=False)
    shutil.rmtree(raw, ignore_errors=True)
    return shards


def epoch_manifest(manifest, samples: int):
    """``manifest`` with its table repeated to exactly ``samples`` rows: the train loader then runs
    ``samples / batch`` steps, drawing (with replacement, as always) from the same real shards."""
    import pyarrow as pa

    n = manifest.num_samples
    table = pa.concat_tables([manifest.table] * math.ceil(samples / n)).slice(0, samples)
    return dataclasses.replace(manifest, table=table)


def stage1_config(shards: Path, sizes: Sizes, device, backbone: str = "resnet18", voc: bool = False):
    from pipeline.config import build_config

    crop, batch = (sizes.voc_crop, sizes.voc_batch) if voc else (sizes.crop, sizes.batch)
    return build_config("voc" if voc else "cityscapes", [
        f"data.shards={shards}", f"data.crop_size={crop[0]}x{crop[1]}", f"data.batch_size={batch}",
        f"data.loader_workers={sizes.loader_workers}", "train.workers=1", "train.epochs=2",
        f"train.gpu={'true' if device.type == 'cuda' else 'false'}", f"model.backbone={backbone}",
        "model.weights=none",  # the preset's ImageNet weights would need a download; speed does not
    ])


@dataclass
class Measured:
    images_per_s: float
    data_wait: float
    peak_gib: float | None
    loss: float


def timed_training(run, cfg, shards: Path, sizes: Sizes, device, epochs: tuple[int, ...] = (0, 1)) -> Measured:
    """A warm-up epoch of ``warmup_steps`` then a timed epoch of ``timed_steps`` (``train_one_epoch``)."""
    import torch

    from pipeline.data import train_loader
    from pipeline.loop import train_one_epoch
    from sharding.manifest import read_manifest

    manifest = read_manifest(shards, cfg.data.train_split)
    stats: dict[str, float] = {}
    for epoch, steps in zip(epochs, (sizes.warmup_steps, sizes.timed_steps)):
        loader = train_loader(epoch_manifest(manifest, steps * cfg.data.batch_size), cfg.data, rank=0, world_size=1,
                              epoch=epoch, seed=cfg.train.seed, pin_memory=device.type == "cuda")
        stats = train_one_epoch(run.model, loader, run.optimizer, cfg, epoch=epoch, steps=sizes.timed_steps,
                                schedule=run.schedule, device=device, scaler=run.scaler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = _gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return Measured(stats["images_per_s"], stats["data_wait_share"], peak, stats["loss"])


def describe(m: Measured) -> str:
    step_only = m.images_per_s / max(1e-9, 1.0 - m.data_wait)
    peak = f"peak {m.peak_gib:.1f} GiB" if m.peak_gib is not None else "peak n/a (cpu)"
    return (f"{m.images_per_s:.2f} img/s, data wait {100 * m.data_wait:.0f}%, steps alone {step_only:.2f} img/s, "
            f"{peak}, loss {m.loss:.3f}")


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def stage1(work: Path, sizes: Sizes, device_name: str) -> None:
    import torch
    import torchvision

    from pipeline.loop import TrainingState, setup_training

    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible to torch (use --cpu-smoke on a machine without one)")
    if device.type == "cpu":
        # At most 2 threads, or OMP_NUM_THREADS (the test suite sets 1: on a loaded 2-core machine
        # a 2-thread pool spins against the other processes, 15x slower per step).
        torch.set_num_threads(min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2)))
    amp = "fp16 autocast + GradScaler" if device.type == "cuda" else "off (cpu)"

    def environment() -> tuple[str, str]:
        import webdataset

        gpu = ""
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            gpu = f", {props.name} {_gib(props.total_memory):.0f} GiB, CUDA {torch.version.cuda}"
        try:
            from importlib.metadata import version
            cs = version("cityscapesscripts")
        except Exception:  # noqa: BLE001
            cs = "?"
        return OK, (f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
                    f"{gpu}; webdataset {getattr(webdataset, '__version__', '?')}, cityscapesscripts {cs}; "
                    f"{os.cpu_count()} CPUs")

    run_check(work, 1, "environment", environment)

    shards_box: dict[str, Path] = {}

    def data() -> tuple[str, str]:
        shards_box["shards"], figures = make_shards(work, sizes)
        return OK, figures

    if run_check(work, 1, "synthetic Cityscapes -> shards", data).result != OK:
        return
    shards = shards_box["shards"]
    steps = sizes.timed_steps
    h, w = sizes.crop
    setting = f"{h}x{w} crops, batch {sizes.batch}, {sizes.loader_workers} loader workers, AMP {amp}"
    print(f"[gpu_check] training setting: {setting}", flush=True)

    measured: dict[str, Measured] = {}
    keep: dict[str, Any] = {}

    def dfdam(backbone: str, label: str, folder: Path | None = None, voc: bool = False) -> Callable[[], tuple[str, str]]:
        from sharding.manifest import read_manifest

        def body() -> tuple[str, str]:
            _free(device)
            if voc:
                keep["voc"] = make_voc_shards(work, sizes)
            source = keep["voc"] if voc else folder or shards
            cfg = stage1_config(source, sizes, device, backbone, voc)
            torch.manual_seed(0)
            classes = read_manifest(source, cfg.data.train_split).num_classes  # 19 Cityscapes, 21 VOC
            run = setup_training(cfg, classes, steps, device)
            m = timed_training(run, cfg, source, sizes, device)
            measured[label] = m
            if label == "R18":  # the resume check continues this run: save it, free the GPU
                keep["saved"] = save_for_resume(work, run, cfg, shards, sizes)
            del run
            return OK, describe(m)
        return body

    def deeplab() -> tuple[str, str]:
        from pipeline.optim import PolySchedule, build_optimizer
        from train_throughput import build_models  # the peer benchmarks/train_throughput.py measures

        _free(device)
        cfg = stage1_config(shards, sizes, device)
        torch.manual_seed(0)
        model = build_models()["DeepLabV3-ResNet-50"]().to(device)
        run = TrainingState(model, build_optimizer(model, cfg.optim),
                            torch.amp.GradScaler(device.type, enabled=cfg.train.amp and device.type == "cuda"),
                            PolySchedule(cfg.optim.lr, steps * cfg.train.epochs, cfg.optim.poly_power))
        try:
            m = timed_training(run, cfg, shards, sizes, device)
        except torch.OutOfMemoryError as exc:
            del run, model
            _free(device)
            return OOM, f"out of memory at {h}x{w}, batch {sizes.batch}: {str(exc).splitlines()[0][:120]}"
        measured["dlv3"] = m
        ratios = [f"{name} {measured[name].images_per_s / m.images_per_s:.2f}x" for name in ("R18", "R101")
                  if name in measured]
        return OK, describe(m) + (f"; DF-DAM / DLv3 img/s: {', '.join(ratios)}" if ratios else "")

    run_check(work, 1, f"train DF-DAM-R18 ({h}x{w}, b{sizes.batch})", dfdam("resnet18", "R18"))
    run_check(work, 1, f"train DF-DAM-R18, lz4 shards ({h}x{w}, b{sizes.batch})",
              dfdam("resnet18", "R18-lz4", work / "shards-lz4"))
    vh, vw = sizes.voc_crop
    run_check(work, 1, f"train DF-DAM-R18, VOC JPEG ({vh}x{vw}, b{sizes.voc_batch})",
              dfdam("resnet18", "R18-voc", voc=True))
    run_check(work, 1, f"train DF-DAM-R101 ({h}x{w}, b{sizes.batch})", dfdam("resnet101", "R101"))
    run_check(work, 1, f"train DeepLabV3-R50 torchvision ({h}x{w}, b{sizes.batch})", deeplab)

    def resume() -> tuple[str, str]:
        if "saved" not in keep:
            return FAIL, "the DF-DAM-R18 training check failed: nothing to resume"
        return check_resume(keep["saved"], shards, sizes, device)

    run_check(work, 1, f"resume onto {device.type} (setup_training)", resume)
    keep.clear()
    _free(device)


def optimizer_devices(optimizer) -> tuple[int, int, set[str]]:
    """(state tensors, those on their parameter's device, the devices seen)."""
    import torch

    total = same = 0
    seen: set[str] = set()
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                total += 1
                same += value.device == param.device
                seen.add(str(value.device))
    return total, same, seen


@dataclass
class Saved:
    """What the resume check compares against: the checkpoint and the state it was written from."""

    folder: Path
    cfg: Any
    momentum: list  # every momentum buffer, on the CPU
    scale: float | None  # the grad scaler's scale (fp16 on the GPU)
    lr: float  # the poly rate at the first step after the checkpoint


def save_for_resume(work: Path, run, cfg, shards: Path, sizes: Sizes) -> Saved:
    """Checkpoint the R18 run as the Ray worker does at the end of epoch 2 (``save_checkpoint``)."""
    from pipeline.checkpoint import save_checkpoint
    from pipeline.loop import dataset_info
    from sharding.manifest import read_manifest

    steps = sizes.timed_steps
    folder = work / "stage1-checkpoint" / "epoch_0002"
    save_checkpoint(folder, model=run.model, optimizer=run.optimizer, scaler=run.scaler, epoch=1, step=2 * steps,
                    config=cfg, dataset=dataset_info(read_manifest(shards, "train")),
                    metrics={"best_val_miou": 0.25}, schedule=run.schedule.to_dict())
    momentum = [run.optimizer.state[p]["momentum_buffer"].detach().cpu().clone() for p in run.model.parameters()
                if "momentum_buffer" in run.optimizer.state[p]]
    return Saved(folder, cfg, momentum, run.scaler.get_scale() if run.scaler.is_enabled() else None,
                 run.schedule.lr(2 * steps))


def check_resume(saved: Saved, shards: Path, sizes: Sizes, device) -> tuple[str, str]:
    """Load the checkpoint as the Ray worker does (onto the CPU) and continue it on ``device``."""
    import torch

    from pipeline.checkpoint import build_model, load_checkpoint
    from pipeline.optim import build_optimizer
    from pipeline.loop import setup_training

    steps, cfg, folder = sizes.timed_steps, saved.cfg, saved.folder
    _free(device)
    state = load_checkpoint(folder)  # onto the CPU, as train_worker reads a Ray checkpoint
    num_classes = state["dataset"]["num_classes"]
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    restored = setup_training(longer, num_classes, steps, device, state)
    problems = []
    total, same, seen = optimizer_devices(restored.optimizer)
    if total == 0 or same != total:
        problems.append(f"{total - same} of {total} optimizer state tensors are not on their parameter's device "
                        f"(devices seen: {sorted(seen)})")
    if any(p.device.type != device.type for p in restored.model.parameters()):
        problems.append(f"parameters are not on {device}")
    buffers = [restored.optimizer.state[p]["momentum_buffer"] for p in restored.model.parameters()
               if "momentum_buffer" in restored.optimizer.state[p]]
    if len(buffers) != len(saved.momentum) or not all(torch.equal(a.cpu(), b) for a, b in zip(buffers, saved.momentum)):
        problems.append("restored momentum buffers differ from the saved ones")
    if restored.start_epoch != 2:
        problems.append(f"start_epoch {restored.start_epoch}, expected 2")
    if saved.scale is not None and restored.scaler.get_scale() != saved.scale:
        problems.append(f"grad scale {restored.scaler.get_scale()} != saved {saved.scale}")
    if restored.schedule.lr(2 * steps) != saved.lr:
        problems.append(f"poly rate jumped: {restored.schedule.lr(2 * steps)} != {saved.lr}")
    if problems:
        return FAIL, "; ".join(problems)
    # One more (short) epoch on the restored state: the optimizer step must run on the device.
    short = dataclasses.replace(sizes, warmup_steps=1, timed_steps=steps)
    m = timed_training(restored, longer, shards, short, device, epochs=(2,))
    if not math.isfinite(m.loss):
        return FAIL, f"loss {m.loss} after resuming"
    figures = (f"{same}/{total} optimizer state tensors on {sorted(seen)[0]}, momentum equal to the saved, "
               f"start epoch 3 of 3, 1 more step trained (loss {m.loss:.3f})")
    if device.type == "cuda":
        # Control: the order the bug had (load the optimizer state, then move the model).
        del restored
        _free(device)
        model = build_model(cfg.model, num_classes, pretrained=False)
        model.load_state_dict(state["model"])
        optimizer = build_optimizer(model, cfg.optim)
        optimizer.load_state_dict(state["optimizer"])
        model.to(device)
        total_c, same_c, _ = optimizer_devices(optimizer)
        figures += f"; control (state loaded before .to({device.type})): {total_c - same_c}/{total_c} left on cpu"
        del model, optimizer
    return OK, figures


# ----------------------------------------------------------------------------- stage 2 (Ray Train + MLflow)


def _session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) of session ``sid`` (a driver started with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _train_command(shards: Path, storage: Path, sizes: Sizes, gpu: bool, resume: bool) -> list[str]:
    h, w = sizes.crop
    return [sys.executable, str(ROOT / "run.py"), "train", "--preset", "cityscapes", "--data", str(shards),
            "--workers", "1", "--epochs", "2", "--name", RUN_NAME, "--storage", str(storage), "--max-failures", "0",
            "--set", f"data.crop_size={h}x{w}", "--set", f"data.batch_size={sizes.batch}",
            "--set", f"data.loader_workers={sizes.loader_workers}", "--set", "data.eval_batch_size=1",
            "--set", "train.log_every=1", "--set", "tracking.overlays=1", "--set", "model.weights=none",
            *(["--gpu"] if gpu else []), *(["--resume"] if resume else [])]


def _stage2_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):  # a private local cluster and store in the work folder
        env.pop(name, None)
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _tee(proc: subprocess.Popen, log: Path) -> Iterator[str]:
    """Yield the process's output lines as they come, copying them to ``log`` and our stdout."""
    assert proc.stdout is not None
    with log.open("a") as f:
        for line in proc.stdout:
            f.write(line)
            sys.stdout.write("    | " + line)
            yield line


def _registered_epochs(run_dir: Path) -> list[str]:
    """Checkpoint folders Ray Train has registered (its checkpoint manager's snapshot)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        text = snapshot.read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"epoch_\d{4}", text)))


def stage2(work: Path, sizes: Sizes, gpu: bool) -> None:
    import threading

    shards, storage = work / "shards", work / "runs"
    run_dir = storage / RUN_NAME
    env = _stage2_env(work)
    log = work / "stage2.log"
    device = "GPU" if gpu else "CPU"
    state: dict[str, Any] = {}
    if not (shards / "train.manifest.parquet").is_file():
        add_row(work, Row(2, "ray train", FAIL, 0.0, f"no shards in {shards}: stage 1 must run first"))
        return

    def first_run() -> tuple[str, str]:
        cmd = _train_command(shards, storage, sizes, gpu, resume=False)
        print("[gpu_check] $ " + " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(_tee(proc, log)), daemon=True)
        reader.start()
        killed_at = None
        limit = time_left(sizes.timeout_s)
        deadline = start + limit
        while proc.poll() is None and time.perf_counter() < deadline:
            if "epoch_0001" in _registered_epochs(run_dir):
                killed_at = time.perf_counter() - start
                os.killpg(proc.pid, signal.SIGKILL)  # the driver and every process it started
                break
            time.sleep(0.2)
        if killed_at is None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return FAIL, f"no epoch-1 checkpoint registered within {limit:.0f} s (see {log})"
        proc.wait()
        reader.join(timeout=10)
        if killed_at is None:
            tail = " | ".join(l.strip() for l in lines[-3:])
            return FAIL, f"run.py train ended (exit {proc.returncode}) before it could be killed: {tail[-300:]}"
        # Whatever the driver started must go with it (Ray's processes share its fate).
        wait_until = time.perf_counter() + 15
        left = _session_pids(proc.pid)
        while left and time.perf_counter() < wait_until:
            time.sleep(0.5)
            left = _session_pids(proc.pid)
        _kill(left)  # ours (same session): end them so the resume starts clean
        printed = "printed" if any(re.match(r"epoch 1/2  loss", l) for l in lines) else "not yet printed"
        state["killed"] = True
        return OK, (f"--{device.lower()} 1 worker, epoch 1 checkpoint registered after {killed_at:.0f} s "
                    f"(its console line {printed}), then SIGKILL to the driver's process group; "
                    f"{len(left)} process(es) outlived it" + (" (killed)" if left else ""))

    run_check(work, 2, f"run.py train --{device.lower()} (2 epochs), SIGKILL after epoch 1", first_run)

    def resumed() -> tuple[str, str]:
        if not state.get("killed"):
            return FAIL, "the first run was not killed after epoch 1: nothing to resume"
        cmd = _train_command(shards, storage, sizes, gpu, resume=True)
        print("[gpu_check] $ " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(_tee(proc, log)), daemon=True)
        reader.start()
        limit = time_left(sizes.timeout_s)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return FAIL, f"run.py train --resume took over {limit:.0f} s (see {log})"
        finally:
            reader.join(timeout=10)
            _kill(_session_pids(proc.pid))
        text = "".join(lines)
        if proc.returncode != 0:
            tail = " | ".join(l.strip() for l in lines[-3:])
            return FAIL, f"exit {proc.returncode}: {tail[-300:]}"
        final = re.search(r"run \S+: val mIoU ([\d.]+) after epoch (\d+)", text)
        problems = []
        if not final or final.group(2) != "2":
            problems.append("no 'after epoch 2' result line")
        if re.search(r"^epoch 1/2  loss", text, re.MULTILINE):
            problems.append("epoch 1 was trained again (no resume)")
        if not re.search(r"^epoch 2/2  loss", text, re.MULTILINE):
            problems.append("no epoch-2 line")
        saved_on = checkpoint_devices(run_dir)
        if gpu and not saved_on.startswith("cuda"):
            problems.append(f"the epoch-2 checkpoint's optimizer state was saved from {saved_on}, not the GPU")
        if problems:
            return FAIL, "; ".join(problems)
        resumed_from = re.search(r"resuming from the checkpoint of epoch (\d+)", text)
        return OK, (f"resumed from epoch {resumed_from.group(1) if resumed_from else 1}, trained epoch 2 only, "
                    f"val mIoU {float(final.group(1)):.4f}; epoch-2 optimizer state saved from {saved_on}")

    run_check(work, 2, f"run.py train --resume --{device.lower()}", resumed)

    def evaluate() -> tuple[str, str]:
        cmd = [sys.executable, str(ROOT / "run.py"), "evaluate", "--model", str(run_dir), "--data", str(shards),
               "--format", "json"]
        print("[gpu_check] $ " + " ".join(cmd[1:]), flush=True)
        done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                              timeout=time_left(sizes.timeout_s))
        with log.open("a") as f:
            f.write(done.stdout + done.stderr)
        if done.returncode != 0:
            return FAIL, f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"
        report = json.loads(done.stdout[done.stdout.index("{"):])
        return OK, (f"{report['split']} split, {report['samples']} images: mIoU {report['miou']:.4f}, "
                    f"pixel acc {report['pixel_acc']:.4f} (run.py evaluate runs on the CPU)")

    run_check(work, 2, "run.py evaluate (run folder)", evaluate)


def checkpoint_devices(run_dir: Path) -> str:
    """The device(s) the newest checkpoint's optimizer state was saved from (read without map_location)."""
    import torch

    from pipeline.checkpoint import CHECKPOINT_FILE, latest_checkpoint

    latest = latest_checkpoint(run_dir)
    if latest is None:
        return "no checkpoint"
    state = torch.load(latest / CHECKPOINT_FILE, map_location=None if torch.cuda.is_available() else "cpu",
                       weights_only=True)
    devices = {str(v.device) for s in state["optimizer"]["state"].values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0}
    where = ",".join(sorted(devices)) or "nowhere (no state)"
    return f"{where} ({latest.name})"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for shards, runs, mlflow.db and rows.json")
    parser.add_argument("--stage", type=int, choices=[1, 2], help="run one stage and add its rows")
    parser.add_argument("--skipped-stage", type=int, choices=[1, 2], help="add a SKIP row for this stage (--reason)")
    parser.add_argument("--failed-stage", type=int, choices=[1, 2], help="add a FAIL row for this stage (--reason)")
    parser.add_argument("--reason", default="", help="why the stage was skipped or failed")
    parser.add_argument("--report", action="store_true", help="print the table of every row so far")
    parser.add_argument("--out-dir", type=Path, help="--report: also write gpu_check.txt and gpu_check.json here")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (the test suite's form)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = CPU_SMOKE if args.cpu_smoke else GPU
    if args.stage == 1:
        stage1(args.work.resolve(), sizes, "cpu" if args.cpu_smoke else "cuda")
    elif args.stage == 2:
        stage2(args.work.resolve(), sizes, gpu=not args.cpu_smoke)
    for stage, result in ((args.skipped_stage, SKIP), (args.failed_stage, FAIL)):
        if stage:
            add_row(args.work, Row(stage, f"stage {stage}", result, 0.0, args.reason or result))
    if not args.report:
        return 0
    rows = load_rows(args.work)
    mode = "cpu-smoke (tiny sizes, CPU)" if args.cpu_smoke else "GPU"
    title = f"gpu_check: {mode}; {sum(r.result == OK for r in rows)} OK, {sum(r.result == FAIL for r in rows)} FAIL"
    text = "\n".join([title, "", format_table(rows)])
    print("\n" + text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "gpu_check.txt").write_text(text + "\n")
        (args.out_dir / "gpu_check.json").write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
        log = args.work / "stage2.log"  # run.py's own output (Ray's), for a failed row: its last 4 MB
        if log.is_file():
            with log.open("rb") as f:
                f.seek(max(0, log.stat().st_size - 4_000_000))
                (args.out_dir / "gpu_check_stage2.log").write_bytes(f.read())
    return 1 if any(r.result == FAIL for r in rows) or not any(r.result == OK for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
