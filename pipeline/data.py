"""WebDataset readers: shards -> (image, label) batches, split by Ray rank and loader worker.

Shards are found only through the Parquet manifest written by ``sharding/``.

* Training (:func:`train_loader`): every rank reads an endless, shuffled stream of shards
  resampled with a seed of its own (rank, loader worker and epoch), and the loader is cut
  at exactly ``steps_per_epoch`` batches, computed from the manifest's sample count. Every
  rank therefore runs the same number of steps and no rank waits in an all-reduce.
* Evaluation (:func:`eval_loader`): rank r reads shards r, r + world, r + 2 world, ...,
  split further between loader workers, each shard once: every validation sample is
  counted exactly once across all ranks. A batch holds images of one size from one shard
  (:func:`batch_by_size`): nothing is padded, so a prediction never depends on the other
  images of its batch, and the batches are the same whatever the number of ranks.
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig
from pipeline.transforms import EvalTransform, TrainTransform
from sharding.manifest import Manifest
from sharding.storage import shard_samples

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw WebDataset sample -> ``{"key", "image": uint8 HxWx3 RGB, "label": uint8 HxW}``.

    Either image encoding of ``run.py shard`` (the image file with a label PNG of train ids,
    or ``npy.lz4`` decoded pixels): :func:`sharding.samples.decode_members`, the decoder
    ``run.py shard verify`` uses too. The label's train ids are read as stored (never
    converted to RGB, never through a generic decoder that would change its values).
    """
    from sharding.samples import decode_members

    key = sample.get("__key__", "?")
    image, label = decode_members(sample, key, sample.get("__url__", "?"))
    return {"key": key, "image": image, "label": label}


def steps_per_epoch(manifest: Manifest, global_batch: int) -> int:
    """Optimizer steps per epoch: one pass over the manifest's samples, rounded up."""
    if manifest.num_samples == 0:
        raise ValueError(f"{manifest.root}: split {manifest.split!r} has no samples")
    return max(1, math.ceil(manifest.num_samples / global_batch))


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


class _Augment:
    """Applies the training transform with an RNG seeded by (seed, epoch, rank, loader worker)."""

    def __init__(self, transform: TrainTransform, seed: int, epoch: int, rank: int) -> None:
        self.transform, self.seed, self.epoch, self.rank = transform, seed, epoch, rank
        self.rng: np.random.Generator | None = None

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rng is None:  # created in the loader worker, after the fork
            self.rng = np.random.default_rng([self.seed, self.epoch, self.rank, _worker_id()])
        return self.transform(sample["image"], sample["label"], self.rng)


def _collate_train(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch)
    # numpy's stack of uint8 is a plain copy per sample, a few times faster than torch.stack's here.
    return (torch.from_numpy(np.stack([i.numpy() for i in images])),  # uint8 (B, H, W, 3)
            torch.from_numpy(np.stack([lab.numpy() for lab in labels])))  # uint8 (B, H, W)


def train_loader(
    manifest: Manifest, cfg: DataConfig, *, rank: int, world_size: int, epoch: int, seed: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless resampled stream for one rank, cut at :func:`steps_per_epoch` batches.

    Each rank gets ``cfg.batch_size // world_size`` samples a step, as uint8 batches
    ``(B, H, W, 3)`` images and ``(B, H, W)`` labels (see :class:`TrainTransform`): the
    training loop normalises them on its device (:func:`~pipeline.transforms.normalize_batch`).
    ``cfg.loader_workers`` processes decode and augment (0: this process), each keeping
    ``cfg.prefetch_batches`` batches ready; ``pin_memory`` (for a GPU) puts the batches in
    page-locked memory so the copy to the device can overlap the step.
    """
    if cfg.loader_workers < 0:
        raise ValueError(f"data.loader_workers = {cfg.loader_workers}: resolve it first "
                         "(pipeline.config.loader_workers gives the processes for train.cpus_per_worker)")
    per_rank = cfg.batch_size // world_size
    steps = steps_per_epoch(manifest, cfg.batch_size)
    transform = TrainTransform(cfg.crop_size, cfg.scales, cfg.mean, cfg.std)
    shard_seed = int(np.random.default_rng([seed, epoch, rank]).integers(2**31))
    pipeline = wds.DataPipeline(
        wds.ResampledShards(list(manifest.shards), seed=shard_seed, worker_seed=_worker_id, deterministic=True),
        shard_samples(),  # local paths and URLs alike (sharding/storage.py)
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, manifest.num_samples), seed=shard_seed),
        wds.map(decode_sample),
        wds.map(_Augment(transform, seed, epoch, rank)),
        wds.batched(per_rank, collation_fn=_collate_train, partial=False),
    )
    extra = {"prefetch_factor": cfg.prefetch_batches} if cfg.loader_workers > 0 else {}
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.loader_workers,
                           persistent_workers=False, pin_memory=pin_memory, **extra)
    return loader.with_epoch(steps)


def rank_shards(manifest: Manifest, rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` reads for evaluation: every ``world_size``-th from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return list(manifest.shards)[rank::world_size]


class _EvalDecode:
    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, str, str]:
        decoded = decode_sample(sample)
        image, label = self.transform(decoded["image"], decoded["label"])
        return image, label, decoded["key"], sample.get("__url__", "")


def batch_by_size(batch_size: int):
    """A pipeline stage: consecutive ``(image, label, key, shard)`` samples -> batches of up to
    ``batch_size`` images that share one size and one shard.

    Padding images to a common size would change predictions near the padding (convolutions,
    and DAFM's global pooling sees the padded area): batches of one size need none. Closing a
    batch at each shard boundary makes the batches depend on the shard alone, not on how the
    shards were dealt to ranks and loader workers, so 1 or N ranks evaluate identical batches.
    Yields ``(images (B, 3, H, W), labels (B, H, W), keys)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_by_size: batch_size must be at least 1, got {batch_size}")

    def stage(samples: Iterator[tuple[torch.Tensor, torch.Tensor, str, str]]):
        pending: list[tuple[torch.Tensor, torch.Tensor, str, str]] = []
        for sample in samples:
            group = (tuple(sample[0].shape), sample[3])
            if pending and (len(pending) == batch_size or (tuple(pending[0][0].shape), pending[0][3]) != group):
                yield _stack(pending)
                pending = []
            pending.append(sample)
        if pending:
            yield _stack(pending)

    return stage


def _stack(samples: list[tuple[torch.Tensor, torch.Tensor, str, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, keys, _ = zip(*samples)
    return torch.stack(images), torch.stack(labels), list(keys)  # (B, 3, H, W), (B, H, W)


def eval_loader(
    manifest: Manifest, cfg: DataConfig, *, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Each of this rank's shards once, in order, in batches of one image size (no padding).

    Yields ``(images (B,3,H,W), labels (B,H,W), keys)``; see :func:`batch_by_size`.
    """
    return shard_loader(rank_shards(manifest, rank, world_size), cfg)


def shard_loader(shards: list[str], cfg: DataConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The samples of ``shards``, each once, in order, batched as :func:`eval_loader` batches them."""
    if not shards:  # more ranks than shards: this rank has nothing to count
        return iter(())
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        shard_samples(),  # local paths and URLs alike (sharding/storage.py)
        wds.map(_EvalDecode(EvalTransform(cfg.mean, cfg.std))),
        batch_by_size(cfg.eval_batch_size),
    )
    workers = min(max(0, cfg.loader_workers), len(shards))
    return wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
