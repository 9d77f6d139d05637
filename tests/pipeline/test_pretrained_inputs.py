"""The paper presets' ImageNet weights are checked on the driver, before Ray starts (pipeline.train.check_inputs)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

import run
from pipeline.config import build_config
from pipeline.train import check_inputs


def test_offline_imagenet_weights_stop_train_before_ray(tiny_shards: Path, offline_torch_home: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    code = run.main(["train", "--preset", "cityscapes", "--data", str(tiny_shards), "--epochs", "1",
                     "--set", "data.crop_size=64x64",  # the preset's 1024x1024 is refused for 64x128 images
                     "--storage", str(tmp_path / "runs"), "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "run.py train: error: cannot download the ImageNet weights of resnet18" in err
    assert "--set model.weights=/path/to/resnet18-f37072fd.pth" in err
    assert str(offline_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err
    assert ("ray" in sys.modules and sys.modules["ray"].is_initialized()) == ray_was_up  # no cluster started
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_weights_in_torch_cache_pass_the_check_offline(tiny_shards: Path, offline_torch_home: Path) -> None:
    cached = offline_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(resnet18(weights=None).state_dict(), cached)
    train, val = check_inputs(build_config("cityscapes", [f"data.shards={tiny_shards}", "data.crop_size=64x64"]))
    assert (train.split, val.split) == ("train", "val")
    with pytest.raises(FileNotFoundError, match="model.weights .*: no such file; expected 'imagenet' or 'imagenet_v1'"):
        check_inputs(build_config("cityscapes", [f"data.shards={tiny_shards}", "data.crop_size=64x64",
                                                 "model.weights=imagenett"]))
