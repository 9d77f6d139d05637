"""Write one shard: a tar of checked samples, atomically, plus its sidecar index.

A shard is written to a hidden temporary file, fsynced and renamed into place; then
its sidecar ``<split>-%06d.index.json`` records the shard's sha256 and size, its
manifest rows, its rejects and a fingerprint of its inputs. :func:`pack_shard`
re-uses a shard whose sidecar matches the inputs and whose bytes still hash to the
recorded sha256, which is how an interrupted run resumes.

Tars are written with the standard library's ``tarfile`` in exactly the form
``webdataset.TarWriter(..., encoder=False, mtime=0)`` writes (PAX format, members
``<key>.<ext>`` in sorted extension order, mode 0o444, owner "bigdata", mtime 0), so
the same samples always give the same bytes. Importing ``webdataset`` would import
torch; this module runs in every worker process and imports only the light modules
that one sample needs.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import signal
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from sharding.atomic import atomic_write_bytes, atomic_writer
from sharding.pixels import DEFAULT_ENCODING
from sharding.samples import Reject, SampleError, SourceSample, encode_sample

log = logging.getLogger(__name__)

INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"
TAR_OWNER = "bigdata"
TAR_MODE = 0o444

Progress = Callable[[int], None]
"""Called with the number of samples just finished (packed, rejected or reused)."""


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its name, where, and the samples in it, in order."""

    index: int
    name: str
    out_dir: Path
    dataset: str
    split: str
    num_classes: int
    strict: bool
    samples: tuple[SourceSample, ...]
    encoding: str = DEFAULT_ENCODING  # sharding.pixels.ENCODINGS

    @property
    def path(self) -> Path:
        return self.out_dir / self.name

    @property
    def index_path(self) -> Path:
        return self.out_dir / (self.name[: -len(".tar")] + INDEX_SUFFIX)


@dataclass
class ShardResult:
    """What writing (or re-using) one shard produced."""

    name: str
    rows: list[dict[str, Any]]
    rejects: list[Reject]
    bytes: int
    sha256: str | None
    source_bytes: int
    reused: bool = False

    def to_index(self, fingerprint: str) -> dict[str, Any]:
        return {"version": INDEX_VERSION, "shard": self.name, "fingerprint": fingerprint,
                "bytes": self.bytes, "sha256": self.sha256, "source_bytes": self.source_bytes,
                "rows": self.rows, "rejects": [r.to_dict() for r in self.rejects]}


class _HashingWriter:
    """A write-only file that forwards to ``handle`` and hashes what passes through."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.handle.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Append one sample as ``<key>.<ext>`` members, like ``webdataset.TarWriter``."""
    for ext in sorted(members):
        data = members[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = 0
        info.mode = TAR_MODE
        info.uname = info.gname = TAR_OWNER
        tar.addfile(info, io.BytesIO(data))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stat(path: Path | None) -> list[int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _file_size(path: Path | None) -> int:
    stat = _stat(path)
    return stat[0] if stat else 0


def task_fingerprint(task: ShardTask) -> str:
    """A hash of everything a shard depends on: format, names, source paths, sizes, mtimes,
    and the image encoding (so a re-run with the other encoding rewrites every shard; left
    out for the original encoding, whose fingerprints predate the choice)."""
    entries = [[s.key, s.relative(s.image_path), _stat(s.image_path), s.relative(s.label_path),
                _stat(s.label_path)] for s in task.samples]
    payload = [INDEX_VERSION, task.dataset, task.split, task.name, task.num_classes, entries]
    if task.encoding != DEFAULT_ENCODING:
        payload.append(task.encoding)
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def load_reusable(task: ShardTask, fingerprint: str) -> ShardResult | None:
    """The recorded result of a shard a previous run finished, if it still verifies."""
    try:
        index = json.loads(task.index_path.read_text())
        if index.get("version") != INDEX_VERSION or index.get("fingerprint") != fingerprint:
            return None
        recorded = ShardResult(name=task.name, rows=index["rows"],
                               rejects=[Reject(**r) for r in index["rejects"]], bytes=index["bytes"],
                               sha256=index["sha256"], source_bytes=index["source_bytes"], reused=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no index, or one this version cannot read: write the shard again
    if not recorded.rows:
        return None if task.path.exists() else recorded
    if not task.path.is_file() or task.path.stat().st_size != recorded.bytes:
        return None
    if file_sha256(task.path) != recorded.sha256:
        log.info("%s: checksum differs from its index, rewriting it", task.path)
        return None
    return recorded


def pack_shard(task: ShardTask, progress: Progress | None = None) -> ShardResult:
    """Write one shard (or re-use a verified one) and its sidecar index.

    Per-sample problems become rejects, or, with ``task.strict``, raise
    :class:`SampleError`; either way no partial tar is left under the shard's name.
    """
    advance = progress or (lambda n: None)
    fingerprint = task_fingerprint(task)
    reused = load_reusable(task, fingerprint)
    if reused is not None:
        advance(len(task.samples))
        return reused
    task.index_path.unlink(missing_ok=True)
    rows: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    source_bytes = 0
    with atomic_writer(task.path) as handle:
        sink = _HashingWriter(handle)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for sample in task.samples:
                try:
                    encoded = encode_sample(sample, dataset=task.dataset, split=task.split,
                                            num_classes=task.num_classes, encoding=task.encoding)
                except SampleError as error:
                    if task.strict:
                        raise
                    rejects.append(Reject.from_error(sample.key, error))
                    advance(1)
                    continue
                add_sample(tar, encoded.key, encoded.members)
                rows.append({"shard": task.name, **encoded.row})
                source_bytes += _file_size(sample.image_path) + _file_size(sample.label_path)
                advance(1)
    result = ShardResult(name=task.name, rows=rows, rejects=rejects, bytes=sink.size,
                         sha256=sink.sha256.hexdigest(), source_bytes=source_bytes)
    if not rows:  # every sample rejected: no shard, only its index
        task.path.unlink(missing_ok=True)
        result.bytes, result.sha256 = 0, None
    atomic_write_bytes(task.index_path, json.dumps(result.to_index(fingerprint)).encode())
    return result


# --------------------------------------------------------------------------- worker processes

_worker_queue: Any = None


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that started it dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pool_init(progress_queue: Any, parent: int | None = None) -> None:
    """A pack worker's initializer: report progress to ``progress_queue``; with ``parent`` (the
    run's pid), die with the run, even a SIGKILLed one, so that no worker goes on writing into a
    folder a re-run has locked (``sharding.write.output_lock``)."""
    global _worker_queue
    if parent is not None:
        _die_with_parent()
        if os.getppid() != parent:  # the run died before the line above took effect
            os._exit(1)
    _worker_queue = progress_queue


def pool_pack(task: ShardTask) -> tuple[int, ShardResult]:
    return task.index, pack_shard(task, _worker_queue.put)
