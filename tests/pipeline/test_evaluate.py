"""run.py evaluate's engine (pipeline/evaluate.py evaluate_model): in this process or spread
over Ray workers, the same confusion matrix; the protocol's metrics logged to the model's run."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import models
from pipeline import tracking
from pipeline.checkpoint import build_model, save_checkpoint
from pipeline.config import PAPER_EVAL_SCALES, InferenceConfig
from pipeline.data import eval_loader
from pipeline.evaluate import EvaluationError, evaluate, evaluate_model, load_model
from pipeline.loop import dataset_info
from sharding.manifest import read_manifest

MS_FLIP = InferenceConfig(scales=PAPER_EVAL_SCALES[:3], flip=True)  # 0.5, 0.75, 1.0: small images stay cheap


@pytest.fixture(scope="module")
def checkpoint(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DF-DAM-R18 saved as a training checkpoint for the tiny shards."""
    from tests.conftest import _tiny_config

    folder = tmp_path_factory.mktemp("checkpoint")
    cfg = _tiny_config(tiny_shards, folder)
    torch.manual_seed(0)
    manifest = read_manifest(tiny_shards, "val")
    model = build_model(cfg.model, manifest.num_classes, pretrained=False).eval()
    return save_checkpoint(folder / "epoch_0001", model=model, optimizer=None, scaler=None, epoch=0, step=0,
                           config=cfg, dataset=dataset_info(manifest), metrics={})


def test_in_process_evaluation_counts_every_image_once(checkpoint: Path, tiny_shards: Path) -> None:
    manifest = read_manifest(tiny_shards, "val")
    loaded = load_model(str(checkpoint))
    from pipeline.config import DataConfig

    expected = evaluate(loaded.model, eval_loader(manifest, DataConfig(eval_batch_size=1, loader_workers=0)),
                        manifest.num_classes, torch.device("cpu"), manifest.ignore_index)
    report = evaluate_model(str(checkpoint), tiny_shards, "val", log=False)
    assert report.samples == manifest.num_samples == 6
    assert torch.equal(report.matrix, expected)
    assert int(report.matrix.sum()) == int((torch.cat([labels.flatten() for _, labels, _ in eval_loader(
        manifest, DataConfig(loader_workers=0))]) != manifest.ignore_index).sum())
    assert report.metrics().keys() == {"val_miou_single", "val_pixel_acc_single", "val_images_per_s_single"}


def test_multi_scale_flip_changes_the_predictions(checkpoint: Path, tiny_shards: Path) -> None:
    single = evaluate_model(str(checkpoint), tiny_shards, "val", log=False)
    ms_flip = evaluate_model(str(checkpoint), tiny_shards, "val", log=False, settings=MS_FLIP)
    assert int(ms_flip.matrix.sum()) == int(single.matrix.sum())  # the same pixels, counted once
    assert not torch.equal(ms_flip.matrix, single.matrix)
    assert set(ms_flip.metrics()) == {"val_miou_ms_flip", "val_pixel_acc_ms_flip", "val_images_per_s_ms_flip"}


def test_one_and_two_ray_workers_give_the_same_confusion_matrix(ray_cluster, checkpoint: Path,
                                                                 tiny_shards: Path) -> None:
    in_process = evaluate_model(str(checkpoint), tiny_shards, "val", log=False, settings=MS_FLIP)
    one = evaluate_model(str(checkpoint), tiny_shards, "val", log=False, settings=MS_FLIP, workers=1)
    two = evaluate_model(str(checkpoint), tiny_shards, "val", log=False, settings=MS_FLIP, workers=2)
    assert torch.equal(one.matrix, two.matrix)
    assert torch.equal(one.matrix, in_process.matrix)
    assert one.samples == two.samples == 6 and two.workers == 2


def test_the_result_is_logged_to_the_models_run_under_the_protocols_name(checkpoint: Path, tiny_shards: Path,
                                                                        tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    loaded = load_model(str(checkpoint))
    run_id = tracking.start_run(uri, "dfdam-test", "trained", {"p": 1})
    tracking.log_metrics(uri, run_id, {"val_miou": 0.25}, step=0)  # training's per-epoch history
    tracking.log_model(uri, run_id, loaded.model, loaded.dataset["num_classes"],
                       code_path=Path(models.__file__).parent,
                       metadata={**loaded.dataset, "mean": list(loaded.mean), "std": list(loaded.std)})
    tracking.end_run(uri, run_id)

    report = evaluate_model(run_id, tiny_shards, "val", tracking_uri=uri, settings=MS_FLIP)
    assert report.logged_to == run_id
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["val_miou_ms_flip"] == pytest.approx(report.miou, abs=1e-12)
    assert metrics["val_pixel_acc_ms_flip"] == pytest.approx(report.pixel_acc, abs=1e-12)
    assert [m.value for m in client.get_metric_history(run_id, "val_miou")] == [0.25]  # untouched
    assert "eval/val_ms_flip.json" in {f.path for f in client.list_artifacts(run_id, "eval")}
    # The MLflow model predicts what the checkpoint predicts.
    direct = evaluate_model(str(checkpoint), tiny_shards, "val", log=False, settings=MS_FLIP)
    assert torch.equal(report.matrix, direct.matrix)


def test_command_line_protocol_flags_become_the_inference_settings() -> None:
    import run

    def settings(*flags: str) -> InferenceConfig:
        return run._inference_from_args(run.build_parser().parse_args(["evaluate", "--model", "m", "--data", "d", *flags]))

    assert settings() == InferenceConfig()
    assert settings("--ms", "--flip") == InferenceConfig(scales=PAPER_EVAL_SCALES, flip=True)
    assert settings("--scales", "0.75,1.25") == InferenceConfig(scales=(0.75, 1.25))
    assert settings("--mode", "slide", "--crop", "512x1024", "--stride", "256x512") == InferenceConfig(
        mode="slide", crop=(512, 1024), stride=(256, 512))


@pytest.mark.parametrize("flags, message", [
    (["--mode", "slide"], "needs inference.crop"),
    (["--mode", "slide", "--crop", "64x64", "--stride", "96x96"], "must not exceed inference.crop"),
    (["--scales", "1,zero"], "expected float"),
])
def test_bad_protocol_flags_are_one_clear_line(flags: list[str], message: str, checkpoint: Path, tiny_shards: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import run

    assert run.main(["evaluate", "--model", str(checkpoint), "--data", str(tiny_shards), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("run.py evaluate: error:") and "Traceback" not in err


def test_a_model_for_other_classes_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    from tests.conftest import _tiny_config

    cfg = _tiny_config(tiny_shards, tmp_path)
    manifest = read_manifest(tiny_shards, "val")
    info = {**dataset_info(manifest), "num_classes": 21}
    path = save_checkpoint(tmp_path / "voc", model=build_model(cfg.model, 21, pretrained=False), optimizer=None,
                           scaler=None, epoch=0, step=0, config=cfg, dataset=info, metrics={})
    with pytest.raises(EvaluationError, match="predicts 21 classes, but split 'val'.* has 19"):
        evaluate_model(str(path), tiny_shards, "val", log=False)
