"""What DF-DAM's attention modules do on one image: ``run.py explain`` (section 4.3, Figures 7-8).

One forward pass of a trained model in eval mode, with the attention it returns
(``return_attention=True``) and the two context features DAFM weighs, captured by forward
hooks on the model's own projections (its forward is not changed):

* ``X^L = project_low(stage 3)`` and ``X^H = project_high(stage 4)`` (B x C x H/16 x W/16 and
  B x C x H/32 x W/32, section 3.4);
* ``alpha_L``, ``alpha_H`` (B x C x 1 x 1, in [0, 1]): DAFM's channel weights (section 3.2,
  Eq. 1-8), both computed from ``X^H``;
* ``beta`` (B x 1 x H/4 x W/4, in [0, 1]): 2DPAM's confidence map over the stage-1 features
  (section 3.3, Eq. 9).

:func:`explain` writes into one folder (each file complete or absent: everything is drawn in
memory first, then each file is written to a temporary name and renamed):

* ``alpha.png``: alpha_H and alpha_L over the channel index (the paper's Figure 7(a)), the
  ``k`` highest- and lowest-weighted channels named on the curves; below, both sorted
  descending, with those channels listed;
* ``channels_low.png`` / ``channels_high.png``: the ``k`` highest- then the ``k``
  lowest-weighted channel maps of X^L / X^H, bilinearly enlarged to the image, each titled
  with its channel index and weight and scaled to its own range (Figure 8's columns 2-4);
* ``beta.png``: beta enlarged to the image, alone and over the image, 0..1 colour bar
  (Figure 8's column 5);
* ``prediction.png``: the predicted classes in the dataset's palette, at the image's size;
* ``attention.npz``: the values behind the pictures, exactly as the model computed them (see
  :func:`explain`).

A variant without DAFM (``model.variant=sum``) has no alpha, so no alpha.png and no channel
grids (nothing ranks its channels); one without 2DPAM (``sum``, ``dafm``) has no beta, so no
beta.png. What is missing is said in :attr:`ExplainReport.missing`, not raised.

Normalisation and palette: what the model was trained with, from its checkpoint's config and
dataset metadata, or from the metadata its MLflow model was logged with
(:func:`pipeline.evaluate.load_model`); models logged before the mean/std were recorded fall
back to ImageNet's statistics (every preset's), and a model with no palette is coloured with
the VOC colour map (:func:`sharding.classes.voc_colormap`). The report says which.

The model takes any input size (the trunk has output stride 32; DAFM and the head resize
with bilinear interpolation), so the image is neither padded nor cropped; ``size`` resizes it
first.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.transforms import EvalTransform
from pipeline.visualize import BETA_COLORMAP, colorize
from sharding.atomic import atomic_write_bytes
from sharding.classes import voc_colormap

if TYPE_CHECKING:
    from pipeline.evaluate import LoadedModel

DPI = 100  # figure sizes below are multiples of 1/4 inch: exact pixel sizes
TILE_WIDTH_IN = 2.0  # one channel map of a grid
BETA_TILE_WIDTH_IN = 4.0  # one of beta.png's two panels
ALPHA_FIGSIZE_IN = (10.0, 7.0)  # alpha.png: 1000 x 700 pixels
CHANNEL_COLORMAP = "viridis"
FILES = ("alpha.png", "channels_low.png", "channels_high.png", "beta.png", "prediction.png", "attention.npz")


class ExplainError(ValueError):
    """Input that ``run.py explain`` cannot use: printed as one line, no traceback."""


@dataclass(frozen=True)
class ModelContext:
    """What the image needs besides the model: normalisation, colours, names, and their origin."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    palette: tuple[tuple[int, int, int], ...] | None = None  # None: the VOC colour map
    class_names: tuple[str, ...] | None = None
    source: str = "defaults: ImageNet mean/std, VOC colour map"


@dataclass
class ExplainReport:
    """What :func:`explain` wrote and found."""

    out_dir: Path
    written: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # stale outputs of an earlier explain
    missing: list[str] = field(default_factory=list)  # what the model has no module for, and why
    summary: str = ""


# ----------------------------------------------------------------------------- inputs


def _quarter_inch(inches: float) -> float:
    """Round to a multiple of 1/4 inch (at least 1/2): exact in binary, so size * DPI is an integer."""
    return max(0.5, round(inches * 4) / 4)


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file (PNG, JPG, ...) -> uint8 RGB ``(H, W, 3)``; with ``size=(H, W)`` resized bilinearly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image at {path}: expected a PNG or JPG file")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:  # not an image; a truncated or damaged one
        raise ExplainError(f"{path} is not an image Pillow can read (expected PNG or JPG): {exc}") from None


def context_of(loaded: LoadedModel) -> ModelContext:
    """Normalisation, palette and class names a trained model came with (its checkpoint's config and
    dataset, or its MLflow model's metadata; see :func:`pipeline.evaluate.load_model`)."""
    palette = loaded.dataset.get("palette")
    names = loaded.dataset.get("class_names")
    return ModelContext(
        mean=tuple(float(v) for v in loaded.mean), std=tuple(float(v) for v in loaded.std),  # type: ignore[arg-type]
        palette=tuple(tuple(int(v) for v in c) for c in palette) if palette else None,
        class_names=tuple(str(n) for n in names) if names else None,
        source=f"{loaded.source}: its mean/std" + (", palette and class names" if palette else
                                                   "; no palette recorded, the VOC colour map"),
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The DFDAM inside a :class:`models.LogitsOnly` (what ``load_any_model`` returns), or ``model`` itself."""
    inner = getattr(model, "model", model)
    for name in ("backbone", "project_low", "project_high", "context_fusion"):
        if not hasattr(inner, name):
            raise ExplainError(f"expected a DF-DAM model (models.DFDAM, or LogitsOnly around one); "
                               f"{type(inner).__name__} has no {name!r}")
    return inner


# ----------------------------------------------------------------------------- the forward pass


@torch.no_grad()
def forward_with_features(dfdam: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``dfdam(x, return_attention=True)`` in eval mode, plus X^L and X^H from forward hooks.

    Returns ``(outputs, features)``: ``outputs`` is the model's own dict (``"out"``, and
    ``"alpha_high"``, ``"alpha_low"``, ``"beta"`` where the variant has them); ``features``
    holds ``"low"`` = ``project_low(stage 3)`` and ``"high"`` = ``project_high(stage 4)``.
    The model is put in eval mode (BatchNorm's running statistics, no auxiliary heads).
    """
    dfdam.eval()
    features: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            features[name] = output.detach().clone()
        return hook

    hooks = [dfdam.project_low.register_forward_hook(keep("low")),
             dfdam.project_high.register_forward_hook(keep("high"))]
    try:
        outputs = dfdam(x, return_attention=True)
    finally:
        for h in hooks:
            h.remove()
    return outputs, features


def rank_channels(alpha: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``k`` highest (descending) and ``k`` lowest (ascending) weights of ``alpha`` (C,).

    Ties keep channel order (a stable sort of ``alpha`` descending: the top is its first
    ``k``, the bottom its last ``k`` reversed).
    """
    order = torch.argsort(alpha.flatten(), descending=True, stable=True)
    return order[:k], order[-k:].flip(0)


# ----------------------------------------------------------------------------- pictures


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _rgb_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _enlarge(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w) -> float32 (N, H, W), bilinear as the model's own resizing."""
    up = F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return up.numpy()


def alpha_figure(alpha_high: np.ndarray, alpha_low: np.ndarray, k: int) -> Figure:
    """DAFM's weight vectors (C,) each: by channel index (Figure 7(a)) and sorted descending.

    In the upper panel the ``k`` highest- and lowest-weighted channels of each vector are
    ringed and named; the lower panel lists them. 1000 x 700 pixels.
    """
    fig = Figure(figsize=ALPHA_FIGSIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    by_index, by_rank = fig.subplots(2, 1)
    c = alpha_high.shape[0]
    lines = (("alpha_H (high-level, X^H)", alpha_high, "C3"), ("alpha_L (low-level, X^L)", alpha_low, "C0"))
    listing = []
    for label, alpha, colour in lines:
        top, bottom = (t.numpy() for t in rank_channels(torch.from_numpy(alpha), k))
        by_index.plot(np.arange(c), alpha, color=colour, lw=1.0, label=label)
        for idx, va, dy in [(i, "bottom", 4) for i in top] + [(i, "top", -4) for i in bottom]:
            by_index.scatter([idx], [alpha[idx]], s=30, facecolors="none", edgecolors=colour, linewidths=1.2)
            by_index.annotate(str(idx), (idx, alpha[idx]), xytext=(0, dy), textcoords="offset points",
                              ha="center", va=va, fontsize=7, color=colour)
        ordered = np.sort(alpha)[::-1]
        by_rank.plot(np.arange(c), ordered, color=colour, lw=1.2, label=label)
        name = label.split(" ")[0]
        listing.append(f"{name} highest: " + ", ".join(f"{i} ({alpha[i]:.3f})" for i in top))
        listing.append(f"{name} lowest: " + ", ".join(f"{i} ({alpha[i]:.3f})" for i in bottom))
    by_index.set_xlabel("channel")
    by_index.set_ylabel("weight")
    by_index.set_xlim(-1, c)
    by_index.set_ylim(-0.08, 1.08)
    by_index.set_title("DAFM channel weights by channel (section 3.2, Eq. 1-8; cf. Figure 7a)")
    by_index.legend(fontsize=8, loc="upper right")
    by_index.grid(alpha=0.3)
    by_rank.set_xlabel("rank (highest weight first)")
    by_rank.set_ylabel("weight")
    by_rank.set_xlim(-1, c)
    by_rank.set_ylim(-0.02, 1.02)
    by_rank.set_title("sorted descending")
    by_rank.grid(alpha=0.3)
    by_rank.legend(fontsize=8, loc="upper right")
    by_rank.text(0.01, 0.03, "\n".join(listing), transform=by_rank.transAxes, fontsize=7, family="monospace",
                 va="bottom", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    return fig


def channel_grid_size(k: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of a channel grid: 2 rows of ``k`` tiles ``TILE_WIDTH_IN`` wide."""
    tile_h = _quarter_inch(TILE_WIDTH_IN * height / width)
    return int(k * TILE_WIDTH_IN * DPI), int((2 * (tile_h + 0.25) + 0.5) * DPI)


def channel_figure(title: str, maps: np.ndarray, indices: Sequence[int], weights: Sequence[float], k: int) -> Figure:
    """2 x ``k`` tiles: the ``k`` highest-weighted channel maps, then the ``k`` lowest (``maps`` is (2k, H, W)).

    Each tile is scaled to its own min..max (the maps' scales differ by channel; Figure 8
    compares patterns, not magnitudes) and titled ``ch <index>  a=<weight>``.
    """
    height, width = maps.shape[1:]
    fig_w, fig_h = channel_grid_size(k, height, width)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, k, squeeze=False)
    for n, ax in enumerate(axes.flat):
        ax.imshow(maps[n], cmap=CHANNEL_COLORMAP, interpolation="nearest")
        ax.set_title(f"ch {indices[n]}  a={weights[n]:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("highest", fontsize=8)
    axes[1, 0].set_ylabel("lowest", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def beta_figure_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of beta.png: two panels ``BETA_TILE_WIDTH_IN`` wide and a colour bar."""
    tile_h = _quarter_inch(BETA_TILE_WIDTH_IN * height / width)
    return int((2 * BETA_TILE_WIDTH_IN + 1.0) * DPI), int((tile_h + 0.75) * DPI)


def beta_figure(image: np.ndarray, beta_image: np.ndarray) -> Figure:
    """2DPAM's confidence map beta (already at the image size): alone, and over the image; 0..1 colour bar."""
    height, width = image.shape[:2]
    fig_w, fig_h = beta_figure_size(height, width)
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    alone, over = fig.subplots(1, 2)
    mapped = alone.imshow(beta_image, cmap=BETA_COLORMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
    alone.set_title("beta (2DPAM, Eq. 9)", fontsize=9)
    over.imshow(image, interpolation="nearest")
    over.imshow(beta_image, cmap=BETA_COLORMAP, vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
    over.set_title("beta over the image", fontsize=9)
    for ax in (alone, over):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(mapped, ax=[alone, over], label="confidence")
    return fig


# ----------------------------------------------------------------------------- files


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def explain(model: nn.Module, image: np.ndarray, out_dir: str | Path, context: ModelContext = ModelContext(),
            channels: int = 4) -> ExplainReport:
    """Draw and save what DAFM and 2DPAM do on ``image`` (uint8 RGB (H, W, 3)); see the module doc.

    ``model`` is a :class:`models.DFDAM` or the :class:`models.LogitsOnly` around one;
    ``channels`` is ``k``, the number of highest- and of lowest-weighted channels shown.
    ``attention.npz`` holds:

    * ``image`` (H, W, 3) uint8, ``input`` (1, 3, H, W) float32: the picture and the
      normalised tensor the model saw; ``mean``, ``std``, ``palette`` used;
    * ``prediction`` (H, W) int64: ``argmax`` of the logits;
    * ``alpha_high``, ``alpha_low`` (1, C, 1, 1) and ``beta`` (1, 1, h, w): the model's
      ``return_attention`` tensors unchanged (those the variant has); ``beta_image`` (H, W):
      beta bilinearly enlarged, as drawn;
    * for ``f`` in ``low`` (X^L) and ``high`` (X^H), with alpha: ``{f}_top_index`` (k,) and
      ``{f}_bottom_index`` (k,) (:func:`rank_channels` of alpha_L / alpha_H), and
      ``{f}_top_maps`` / ``{f}_bottom_maps`` (k, h, w): those channels of the projection's
      output, at the features' resolution.

    Files of an earlier explain in ``out_dir`` that this model does not produce are removed,
    so the folder never mixes two models.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ExplainError(f"explain: image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
    dfdam = unwrap(model)
    height, width = image.shape[:2]
    x, _ = EvalTransform(context.mean, context.std)(image, np.zeros((height, width), np.uint8))
    x = x[None]  # (1, 3, H, W)
    outputs, features = forward_with_features(dfdam, x)
    logits = outputs["out"]  # (1, K, H, W)
    num_classes = logits.shape[1]
    prediction = logits[0].argmax(0).numpy().astype(np.int64)  # (H, W)
    palette = context.palette or tuple(voc_colormap(num_classes))
    if len(palette) < num_classes:
        raise ExplainError(f"explain: the palette has {len(palette)} colours for a {num_classes}-class model")
    names = context.class_names or tuple(f"class {i}" for i in range(num_classes))

    report = ExplainReport(out_dir=Path(out_dir))
    files: dict[str, bytes] = {"prediction.png": _rgb_png(colorize(prediction, palette))}
    arrays: dict[str, np.ndarray] = {
        "image": image, "input": x.numpy(), "prediction": prediction,
        "mean": np.asarray(context.mean, np.float64), "std": np.asarray(context.std, np.float64),
        "palette": np.asarray(palette, np.uint8),
    }
    lines = [f"normalisation and colours: {context.source}"]

    if "alpha_high" in outputs and "alpha_low" in outputs:
        k = int(channels)
        c = outputs["alpha_high"].shape[1]
        if not 1 <= k <= c // 2:
            raise ExplainError(f"explain: --channels must be between 1 and {c // 2} (half the model's {c} channels), got {k}")
        alphas = {"high": outputs["alpha_high"][0, :, 0, 0], "low": outputs["alpha_low"][0, :, 0, 0]}  # (C,)
        arrays["alpha_high"] = outputs["alpha_high"].numpy()
        arrays["alpha_low"] = outputs["alpha_low"].numpy()
        files["alpha.png"] = _png(alpha_figure(alphas["high"].numpy(), alphas["low"].numpy(), k))
        for f, label in (("low", "X^L (stage 3, alpha_L)"), ("high", "X^H (stage 4, alpha_H)")):
            top, bottom = rank_channels(alphas[f], k)
            feats = features[f][0]  # (C, h, w)
            arrays[f"{f}_top_index"], arrays[f"{f}_bottom_index"] = top.numpy(), bottom.numpy()
            arrays[f"{f}_top_maps"], arrays[f"{f}_bottom_maps"] = feats[top].numpy(), feats[bottom].numpy()
            chosen = torch.cat([top, bottom])
            grid = channel_figure(f"{label}: {k} highest- and {k} lowest-weighted channel maps of "
                                  f"{tuple(feats.shape[1:])}, enlarged to {height}x{width}",
                                  _enlarge(feats[chosen], (height, width)), chosen.tolist(),
                                  alphas[f][chosen].tolist(), k)
            files[f"channels_{f}.png"] = _png(grid)
            sym = "alpha_H" if f == "high" else "alpha_L"
            lines.append(f"{sym} highest: " + ", ".join(f"ch {i} {alphas[f][i]:.3f}" for i in top.tolist()))
            lines.append(f"{sym} lowest:  " + ", ".join(f"ch {i} {alphas[f][i]:.3f}" for i in bottom.tolist()))
        lines.append(f"mean alpha_H {alphas['high'].mean():.3f}, mean alpha_L {alphas['low'].mean():.3f}")
    else:
        report.missing.append("alpha.png, channels_low.png, channels_high.png: the model has no DAFM "
                              "(variant 'sum' adds X^L and X^H unweighted), so there are no channel weights alpha")

    if "beta" in outputs:
        beta = outputs["beta"]  # (1, 1, h, w)
        beta_image = _enlarge(beta[0], (height, width))[0]  # (H, W)
        arrays["beta"], arrays["beta_image"] = beta.numpy(), beta_image
        files["beta.png"] = _png(beta_figure(image, beta_image))
        b = beta.flatten()
        lines.append(f"beta {tuple(beta.shape[-2:])}: min {b.min():.3f}, mean {b.mean():.3f}, max {b.max():.3f}")
    else:
        report.missing.append("beta.png: the model has no 2DPAM (variants 'sum' and 'dafm' add the stage-1 "
                              "features ungated), so there is no confidence map beta")

    counts = np.bincount(prediction.ravel(), minlength=num_classes)
    shown = [f"{names[i]} {100 * counts[i] / prediction.size:.1f}%" for i in np.argsort(-counts, kind="stable")[:5]
             if counts[i] > 0]
    lines.append("prediction: " + ", ".join(shown))
    files["attention.npz"] = _npz(arrays)

    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if name in files:
            atomic_write_bytes(out / name, files[name])
            report.written.append(out / name)
        elif (out / name).exists():
            (out / name).unlink()
            report.removed.append(out / name)
    report.summary = "\n".join(lines)
    return report


def explain_reference(reference: str, image_path: str | Path, out_dir: str | Path,
                      size: tuple[int, int] | None = None, channels: int = 4,
                      tracking_uri: str | None = None) -> ExplainReport:
    """``run.py explain``: load the model ``reference`` names (any form
    :func:`pipeline.evaluate.load_model` takes) and :func:`explain` one image file."""
    from pipeline.evaluate import load_model

    image = load_image(image_path, size)  # before the model: a wrong path fails fast
    loaded = load_model(reference, tracking_uri)
    model, context = loaded.model, context_of(loaded)
    return explain(model, image, out_dir, context, channels)
