"""Ray Train end to end on a real local cluster, MLflow on a real SQLite store."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import run
from pipeline.checkpoint import load_checkpoint
from pipeline.cluster import ResourceError
from pipeline.train import fit


def test_two_workers_train_checkpoint_track_and_resume(ray_cluster, tiny_config, tiny_shards: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_shards, tmp_path)
    result = fit(cfg, name="tiny")

    # A checkpoint of the one epoch, holding everything needed to continue.
    state = load_checkpoint(result.checkpoint)
    assert state["epoch"] == 0 and state["optimizer"] is not None
    assert state["dataset"]["num_classes"] == 19 and len(state["dataset"]["palette"]) == 19

    # The MLflow run: params, per-epoch metrics, artifacts and a model that loads and predicts.
    client = MlflowClient(result.tracking_uri)
    tracked = client.get_run(result.run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["optim.lr"] == str(cfg.optim.lr)
    assert tracked.data.params["model.variant"] == "dafm+2dpam"
    assert 0.0 <= tracked.data.metrics["val_miou"] <= 1.0
    assert "val_pixel_acc" in tracked.data.metrics and "train_loss" in tracked.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/per_class_iou.txt", "eval/overlays"} <= artifacts
    assert len(client.list_artifacts(result.run_id, "eval/overlays")) == 2
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pytorch.load_model(tracked.data.tags["dfdam.model_uri"])
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 19, 64, 96)

    # Resume the same run with a longer budget: it continues at epoch 2, it does not restart.
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    resumed = fit(longer, name="tiny", resume=True)
    assert resumed.run_id == result.run_id
    assert load_checkpoint(resumed.checkpoint)["epoch"] == 1
    history = client.get_metric_history(result.run_id, "val_miou")
    assert sorted(m.step for m in history) == [1, 2]

    # evaluate by run id and by checkpoint agree with each other and with training.
    from pipeline.evaluate import evaluate_model

    by_run = evaluate_model(result.run_id, tiny_shards, tracking_uri=result.tracking_uri)
    by_checkpoint = evaluate_model(resumed.checkpoint, tiny_shards)
    assert by_run.miou == pytest.approx(by_checkpoint.miou)
    # Same model and data as the last training epoch; only the thread count differs, which can
    # flip the argmax of a few near-tied pixels.
    assert by_run.miou == pytest.approx(client.get_run(result.run_id).data.metrics["val_miou"], abs=1e-3)


def test_an_impossible_worker_count_is_refused_before_training(ray_cluster, tiny_config, tiny_shards: Path,
                                                             tmp_path: Path) -> None:
    cfg = tiny_config(tiny_shards, tmp_path, "train.workers=4")
    with pytest.raises(ResourceError, match="4 worker"):
        fit(cfg, name="too-big")
    assert not (tmp_path / "runs" / "too-big").exists()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run.main(argv)
    return code, capsys.readouterr().err


def test_bad_inputs_fail_clearly_before_any_work(tiny_shards: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # --epochs 1: should a check ever let a run start, it stays short (and the test still fails).
    base = ["train", "--preset", "synthetic", "--epochs", "1", "--storage", str(tmp_path / "runs"),
            "--set", f"tracking.uri={db}"]

    code, err = _run([*base, "--data", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run([*base, "--data", str(empty)], capsys)
    assert code == 2 and "train.manifest.parquet" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--set", "optim.lrr=0.1"], capsys)
    assert code == 2 and "did you mean optim.lr" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--preset", "voc"], capsys)
    assert code == 2 and "no manifest for split 'train_aug'" in err
    code, err = _run([*base, "--data", str(tiny_shards), "--preset", "voc", "--set", "data.train_split=train"], capsys)
    assert code == 2 and "cityscapes shards" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--address", "127.0.0.1:9"], capsys)
    assert code == 2 and "cannot reach the Ray cluster" in err

    code, err = _run([*base[:-2], "--data", str(tiny_shards), "--set", "tracking.uri=http://127.0.0.1:9"], capsys)
    assert code == 2 and "unreachable" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--name", "nothing", "--resume"], capsys)
    assert code == 2 and "no run named 'nothing'" in err

    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
