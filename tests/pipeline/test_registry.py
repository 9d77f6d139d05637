"""The champion alias moves only to a model that beats the champion on the same validation data."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import models
from pipeline import tracking
from pipeline.champion import register_best, validation_fingerprint
from pipeline.config import build_config
from pipeline.trials import TrialRow
from sharding.manifest import read_manifest


def _logged_run(uri: str, name: str, model: torch.nn.Module) -> str:
    run_id = tracking.start_run(uri, "dfdam-test", name, {"p": 1})
    tracking.log_model(uri, run_id, model, 19, code_path=Path(models.__file__).parent)
    tracking.end_run(uri, run_id)
    return run_id


def _row(run_id: str, miou: float) -> TrialRow:
    return TrialRow(trial_id=run_id[:8], params={}, epochs=1, val_miou=miou, best_val_miou=miou,
                    status="finished", run_id=run_id)


def test_champion_moves_only_to_a_better_model(tiny_shards: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = build_config("synthetic", [f"data.shards={tiny_shards}"])
    val = read_manifest(tiny_shards, "val")
    torch.manual_seed(0)
    runs = [_logged_run(uri, f"r{i}", torch.nn.Conv2d(3, 19, 1)) for i in range(3)]

    third = 1 / 3  # not exactly representable in a short decimal tag: a rounded tag would lose the tie
    first = register_best([_row(runs[0], third)], uri, "dfdam-test", cfg, val)
    assert first["champion"] is True and first["previous_champion"] is None
    # A tie does not take the alias; a finished trial with the best mIoU is the one registered.
    tie = register_best([_row(runs[1], third), _row(runs[2], 0.1)], uri, "dfdam-test", cfg, val)
    assert tie["champion"] is False and tie["previous_champion"]["val_miou"] == third
    client = MlflowClient(uri)
    assert client.get_model_version_by_alias("dfdam-test", "champion").version == int(first["version"])
    better = register_best([_row(runs[2], 0.75)], uri, "dfdam-test", cfg, val)
    assert better["champion"] is True
    champion = client.get_model_version_by_alias("dfdam-test", "champion")
    assert champion.version == int(better["version"])
    assert champion.tags["val_data"] == validation_fingerprint(val)

    # A champion scored on other data is measured again on this split before comparing.
    client.set_model_version_tag("dfdam-test", champion.version, "val_data", "other-data")
    measured = register_best([_row(runs[0], 0.99)], uri, "dfdam-test", cfg, val)
    assert measured["previous_champion"]["val_miou"] != pytest.approx(0.75)  # re-evaluated, not the tag
    assert 0.0 <= measured["previous_champion"]["val_miou"] < 0.99 and measured["champion"] is True
    # What evaluate and predict read of models:/NAME@champion: the model's metadata and its run.
    metadata, run_id = tracking.model_details(uri, "models:/dfdam-test@champion")
    assert run_id == runs[0] and isinstance(metadata, dict)


def test_nothing_finished_registers_nothing(tiny_shards: Path, tmp_path: Path) -> None:
    cfg = build_config("synthetic", [f"data.shards={tiny_shards}"])
    row = TrialRow("t", {}, 1, 0.3, 0.3, "stopped early", None)
    assert register_best([row], f"sqlite:///{tmp_path / 'm.db'}", "x", cfg, read_manifest(tiny_shards, "val")) is None
