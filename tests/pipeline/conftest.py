"""Tiny generated shards, a tiny training config, and one local Ray cluster for the pipeline tests."""
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


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for every test that needs one."""
    import os

    import ray

    from pipeline.tune import TRIAL_DRIVER_RESOURCE

    # Ray Train gives a worker group 60 s to start; a loaded 2-core CI machine can need more.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

    ray.init(num_cpus=2, resources={TRIAL_DRIVER_RESOURCE: 1000}, include_dashboard=True,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
