"""The WebDataset readers: equal steps per rank, each validation sample exactly once."""
from __future__ import annotations

import dataclasses
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig
from pipeline.data import batch_by_size, decode_sample, eval_loader, rank_shards, steps_per_epoch, train_loader
from sharding.manifest import read_manifest


@pytest.fixture(scope="module")
def data_cfg() -> DataConfig:
    return DataConfig(crop_size=(48, 64), scales=(0.75, 1.0), batch_size=4, eval_batch_size=2,
                      loader_workers=0, shuffle_buffer=8)


@pytest.mark.parametrize(("world", "loader_workers"), [(1, 0), (2, 0), (2, 2), (4, 0)])
def test_every_rank_runs_the_same_number_of_steps(tiny_shards: Path, data_cfg: DataConfig, world: int,
                                                  loader_workers: int) -> None:
    manifest = read_manifest(tiny_shards, "train")
    cfg = dataclasses.replace(data_cfg, loader_workers=loader_workers)
    expected = steps_per_epoch(manifest, cfg.batch_size)
    assert expected == 3  # 12 samples, global batch 4
    counts = []
    for rank in range(world):
        batches = list(train_loader(manifest, cfg, rank=rank, world_size=world, epoch=0, seed=0))
        counts.append(len(batches))
        for images, labels in batches:
            assert images.shape == (cfg.batch_size // world, 48, 64, 3) and images.dtype == torch.uint8
            assert labels.shape == (cfg.batch_size // world, 48, 64) and labels.dtype == torch.uint8
            values = set(labels.unique().tolist())
            assert values <= set(range(manifest.num_classes)) | {255}
    assert counts == [expected] * world


def test_ranks_and_epochs_see_different_samples(tiny_shards: Path, data_cfg: DataConfig) -> None:
    manifest = read_manifest(tiny_shards, "train")
    first = [b[0] for b in train_loader(manifest, data_cfg, rank=0, world_size=2, epoch=0, seed=0)]
    other_rank = [b[0] for b in train_loader(manifest, data_cfg, rank=1, world_size=2, epoch=0, seed=0)]
    next_epoch = [b[0] for b in train_loader(manifest, data_cfg, rank=0, world_size=2, epoch=1, seed=0)]
    again = [b[0] for b in train_loader(manifest, data_cfg, rank=0, world_size=2, epoch=0, seed=0)]
    assert not torch.equal(first[0], other_rank[0])
    assert not torch.equal(first[0], next_epoch[0])
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # reproducible from (seed, epoch, rank)


@pytest.mark.parametrize(("world", "loader_workers"), [(1, 0), (2, 0), (3, 2), (5, 0)])
def test_evaluation_reads_each_sample_exactly_once(tiny_shards: Path, data_cfg: DataConfig, world: int,
                                                   loader_workers: int) -> None:
    manifest = read_manifest(tiny_shards, "val")
    cfg = dataclasses.replace(data_cfg, loader_workers=loader_workers)
    keys: Counter[str] = Counter()
    pixels = 0
    for rank in range(world):
        for _images, labels, batch_keys in eval_loader(manifest, cfg, rank=rank, world_size=world):
            keys.update(batch_keys)
            pixels += int((labels != 255).sum())
    assert sorted(keys) == sorted(manifest.table.column("key").to_pylist())
    assert set(keys.values()) == {1}
    assert pixels == int(np.array(manifest.table.column("class_pixels").to_pylist()).sum())


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_evaluation_batches_do_not_depend_on_the_number_of_ranks(tiny_shards: Path, data_cfg: DataConfig,
                                                                 loader_workers: int) -> None:
    manifest = read_manifest(tiny_shards, "val")
    cfg = dataclasses.replace(data_cfg, loader_workers=loader_workers)

    def batches(world: int) -> set[tuple[str, ...]]:
        return {tuple(keys) for rank in range(world) for _, _, keys in eval_loader(manifest, cfg, rank=rank, world_size=world)}

    assert batches(1) == batches(2) == batches(3)


def test_batch_by_size_never_pads_nor_mixes_shards() -> None:
    def sample(h: int, w: int, key: str, shard: str):
        return torch.zeros(3, h, w), torch.zeros(h, w, dtype=torch.int64), key, shard

    stream = [sample(4, 6, "a", "s0"), sample(4, 6, "b", "s0"), sample(4, 6, "c", "s0"), sample(5, 6, "d", "s0"),
              sample(5, 6, "e", "s1"), sample(5, 6, "f", "s1")]
    out = list(batch_by_size(2)(iter(stream)))
    assert [keys for _, _, keys in out] == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    assert [tuple(images.shape) for images, _, _ in out] == [(2, 3, 4, 6), (1, 3, 4, 6), (1, 3, 5, 6), (2, 3, 5, 6)]
    assert all(labels.shape[0] == images.shape[0] for images, labels, _ in out)
    with pytest.raises(ValueError, match="at least 1"):
        batch_by_size(0)


def test_rank_shards_partition_the_shard_list(tiny_shards: Path) -> None:
    manifest = read_manifest(tiny_shards, "val")
    parts = [rank_shards(manifest, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(manifest.shards)
    with pytest.raises(ValueError, match="outside"):
        rank_shards(manifest, 3, 3)


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array, mode="L" if mode == "L" else None)
    if mode == "P":
        image = Image.fromarray(array).convert("P")
        image.putpalette([0, 0, 0, 255, 0, 0] * 128)
        image = Image.fromarray(array, mode="L").convert("P")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_keeps_label_indices_and_rejects_bad_samples() -> None:
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    label = np.array([[0, 1, 2, 255, 7, 18]] * 4, dtype=np.uint8)
    sample = {"__key__": "k", "png": _png(image, "RGB"), "label.png": _png(label, "L")}
    decoded = decode_sample(sample)
    assert decoded["image"].shape == (4, 6, 3)
    np.testing.assert_array_equal(decoded["label"], label)
    with pytest.raises(ValueError, match="expected an image"):
        decode_sample({"__key__": "k", "png": sample["png"]})
    rgb_label = {"__key__": "k", "png": sample["png"], "label.png": _png(np.zeros((4, 6, 3), np.uint8), "RGB")}
    with pytest.raises(ValueError, match="single-channel"):
        decode_sample(rgb_label)
    small = {"__key__": "k", "png": sample["png"], "label.png": _png(label[:2], "L")}
    with pytest.raises(ValueError, match="differ in size"):
        decode_sample(small)
