"""Resume without Ray: a restored run continues exactly, on the parameters' device."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.data import steps_per_epoch, train_loader
from pipeline.loop import TrainingState, setup_training, train_one_epoch
from sharding.manifest import read_manifest

CPU = torch.device("cpu")


def _epoch(run: TrainingState, cfg: Config, shards: Path, epoch: int, steps: int) -> dict[str, float]:
    manifest = read_manifest(shards, "train")
    loader = train_loader(manifest, cfg.data, rank=0, world_size=1, epoch=epoch, seed=cfg.train.seed)
    return train_one_epoch(run.model, loader, run.optimizer, cfg, epoch=epoch, steps=steps, schedule=run.schedule,
                           device=CPU, scaler=run.scaler)


def _save(run: TrainingState, cfg: Config, folder: Path, epoch: int, steps: int) -> dict:
    save_checkpoint(folder, model=run.model, optimizer=run.optimizer, scaler=run.scaler, epoch=epoch,
                    step=(epoch + 1) * steps, config=cfg, dataset={"num_classes": 19}, metrics={"best_val_miou": 0.5},
                    schedule=run.schedule.to_dict())
    return load_checkpoint(folder)


def _fresh(cfg: Config, steps: int) -> TrainingState:
    torch.manual_seed(cfg.train.seed)
    return setup_training(cfg, 19, steps, CPU)


@pytest.fixture
def cfg(tiny_config, tiny_shards: Path, tmp_path: Path) -> Config:
    return tiny_config(tiny_shards, tmp_path, "train.workers=1", "train.epochs=3", "model.backbone=resnet18")


def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(cfg: Config, tiny_shards: Path,
                                                                   tmp_path: Path) -> None:
    torch.set_num_threads(1)  # the same kernels in both runs (they share this process anyway)
    steps = steps_per_epoch(read_manifest(tiny_shards, "train"), cfg.data.batch_size)

    straight = _fresh(cfg, steps)
    lrs_straight = [_epoch(straight, cfg, tiny_shards, e, steps)["lr"] for e in range(3)]

    first = _fresh(cfg, steps)
    lrs_resumed = [_epoch(first, cfg, tiny_shards, 0, steps)["lr"]]
    state = _save(first, cfg, tmp_path / "epoch_0001", 0, steps)
    resumed = setup_training(cfg, 19, steps, CPU, state)
    assert resumed.start_epoch == 1 and resumed.best == 0.5
    lrs_resumed += [_epoch(resumed, cfg, tiny_shards, e, steps)["lr"] for e in (1, 2)]

    assert lrs_resumed == lrs_straight  # the same poly rate at every step, to the bit
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    momentum_a = [straight.optimizer.state[p]["momentum_buffer"] for p in straight.model.parameters()]
    momentum_b = [resumed.optimizer.state[p]["momentum_buffer"] for p in resumed.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(momentum_a, momentum_b))


def test_a_longer_budget_on_resume_continues_the_rate_without_a_jump(cfg: Config, tiny_shards: Path,
                                                                     tmp_path: Path) -> None:
    steps = steps_per_epoch(read_manifest(tiny_shards, "train"), cfg.data.batch_size)
    run = _fresh(cfg, steps)
    _epoch(run, cfg, tiny_shards, 0, steps)
    state = _save(run, cfg, tmp_path / "epoch_0001", 0, steps)
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=6))
    resumed = setup_training(longer, 19, steps, CPU, state)
    assert resumed.schedule.lr(steps) == run.schedule.lr(steps)  # where the first run was
    assert resumed.schedule.end == 6 * steps and resumed.schedule.lr(6 * steps) == 0.0
    stats = _epoch(resumed, longer, tiny_shards, 1, steps)
    assert stats["lr"] < run.schedule.lr(steps)


@pytest.mark.filterwarnings("ignore:.*meta parameter")
def test_optimizer_state_lands_on_the_parameters_device(cfg: Config, tiny_shards: Path, tmp_path: Path) -> None:
    """The GPU resume bug, checked on the meta device: the state is saved on the CPU and
    restored onto another device; every momentum buffer must follow its parameter."""
    steps = steps_per_epoch(read_manifest(tiny_shards, "train"), cfg.data.batch_size)
    run = _fresh(cfg, steps)
    _epoch(run, cfg, tiny_shards, 0, steps)
    state = _save(run, cfg, tmp_path / "epoch_0001", 0, steps)
    meta = torch.device("meta")
    restored = setup_training(cfg, 19, steps, meta, state)
    params = list(restored.model.parameters())
    assert all(p.device == meta for p in params)
    buffers = [restored.optimizer.state[p]["momentum_buffer"] for p in params if p in restored.optimizer.state]
    assert len(buffers) == len(params) and all(b.device == meta for b in buffers)
