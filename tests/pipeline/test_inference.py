"""Multi-scale, flip and sliding-window inference (pipeline/inference.py) against references
written here, and the inference config's checks and metric names."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from models import LogitsOnly, build_dfdam
from pipeline.config import ConfigError, InferenceConfig, apply_overrides, preset
from pipeline.inference import predict_scores, segment, window_starts, windows

# Averaging k softmaxes sums floats in an order the reference may not share: 1e-6 is far
# below any change of prediction and far above float32 rounding of numbers in [0, 1].
ATOL = 1e-6


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return LogitsOnly(build_dfdam(5, backbone="resnet18", aux_heads=False)).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def test_multi_scale_flip_is_the_softmax_averaged_at_the_input_size(model, images) -> None:
    scales = (0.5, 1.0, 1.5)
    expected = torch.zeros(2, 5, 64, 96)
    with torch.no_grad():
        for s in scales:
            x = F.interpolate(images, size=(round(64 * s), round(96 * s)), mode="bilinear", align_corners=False)
            for flipped in (False, True):
                logits = model(torch.flip(x, dims=[3]) if flipped else x)
                logits = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
                probs = torch.softmax(logits, dim=1)
                expected += torch.flip(probs, dims=[3]) if flipped else probs
    expected /= 2 * len(scales)

    got = predict_scores(model, images, InferenceConfig(scales=scales, flip=True))
    assert got.shape == (2, 5, 64, 96)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 64, 96), rtol=0, atol=ATOL)
    # Flip alone changes the prediction of an untrained model somewhere: the test can fail.
    assert not torch.equal(segment(model, images, InferenceConfig(flip=True)), segment(model, images))


def test_default_settings_are_one_pass_of_logits(model, images) -> None:
    with torch.no_grad():
        logits = model(images)
    assert torch.equal(predict_scores(model, images), logits)
    assert torch.equal(segment(model, images), logits.argmax(1))


def test_a_window_the_size_of_the_image_is_whole_image_inference(model, images) -> None:
    with torch.no_grad():
        whole = model(images).softmax(1)
    for crop in ((64, 96), (200, 300)):  # a crop larger than the image shrinks to it: no padding
        slide = predict_scores(model, images, InferenceConfig(mode="slide", crop=crop))
        assert torch.equal(slide, whole)


def test_overlapping_windows_average_each_pixel_once_per_window() -> None:
    # A per-pixel model sees the same pixel identically in every window: any overlap of
    # windows must give back its softmax (the windows' sum divided by their count).
    torch.manual_seed(0)
    pointwise = nn.Conv2d(3, 4, 1).eval()
    images = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        whole = pointwise(images).softmax(1)
    settings = InferenceConfig(mode="slide", crop=(32, 48), stride=(20, 30), scales=(1.0,))
    torch.testing.assert_close(predict_scores(pointwise, images, settings), whole, rtol=0, atol=ATOL)


def test_windows_cover_every_pixel_and_end_flush() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(5, 8, 3) == [0]  # a crop larger than the image: one window, the image
    seen = torch.zeros(70, 101, dtype=torch.int64)
    for rows, cols in windows(70, 101, (32, 48), (20, 30)):
        assert (rows.stop - rows.start, cols.stop - cols.start) == (32, 48)
        seen[rows, cols] += 1
    assert int(seen.min()) >= 1


def test_protocol_names_say_how_predictions_were_made() -> None:
    assert InferenceConfig().protocol == ""
    assert InferenceConfig(scales=(0.5, 1.0, 2.0), flip=True).protocol == "ms_flip"
    assert InferenceConfig(flip=True).protocol == "flip"
    assert InferenceConfig(mode="slide", crop=(64, 64)).protocol == "slide"
    assert InferenceConfig(scales=(0.5,)).protocol == "x0.5"


@pytest.mark.parametrize("override, message", [
    ("inference.mode=tiles", "inference.mode must be whole or slide"),
    ("inference.mode=slide", "needs inference.crop"),
    ("inference.scales=0.5,-1", "inference.scales must be positive"),
    ("inference.crop=16x16", "at least 32x32"),
])
def test_bad_inference_settings_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("synthetic"), [override])


def test_inference_settings_parse_from_overrides() -> None:
    cfg = apply_overrides(preset("synthetic"), ["inference.scales=0.5,1,2", "inference.flip=true",
                                                "inference.mode=slide", "inference.crop=64x128"])
    assert cfg.inference == InferenceConfig(scales=(0.5, 1.0, 2.0), flip=True, mode="slide", crop=(64, 128))
