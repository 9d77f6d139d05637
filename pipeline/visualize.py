"""Pictures of segmentations: colourised masks, comparison panels, confusion matrices, search plots.

Pure functions on numpy arrays; no pyplot (its global state does not belong in Ray
workers), only :class:`matplotlib.figure.Figure` rendered with the Agg canvas. Arrays
are uint8 RGB ``(H, W, 3)`` unless stated; an image tensor from
:mod:`pipeline.transforms` is turned back into one with
:func:`pipeline.transforms.denormalize`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from sharding.classes import IGNORE_INDEX

TITLE_HEIGHT = 16  # pixels of the title bar above each tile of prediction_panel
GAP = 4  # white pixels between tiles of prediction_panel
BETA_COLORMAP = "inferno"
OVERLAY_ALPHA = 0.5  # weight of the class colour over the image in overlay


def _as_numpy(array: Any) -> np.ndarray:
    """Accept numpy arrays and torch tensors (any device) without importing torch here."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_rgb(image: np.ndarray, name: str, where: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: {name} must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")


def colorize(
    label: np.ndarray,
    palette: Sequence[Sequence[int]],
    ignore_index: int = IGNORE_INDEX,
    ignore_color: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Class indices ``(H, W)`` -> uint8 RGB ``(H, W, 3)``: class ``k`` gets ``palette[k]`` exactly.

    ``ignore_index`` pixels get ``ignore_color``. Any other value outside
    ``[0, len(palette))`` raises ``ValueError``.
    """
    lab = _as_numpy(label)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"colorize: label must be an integer (H, W) array, got {lab.dtype} {lab.shape}")
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] == 0 or pal.min() < 0 or pal.max() > 255:
        raise ValueError(f"colorize: palette must be K >= 1 colours [r, g, b] in 0..255, got shape {pal.shape}")
    k = pal.shape[0]
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= k))
    if bad.any():
        raise ValueError(f"colorize: label values {np.unique(lab[bad])[:10].tolist()} have no colour in a {k}-colour palette")
    lut = np.concatenate([pal, np.asarray(ignore_color).reshape(1, 3)]).astype(np.uint8)  # (K + 1, 3), row K = ignore
    return lut[np.where(valid, lab, k)]  # (H, W) -> (H, W, 3)


def overlay(
    image_rgb: np.ndarray,
    label: np.ndarray,
    palette: Sequence[Sequence[int]],
    ignore_index: int = IGNORE_INDEX,
    alpha: float = OVERLAY_ALPHA,
) -> np.ndarray:
    """The colourised ``label`` (:func:`colorize`) blended over ``image_rgb``, uint8 RGB ``(H, W, 3)``.

    Per pixel ``((256 - w) * image + w * colour + 128) // 256`` with ``w = round(256 * alpha)``:
    integer arithmetic, so the same inputs give the same bytes on every machine. Pixels of
    ``ignore_index`` show the image alone.
    """
    image = _as_numpy(image_rgb)
    _check_rgb(image, "image_rgb", "overlay")
    lab = _as_numpy(label)
    if lab.shape != image.shape[:2]:
        raise ValueError(f"overlay: label is {lab.shape}, image is {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}")
    weight = round(256 * alpha)
    colour = colorize(lab, palette, ignore_index).astype(np.uint16)
    blended = ((256 - weight) * image.astype(np.uint16) + weight * colour + 128) >> 8
    return np.where((lab == ignore_index)[..., None], image, blended.astype(np.uint8))


def heatmap(values: np.ndarray, size: tuple[int, int] | None = None, colormap: str = BETA_COLORMAP) -> np.ndarray:
    """A map of values in [0, 1] -> uint8 RGB ``(H, W, 3)`` with a fixed 0..1 colour scale.

    ``values`` is ``(h, w)`` or ``(1, h, w)``; with ``size=(H, W)`` it is first resized
    bilinearly (2DPAM's beta lives at 1/4 of the input resolution). The scale is not
    stretched per image, so maps of different images compare.
    """
    v = _as_numpy(values).astype(np.float32)
    if v.ndim == 3 and v.shape[0] == 1:
        v = v[0]  # (1, h, w) -> (h, w)
    if v.ndim != 2:
        raise ValueError(f"heatmap: values must be (h, w) or (1, h, w), got {v.shape}")
    if size is not None and v.shape != tuple(size):
        beta_img = Image.fromarray(np.ascontiguousarray(v))  # float32 -> mode "F"
        v = np.asarray(beta_img.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    rgba = matplotlib.colormaps[colormap](np.clip(v, 0.0, 1.0), bytes=True)  # (H, W, 4) uint8
    return np.ascontiguousarray(rgba[..., :3])


def prediction_panel(
    image_rgb: np.ndarray,
    target: np.ndarray,
    prediction: np.ndarray,
    palette: Sequence[Sequence[int]],
    ignore_index: int = IGNORE_INDEX,
    beta: np.ndarray | None = None,
    titles: bool = True,
) -> np.ndarray:
    """image | ground truth | prediction (| 2DPAM confidence map beta) side by side, uint8 RGB.

    ``target`` and ``prediction`` are ``(H, W)`` class indices (ignored pixels black);
    ``beta`` is the 2DPAM confidence map (section 3.3), ``(h, w)`` or ``(1, h, w)`` in
    [0, 1] at any resolution, drawn as a heat map. Tiles are separated by ``GAP`` white
    columns; with ``titles`` a ``TITLE_HEIGHT``-pixel bar with each tile's name sits on
    top. Shape: ``(TITLE_HEIGHT * titles + H, n * W + (n - 1) * GAP, 3)``, n = 3 or 4.
    """
    image_rgb = _as_numpy(image_rgb)
    _check_rgb(image_rgb, "image_rgb", "prediction_panel")
    height, width = image_rgb.shape[:2]
    tiles = [("image", image_rgb)]
    for name, lab in (("ground truth", target), ("prediction", prediction)):
        lab = _as_numpy(lab)
        if lab.shape != (height, width):
            raise ValueError(f"prediction_panel: {name} is {lab.shape}, image is {(height, width)}")
        tiles.append((name, colorize(lab, palette, ignore_index)))
    if beta is not None:
        tiles.append(("2DPAM beta", heatmap(beta, size=(height, width))))

    top = TITLE_HEIGHT if titles else 0
    n = len(tiles)
    panel = np.full((top + height, n * width + (n - 1) * GAP, 3), 255, dtype=np.uint8)
    for i, (_, tile) in enumerate(tiles):
        x = i * (width + GAP)
        panel[top:, x : x + width] = tile
    if titles:
        canvas = Image.fromarray(panel)
        draw = ImageDraw.Draw(canvas)
        for i, (name, _) in enumerate(tiles):
            draw.text((i * (width + GAP) + 3, 2), name, fill=(0, 0, 0))
        panel = np.asarray(canvas).copy()
    return panel


def confusion_matrix_figure(cm: Any, class_names: Sequence[str], annotate: bool | None = None) -> Figure:
    """Row-normalised confusion matrix (rows = ground truth, columns = prediction) with a colour bar.

    Each row shows where a class's ground-truth pixels went (rows sum to 1; a class with
    no ground truth is a blank row). Cells carry their percentage when ``annotate`` (by
    default when K <= 25). Returns a :class:`matplotlib.figure.Figure` on an Agg canvas:
    ``fig.savefig(path)`` or ``mlflow.log_figure(fig, ...)`` work without pyplot.
    """
    counts = _as_numpy(cm).astype(np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion_matrix_figure: expected a square (K, K) matrix, got {counts.shape}")
    k = counts.shape[0]
    if len(class_names) != k:
        raise ValueError(f"confusion_matrix_figure: {len(class_names)} class names for a {k}-class matrix")
    rows = counts.sum(axis=1, keepdims=True)  # (K, 1) ground-truth pixels per class
    with np.errstate(invalid="ignore", divide="ignore"):
        normed = np.where(rows > 0, counts / rows, np.nan)  # (K, K)

    side = max(4.0, 0.42 * k + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(normed), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="fraction of ground-truth pixels")  # no fraction/pad: they defeat the constrained layout
    ax.set_xticks(range(k), labels=[str(n) for n in class_names], rotation=90, fontsize=8)
    ax.set_yticks(range(k), labels=[str(n) for n in class_names], fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (row-normalised)")
    if annotate if annotate is not None else k <= 25:
        for r in range(k):
            for c in range(k):
                v = normed[r, c]
                if v == v and v >= 0.005:  # skip NaN and cells that round to 0
                    ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v > 0.5 else "black")
    return fig


def search_figure(
    rows: Sequence[tuple[dict[str, float], float, str]], names: Sequence[str]
) -> Figure:
    """Best validation mIoU of each Tune trial against each searched hyper-parameter.

    ``rows`` holds one ``(params, best_val_miou, status)`` per trial; ``names`` are the
    searched parameters (e.g. ``lambda_c``, ``lambda_s``, ``lr``: one panel each). Colour
    and marker follow the trial status; the best trial is ringed in red. A parameter whose
    values are positive and span at least 20x is drawn on a log axis (the learning rate).
    Trials without a finite mIoU are left out.
    """
    if len(names) == 0:
        raise ValueError("search_figure: no searched parameter names")
    kept = [(p, float(m), str(st)) for p, m, st in rows if np.isfinite(m)]
    statuses = sorted({st for _, _, st in kept})
    markers = "osD^vP*X"
    best = max(kept, key=lambda r: r[1]) if kept else None

    fig = Figure(figsize=(3.6 * len(names) + 0.6, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        for i, status in enumerate(statuses):
            pts = [(p[name], m) for p, m, st in kept if st == status and name in p]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, s=28, marker=markers[i % len(markers)], color=f"C{i}", alpha=0.8, label=status)
        if best is not None and name in best[0]:
            ax.scatter([best[0][name]], [best[1]], s=140, facecolors="none", edgecolors="red", linewidths=1.5,
                       label="best")
        values = [p[name] for p, _, _ in kept if name in p]
        if values and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best val mIoU")
    if kept:
        axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"search: {len(kept)} of {len(rows)} trials with an mIoU")
    return fig
