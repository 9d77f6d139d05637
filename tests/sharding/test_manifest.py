"""The manifest API that pipeline/data.py reads, and its errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharding.manifest import METADATA_KEY, Manifest, ManifestError, list_splits, read_manifest


def test_read_manifest_gives_what_a_reader_needs(cityscapes_shards: Path) -> None:
    manifest = read_manifest(cityscapes_shards, "train")
    assert isinstance(manifest, Manifest)
    assert manifest.root == str(cityscapes_shards.resolve()) and manifest.split == "train"
    assert manifest.dataset == "cityscapes" and manifest.num_samples == 6
    assert manifest.shards == [str(cityscapes_shards.resolve() / f"train-{i:06d}.tar") for i in range(2)]
    assert all(Path(s).is_absolute() and Path(s).is_file() for s in manifest.shards)
    assert manifest.shard_counts == [4, 2]
    assert manifest.num_classes == 19 and len(manifest.class_names) == 19 and manifest.ignore_index == 255
    assert manifest.palette[0] == [128, 64, 128] and all(len(c) == 3 for c in manifest.palette)
    assert manifest.table.column_names[:11] == ["key", "shard", "image_ext", "image_bytes", "label_bytes",
                                                "image_sha256", "label_sha256", "height", "width",
                                                "class_pixels", "ignore_pixels"]
    assert str(manifest.table.schema.field("height").type) == "int32"
    pixels = manifest.table.schema.field("class_pixels").type
    assert pa.types.is_list(pixels) and pixels.value_type == pa.int64()
    class_pixels = manifest.table.column("class_pixels").to_pylist()
    assert all(len(counts) == 19 for counts in class_pixels)
    assert sum(map(sum, class_pixels)) + sum(manifest.table.column("ignore_pixels").to_pylist()) == 6 * 32 * 64


def test_list_splits(cityscapes_shards: Path, voc_shards: Path, tmp_path: Path) -> None:
    assert list_splits(cityscapes_shards) == ["test", "train", "val"]
    assert list_splits(voc_shards) == ["train_aug", "val"]
    assert list_splits(tmp_path) == []


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


def test_missing_manifest_names_the_file_and_the_splits_there(cityscapes_shards: Path) -> None:
    with pytest.raises(ManifestError, match=r"train_aug.manifest.parquet: no manifest for split 'train_aug' "
                                            r"\(splits with a manifest here: test, train, val\)"):
        read_manifest(cityscapes_shards, "train_aug")


@pytest.fixture
def shard_copy(cityscapes_shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cityscapes_shards, tmp_path / "shards"))


def test_missing_shard_file(shard_copy: Path) -> None:
    (shard_copy / "train-000001.tar").unlink()
    with pytest.raises(ManifestError, match=r"train.manifest.parquet: lists shard train-000001.tar, but .* is missing"):
        read_manifest(shard_copy, "train")
    assert read_manifest(shard_copy, "train", check_files=False).num_samples == 6


def test_shard_of_the_wrong_size(shard_copy: Path) -> None:
    with open(shard_copy / "train-000000.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(ManifestError, match=r"lists shard train-000000.tar with \d+ bytes, but .* has \d+"):
        read_manifest(shard_copy, "train")


def _rewrite_metadata(path: Path, edit) -> None:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    edit(meta)
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path)


def test_counts_that_disagree(shard_copy: Path) -> None:
    path = shard_copy / "train.manifest.parquet"
    _rewrite_metadata(path, lambda meta: meta["shards"][0].update(samples=3))
    with pytest.raises(ManifestError, match=r"train.manifest.parquet: 6 rows, but the metadata records 6 samples "
                                            r"and its shards hold 5"):
        read_manifest(shard_copy, "train")


def test_rows_that_disagree_with_the_shard_list(shard_copy: Path) -> None:
    path = shard_copy / "train.manifest.parquet"
    _rewrite_metadata(path, lambda meta: (meta["shards"][0].update(samples=3), meta["shards"][1].update(samples=3)))
    with pytest.raises(ManifestError, match=r"rows per shard .* disagree with the shard list"):
        read_manifest(shard_copy, "train")


def test_unreadable_and_foreign_files(shard_copy: Path) -> None:
    path = shard_copy / "val.manifest.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match=r"val.manifest.parquet: unreadable Parquet file"):
        read_manifest(shard_copy, "val")
    table = pq.read_table(shard_copy / "test.manifest.parquet").replace_schema_metadata(None)
    pq.write_table(table, shard_copy / "test.manifest.parquet")
    with pytest.raises(ManifestError, match=r"test.manifest.parquet: no dfdam.manifest entry .*not a DF-DAM manifest"):
        read_manifest(shard_copy, "test")


def test_manifest_of_another_split(shard_copy: Path) -> None:
    shutil.copy(shard_copy / "val.manifest.parquet", shard_copy / "other.manifest.parquet")
    with pytest.raises(ManifestError, match=r"records split 'val', expected 'other'"):
        read_manifest(shard_copy, "other")
