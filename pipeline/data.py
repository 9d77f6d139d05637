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

Damaged data (a member that does not decode, a label of another size than its image, a shard
cut short: :class:`Skipped`, naming the shard and the sample key) is treated two ways.
Training skips it with a warning and counts it (:attr:`TrainBatches.skipped`, logged per epoch
as ``data_skipped``), up to ``data.max_skipped`` samples a rank and epoch
(:class:`TooManySkipped` beyond); the count travels with the sample stream from the loader
processes, as items of their own. Evaluation never skips: the first damaged sample is a
:class:`DamagedSampleError` (its mIoU would otherwise be of another set than the manifest's).
"""
from __future__ import annotations

import io
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.config import DataConfig
from pipeline.transforms import EvalTransform, TrainTransform
from sharding.manifest import Manifest
from sharding.storage import display, name, shard_samples
from sharding.tarstream import TarError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")

log = logging.getLogger(__name__)

VERIFY_HINT = "`run.py shard verify --out SHARD_DIR` lists every damaged sample"


class DataError(ValueError):
    """Shard data that cannot be used: names the shard and the sample key."""


class DamagedSampleError(DataError):
    """Evaluation met a sample it cannot read (it never skips one)."""


class TooManySkipped(DataError):
    """A training rank skipped more than ``data.max_skipped`` samples in one epoch."""


@dataclass(frozen=True)
class Skipped:
    """A sample (or the unread rest of a shard) the loader could not use, as an item of the
    sample stream: it crosses from the loader processes to the training loop like a batch.

    Attributes:
        shard: the shard's location.
        key: the sample's key, or the last key read before a shard was cut short (None: none).
        reason: what is wrong, as the decoder or the tar reader said it.
        samples: samples lost (a shard cut short loses all the rest of its samples).
    """

    shard: str
    key: str | None
    reason: str
    samples: int = 1

    def message(self) -> str:
        where = f"shard {name(self.shard)}" + (f", sample {self.key!r}" if self.key else "")
        return f"{where}: {self.reason}"


def _read_shards(expected: dict[str, int]) -> Callable[[Iterable[dict[str, Any]]], Iterator[Any]]:
    """The stage ``{"url": shard}`` -> samples, like :func:`~sharding.storage.shard_samples`, but a
    shard whose tar cannot be read to its end (cut short, a corrupted header) ends in a
    :class:`Skipped` for the samples not read (``expected``: samples per shard location). A
    shard that cannot be opened (gone, a server unreachable) is not damaged data: its
    ``OSError`` (naming the location) is raised as before."""
    reader = shard_samples()

    def stage(sources: Iterable[dict[str, Any]]) -> Iterator[Any]:
        for source in sources:
            url, read, last = source["url"], 0, None
            try:
                for sample in reader([source]):
                    read, last = read + 1, sample["__key__"]
                    yield sample
            except TarError as exc:
                lost = max(1, expected.get(url, 0) - read)
                reason = str(exc).removeprefix(f"{display(url)}: ")
                after = f" after sample {last!r}" if last else ""
                yield Skipped(url, None, f"{reason} ({lost} sample(s){after} not read)", lost)

    return stage


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


def _decode_or_skip(sample: dict[str, Any]) -> dict[str, Any] | Skipped:
    """:func:`decode_sample`, or a :class:`Skipped` naming the sample when it does not decode."""
    try:
        return decode_sample(sample)
    except ValueError as exc:  # decode_members': "sample 'KEY' from SHARD: what is wrong"
        text = str(exc)
        return Skipped(sample.get("__url__", "?"), sample.get("__key__"),
                       text.split(": ", 1)[-1] if text.startswith("sample ") else text)


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


def _decode_train(augment: _Augment) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """The stage samples -> augmented ``(image, label)``; a sample that does not decode becomes a
    :class:`Skipped` (and :class:`Skipped` items pass)."""

    def stage(samples: Iterable[Any]) -> Iterator[Any]:
        for sample in samples:
            if isinstance(sample, Skipped):
                yield sample
                continue
            decoded = _decode_or_skip(sample)
            yield decoded if isinstance(decoded, Skipped) else augment(decoded)

    return stage


def _batch_train(per_rank: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
    """The stage ``(image, label)`` -> batches of ``per_rank`` (:func:`_collate_train`); each
    :class:`Skipped` is passed on at once, between batches."""

    def stage(samples: Iterable[Any]) -> Iterator[Any]:
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        for sample in samples:
            if isinstance(sample, Skipped):
                yield sample
                continue
            pending.append(sample)
            if len(pending) == per_rank:
                yield _collate_train(pending)
                pending = []

    return stage


class TrainBatches:
    """One epoch of a rank's training batches: :func:`train_loader`'s endless stream cut at
    ``steps`` batches, its :class:`Skipped` items counted and warned about, never yielded.

    Attributes:
        skipped: samples skipped in the epoch so far (``data_skipped`` in MLflow, summed over ranks).
        recent: the last few skips, for :class:`TooManySkipped`'s message.
    """

    def __init__(self, stream: Iterable[Any], steps: int, max_skipped: int, epoch: int) -> None:
        self.stream, self.steps, self.max_skipped, self.epoch = stream, steps, max_skipped, epoch
        self.skipped = 0
        self.recent: deque[Skipped] = deque(maxlen=3)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped, done = 0, 0
        self.recent.clear()
        if self.steps <= 0:
            return
        for item in self.stream:
            if isinstance(item, Skipped):
                self.skip(item)
                continue
            yield item
            done += 1
            if done == self.steps:
                return

    def skip(self, item: Skipped) -> None:
        """Count ``item``, warn naming it, and stop past ``max_skipped``."""
        self.skipped += item.samples
        self.recent.append(item)
        log.warning("training skips %s (%d skipped in epoch %d, data.max_skipped = %d)", item.message(),
                    self.skipped, self.epoch + 1, self.max_skipped)
        if self.skipped > self.max_skipped:
            last = "; ".join(s.message() for s in self.recent)
            raise TooManySkipped(f"{self.skipped} damaged samples skipped in epoch {self.epoch + 1}, more than "
                                 f"data.max_skipped = {self.max_skipped}; last: {last}. {VERIFY_HINT}; re-run "
                                 "`run.py shard` to rewrite the damaged shards")


def _collate_train(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batch)
    # numpy's stack of uint8 is a plain copy per sample, a few times faster than torch.stack's here.
    return (torch.from_numpy(np.stack([i.numpy() for i in images])),  # uint8 (B, H, W, 3)
            torch.from_numpy(np.stack([lab.numpy() for lab in labels])))  # uint8 (B, H, W)


def train_loader(
    manifest: Manifest, cfg: DataConfig, *, rank: int, world_size: int, epoch: int, seed: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless resampled stream for one rank, cut at :func:`steps_per_epoch` batches
    (a :class:`TrainBatches`: damaged samples are skipped and counted, see the module's doc).

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
        _read_shards(_shard_sizes(manifest)),  # local paths and URLs alike (sharding/storage.py)
        wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, manifest.num_samples), seed=shard_seed),
        _decode_train(_Augment(transform, seed, epoch, rank)),
        _batch_train(per_rank),
    )
    extra = {"prefetch_factor": cfg.prefetch_batches} if cfg.loader_workers > 0 else {}
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=cfg.loader_workers,
                           persistent_workers=False, pin_memory=pin_memory, **extra)
    return TrainBatches(loader, steps, cfg.max_skipped, epoch)


def _shard_sizes(manifest: Manifest) -> dict[str, int]:
    return dict(zip(manifest.shards, manifest.shard_counts))


def rank_shards(manifest: Manifest, rank: int, world_size: int) -> list[str]:
    """The shards rank ``rank`` reads for evaluation: every ``world_size``-th from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return list(manifest.shards)[rank::world_size]


class _EvalDecode:
    def __init__(self, transform: EvalTransform) -> None:
        self.transform = transform

    def __call__(self, samples: Iterable[Any]) -> Iterator[Any]:
        """The stage samples -> ``(image, label, key, shard)``; a sample that does not decode
        becomes a :class:`Skipped` (which :func:`_exact` turns into an error)."""
        for sample in samples:
            if isinstance(sample, Skipped):
                yield sample
                continue
            decoded = _decode_or_skip(sample)
            if isinstance(decoded, Skipped):
                yield decoded
                continue
            image, label = self.transform(decoded["image"], decoded["label"])
            yield image, label, decoded["key"], sample.get("__url__", "")


def _exact(batches: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Evaluation's batches, raising :class:`DamagedSampleError` at the first :class:`Skipped`:
    an evaluation counts every sample of the manifest, or fails naming the one it cannot read."""
    for item in batches:
        if isinstance(item, Skipped):
            raise DamagedSampleError(f"{item.message()}; evaluation reads every sample, so it stops here. "
                                     f"{VERIFY_HINT}; re-run `run.py shard` to rewrite the damaged shards")
        yield item


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
            if isinstance(sample, Skipped):  # passed on at once (evaluation fails on it)
                yield sample
                continue
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

    Yields ``(images (B,3,H,W), labels (B,H,W), keys)``; see :func:`batch_by_size`. A sample
    or shard that cannot be read is a :class:`DamagedSampleError` naming it (never skipped).
    """
    return shard_loader(rank_shards(manifest, rank, world_size), cfg)


def shard_loader(shards: list[str], cfg: DataConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """The samples of ``shards``, each once, in order, batched as :func:`eval_loader` batches them."""
    if not shards:  # more ranks than shards: this rank has nothing to count
        return iter(())
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        _read_shards({}),  # local paths and URLs alike (sharding/storage.py)
        _EvalDecode(EvalTransform(cfg.mean, cfg.std)),
        batch_by_size(cfg.eval_batch_size),
    )
    workers = min(max(0, cfg.loader_workers), len(shards))
    return _exact(wds.WebLoader(pipeline, batch_size=None, num_workers=workers))
