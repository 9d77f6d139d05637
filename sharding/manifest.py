"""The Parquet manifest: the contract between writing shards and reading them.

One file per split, ``<shard_dir>/<split>.manifest.parquet``, one row per sample in
shard order. Dataset-level facts (classes, palette, the shards with their counts,
sizes and sha256, the image encoding) live in the Parquet schema metadata under
``dfdam.manifest`` as JSON. :func:`read_manifest` checks the file against itself and against the shard
files, and raises :class:`ManifestError` (naming the file) on any mismatch.

Shards are named relative to the manifest's folder (:attr:`ShardInfo.name`), so a shard
folder copied or uploaded whole reads from its new place: a local path, a shared (NFS)
one, or an ``https://``, ``s3://`` or ``gs://`` URL (``sharding/storage.py``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sharding import storage
from sharding.atomic import atomic_writer
from sharding.classes import ClassTable
from sharding.pixels import DEFAULT_ENCODING, ENCODINGS, IMAGE_MEMBER
from sharding.tarstream import split_name

FORMAT_VERSION = 1
METADATA_KEY = b"dfdam.manifest"
MANIFEST_SUFFIX = ".manifest.parquet"
REJECTS_SUFFIX = ".rejects.jsonl"

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),          # file name relative to the shard dir
    pa.field("image_ext", pa.string(), nullable=False),      # "png" | "jpg" | "npy.lz4": the image's tar member
    pa.field("image_bytes", pa.int64(), nullable=False),
    pa.field("label_bytes", pa.int64(), nullable=False),
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("label_sha256", pa.string(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("class_pixels", pa.list_(pa.int64()), nullable=False),  # length num_classes
    pa.field("ignore_pixels", pa.int64(), nullable=False),
    pa.field("image_source", pa.string(), nullable=False),   # relative to the dataset root
    pa.field("label_source", pa.string(), nullable=True),    # None for an unlabelled split
])


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or disagrees with itself or the shards."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str  # the file name, relative to the manifest's folder
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A split's manifest, checked and ready for a reader.

    Attributes:
        root: the shard folder: an absolute local path, or a URL (``https://``, ``s3://``,
            ``gs://``) that every Ray worker opens itself.
        path: the manifest file (a path or a URL, as ``root``).
        split, dataset: e.g. ``"train"``, ``"cityscapes"``.
        num_classes, class_names, ignore_index, palette: the class table; ``palette``
            holds one ``[r, g, b]`` per train id.
        shard_infos: every shard in order with its sample count, byte size and sha256.
        num_rejects: samples left out when the shards were written.
        table: one row per sample, in shard order (see :data:`SCHEMA`).
        encoding: how images and labels are stored (:data:`sharding.pixels.ENCODINGS`):
            ``"original"`` (the image file's bytes + ``label.png``; also what a manifest
            that records none means) or ``"lz4"`` (``npy.lz4`` + ``label.npy.lz4``).
    """

    root: str
    path: str
    split: str
    dataset: str
    num_classes: int
    class_names: list[str]
    ignore_index: int
    palette: list[list[int]]
    shard_infos: list[ShardInfo]
    num_rejects: int
    table: pa.Table
    encoding: str = DEFAULT_ENCODING

    @property
    def num_samples(self) -> int:
        """Samples in the split (rows of the table)."""
        return self.table.num_rows

    @property
    def shards(self) -> list[str]:
        """Shard locations in order (absolute paths, or URLs for a remote root), as
        :func:`sharding.storage.shard_samples` takes them."""
        return [self.shard_location(s.name) for s in self.shard_infos]

    def shard_location(self, name: str) -> str:
        """Where the shard ``name`` (a :attr:`ShardInfo.name`) is: ``root/name``."""
        return storage.join(self.root, name)

    @property
    def shard_counts(self) -> list[int]:
        """Samples per shard, in the order of :attr:`shards`."""
        return [s.samples for s in self.shard_infos]


def manifest_path(shard_dir: Path, split: str) -> Path:
    """``<shard_dir>/<split>.manifest.parquet``."""
    return Path(shard_dir) / f"{split}{MANIFEST_SUFFIX}"


def rejects_path(shard_dir: Path, split: str) -> Path:
    """``<shard_dir>/<split>.rejects.jsonl``: one JSON object per sample left out."""
    return Path(shard_dir) / f"{split}{REJECTS_SUFFIX}"


def shard_name(split: str, index: int) -> str:
    """``<split>-%06d.tar``."""
    return f"{split}-{index:06d}.tar"


def list_splits(shard_dir: Path | str) -> list[str]:
    """The splits with a manifest in ``shard_dir``, sorted (a URL: ``[]`` where the server lists no folders)."""
    return [name[: -len(MANIFEST_SUFFIX)] for name in storage.list_names(shard_dir, MANIFEST_SUFFIX)]


def build_metadata(*, dataset: str, split: str, classes: ClassTable, shards: Sequence[ShardInfo],
                   num_samples: int, num_rejects: int, encoding: str = DEFAULT_ENCODING) -> dict[str, Any]:
    """The dataset-level JSON stored in the Parquet schema metadata."""
    return {
        "encoding": encoding,
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "split": split,
        "num_samples": num_samples,
        "num_classes": classes.num_classes,
        "class_names": list(classes.names),
        "ignore_index": classes.ignore_index,
        "palette": [list(c) for c in classes.palette],
        "shards": [s.to_dict() for s in shards],
        "num_rejects": num_rejects,
    }


def write_manifest(shard_dir: Path, split: str, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> Path:
    """Write the manifest of ``split`` atomically; ``rows`` follow :data:`SCHEMA`."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    path = manifest_path(shard_dir, split)
    with atomic_writer(path) as handle:
        pq.write_table(table, handle)
    return path


def missing_shard_folder(folder: Path | str) -> FileNotFoundError:
    """The one error for a shard folder that is not there (train, tune, evaluate, shard verify)."""
    return FileNotFoundError(f"shard folder {folder} does not exist: expected the --out folder of `run.py shard`")


def _fail(path: Path | str, problem: str) -> ManifestError:
    return ManifestError(f"{path}: {problem}")


def _check_columns(path: Path | str, schema: pa.Schema) -> None:
    for field in SCHEMA:
        if field.name not in schema.names:
            raise _fail(path, f"missing column {field.name!r}; expected columns {', '.join(SCHEMA.names)}")
        found = schema.field(field.name).type
        if found != field.type:
            raise _fail(path, f"column {field.name!r} is {found}, expected {field.type}")


def _check_rows(path: Path | str, table: pa.Table, shards: list[ShardInfo], num_classes: int,
                encoding: str) -> None:
    """Rows come in blocks, one per shard in order, of the recorded sizes; every image
    member is of the recorded encoding."""
    if encoding not in ENCODINGS:
        raise _fail(path, f"image encoding {encoding!r}, expected one of {', '.join(ENCODINGS)}")
    names = table.column("shard").to_pylist()
    expected = [s.name for s in shards for _ in range(s.samples)]
    if names != expected:
        found = {n: names.count(n) for n in dict.fromkeys(names)}
        want = {s.name: s.samples for s in shards}
        raise _fail(path, f"rows per shard {found} disagree with the shard list {want} "
                          "(rows must come in shard order)")
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != table.num_rows:
        raise _fail(path, "sample keys are not unique")
    lengths = pc.list_value_length(table.column("class_pixels"))
    if table.num_rows and (pc.min(lengths).as_py() != num_classes or pc.max(lengths).as_py() != num_classes):
        raise _fail(path, f"class_pixels lists must have num_classes = {num_classes} entries")
    lz4_rows = pc.sum(pc.equal(table.column("image_ext"), IMAGE_MEMBER)).as_py() or 0
    if lz4_rows != (table.num_rows if encoding == "lz4" else 0):
        raise _fail(path, f"records image encoding {encoding!r}, but {lz4_rows} of {table.num_rows} rows have "
                          f"image_ext {IMAGE_MEMBER}: one split holds one encoding; re-run `run.py shard`")


def read_manifest(shard_dir: Path | str, split: str, *, check_files: bool = True) -> Manifest:
    """Read and check ``<shard_dir>/<split>.manifest.parquet``.

    Args:
        shard_dir: the folder the shards were written to, or a copy of it: a local path or an
            ``https://``, ``s3://`` or ``gs://`` URL (``sharding/storage.py``).
        split: e.g. ``"train"``.
        check_files: also check that every listed shard exists with its recorded size and (a
            local folder) begins with its first sample: :func:`check_shard_files`.

    Raises:
        ManifestError: naming the file, when the manifest is missing, unreadable, or
            inconsistent with itself or the shard files.
        sharding.storage.StorageError: a remote folder that cannot be reached or read
            (the URL and the cause in the message).
    """
    root = storage.absolute(shard_dir)
    path = storage.join(root, f"{split}{MANIFEST_SUFFIX}")
    where = storage.display(path)
    try:
        data = storage.read_bytes(path, expected=f"the manifest of split {split!r}")
    except FileNotFoundError:
        if not storage.is_remote(root) and not storage.is_folder(root):
            raise missing_shard_folder(shard_dir) from None
        found = list_splits(root)
        none = "none listed (a web server need not list its folders)" if storage.is_remote(root) else "none"
        listing = f"splits with a manifest here: {', '.join(found) or none}"
        raise _fail(where, f"no manifest for split {split!r} ({listing}); write it with `python run.py shard`"
                           + (" and upload the whole shard folder" if storage.is_remote(root) else "")) from None
    except IsADirectoryError:
        raise _fail(where, f"a folder, not the manifest of split {split!r}") from None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:
        raise _fail(where, f"unreadable Parquet file ({type(exc).__name__}: {exc})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise _fail(where, f"no {METADATA_KEY.decode()} entry in the schema metadata; not a DF-DAM manifest")
    try:
        meta = json.loads(raw)
        version = meta["format_version"]
        shards = [ShardInfo(name=s["name"], samples=int(s["samples"]), bytes=int(s["bytes"]),
                            sha256=s["sha256"]) for s in meta["shards"]]
        num_classes = int(meta["num_classes"])
        class_names = list(meta["class_names"])
        palette = [list(map(int, c)) for c in meta["palette"]]
        manifest = Manifest(root=root, path=path, split=meta["split"], dataset=meta["dataset"],
                            num_classes=num_classes, class_names=class_names,
                            ignore_index=int(meta["ignore_index"]), palette=palette,
                            shard_infos=shards, num_rejects=int(meta.get("num_rejects", 0)),
                            table=table.replace_schema_metadata(None),
                            encoding=meta.get("encoding", DEFAULT_ENCODING))
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(where, f"malformed metadata ({type(exc).__name__}: {exc})") from None
    if version != FORMAT_VERSION:
        raise _fail(where, f"format version {version}, expected {FORMAT_VERSION}; re-run `run.py shard`")
    if manifest.split != split:
        raise _fail(where, f"records split {manifest.split!r}, expected {split!r}")
    if len(class_names) != num_classes or len(palette) != num_classes:
        raise _fail(where, f"{len(class_names)} class names and {len(palette)} colours for "
                          f"num_classes = {num_classes}")
    if meta.get("num_samples") != table.num_rows or sum(manifest.shard_counts) != table.num_rows:
        raise _fail(where, f"{table.num_rows} rows, but the metadata records {meta.get('num_samples')} samples "
                          f"and its shards hold {sum(manifest.shard_counts)}")
    _check_columns(where, table.schema)
    _check_rows(where, table, shards, num_classes, manifest.encoding)
    if check_files:
        check_shard_files(manifest)
    return manifest


FULL_CHECK = "`run.py shard verify` checks every byte (sha256); `run.py shard` rewrites what differs"


def check_shard_files(manifest: Manifest) -> None:
    """The cheap check that the shards are still the ones the manifest lists, before any work
    starts: each exists with its recorded byte size and, for a local folder, begins with the
    sample the manifest lists first (one tar header read: a shard swapped for another of the
    same size is caught too). A URL is checked by size alone (one HEAD / object lookup per
    shard, nothing downloaded). The full check, every byte's sha256, is ``run.py shard verify``.

    Raises:
        ManifestError: naming the manifest, the shard, what was expected and what was found.
    """
    where = storage.display(manifest.path)
    keys = manifest.table.column("key").to_pylist()
    first = 0
    for info in manifest.shard_infos:
        shard = manifest.shard_location(info.name)
        try:
            size = storage.size(shard, expected=f"shard {info.name} of {info.bytes} bytes")
        except FileNotFoundError:
            raise _fail(where, f"lists shard {info.name}, but {storage.display(shard)} is missing "
                               f"(deleted or moved since `run.py shard` wrote it); {FULL_CHECK}") from None
        if size != info.bytes:
            raise _fail(where, f"lists shard {info.name} with {info.bytes} bytes, but {storage.display(shard)} "
                               f"has {size} (cut short, or replaced since `run.py shard` wrote it); {FULL_CHECK}")
        if info.samples and not storage.is_remote(shard):
            found = _first_key(shard)
            if found != keys[first]:
                raise _fail(where, f"lists shard {info.name} beginning with sample {keys[first]!r}, but "
                                   f"{storage.display(shard)} begins with "
                                   f"{'no sample (not a tar file)' if found is None else repr(found)} "
                                   f"(replaced by another shard?); {FULL_CHECK}")
        first += info.samples


def _first_key(path: str) -> str | None:
    """The WebDataset key of a local tar's first member (its first header alone is read), or None."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.next()
    except (tarfile.TarError, OSError):
        return None
    return None if member is None else split_name(member.name)[0]
