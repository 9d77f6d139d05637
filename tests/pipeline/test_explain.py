"""run.py explain: DAFM's weights, the channel maps they rank and 2DPAM's beta, as the model computed them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from pipeline.checkpoint import build_model, save_checkpoint
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, build_config
from pipeline.evaluate import load_any_model
from pipeline.explain import ModelContext, explain
from pipeline.visualize import colorize

HEIGHT, WIDTH = 64, 96
NAMES = ["road", "building", "tree", "sky", "car"]
PALETTE = [[128, 64, 128], [70, 70, 70], [107, 142, 35], [70, 130, 180], [0, 0, 142]]
# Not ImageNet's: shows that the checkpoint's data.mean/std are the ones applied.
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
ATTENTION_FILES = {"alpha.png", "channels_low.png", "channels_high.png", "beta.png"}


def _checkpoint(folder: Path, variant: str) -> Path:
    cfg = build_config("synthetic", [f"model.variant={variant}"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=MEAN, std=STD))
    torch.manual_seed(0)
    model = build_model(cfg.model, len(NAMES), pretrained=False)
    save_checkpoint(folder, model=model, optimizer=None, scaler=None, epoch=0, step=1, config=cfg,
                    dataset={"dataset": "synthetic", "num_classes": len(NAMES), "class_names": NAMES,
                             "palette": PALETTE, "ignore_index": 255},
                    metrics={})
    return folder


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt-full"), "dafm+2dpam")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64x96 street-like picture: sky, a building block, road, noise."""
    rng = np.random.default_rng(3)
    img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    img[:20] = (70, 130, 180)
    img[20:40, 10:60] = (90, 90, 90)
    img[40:] = (128, 64, 128)
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / "street.png"
    Image.fromarray(img).save(path)
    return path


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size  # (width, height)


def test_explain_writes_the_models_own_attention(full_checkpoint: Path, image_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, k = tmp_path / "explained", 3
    assert run.main(["explain", "--model", str(full_checkpoint), "--input", str(image_file), "--out", str(out),
                     "--channels", str(k)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == ATTENTION_FILES | {"prediction.png", "attention.npz"}
    saved = np.load(out / "attention.npz")

    # The input: the file's pixels, normalised with the checkpoint's mean/std (tolerance: float32 arithmetic).
    pixels = np.asarray(Image.open(image_file).convert("RGB"))
    assert np.array_equal(saved["image"], pixels)
    expected = (pixels.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)
    assert saved["input"].shape == (1, 3, HEIGHT, WIDTH)
    np.testing.assert_allclose(saved["input"][0].transpose(1, 2, 0), expected, rtol=0, atol=1e-5)

    # The model's own return_attention tensors, computed again on the same input: identical.
    dfdam = load_any_model(str(full_checkpoint))[0].model.eval()
    x = torch.from_numpy(saved["input"])
    with torch.no_grad():
        first = dfdam(x, return_attention=True)
        again = dfdam(x, return_attention=True)
        feats = dfdam.backbone(x)
        features = {"low": dfdam.project_low(feats[3]), "high": dfdam.project_high(feats[4])}
    for key in ("alpha_high", "alpha_low", "beta"):
        assert torch.equal(first[key], again[key])  # deterministic, so exact comparison is meaningful
        assert torch.equal(torch.from_numpy(saved[key]), first[key]), key
    assert saved["beta"].shape == (1, 1, HEIGHT // 4, WIDTH // 4)
    assert saved["beta_image"].shape == (HEIGHT, WIDTH)
    assert np.array_equal(saved["prediction"], first["out"][0].argmax(0).numpy())

    # The channels shown: the argsort of alpha; their maps: the projections' outputs on those channels.
    for f, alpha_key in (("low", "alpha_low"), ("high", "alpha_high")):
        alpha = saved[alpha_key].flatten()
        order = np.argsort(-alpha, kind="stable")
        assert saved[f"{f}_top_index"].tolist() == order[:k].tolist()
        assert saved[f"{f}_bottom_index"].tolist() == order[::-1][:k].tolist()
        rest = np.setdiff1d(np.arange(alpha.size), saved[f"{f}_top_index"])
        assert alpha[saved[f"{f}_top_index"]].min() >= alpha[rest].max()
        top, bottom = (torch.from_numpy(saved[f"{f}_{end}_index"]) for end in ("top", "bottom"))
        assert torch.equal(torch.from_numpy(saved[f"{f}_top_maps"]), features[f][0, top])
        assert torch.equal(torch.from_numpy(saved[f"{f}_bottom_maps"]), features[f][0, bottom])
        sym = "alpha_L" if f == "low" else "alpha_H"
        assert f"{sym} highest: ch {order[0]} {alpha[order[0]]:.3f}" in printed
    assert saved["low_top_maps"].shape == (k, HEIGHT // 16, WIDTH // 16)
    assert saved["high_top_maps"].shape == (k, HEIGHT // 32, WIDTH // 32)

    # The pictures: prediction.png is the prediction in the checkpoint's palette, pixel for pixel.
    with Image.open(out / "prediction.png") as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), colorize(saved["prediction"], PALETTE))
    assert np.array_equal(saved["palette"], np.array(PALETTE, np.uint8))
    # Sizes documented in pipeline/explain.py: alpha 10 x 7 in; grids k tiles of 2 in, each
    # 2 * 64/96 = 1.25 in tall (+ titles); beta two 4 in panels + 1 in for the colour bar.
    assert _size(out / "alpha.png") == (1000, 700)
    assert _size(out / "channels_low.png") == _size(out / "channels_high.png") == (k * 200, 350)
    assert _size(out / "beta.png") == (900, 350)
    assert "its mean/std, palette and class names" in printed and "not written" not in printed
    assert str(out / "attention.npz") in printed


def test_size_resizes_and_defaults_apply_without_a_checkpoint(image_file: Path, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model(build_config("synthetic", ["model.variant=dafm"]).model, 5, pretrained=False)
    from pipeline.explain import load_image

    image = load_image(image_file, size=(32, 48))
    assert image.shape == (32, 48, 3)
    report = explain(model, image, tmp_path / "dafm", ModelContext(), channels=2)
    assert not model.project_low._forward_hooks and not model.project_high._forward_hooks  # hooks removed
    written = {p.name for p in report.written}
    assert written == {"alpha.png", "channels_low.png", "channels_high.png", "prediction.png", "attention.npz"}
    assert len(report.missing) == 1 and "no 2DPAM" in report.missing[0]
    saved = np.load(tmp_path / "dafm" / "attention.npz")
    assert "beta" not in saved and saved["low_top_index"].shape == (2,)
    expected = (image.astype(np.float64) / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(saved["input"][0].transpose(1, 2, 0), expected, rtol=0, atol=1e-5)
    assert _size(tmp_path / "dafm" / "prediction.png") == (48, 32)


def test_sum_variant_writes_no_attention_and_says_so(image_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "explained"
    out.mkdir()
    for name in [*ATTENTION_FILES, "notes.txt"]:  # as an earlier explain of a full model left them, and a file of the user's
        (out / name).write_bytes(b"earlier")
    sum_ckpt = _checkpoint(tmp_path / "ckpt-sum", "sum")
    assert run.main(["explain", "--model", str(sum_ckpt), "--input", str(image_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"prediction.png", "attention.npz", "notes.txt"}  # no mixed models
    assert "not written: alpha.png, channels_low.png, channels_high.png: the model has no DAFM" in printed
    assert "not written: beta.png: the model has no 2DPAM" in printed
    assert "removed" in printed and "beta.png" in printed
    saved = np.load(out / "attention.npz")
    assert not {"alpha_high", "alpha_low", "beta", "low_top_index"} & set(saved.files)
    assert saved["prediction"].shape == (HEIGHT, WIDTH)


def test_bad_input_is_one_clear_line(full_checkpoint: Path, image_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = ["explain", "--model", str(full_checkpoint), "--out", str(out)]
    assert run.main([*args, "--input", str(image_file), "--channels", "65"]) == 2
    assert "--channels must be between 1 and 64" in capsys.readouterr().err
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    assert run.main([*args, "--input", str(not_image)]) == 2
    assert "is not an image" in capsys.readouterr().err
    assert run.main([*args, "--input", str(tmp_path / "missing.png")]) == 2
    assert "no image at" in capsys.readouterr().err
    assert run.main([*args, "--input", str(image_file), "--size", "64by96"]) == 2
    assert "--size: expected HxW" in capsys.readouterr().err
    assert not out.exists()  # nothing written on a refused input
