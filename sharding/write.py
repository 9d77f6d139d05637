"""Pack dataset splits into WebDataset tar shards and write their Parquet manifests.

The plan is fixed before any work: samples sorted by key, cut into shards of
``shard_size`` samples, ``<out>/<split>-%06d.tar``. Each shard is one task
(:func:`sharding.pack.pack_shard`), run in a pool of worker processes; a task writes
its shard atomically with a sidecar index, and a re-run re-uses every shard whose
checksum still verifies, so a killed run resumes where it stopped. The manifest is
deleted when a split starts and written (atomically) only once every shard is in
place. The same inputs give byte-identical shards, whatever the number of workers.

The image encoding (:data:`sharding.pixels.ENCODINGS`) is a property of a split:
``original`` keeps each image file's bytes and a label PNG, ``lz4`` stores decoded
pixels that load several times faster, in larger shards (``benchmarks/decode_throughput.py``).
It is part of every shard's fingerprint, so re-packing a split with the other encoding
rewrites all of its shards and never mixes the two; the manifest records it.

One run at a time per output folder: :func:`output_lock` holds an exclusive ``flock`` on
``<out>/.shard.lock`` (the holder's pid inside) for the whole run, so a second ``run.py shard``
on the same ``--out`` is refused at once (:class:`OutputLockedError`, naming the holder) instead
of interleaving its shards with the first's. The kernel releases the lock when its holder dies,
even by SIGKILL, so a re-run is never blocked by a stale file; a run that ends removes the file.
Worker processes die with the run (``PR_SET_PDEATHSIG`` on Linux), so none outlives a killed
run to write into a folder a re-run has locked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing
import os
import queue as queue_module
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from sharding import cityscapes, voc
from sharding.atomic import atomic_write_bytes, remove_temporaries
from sharding.classes import DATASETS, classes_for
from sharding.manifest import (ShardInfo, build_metadata, manifest_path, rejects_path, shard_name,
                               write_manifest)
from sharding.marker import read_marker
from sharding.pack import INDEX_SUFFIX, Progress, ShardResult, ShardTask, pack_shard, pool_init, pool_pack
from sharding.pixels import DEFAULT_ENCODING, check_encoding
from sharding.samples import DatasetError, Discovery, Reject, SampleError, SourceSample
from sharding.text import bar_disabled, format_table

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 100
LOCK_FILE = ".shard.lock"


class OutputLockedError(RuntimeError):
    """Another ``run.py shard`` holds the output folder's lock; names the folder and the holder."""


# --------------------------------------------------------------------------- one writer per folder

def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "its pid not yet recorded: it has only just started"


@contextmanager
def output_lock(out_dir: Path | str) -> Iterator[Path]:
    """Hold ``<out_dir>/.shard.lock`` exclusively while the block runs; creates ``out_dir`` (and
    removes it again if it was created here and is still empty at the end).

    Raises:
        OutputLockedError: another process holds the lock (its pid, host and start time are in
            the message).
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    path = out_dir / LOCK_FILE
    while True:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the folder went away with a finished holder: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _lock_holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise OutputLockedError(f"{out_dir} is being written by another `run.py shard` ({holder}); "
                                    f"wait for it to finish or stop it (it holds {path}), then run again") from None
        try:  # a holder that finished removed the file between our open and our lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # still held: nobody can have locked this file meanwhile
        os.close(fd)
        if created:
            try:
                out_dir.rmdir()  # only if nothing was written
            except OSError:
                pass


# --------------------------------------------------------------------------- datasets

def dataset_splits(dataset: str) -> tuple[str, ...]:
    """The splits ``shard`` writes for ``dataset`` when none are named."""
    if dataset == "cityscapes":
        return cityscapes.SPLITS
    if dataset == "voc":
        return voc.DEFAULT_SPLITS
    raise DatasetError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def discover(dataset: str, root: Path, split: str) -> Discovery:
    """List the samples of ``split`` with the reader of ``dataset``."""
    if not Path(root).is_dir():
        raise DatasetError(f"dataset root {root} is not a folder; expected the folder holding the dataset as "
                           "downloaded (cityscapes: leftImg8bit/ and gtFine/; voc: VOCdevkit/)")
    if dataset == "cityscapes":
        return cityscapes.discover(root, split)
    if dataset == "voc":
        return voc.discover(root, split)
    raise DatasetError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")


def expected_count(dataset: str, root: Path, split: str) -> tuple[int | None, str]:
    """The image count ``split`` must have, and where that number comes from.

    A synthetic dataset declares its own counts in its marker file; otherwise the
    official counts of the full release apply.
    """
    marker = read_marker(root)
    if marker is not None:
        counts = marker.get("expected_counts", {})
        return counts.get(split), f"declared by the synthetic marker in {root}"
    official = cityscapes.OFFICIAL_COUNTS if dataset == "cityscapes" else voc.OFFICIAL_COUNTS
    return official.get(split), f"the official count of the full {dataset} release"


def check_count(dataset: str, root: Path, split: str, found: int, *, partial: bool) -> None:
    """Stop (or, with ``partial``, warn) when ``found`` differs from the expected count."""
    expected, source = expected_count(dataset, root, split)
    if expected is None or expected == found:
        return
    message = (f"{dataset} split {split!r} under {root} lists {found} images, expected {expected} "
               f"({source})")
    if partial:
        log.warning("%s; going on because of --partial", message)
        return
    raise DatasetError(f"{message}. Check that the download is complete and unpacked in the expected "
                       "layout, or pass --partial to shard what is there.")


# --------------------------------------------------------------------------- many shards

def plan_shards(samples: Sequence[SourceSample], *, out_dir: Path, dataset: str, split: str,
                num_classes: int, shard_size: int, strict: bool,
                encoding: str = DEFAULT_ENCODING) -> list[ShardTask]:
    """Cut key-sorted ``samples`` into consecutive shards of ``shard_size``."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    ordered = sorted(samples, key=lambda s: s.key)
    return [ShardTask(index=i, name=shard_name(split, i), out_dir=out_dir, dataset=dataset, split=split,
                      num_classes=num_classes, strict=strict,
                      samples=tuple(ordered[start:start + shard_size]), encoding=encoding)
            for i, start in enumerate(range(0, len(ordered), shard_size))]


def run_tasks(tasks: Sequence[ShardTask], workers: int, progress: Progress) -> list[ShardResult]:
    """Run shard tasks in ``workers`` processes (in this one when 1); results in task order.

    Workers are spawned, not forked: safe whatever threads the caller runs (tqdm, Ray),
    and cheap, since a worker imports only :mod:`sharding.pack` and the label readers.
    Their per-sample progress comes back through a queue to ``progress``.
    """
    if workers <= 1 or len(tasks) <= 1:
        return [pack_shard(task, progress) for task in tasks]
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                progress(progress_queue.get(timeout=0.1))
            except queue_module.Empty:
                if done.is_set():
                    return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    results: list[ShardResult | None] = [None] * len(tasks)
    pool = ctx.Pool(min(workers, len(tasks)), initializer=pool_init,
                    initargs=(progress_queue, os.getpid()))
    try:
        for index, result in pool.imap_unordered(pool_pack, tasks):
            results[index] = result
        pool.close()
        pool.join()
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    finally:
        done.set()
        reader.join(timeout=5)
    missing = [task.name for task, result in zip(tasks, results) if result is None]
    if missing:
        raise RuntimeError(f"worker pool returned no result for {', '.join(missing)}")
    return results  # type: ignore[return-value]


_SHARD_FILE = r"-(\d{6})(\.tar|" + re.escape(INDEX_SUFFIX) + r")"


def remove_stale_shards(out_dir: Path, split: str, num_shards: int) -> None:
    """Delete shards and indexes of ``split`` numbered beyond the current plan."""
    pattern = re.compile(re.escape(split) + _SHARD_FILE)
    for path in out_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()


# --------------------------------------------------------------------------- a split

@dataclass
class SplitReport:
    """The outcome of sharding one split, for the summary table."""

    dataset: str
    split: str
    samples: int
    shards: int
    shards_reused: int
    bytes: int
    source_bytes: int
    seconds: float
    rejects: list[Reject] = field(default_factory=list)
    manifest: Path | None = None
    encoding: str = DEFAULT_ENCODING

    @property
    def images_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.source_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0

    @property
    def size_ratio(self) -> float:
        """Bytes of shards per byte of source files (image + label): the encoding's size cost."""
        return self.bytes / self.source_bytes if self.source_bytes else 0.0


def _write_rejects(out_dir: Path, split: str, rejects: Sequence[Reject]) -> Path:
    path = rejects_path(out_dir, split)
    lines = "".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in rejects)
    atomic_write_bytes(path, lines.encode())
    return path


def shard_split(dataset: str, root: Path | str, split: str, out_dir: Path | str, **options: Any) -> SplitReport:
    """Shard one split of a dataset into ``out_dir``, resuming what a previous run finished,
    holding the folder's lock (:func:`output_lock`); the options are :func:`_shard_split`'s."""
    with output_lock(out_dir):
        return _shard_split(dataset, root, split, out_dir, **options)


def _shard_split(dataset: str, root: Path | str, split: str, out_dir: Path | str, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1, partial: bool = False,
                 strict: bool = False, show_progress: bool = True,
                 on_progress: Progress | None = None, encoding: str = DEFAULT_ENCODING) -> SplitReport:
    """Shard one split (the caller holds the lock of ``out_dir``).

    Args:
        dataset: ``"cityscapes"`` or ``"voc"``.
        root: the dataset as downloaded (see :mod:`sharding.cityscapes`, :mod:`sharding.voc`).
        split: e.g. ``"train"``, ``"val"``, ``"test"``, ``"train_aug"``.
        out_dir: where ``<split>-%06d.tar`` and ``<split>.manifest.parquet`` go.
        shard_size: samples per shard.
        workers: processes packing shards in parallel.
        partial: warn instead of stopping when the image count differs from the expected one.
        strict: stop at the first bad sample instead of listing it in the rejects.
        show_progress: draw a tqdm progress bar on stderr.
        on_progress: also called with each number of finished samples.
        encoding: ``"original"`` (the image file's bytes and a label PNG) or ``"lz4"``
            (decoded pixels, :mod:`sharding.pixels`); shards written with the other
            encoding are all rewritten.

    Raises:
        DatasetError: missing folders or lists, a wrong count, or no usable sample.
        SampleError: with ``strict``, the first bad sample.
        OutputLockedError: (from :func:`shard_split`) another run is writing ``out_dir``.
    """
    root, out_dir = Path(root), Path(out_dir)
    check_encoding(encoding)
    classes = classes_for(dataset)
    discovery = discover(dataset, root, split)
    check_count(dataset, root, split, discovery.listed, partial=partial)
    if strict and discovery.rejects:
        first = discovery.rejects[0]
        raise SampleError(first.path, first.reason)
    if not discovery.samples:
        raise DatasetError(f"{dataset} split {split!r} under {root} has no complete sample "
                           f"({len(discovery.rejects)} rejected)")
    tasks = plan_shards(discovery.samples, out_dir=out_dir, dataset=dataset, split=split,
                        num_classes=classes.num_classes, shard_size=shard_size, strict=strict, encoding=encoding)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path(out_dir, split).unlink(missing_ok=True)  # the split is incomplete until the end
    for prefix in (f"{split}-", f"{split}."):  # what a killed run left behind
        remove_temporaries(out_dir, prefix)
    remove_stale_shards(out_dir, split, len(tasks))
    start = time.perf_counter()
    bar = tqdm(total=len(discovery.samples), unit="img", desc=f"{dataset}/{split}",
               disable=bar_disabled(show_progress), dynamic_ncols=True)

    def advance(n: int) -> None:
        bar.update(n)
        if on_progress is not None:
            on_progress(n)

    try:
        results = run_tasks(tasks, workers, advance)
    finally:
        bar.close()
        remove_temporaries(out_dir, f"{split}-")
    rejects = list(discovery.rejects) + [r for result in results for r in result.rejects]
    if strict and rejects:
        raise SampleError(rejects[0].path, rejects[0].reason)
    rejects_file = _write_rejects(out_dir, split, rejects)
    rows = [row for result in results for row in result.rows]
    shards = [ShardInfo(name=r.name, samples=len(r.rows), bytes=r.bytes, sha256=r.sha256)
              for r in results if r.rows and r.sha256]
    if not rows:
        raise DatasetError(f"{dataset} split {split!r}: every sample was rejected; see {rejects_file}")
    metadata = build_metadata(dataset=dataset, split=split, classes=classes, shards=shards,
                              num_samples=len(rows), num_rejects=len(rejects), encoding=encoding)
    manifest = write_manifest(out_dir, split, rows, metadata)
    seconds = time.perf_counter() - start
    if rejects:
        log.warning("%s/%s: %d sample(s) rejected and listed in %s; first: %s", dataset, split, len(rejects),
                    rejects_file, rejects[0].message())
    return SplitReport(dataset=dataset, split=split, samples=len(rows), shards=len(shards),
                       shards_reused=sum(r.reused for r in results), bytes=sum(s.bytes for s in shards),
                       source_bytes=sum(r.source_bytes for r in results), seconds=seconds,
                       rejects=rejects, manifest=manifest, encoding=encoding)


def shard_dataset(dataset: str, root: Path | str, out_dir: Path | str, splits: Sequence[str] | None = None,
                  **options: Any) -> list[SplitReport]:
    """Shard several splits (all of the dataset's by default) under one hold of the folder's
    lock; see :func:`shard_split`."""
    names = list(splits) if splits else list(dataset_splits(dataset))
    with output_lock(out_dir):
        return [_shard_split(dataset, root, split, out_dir, **options) for split in names]


def format_summary(reports: Sequence[SplitReport]) -> str:
    """A plain-text table: samples, shards, bytes, time, throughput and rejects per split; then
    each split's image encoding and its size cost (shard bytes per source byte)."""
    header = ("split", "samples", "shards", "reused", "MB out", "seconds", "img/s", "MB/s in", "rejects")
    lines = [[r.split, str(r.samples), str(r.shards), str(r.shards_reused), f"{r.bytes / 1e6:.1f}",
              f"{r.seconds:.1f}", f"{r.images_per_second:.1f}", f"{r.mb_per_second:.1f}", str(len(r.rejects))]
             for r in reports]
    if len(reports) > 1:
        seconds = sum(r.seconds for r in reports)
        samples = sum(r.samples for r in reports)
        source = sum(r.source_bytes for r in reports)
        lines.append(["total", str(samples), str(sum(r.shards for r in reports)),
                      str(sum(r.shards_reused for r in reports)), f"{sum(r.bytes for r in reports) / 1e6:.1f}",
                      f"{seconds:.1f}", f"{samples / seconds if seconds else 0:.1f}",
                      f"{source / 1e6 / seconds if seconds else 0:.1f}", str(sum(len(r.rejects) for r in reports))])
    table = format_table(header, lines)  # split name left-aligned, numbers right-aligned
    costs = [f"{r.split}: image encoding {r.encoding}, {r.bytes / 1e6:.1f} MB of shards for "
             f"{r.source_bytes / 1e6:.1f} MB of source files ({r.size_ratio:.2f}x)" for r in reports]
    return "\n".join([table, *costs])
