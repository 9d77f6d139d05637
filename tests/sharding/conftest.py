"""Tiny generated datasets (real layouts) and their shards, shared by the sharding tests."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sharding.synthetic import make_cityscapes, make_voc
from sharding.write import shard_dataset

CITYSCAPES_SIZE = {"train": 6, "val": 3, "test": 2, "height": 32, "width": 64}
VOC_SIZE = {"train_aug": 10, "val": 4, "min_size": 24, "max_size": 40}


@pytest.fixture(scope="session")
def synthetic_sizes() -> dict[str, dict]:
    """The sizes of the shared tiny datasets, per layout."""
    return {"cityscapes": dict(CITYSCAPES_SIZE), "voc": dict(VOC_SIZE)}


@pytest.fixture(scope="session")
def cityscapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic Cityscapes: 6 train (2 cities), 3 val, 2 test images of 32x64."""
    root = tmp_path_factory.mktemp("cityscapes")
    make_cityscapes(root, seed=0, **CITYSCAPES_SIZE)
    return root


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only synthetic VOC 2012 + SBD: 10 train_aug and 4 val images."""
    root = tmp_path_factory.mktemp("voc")
    make_voc(root, seed=0, **VOC_SIZE)
    return root


@pytest.fixture(scope="session")
def cityscapes_shards(cityscapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three Cityscapes splits sharded 4 samples per shard (train: 2 shards)."""
    out = tmp_path_factory.mktemp("cityscapes-shards")
    shard_dataset("cityscapes", cityscapes_root, out, shard_size=4, workers=1, show_progress=False)
    return out


@pytest.fixture(scope="session")
def voc_shards(voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VOC train_aug and val sharded 4 samples per shard."""
    out = tmp_path_factory.mktemp("voc-shards")
    shard_dataset("voc", voc_root, out, shard_size=4, workers=1, show_progress=False)
    return out


@pytest.fixture
def cityscapes_copy(cityscapes_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic Cityscapes that a test may break."""
    return Path(shutil.copytree(cityscapes_root, tmp_path / "cityscapes"))


@pytest.fixture
def voc_copy(voc_root: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic VOC + SBD that a test may break."""
    return Path(shutil.copytree(voc_root, tmp_path / "voc"))
