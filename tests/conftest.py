"""Fixtures shared by more than one test folder: tiny generated shards and a tiny training config.

``tests/pipeline`` (Ray in the pytest process) and ``tests/cluster`` (Ray in subprocesses)
both train on these.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, build_config
from sharding.synthetic import make_cityscapes
from sharding.write import shard_dataset


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Cityscapes, 12 train / 6 val images of 64x128, 3 samples per shard."""
    root = tmp_path_factory.mktemp("tiny-cityscapes")
    make_cityscapes(root, seed=1, train=12, val=6, test=1, height=64, width=128)
    out = tmp_path_factory.mktemp("tiny-shards")
    shard_dataset("cityscapes", root, out, splits=["train", "val"], shard_size=3, workers=1, show_progress=False)
    return out


def _tiny_config(shards: Path, tmp_path: Path, *overrides: str) -> Config:
    return build_config("synthetic", [
        f"data.shards={shards}", "data.crop_size=64x64", "data.batch_size=4", "data.eval_batch_size=2",
        "train.epochs=1", "train.workers=2", "train.timeout_s=120", f"train.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.overlays=2", *overrides,
    ])


@pytest.fixture
def tiny_config():
    """Factory: the synthetic preset shrunk for tests (64x64 crops, batch 4, 1 epoch, 2 workers,
    MLflow and Ray storage in the given folder): ``tiny_config(shards, tmp_path, *overrides)``."""
    return _tiny_config
