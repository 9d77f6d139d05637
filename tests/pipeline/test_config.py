"""The typed config: presets carry the paper's numbers; overrides are checked."""
from __future__ import annotations

import pytest

from pipeline.config import Config, ConfigError, build_config, loader_workers, preset, with_values


def test_presets_carry_the_papers_hyper_parameters() -> None:
    city, voc = preset("cityscapes"), preset("voc")
    assert (city.data.batch_size, city.optim.lr, city.optim.weight_decay, city.data.crop_size) == (8, 0.01, 5e-4, (1024, 1024))
    assert (voc.data.batch_size, voc.optim.lr, voc.optim.weight_decay, voc.data.crop_size) == (16, 0.001, 1e-5, (512, 512))
    for cfg in (city, voc):
        assert cfg.optim.momentum == 0.9 and cfg.optim.poly_power == 0.9
        assert cfg.data.scales == (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
        assert (cfg.loss.lambda_c, cfg.loss.lambda_s) == (0.4, 0.1)
    assert voc.data.train_split == "train_aug"


def test_paper_presets_start_from_imagenet_and_synthetic_from_scratch() -> None:
    assert (preset("cityscapes").model.weights, preset("voc").model.weights) == ("imagenet", "imagenet")
    assert (preset("cityscapes").model.backbone, preset("voc").model.backbone) == ("resnet18", "resnet101")
    assert preset("synthetic").model.weights is None
    assert build_config("voc", ["model.weights=none"]).model.weights is None
    assert build_config("voc", ["model.weights=imagenet_v1"]).model.weights == "imagenet_v1"


def test_overrides_are_parsed_by_type() -> None:
    cfg = build_config("synthetic", ["optim.lr=0.02", "data.crop_size=96x160", "train.gpu=true",
                                     "model.weights=none", "data.scales=1,1.5", "loss.lambda_c=0"])
    assert cfg.optim.lr == 0.02 and cfg.data.crop_size == (96, 160) and cfg.train.gpu is True
    assert cfg.model.weights is None and cfg.data.scales == (1.0, 1.5) and cfg.loss.lambda_c == 0.0
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.flat()["optim.lr"] == 0.02


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", "did you mean optim.lr"),
        ("optim.lrate=0.1", r"did you mean optim\.lr\?$"),  # too far for difflib: the field it begins with
        ("train.epoch=3", r"did you mean train\.epochs\?$"),
        ("optim.x=1", r"unknown field 'optim\.x': optim has \[[^]]*\]$"),  # nothing near: no guess
        ("optm.lr=0.1", "did you mean 'optim'"),
        ("optim.lr=fast", "expected float"),
        ("train.gpu=maybe", "expected bool"),
        ("data.crop_size=96", "expected 2 comma-separated values"),
        ("data.crop_size=96x", "data.crop_size: expected HxW such as 128x256"),
        ("lr=0.1", "section.field"),
        ("optim.lr", "section.field=value"),
        ("train.workers=3", "divisible"),
        ("model.variant=dafm+pam", "model.variant"),
    ],
)
def test_bad_overrides_are_refused_with_a_clear_message(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("synthetic", [override])


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="expected one of"):
        preset("ade20k")


def test_typed_values_are_set_without_text_in_between() -> None:
    cfg = build_config("synthetic")
    value = 0.1 + 0.2  # a float whose repr round trip would be exact anyway; no text is involved at all
    tuned = with_values(cfg, {"loss.lambda_c": value, "optim.lr": 1, "train.epochs": 3})
    assert tuned.loss.lambda_c is value and tuned.optim.lr == 1.0 and isinstance(tuned.optim.lr, float)
    assert tuned.train.epochs == 3
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        with_values(cfg, {"train.epochs": 2.5})
    with pytest.raises(ConfigError, match="did you mean loss.lambda_c"):
        with_values(cfg, {"loss.lamda_c": 0.3})
    with pytest.raises(ConfigError, match="must be >= 0"):
        with_values(cfg, {"loss.lambda_s": -0.1})


@pytest.mark.parametrize(("cpus", "overrides", "expected"), [
    (1, [], 1), (8, [], 7), (2, [], 1), (8, ["data.loader_workers=3"], 3), (8, ["data.loader_workers=0"], 0),
])
def test_loader_workers_follow_the_training_workers_cpus(cpus: int, overrides: list[str], expected: int) -> None:
    cfg = build_config("cityscapes", [f"train.cpus_per_worker={cpus}", *overrides])
    resolved = loader_workers(cfg)
    assert resolved.data.loader_workers == expected
    assert resolved.train == cfg.train and resolved.model == cfg.model  # nothing else moves


def test_loader_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="data.loader_workers"):
        build_config("cityscapes", ["data.loader_workers=-2"])
    with pytest.raises(ConfigError, match="data.prefetch_batches"):
        build_config("cityscapes", ["data.prefetch_batches=0"])
