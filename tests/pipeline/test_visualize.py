"""Colourised masks, panels, the confusion-matrix figure and the search figure."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pipeline.visualize import (
    GAP,
    TITLE_HEIGHT,
    colorize,
    confusion_matrix_figure,
    heatmap,
    prediction_panel,
    search_figure,
)

PALETTE = [[128, 64, 128], [244, 35, 232], [70, 70, 70]]
LABEL = np.array([[0, 1, 2], [255, 2, 0]], dtype=np.uint8)


def _pixels(fig: Figure) -> np.ndarray:
    """Draw a figure on its Agg canvas: uint8 RGB (H, W, 3)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


def test_colorize_maps_the_palette_exactly() -> None:
    rgb = colorize(LABEL, PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert rgb.tolist() == [
        [[128, 64, 128], [244, 35, 232], [70, 70, 70]],
        [[0, 0, 0], [70, 70, 70], [128, 64, 128]],
    ]
    custom = colorize(torch.from_numpy(LABEL).long(), PALETTE, ignore_color=(255, 255, 255))
    assert custom[1, 0].tolist() == [255, 255, 255] and np.array_equal(custom[0], rgb[0])
    assert colorize(np.where(LABEL == 255, 9, LABEL), PALETTE, ignore_index=9)[1, 0].tolist() == [0, 0, 0]


def test_colorize_rejects_values_without_a_colour() -> None:
    with pytest.raises(ValueError, match=r"\[3\] have no colour"):
        colorize(np.array([[0, 3]]), PALETTE)
    with pytest.raises(ValueError, match="integer"):
        colorize(np.zeros((2, 2), np.float32), PALETTE)
    with pytest.raises(ValueError, match="palette"):
        colorize(LABEL, [[0, 0]])


def test_prediction_panel_places_the_tiles() -> None:
    rng = np.random.default_rng(0)
    h, w = 12, 16
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    target = rng.integers(0, 3, (h, w)).astype(np.uint8)
    target[0, :] = 255
    prediction = rng.integers(0, 3, (h, w))

    panel = prediction_panel(image, target, prediction, PALETTE, titles=False)
    assert panel.dtype == np.uint8 and panel.shape == (h, 3 * w + 2 * GAP, 3)
    assert np.array_equal(panel[:, :w], image)
    assert np.array_equal(panel[:, w + GAP : 2 * w + GAP], colorize(target, PALETTE))
    assert np.array_equal(panel[:, 2 * (w + GAP) :], colorize(prediction, PALETTE))
    assert np.all(panel[:, w : w + GAP] == 255)  # white gap

    titled = prediction_panel(image, target, prediction, PALETTE)
    assert titled.shape == (TITLE_HEIGHT + h, 3 * w + 2 * GAP, 3)
    assert np.array_equal(titled[TITLE_HEIGHT:], panel)
    assert (titled[:TITLE_HEIGHT] < 128).any()  # some title text was drawn


def test_prediction_panel_with_beta_heat_map() -> None:
    h, w = 16, 20
    image = np.zeros((h, w, 3), np.uint8)
    target = np.zeros((h, w), np.uint8)
    beta = np.zeros((1, h // 4, w // 4), np.float32)  # 2DPAM's map at 1/4 resolution
    beta[..., w // 8 :] = 1.0  # right half confident
    panel = prediction_panel(image, target, target, PALETTE, beta=beta, titles=False)
    assert panel.shape == (h, 4 * w + 3 * GAP, 3)
    tile = panel[:, 3 * (w + GAP) :]
    assert np.array_equal(tile, heatmap(beta, size=(h, w)))
    low, high = tile[h // 2, 0].astype(int), tile[h // 2, w - 1].astype(int)
    assert high.sum() > low.sum() + 200  # inferno: 0 is near black, 1 is bright yellow
    with pytest.raises(ValueError, match="prediction"):
        prediction_panel(image, target, target[:, :-1], PALETTE)


def test_confusion_matrix_figure_is_row_normalised() -> None:
    cm = torch.tensor([[2, 1, 0], [0, 0, 0], [1, 0, 3]])
    fig = confusion_matrix_figure(cm, ["a", "b", "c"])
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # the matrix and its colour bar
    shown = fig.axes[0].images[0].get_array()  # (3, 3) masked array
    assert shown[0].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert shown[2].tolist() == pytest.approx([0.25, 0.0, 0.75])
    assert shown.mask[1].all()  # no ground truth for "b": blank row, not a fake 0
    pixels = _pixels(fig)
    renderer = fig.canvas.get_renderer()
    assert fig.axes[0].yaxis.label.get_window_extent(renderer).x0 >= 0  # axis title not clipped
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.std() > 0
    with pytest.raises(ValueError, match="2 class names"):
        confusion_matrix_figure(cm, ["a", "b"])


def test_search_figure_plots_each_parameter_and_skips_failed_trials() -> None:
    rows = [
        ({"lambda_c": 0.2, "lr": 1e-3}, 0.40, "completed"),
        ({"lambda_c": 0.6, "lr": 1e-1}, 0.55, "completed"),
        ({"lambda_c": 0.9, "lr": 1e-2}, 0.30, "stopped early"),
        ({"lambda_c": 0.5, "lr": 3e-2}, float("nan"), "error"),
    ]
    fig = search_figure(rows, ["lambda_c", "lr"])
    axes = [ax for ax in fig.axes if ax.get_xlabel()]
    assert [ax.get_xlabel() for ax in axes] == ["lambda_c", "lr"]
    assert axes[0].get_xscale() == "linear" and axes[1].get_xscale() == "log"  # lr spans 100x
    # Per panel: one scatter per status + the ring on the best trial; the NaN trial is absent.
    points = sorted(tuple(p) for c in axes[0].collections for p in c.get_offsets().tolist())
    assert points == sorted([(0.2, 0.40), (0.6, 0.55), (0.9, 0.30), (0.6, 0.55)])
    assert _pixels(fig).std() > 0


def test_visualize_never_touches_pyplot() -> None:
    code = (
        "import sys, numpy as np\n"
        "from pipeline.visualize import confusion_matrix_figure, search_figure\n"
        "confusion_matrix_figure(np.eye(3, dtype=np.int64), ['a', 'b', 'c']).canvas.draw()\n"
        "search_figure([({'lr': 0.1}, 0.5, 'completed')], ['lr']).canvas.draw()\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
