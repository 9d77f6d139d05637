"""The Parquet manifest: the contract between writing shards and reading them.

One file per split, ``<shard_dir>/<split>.manifest.parquet``, one row per sample in
shard order. Dataset-level facts (classes, palette, the shards with their counts,
sizes and sha256, the image encoding) live in the Parquet schema metadata under
``dfdam.manifest`` as JSON. :func:`read_manifest` checks the file against itself and against the shard
files on disk, and raises :class:`ManifestError` (naming the file) on any mismatch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sharding.atomic import atomic_writer
from sharding.classes import ClassTable
from sharding.pixels import DEFAULT_ENCODING, ENCODINGS, IMAGE_MEMBER

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

    name: str
    samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A split's manifest, checked and ready for a reader.

    Attributes:
        root: the shard directory (absolute).
        path: the manifest file.
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

    root: Path
    path: Path
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
        """Absolute shard paths in order, as WebDataset takes them."""
        return [str(self.root / s.name) for s in self.shard_infos]

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


def list_splits(shard_dir: Path) -> list[str]:
    """The splits with a manifest in ``shard_dir``, sorted."""
    return sorted(p.name[: -len(MANIFEST_SUFFIX)] for p in Path(shard_dir).glob(f"*{MANIFEST_SUFFIX}"))


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


def _fail(path: Path, problem: str) -> ManifestError:
    return ManifestError(f"{path}: {problem}")


def _check_columns(path: Path, schema: pa.Schema) -> None:
    for field in SCHEMA:
        if field.name not in schema.names:
            raise _fail(path, f"missing column {field.name!r}; expected columns {', '.join(SCHEMA.names)}")
        found = schema.field(field.name).type
        if found != field.type:
            raise _fail(path, f"column {field.name!r} is {found}, expected {field.type}")


def _check_rows(path: Path, table: pa.Table, shards: list[ShardInfo], num_classes: int,
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
        shard_dir: the folder the shards were written to.
        split: e.g. ``"train"``.
        check_files: also check that every listed shard exists with its recorded size.

    Raises:
        ManifestError: naming the file, when the manifest is missing, unreadable, or
            inconsistent with itself or the shard files.
    """
    root = Path(shard_dir).resolve()
    path = manifest_path(root, split)
    if not path.is_file():
        found = list_splits(root) if root.is_dir() else []
        raise _fail(path, f"no manifest for split {split!r} (splits with a manifest here: "
                          f"{', '.join(found) or 'none'}); write it with `python run.py shard`")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise _fail(path, f"unreadable Parquet file ({type(exc).__name__}: {exc})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise _fail(path, f"no {METADATA_KEY.decode()} entry in the schema metadata; not a DF-DAM manifest")
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
        raise _fail(path, f"malformed metadata ({type(exc).__name__}: {exc})") from None
    if version != FORMAT_VERSION:
        raise _fail(path, f"format version {version}, expected {FORMAT_VERSION}; re-run `run.py shard`")
    if manifest.split != split:
        raise _fail(path, f"records split {manifest.split!r}, expected {split!r}")
    if len(class_names) != num_classes or len(palette) != num_classes:
        raise _fail(path, f"{len(class_names)} class names and {len(palette)} colours for "
                          f"num_classes = {num_classes}")
    if meta.get("num_samples") != table.num_rows or sum(manifest.shard_counts) != table.num_rows:
        raise _fail(path, f"{table.num_rows} rows, but the metadata records {meta.get('num_samples')} samples "
                          f"and its shards hold {sum(manifest.shard_counts)}")
    _check_columns(path, table.schema)
    _check_rows(path, table, shards, num_classes, manifest.encoding)
    if check_files:
        for info in shards:
            shard = root / info.name
            if not shard.is_file():
                raise _fail(path, f"lists shard {info.name}, but {shard} is missing")
            size = shard.stat().st_size
            if size != info.bytes:
                raise _fail(path, f"lists shard {info.name} with {info.bytes} bytes, but {shard} has {size}")
    return manifest
