"""Ray Train end to end on a real local cluster, MLflow on a real SQLite store."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import run
from pipeline.checkpoint import load_checkpoint
from pipeline.cluster import ResourceError
from pipeline.train import fit
from sharding.synthetic import make_voc
from sharding.write import shard_dataset


@pytest.fixture(scope="module")
def tiny_voc_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic VOC: images of many sizes (48 to 96 pixels a side), 2 samples per shard."""
    root = tmp_path_factory.mktemp("tiny-voc")
    make_voc(root, seed=3, train_aug=8, val=6, min_size=48, max_size=96)
    out = tmp_path_factory.mktemp("tiny-voc-shards")
    shard_dataset("voc", root, out, splits=["train_aug", "val"], shard_size=2, workers=1, show_progress=False)
    return out


@pytest.fixture(scope="module")
def voc_run(ray_cluster, tiny_voc_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """One Ray Train run that the tests below share: 2 workers, 1 epoch on the VOC shards (images
    of many sizes, evaluated 4 to a batch), 2 overlays. Starting a run (Ray Train's controller,
    a worker group of 2) costs far more than its tiny epoch, so the checks of a run are made on
    one. It trains on a copy of the shards whose every train_aug shard has its second image
    damaged (validation untouched): the workers skip them and MLflow gets ``data_skipped``.
    Returns its config and result; the resume test continues it to epoch 2."""
    from tests.conftest import _tiny_config
    from tests.damage import copy_shards, damage_member

    folder = tmp_path_factory.mktemp("voc-run")
    shards = copy_shards(tiny_voc_shards, folder / "shards")
    for shard in shards.glob("train_aug-*.tar"):
        damage_member(shard, 1, "jpg", "header")
    cfg = _tiny_config(shards, folder, "data.train_split=train_aug", "data.eval_batch_size=4")
    return cfg, fit(cfg, name="tiny")


def _logged_miou_is_the_models(cfg, run_id: str, shards: Path, tracking_uri: str) -> None:
    """The logged mIoU is the mIoU of the logged model: every rank evaluated the weights and
    BatchNorm buffers rank 0 checkpointed (see pipeline.train.average_buffers), and validation
    batches of images of different sizes are never padded."""
    from pipeline.evaluate import evaluate_model

    with _threads(cfg.train.cpus_per_worker):  # the workers' kernels, so even near-ties break alike
        report = evaluate_model(run_id, shards, data=cfg.data, tracking_uri=tracking_uri)
    logged = MlflowClient(tracking_uri).get_run(run_id).data.metrics["val_miou"]
    assert report.miou == pytest.approx(logged, abs=1e-4)


def test_logged_miou_is_the_logged_models_on_images_of_different_sizes(voc_run, tiny_voc_shards: Path) -> None:
    cfg, result = voc_run  # epoch 1 (or epoch 2 when the resume test ran first: the same claim)
    _logged_miou_is_the_models(cfg, result.run_id, tiny_voc_shards, result.tracking_uri)


def test_two_workers_train_checkpoint_track_and_resume(voc_run, tiny_voc_shards: Path) -> None:
    cfg, result = voc_run

    # A checkpoint of the one epoch, holding everything needed to continue.
    state = load_checkpoint(result.checkpoint)
    assert state["epoch"] == 0 and state["optimizer"] is not None
    assert state["dataset"]["num_classes"] == 21 and len(state["dataset"]["palette"]) == 21

    # The MLflow run: params, per-epoch metrics, artifacts and a model that loads and predicts.
    client = MlflowClient(result.tracking_uri)
    tracked = client.get_run(result.run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["optim.lr"] == str(cfg.optim.lr)
    assert tracked.data.params["model.variant"] == "dafm+2dpam"
    assert 0.0 <= tracked.data.metrics["val_miou"] <= 1.0
    assert "val_pixel_acc" in tracked.data.metrics and "train_loss" in tracked.data.metrics
    skipped = client.get_metric_history(result.run_id, "data_skipped")  # the damaged images, summed over ranks
    assert [m.step for m in skipped] == [1] and skipped[0].value >= 1 and skipped[0].value == int(skipped[0].value)
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/per_class_iou.txt", "eval/overlays"} <= artifacts
    assert len(client.list_artifacts(result.run_id, "eval/overlays")) == 2
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pytorch.load_model(tracked.data.tags["dfdam.model_uri"])
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 21, 64, 96)

    # Resume the same run with a longer budget: it continues at epoch 2, it does not restart.
    longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    resumed = fit(longer, name="tiny", resume=True)
    assert resumed.run_id == result.run_id
    assert load_checkpoint(resumed.checkpoint)["epoch"] == 1
    history = client.get_metric_history(result.run_id, "val_miou")
    assert sorted(m.step for m in history) == [1, 2]
    assert sorted(m.step for m in client.get_metric_history(result.run_id, "data_skipped")) == [1, 2]

    # evaluate by run id and by checkpoint agree with each other and with training.
    from pipeline.evaluate import evaluate_model

    by_run = evaluate_model(result.run_id, tiny_voc_shards, tracking_uri=result.tracking_uri)
    by_checkpoint = evaluate_model(resumed.checkpoint, tiny_voc_shards)
    assert by_run.miou == pytest.approx(by_checkpoint.miou)
    _logged_miou_is_the_models(cfg, result.run_id, tiny_voc_shards, result.tracking_uri)


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_one_or_two_ranks_count_the_same_confusion_matrix(dataset: str, tiny_shards: Path, tiny_voc_shards: Path) -> None:
    from models import build_dfdam
    from pipeline.config import DataConfig
    from pipeline.data import eval_loader
    from pipeline.evaluate import evaluate
    from sharding.manifest import read_manifest

    manifest = read_manifest(tiny_shards if dataset == "cityscapes" else tiny_voc_shards, "val")
    torch.manual_seed(0)
    model = build_dfdam(manifest.num_classes).eval()
    data = DataConfig(eval_batch_size=4, loader_workers=0)
    cpu = torch.device("cpu")
    one = evaluate(model, eval_loader(manifest, data), manifest.num_classes, cpu)
    two = sum(evaluate(model, eval_loader(manifest, data, rank=r, world_size=2), manifest.num_classes, cpu)
              for r in range(2))
    assert int(one.sum()) == int(np.array(manifest.table.column("class_pixels").to_pylist()).sum())
    assert torch.equal(one, two)


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
    assert code == 2 and "val.manifest.parquet" in err  # the validation split is read first

    code, err = _run([*base, "--data", str(tiny_shards), "--set", "optim.lrr=0.1"], capsys)
    assert code == 2 and "did you mean optim.lr" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--preset", "voc"], capsys)
    assert code == 2 and "holds cityscapes shards: use --preset cityscapes" in err  # told before the missing split
    code, err = _run([*base, "--data", str(tiny_shards), "--preset", "voc", "--set", "data.train_split=train"], capsys)
    assert code == 2 and "cityscapes shards" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--address", "127.0.0.1:9"], capsys)
    assert code == 2 and "cannot reach the Ray cluster" in err

    code, err = _run([*base[:-2], "--data", str(tiny_shards), "--set", "tracking.uri=http://127.0.0.1:9"], capsys)
    assert code == 2 and "unreachable" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--name", "nothing", "--resume"], capsys)
    assert code == 2 and "no run named 'nothing'" in err

    code, err = _run([*base, "--data", str(tiny_shards), "--set", f"model.weights={tmp_path / 'resnet18.pth'}"], capsys)
    assert code == 2 and "model.weights" in err and "no such file" in err

    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    # A resume with nothing left to train: --epochs is the new total, not a number to add.
    from models import build_dfdam
    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import build_config

    done = tmp_path / "runs" / "done"
    save_checkpoint(done / "epoch_0003", model=build_dfdam(19), optimizer=None, scaler=None, epoch=2, step=9,
                    config=build_config("synthetic"), dataset={"num_classes": 19}, metrics={})
    three = ["train", "--preset", "synthetic", "--epochs", "3", *base[5:]]
    code, err = _run([*three, "--data", str(tiny_shards), "--name", "done", "--resume"], capsys)
    assert code == 2 and "has already trained 3 epoch(s)" in err and "pass more than 3" in err
