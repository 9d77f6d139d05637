#!/usr/bin/env python3
"""Training and data-loading throughput of one DF-DAM worker, each beside a peer in the same run.

Two measurements, both for ONE training worker (one Ray Train worker = one process):

1. **Training images/s.** DF-DAM (ResNet-18, full model with its auxiliary heads, train
   mode) runs the project's real training step: ``pipeline.optim.set_lr`` (poly LR),
   forward (under autocast with ``--amp``; by default fp16 with a GradScaler on GPU, as
   ``train.amp`` does, and fp32 on CPU), ``pipeline.losses.joint_loss`` (Eq. 12,
   lambda_c = 0.4, lambda_s = 0.1), backward, SGD step from
   ``pipeline.optim.build_optimizer`` -- the same sequence as
   ``pipeline.loop.train_one_epoch``. The peer is torchvision's DeepLabV3-ResNet-50
   (output stride 8, no aux head) in the *same loop*, with the same optimizer recipe.
   Inputs are random tensors already in memory, so this measures compute only. Each
   row is ``--warmup`` untimed steps then ``--steps`` timed steps; seconds/step is the
   **median** of the per-step times (min and max show the spread), and
   images/s = batch / median. ``DF-DAM / DLv3`` > 1 means DF-DAM trains faster.
   ``cpu/wall`` is the process's CPU time per second of the timed steps (about the
   thread count on an idle machine; lower when other work took the cores) and
   ``load 1m`` the load average as the row ended: read rows with either off as
   contended.
   ``torch.set_num_threads(N)`` is applied for each ``--threads`` value: a Ray worker
   with ``train.cpus_per_worker = 1`` runs with 1 thread.

2. **Data loading samples/s** for one loader process (``data.loader_workers = 0``): what
   one CPU core prepares for training. Rows, all from the same frames:

   * ``shards / png``: the shards as ``run.py shard`` writes them by default (the original
     image bytes, a train-id label PNG); ``shards / lz4``: the same split written with
     ``--image-encoding lz4`` (decoded pixels, LZ4-compressed);
   * ``decode only``: tar reading and decoding (image RGB + train-id label);
   * ``full: before``: the path before issue 11, as its peer: the whole frame resized then
     cut (``TrainTransform(resize="frame")``), normalised to float32 in the loader;
   * ``full: train_loader``: ``pipeline.data.train_loader`` itself (resampled shards, shuffle
     buffer, decode, ``TrainTransform`` resizing only the crop's window, uint8 batches; the
     normalisation runs on the training device);
   * ``loose files``: the same PNG files read as a Cityscapes folder (PIL decode, label ids ->
     train ids with ``sharding.cityscapes.train_id_lut()``), then the same transform.

   ``augment ms`` = full - decode only of the same source; ``vs before`` compares each full
   row with the path before; ``vs loose files`` compares shards with loose files at the same
   stage. A goals table checks the full path against ``--target`` x the path before and the
   shard reader against loose files. Every file is read once before timing, so all rows read
   from the page cache: the numbers are CPU costs, not disk speed. Each row counts
   ``--samples`` samples in the steady state; the fastest of ``--repeat`` runs is reported.
   What each new epoch pays once (pipeline start and the shuffle buffer's fill) is printed
   below. Compare samples/s with training images/s above: the loader keeps up when it is
   faster, and ``data.loader_workers`` processes multiply it where spare cores exist.

Without ``--data-root``/``--shards`` a synthetic Cityscapes (``sharding.synthetic``) is
generated and sharded in a temporary folder; by default its frames are crop_h x 2*crop_w,
the aspect (and, for crop 1024, the size) of real Cityscapes frames.

Examples::

    python benchmarks/train_throughput.py                       # CPU, crop 256x256, batch 4
    python benchmarks/train_throughput.py --threads 1,2 --json out.json
    python benchmarks/train_throughput.py --crop 1024x1024 --batch 8 --skip-train \\
        --images 40 --samples 24 --repeat 1              # issue 11's data path at the Cityscapes recipe
    python benchmarks/train_throughput.py --dataset voc --crop 512x512 --batch 16 --skip-train \\
        --images 96 --samples 64                         # ... and at the VOC recipe
    python benchmarks/train_throughput.py --device cuda --crop 1024x1024 --batch 8 \\
        --data-root /data/cityscapes --shards /data/shards/cityscapes    # the paper's Cityscapes setting
    python benchmarks/train_throughput.py --device cuda --crop 512x512 --batch 16 --skip-data  # VOC setting

On a shared machine check ``uptime`` first: other processes on the same cores slow every
row, and thread scaling in particular (the header prints the load average at start).
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from pipeline.config import DataConfig, LossConfig, OptimConfig  # noqa: E402
from pipeline.data import decode_sample, train_loader  # noqa: E402
from pipeline.optim import PolySchedule, build_optimizer, set_lr  # noqa: E402
from pipeline.loop import train_step  # noqa: E402
from pipeline.transforms import TrainTransform, normalize_batch  # noqa: E402
from sharding.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX, train_id_lut  # noqa: E402
from sharding.classes import IGNORE_INDEX  # noqa: E402
from sharding.manifest import Manifest, read_manifest  # noqa: E402
from sharding.storage import shard_samples  # noqa: E402
from sharding.synthetic import make_cityscapes, make_voc  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402
from sharding.write import shard_dataset  # noqa: E402

NUM_CLASSES = 19  # Cityscapes train ids
MIN_SIZE = 32  # the trunk's output stride
SPLIT = "train"
VOC_SPLIT = "train_aug"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- results


@dataclass
class TrainRow:
    model: str
    threads: int
    batch: int
    crop: tuple[int, int]
    params_m: float
    step_seconds: list[float] = field(default_factory=list)
    cpu_per_wall: float = math.nan  # process CPU seconds / wall seconds over the timed steps
    load_avg: float = math.nan  # 1-minute load average when the row ended
    error: str | None = None  # e.g. out of memory at this size

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s if self.step_seconds else math.nan

    def to_dict(self) -> dict[str, Any]:
        measured = bool(self.step_seconds)
        return {**asdict(self), "median_s": self.median_s if measured else None,
                "images_per_s": self.images_per_s if measured else None}


@dataclass
class DataRow:
    source: str  # "shards" | "loose files"
    encoding: str  # "png" (the original bytes) | "lz4" (run.py shard --image-encoding lz4)
    stage: str  # "decode only" | "full: ..." (decode + augment + batch)
    samples: int
    seconds: float  # fastest of the repeats

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    @property
    def ms_per_sample(self) -> float:
        return 1e3 * self.seconds / self.samples

    @property
    def is_full(self) -> bool:
        return self.stage.startswith("full")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.samples_per_s, "ms_per_sample": self.ms_per_sample}


# ----------------------------------------------------------------------------- training


def build_models() -> dict[str, Callable[[], nn.Module]]:
    """Model name -> constructor, DF-DAM first (it is the numerator of the ratio)."""
    from torchvision.models.segmentation import deeplabv3_resnet50

    return {
        "DF-DAM-ResNet-18": lambda: models.build_dfdam(NUM_CLASSES, "resnet18"),
        "DeepLabV3-ResNet-50": lambda: deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                          num_classes=NUM_CLASSES, aux_loss=False),
    }


def random_batch(batch: int, crop: tuple[int, int], device: torch.device,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised-looking image batch (B, 3, H, W) and train-id labels (B, H, W) with ~5% ignored."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn((batch, 3, *crop), generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch, *crop), generator=gen)
    labels[torch.rand((batch, *crop), generator=gen) < 0.05] = IGNORE_INDEX
    return images.to(device), labels.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, warmup: int, steps: int,
                  device: torch.device, amp: torch.dtype | None) -> tuple[list[float], float]:
    """Seconds of each timed step of the project's training step (see ``train_one_epoch``), and the
    process's CPU seconds per wall second over them (about the thread count when nothing else runs)."""
    optim_cfg, loss_cfg = OptimConfig(), LossConfig()
    optimizer = build_optimizer(model, optim_cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
    max_iter = warmup + steps
    schedule = PolySchedule(optim_cfg.lr, max_iter, optim_cfg.poly_power)
    model.train()
    times: list[float] = []
    cpu = 0.0
    for iteration in range(max_iter):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        set_lr(optimizer, schedule, iteration)
        loss, parts = train_step(model, images, labels, optimizer, scaler, loss_cfg, amp)
        loss.item()  # the real loop logs it every step; also a device sync
        for value in parts.values():
            value.item()
        _sync(device)
        if iteration >= warmup:
            times.append(time.perf_counter() - start)
            cpu += time.process_time() - cpu_start
    return times, cpu / sum(times)


def run_training(threads: Sequence[int], crop: tuple[int, int], batch: int, warmup: int, steps: int,
                 device: torch.device, amp: torch.dtype | None, log: Callable[[str], None]) -> list[TrainRow]:
    rows: list[TrainRow] = []
    images, labels = random_batch(batch, crop, device)
    for n in threads:
        torch.set_num_threads(n)
        for name, build in build_models().items():
            torch.manual_seed(0)
            model = build().to(device)
            row = TrainRow(name, n, batch, crop, sum(p.numel() for p in model.parameters()) / 1e6)
            log(f"  training {name}, {n} thread(s), batch {batch}, {crop[0]}x{crop[1]} ...")
            try:
                row.step_seconds, row.cpu_per_wall = time_training(model, images, labels, warmup=warmup,
                                                                   steps=steps, device=device, amp=amp)
            except torch.cuda.OutOfMemoryError as exc:
                row.error = f"out of memory ({str(exc).splitlines()[0][:80]})"
            finally:
                row.load_avg = os.getloadavg()[0]
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LooseSample:
    image: Path
    label: Path


def loose_samples(root: Path, split: str = SPLIT) -> list[LooseSample]:
    """The Cityscapes-layout image/label pairs of ``split``, sorted by image path."""
    images = sorted(glob.glob(str(root / "leftImg8bit" / split / "*" / f"*{IMAGE_SUFFIX}")))
    pairs = []
    for image in map(Path, images):
        key = image.name[: -len(IMAGE_SUFFIX)]
        label = root / "gtFine" / split / image.parent.name / f"{key}{LABEL_SUFFIX}"
        if label.is_file():
            pairs.append(LooseSample(image, label))
    if not pairs:
        raise SystemExit(f"no {split} image/label pairs under {root} (expected leftImg8bit/{split}/<city>/"
                         f"*{IMAGE_SUFFIX} with gtFine/{split}/<city>/*{LABEL_SUFFIX})")
    return pairs


_LUT = train_id_lut()


def decode_loose(sample: LooseSample) -> tuple[np.ndarray, np.ndarray]:
    """Loose files -> (uint8 (H, W, 3) RGB, uint8 (H, W) train ids), as the shards hold them."""
    image = np.asarray(Image.open(io.BytesIO(sample.image.read_bytes())).convert("RGB"))
    ids = np.asarray(Image.open(io.BytesIO(sample.label.read_bytes())), dtype=np.uint8)
    return image, _LUT[ids]


def _cycle(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    """Endless: restart ``make()`` each time it runs out."""
    while True:
        empty = True
        for item in make():
            empty = False
            yield item
        if empty:
            raise RuntimeError("data source yielded nothing")


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch)
    return torch.stack(images), torch.stack(labels)


def loose_decode_stream(pairs: list[LooseSample]) -> Iterator[int]:
    for image, _ in map(decode_loose, _cycle(lambda: iter(pairs))):
        yield 1 if image.size else 0


def loose_full_stream(pairs: list[LooseSample], transform: TrainTransform, batch: int) -> Iterator[int]:
    rng = np.random.default_rng(0)
    samples = (transform(*decode_loose(p), rng) for p in _cycle(lambda: iter(pairs)))
    while True:
        images, _ = _collate([next(samples) for _ in range(batch)])
        yield images.shape[0]


def _shard_samples(manifest: Manifest, before: bool = False) -> Iterator[dict[str, Any]]:
    """The shards' samples in order, each decoded by ``pipeline.data.decode_sample``, forever: read
    by the loaders' tar reader (``sharding.storage.shard_samples``), or with ``before`` by the one
    they used before issue 11 (WebDataset's ``tarfile_to_samples``, tarfile's streaming mode)."""
    import webdataset as wds

    reader = wds.tarfile_to_samples(handler=wds.reraise_exception) if before else shard_samples()

    def once() -> Iterator[dict[str, Any]]:
        return iter(wds.DataPipeline(wds.SimpleShardList(list(manifest.shards)), reader, wds.map(decode_sample)))

    return _cycle(once)


def shard_decode_stream(manifest: Manifest) -> Iterator[int]:
    for sample in _shard_samples(manifest):
        yield 1 if sample["image"].size else 0


def before_stream(manifest: Manifest, cfg: DataConfig) -> Iterator[int]:
    """The data path as it was before issue 11, per sample: tarfile's streaming reader, decode,
    resize the *whole* frame, cut
    (``TrainTransform(resize="frame")``), normalise to float32 on the CPU (what the loader
    process did), then stack float32 batches. Read in shard order without the shuffle buffer,
    which only makes this peer a little faster than the ``train_loader`` it was."""
    transform = TrainTransform(cfg.crop_size, cfg.scales, cfg.mean, cfg.std, resize="frame")
    rng = np.random.default_rng(0)
    samples = _shard_samples(manifest, before=True)

    def one() -> tuple[torch.Tensor, torch.Tensor]:
        sample = next(samples)
        image, label = transform(sample["image"], sample["label"], rng)
        return normalize_batch(image[None], cfg.mean, cfg.std)[0], label.long()

    while True:
        images, _ = _collate([one() for _ in range(cfg.batch_size)])
        yield images.shape[0]


def shard_full_stream(manifest: Manifest, cfg: DataConfig) -> Iterator[int]:
    """``pipeline.data.train_loader`` epoch after epoch (a new epoch re-seeds and refills the shuffle buffer)."""
    epoch = 0
    while True:
        for images, _ in train_loader(manifest, cfg, rank=0, world_size=1, epoch=epoch):
            yield images.shape[0]
        epoch += 1


def first_batch_seconds(manifest: Manifest, cfg: DataConfig, epochs: int = 3) -> float:
    """Median seconds from calling ``train_loader`` to its first batch: each epoch pays it once."""
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        next(iter(train_loader(manifest, cfg, rank=0, world_size=1, epoch=epoch)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_stream(make: Callable[[], Iterator[int]], samples: int, warmup: int, repeat: int) -> float:
    """Fastest of ``repeat`` runs, seconds to draw ``samples`` samples from a fresh ``make()``."""
    best = math.inf
    for _ in range(repeat):
        stream = make()
        seen = 0
        while seen < warmup:
            seen += next(stream)
        seen, start = 0, time.perf_counter()
        while seen < samples:
            seen += next(stream)
        best = min(best, (time.perf_counter() - start) * samples / seen)  # per requested sample count
    return best


BEFORE = "full: before (whole-frame resize, float32 on CPU)"
AFTER = "full: train_loader (window resize, uint8)"
LOOSE = "full: same transform as train_loader"


def run_data(manifests: dict[str, Manifest], pairs: list[LooseSample] | None, crop: tuple[int, int], batch: int,
             samples: int, repeat: int, log: Callable[[str], None]) -> tuple[list[DataRow], float | None]:
    """The data rows, and ``train_loader``'s first-batch latency on the original shards (None without shards).

    ``manifests`` maps an encoding ("png", "lz4") to the same split packed that way."""
    cfg = DataConfig(crop_size=crop, batch_size=batch, loader_workers=0)
    transform = TrainTransform(cfg.crop_size, cfg.scales, cfg.mean, cfg.std)
    streams: list[tuple[str, str, str, Callable[[], Iterator[int]]]] = []
    for encoding, manifest in manifests.items():
        for path in manifest.shards:  # page cache
            Path(path).read_bytes()
        streams.append(("shards", encoding, "decode only", lambda m=manifest: shard_decode_stream(m)))
        if encoding != "lz4":  # the path before issue 11 read the original bytes
            streams.append(("shards", encoding, BEFORE, lambda m=manifest: before_stream(m, cfg)))
        streams.append(("shards", encoding, AFTER, lambda m=manifest: shard_full_stream(m, cfg)))
    if pairs is not None:
        for pair in pairs:
            pair.image.read_bytes()
            pair.label.read_bytes()
        streams += [("loose files", "png", "decode only", lambda: loose_decode_stream(pairs)),
                    ("loose files", "png", LOOSE, lambda: loose_full_stream(pairs, transform, batch))]
    first = next(iter(manifests.values()), None)
    if first is not None and first.num_samples < samples + batch:
        print(f"note: {first.num_samples} shard samples < {samples} + a warm-up batch: the train_loader rows "
              f"cross epochs and include their start-up cost")
    rows = []
    for source, encoding, stage, make in streams:
        log(f"  reading {source} ({encoding}): {stage} ...")
        rows.append(DataRow(source, encoding, stage, samples, time_stream(make, samples, warmup=batch, repeat=repeat)))
    return rows, first_batch_seconds(first, cfg) if first is not None else None


def prepare_data(args: argparse.Namespace, crop: tuple[int, int], scratch: Path,
                 log: Callable[[str], None]) -> tuple[dict[str, Manifest], list[LooseSample] | None, str]:
    """The manifests (per encoding) and loose files to read, generating and sharding a synthetic set
    when none is given. With ``--shards`` only that folder is read (whatever its encoding)."""
    root: Path | None = args.data_root
    shards: Path | None = args.shards
    split = VOC_SPLIT if args.dataset == "voc" else SPLIT
    if args.dataset == "voc" and shards is None:
        # VOC's photos: JPEG, each side at most 500 px (sharding.synthetic draws them in [333, 500]).
        root = scratch / "voc"
        start = time.perf_counter()
        make_voc(root, seed=0, train_aug=args.images, val=2, test=0, min_size=333, max_size=500)
        log(f"  generated {args.images} synthetic VOC photos (JPEG, sides 333-500) in "
            f"{time.perf_counter() - start:.1f} s")
        described = f"synthetic VOC, {args.images} JPEG photos of 333-500 px a side"
    elif root is None and shards is None:
        height, width = parse_size(args.image_size, MIN_SIZE) if args.image_size else (crop[0], 2 * crop[1])
        root = scratch / "cityscapes"
        start = time.perf_counter()
        make_cityscapes(root, seed=0, train=args.images, val=2, test=1, height=height, width=width)
        log(f"  generated {args.images} synthetic Cityscapes frames of {height}x{width} "
            f"in {time.perf_counter() - start:.1f} s")
        described = f"synthetic Cityscapes, {args.images} frames of {height}x{width}"
    else:
        described = f"{root or '(no loose files)'} / {shards or '(shards written here)'}"
    manifests: dict[str, Manifest] = {}
    if shards is not None:
        manifest = read_manifest(shards, split)
        manifests["lz4" if manifest.encoding == "lz4" else manifest.table.column("image_ext")[0].as_py()] = manifest
    else:
        assert root is not None
        original = "jpg" if args.dataset == "voc" else "png"
        for encoding, option in ((original, "original"), ("lz4", "lz4")):
            folder = scratch / f"shards-{encoding}"
            start = time.perf_counter()
            shard_dataset(args.dataset, root, folder, splits=[split], shard_size=8, workers=1,
                          show_progress=False, partial=True, encoding=option)
            manifests[encoding] = read_manifest(folder, split)
            size = sum(info.bytes for info in manifests[encoding].shard_infos) / 1e6
            log(f"  sharded them (8 per shard, --image-encoding {option}: {size:.0f} MB) "
                f"in {time.perf_counter() - start:.1f} s")
    pairs = loose_samples(root) if root is not None and args.dataset == "cityscapes" else None
    first = next(iter(manifests.values()))
    sizes = ", ".join(f"{enc} {sum(i.bytes for i in m.shard_infos) / m.num_samples / 1e6:.2f} MB/sample"
                      for enc, m in manifests.items())
    return manifests, pairs, f"{described}; {first.num_samples} samples in {len(first.shards)} shards ({sizes})"


# ----------------------------------------------------------------------------- output


def train_table(rows: list[TrainRow]) -> str:
    reference = {r.threads: r for r in rows if r.model.startswith("DeepLabV3")}
    lines = []
    for r in rows:
        peer = reference.get(r.threads)
        ratio = r.images_per_s / peer.images_per_s if peer and not (r.error or peer.error) else math.nan
        if r.error:
            lines.append([r.model, str(r.threads), str(r.batch), f"{r.params_m:.1f}", r.error, "", "", "", "",
                          "", f"{r.load_avg:.2f}"])
            continue
        lines.append([r.model, str(r.threads), str(r.batch), f"{r.params_m:.1f}", f"{r.median_s:.3f}",
                      f"{min(r.step_seconds):.3f}", f"{max(r.step_seconds):.3f}", f"{r.images_per_s:.2f}",
                      "" if r is peer else f"{ratio:.2f}x", f"{r.cpu_per_wall:.2f}", f"{r.load_avg:.2f}"])
    return format_table(["model", "threads", "batch", "params M", "s/step (median)", "min", "max", "images/s",
                  "DF-DAM / DLv3", "cpu/wall", "load 1m"], lines)


def data_table(rows: list[DataRow]) -> str:
    """Samples/s per row; augment = full - decode only (same source and encoding); each row beside
    the path before issue 11 (``before``) and beside the loose files' same stage."""
    decode = {(r.source, r.encoding): r for r in rows if not r.is_full}
    before = next((r for r in rows if r.stage == BEFORE), None)
    loose = {r.is_full: r for r in rows if r.source == "loose files"}
    lines = []
    for r in rows:
        base = decode.get((r.source, r.encoding))
        augment = f"{r.ms_per_sample - base.ms_per_sample:.2f}" if r.is_full and base else ""
        vs_before = f"{r.samples_per_s / before.samples_per_s:.2f}x" if before and r.is_full else ""
        peer = loose.get(r.is_full)
        vs_loose = f"{r.samples_per_s / peer.samples_per_s:.2f}x" if peer and r.source == "shards" else ""
        lines.append([r.source, r.encoding, r.stage, str(r.samples), f"{r.samples_per_s:.1f}",
                      f"{r.ms_per_sample:.2f}", augment, vs_before, vs_loose])
    return format_table(["source", "encoding", "stage", "samples", "samples/s", "ms/sample", "augment ms",
                         "vs before", "vs loose files"], lines)


def goals_table(rows: list[DataRow], target: float) -> str:
    """Issue 11's two data goals, measured in this run: the full path against the path before
    (``target`` x, per core) and the shard reader against loose files for the same work."""
    def find(source: str, encoding: str, stage: str) -> DataRow | None:
        return next((r for r in rows if (r.source, r.encoding, r.stage) == (source, encoding, stage)), None)

    before = next((r for r in rows if r.stage == BEFORE), None)
    lines = []
    for after in (r for r in rows if r.stage == AFTER):
        if before:
            ratio = after.samples_per_s / before.samples_per_s
            lines.append([f"full path ({after.encoding} shards) / before", f"{ratio:.2f}x", f">= {target:g}x",
                          "pass" if ratio >= target else "FAIL"])
    for stage_a, stage_b, what in (("decode only", "decode only", "decode only"), (AFTER, LOOSE, "full")):
        shard, loose = find("shards", "png", stage_a), find("loose files", "png", stage_b)
        if shard and loose:
            ratio = shard.samples_per_s / loose.samples_per_s
            lines.append([f"shards / loose files, same PNGs, {what}", f"{ratio:.2f}x", ">= 1x",
                          "pass" if ratio >= 1.0 else "FAIL"])
    return format_table(["goal", "measured", "target", ""], lines)


# ----------------------------------------------------------------------------- main


def size_arg(text: str) -> tuple[int, int]:
    """``parse_size`` for argparse, which shows an ArgumentTypeError's message (a ValueError's it does not)."""
    try:
        return parse_size(text, MIN_SIZE)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_threads(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated thread counts, e.g. 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return values


def machine_facts(device: torch.device, threads: list[int], amp: torch.dtype | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "amp": next((name for name, dtype in AMP_DTYPES.items() if dtype is amp), "off"),
        "load_avg_start": os.getloadavg(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=size_arg, default=(256, 256), metavar="HxW",
                        help="training crop (default 256x256; the paper: 1024x1024 Cityscapes, 512x512 VOC)")
    parser.add_argument("--batch", type=int, default=4, help="per-worker batch (default 4; the paper: 8 / 16)")
    parser.add_argument("--threads", type=parse_threads, default=[1], metavar="N[,N...]",
                        help="torch.set_num_threads values to measure training at (default 1 = one Ray worker "
                             "with 1 CPU); data loading runs at the first value")
    parser.add_argument("--warmup", type=int, default=1, help="untimed training steps per row (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per row (default 4)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="training device (default cpu)")
    parser.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                        help="autocast dtype for training; auto = fp16 + GradScaler on cuda (what train.amp "
                             "does) and off on cpu; bf16 needs no scaler")
    parser.add_argument("--dataset", choices=["cityscapes", "voc"], default="cityscapes",
                        help="synthetic data for the data rows: Cityscapes frames (PNG, also read as loose files) "
                             "or VOC photos (JPEG, 333-500 px a side, split train_aug; the VOC recipe crops "
                             "512x512, batch 16); with --shards, the split read (train or train_aug)")
    parser.add_argument("--data-root", type=Path, help="a Cityscapes-layout dataset for the loose-file rows "
                        "(leftImg8bit/ + gtFine/); sharded into a temporary folder unless --shards is given "
                        "(minutes for the full Cityscapes train split)")
    parser.add_argument("--shards", type=Path, help="a shard folder with train.manifest.parquet (e.g. written by "
                        "'run.py shard'); without --data-root only the shard rows are measured")
    parser.add_argument("--images", type=int, default=128,
                        help="synthetic train frames to generate (default 128: one train_loader epoch covers "
                             "the warm-up batch and --samples, so the rows measure the steady state)")
    parser.add_argument("--image-size", metavar="HxW", help="synthetic frame size (default crop_h x 2*crop_w)")
    parser.add_argument("--samples", type=int, default=96, help="samples counted per data row (default 96)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per data row, fastest reported (default 2)")
    parser.add_argument("--target", type=float, default=5.0,
                        help="speed-up of the full data path over the path before issue 11 to check (default 5)")
    parser.add_argument("--skip-train", action="store_true", help="only measure data loading")
    parser.add_argument("--skip-data", action="store_true", help="only measure training")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the tables")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.samples < 1 or args.repeat < 1:
        parser.error("--batch, --steps, --samples and --repeat must be >= 1, --warmup >= 0")
    if args.dataset == "voc" and args.data_root:
        parser.error("--data-root is a Cityscapes folder (the loose-file rows); for VOC pass --shards")
    if args.image_size:
        size_arg(args.image_size)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    amp = None if args.amp == "off" or (args.amp == "auto" and device.type == "cpu") else \
        AMP_DTYPES["fp16" if args.amp == "auto" else args.amp]
    log: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))

    facts = machine_facts(device, args.threads, amp)
    load = facts["load_avg_start"]
    crop = args.crop
    title = (f"train_throughput: torch {facts['torch']}, device {device}"
             f"{' (' + facts['gpu'] + ')' if 'gpu' in facts else ''}, amp {facts['amp']}, "
             f"threads {','.join(map(str, args.threads))}, {facts['cpu_count']} CPUs, "
             f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(title)
    print("=" * len(title))
    if load[0] > 0.75 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load[0]:.2f} on {os.cpu_count()} CPUs: other work shares these "
              "cores and every number below is lower than on an idle machine")
    result: dict[str, Any] = {"machine": facts, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                          for k, v in vars(args).items()}}

    if not args.skip_train:
        log("training ...")
        rows = run_training(args.threads, crop, args.batch, args.warmup, args.steps, device, amp, log)
        print(f"\nTraining, one worker: crop {crop[0]}x{crop[1]}, batch {args.batch}, {args.warmup} warm-up + "
              f"{args.steps} timed steps (forward + joint loss + backward + SGD step)")
        print(train_table(rows))
        result["train"] = [r.to_dict() for r in rows]

    if not args.skip_data:
        log("data ...")
        torch.set_num_threads(args.threads[0])
        scratch = Path(tempfile.mkdtemp(prefix="train-throughput-"))
        try:
            manifests, pairs, described = prepare_data(args, crop, scratch, log)
            rows_d, first_batch = run_data(manifests, pairs, crop, args.batch, args.samples, args.repeat, log)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"\nData loading, one process (loader_workers=0, {args.threads[0]} torch thread(s)): {described}; "
              f"crop {crop[0]}x{crop[1]}, batch {args.batch}, fastest of {args.repeat}, page cache warm")
        print(data_table(rows_d))
        print()
        print(goals_table(rows_d, args.target))
        if first_batch is not None:
            print(f"train_loader's first batch of an epoch: {first_batch * 1e3:.0f} ms (pipeline start + shuffle "
                  f"buffer fill, paid once per epoch; not in the rows above when one epoch covers the samples)")
        result["data"] = [r.to_dict() for r in rows_d]
        result["train_loader_first_batch_s"] = first_batch
        result["data_source"] = described

    facts["load_avg_end"] = os.getloadavg()
    end = facts["load_avg_end"]
    print(f"\nload avg at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=list) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
