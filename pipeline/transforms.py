"""Joint (image, label) transforms of the paper's training recipe (section 4.1).

"We adopt random horizontal flip, mean subtraction and random scale on the input images
in training process, the scales contains {0.75, 1.0, 1.25, 1.5, 1.75, 2.0}. Besides, we
randomly crop the input image, the crop size is 1024x1024 and 512x512 for Cityscapes and
PASCAL VOC 2012." (section 4.1)

Conventions shared by every function here:

- Input: ``image`` a uint8 numpy ``(H, W, 3)`` RGB array, ``label`` a uint8 numpy
  ``(H, W)`` array of train ids, ``ignore_index`` (255) marking "not counted".
- Training (:class:`TrainTransform`) stays in uint8 from decode to batch: image
  ``uint8 (h, w, 3)``, label ``uint8 (h, w)``; the training loop normalises whole batches
  on its device (:func:`normalize_batch`) to ``float32 (B, 3, h, w)``,
  ``(x / 255 - mean) / std``.
- Evaluation (:class:`EvalTransform`): image ``torch.float32 (3, H, W)`` normalised the
  same way, label ``torch.int64 (H, W)``.
- Labels are only ever resized with NEAREST, so a transformed label holds nothing but the
  values of its input and ``ignore_index``.
- Padding: the label is padded with ``ignore_index``, the image with the mean colour (0 in
  normalised space, up to uint8 rounding). Padded pixels therefore carry no signal to the
  network and are never counted by the loss or the confusion matrix.

These run in data-loader workers on CPU. A training crop resizes only its own window
(``resize="window"``): the cost per sample follows the crop, not the frame times the
scale.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, PAPER_TRAIN_SCALES
from sharding.classes import IGNORE_INDEX


# ----------------------------------------------------------------------------- checks


def _check_image(image: Any, where: str) -> None:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: image must be a numpy array (H, W, 3) uint8 RGB, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"{where}: image must be uint8 (H, W, 3) RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image must have shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{where}: image is empty, shape {image.shape}")


def _check_label(label: Any, image: np.ndarray, where: str) -> None:
    if not isinstance(label, np.ndarray):
        raise TypeError(f"{where}: label must be a numpy array (H, W) uint8 of train ids, got {type(label).__name__}")
    if label.dtype != np.uint8:
        raise TypeError(f"{where}: label must be uint8 (H, W) train ids, got dtype {label.dtype}")
    if label.ndim != 2:
        raise ValueError(f"{where}: label must have shape (H, W), got {label.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(
            f"{where}: image and label differ in size: image (H, W) = {image.shape[:2]}, label = {label.shape}"
        )


def _check_mean_std(mean: Sequence[float], std: Sequence[float], where: str) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{where}: mean and std need 3 values (R, G, B), got mean={mean!r}, std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"{where}: std must be positive, got {std!r}")


# ----------------------------------------------------------------------------- normalisation


def _affine(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / 255 - mean) / std == x * scale + bias``; returns (scale, bias), each (3, 1, 1)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return 1.0 / (255.0 * s), -m / s


def _to_normalised(hwc: np.ndarray, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, h, w), normalised; ``hwc`` may be a strided view.

    This is the "mean subtraction" of section 4.1, with the ImageNet statistics of the
    pre-trained backbone by default.
    """
    chw = torch.from_numpy(np.array(hwc, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, h, w)
    return chw.to(torch.float32).mul_(scale).add_(bias)


def denormalize(
    image: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """Inverse of the transforms' normalisation: float (3, H, W) -> uint8 numpy (H, W, 3) RGB, for drawing.

    Values are rounded and clipped to [0, 255]; padded pixels (0 in normalised space)
    come back as the mean colour.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"denormalize: expected a tensor (3, H, W), got {got}")
    _check_mean_std(mean, std, "denormalize")
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (image.detach().to("cpu", torch.float32) * s + m) * 255.0  # (3, H, W)
    return pixels.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)


# ----------------------------------------------------------------------------- transforms


RESIZE_ORDERS = ("window", "frame")


@dataclass(frozen=True)
class Crop:
    """One draw of :class:`TrainTransform`: where a training crop comes from.

    ``scale`` is the drawn factor and ``(sh, sw)`` the size of the scaled frame; the window
    ``[y0, y0 + vh) x [x0, x0 + vw)`` of the scaled frame holds the crop's real pixels
    (``vh <= crop height``, ``vw <= crop width``; the rest is padding); ``flip`` mirrors the
    whole crop, padding included.
    """

    scale: float
    sh: int
    sw: int
    y0: int
    x0: int
    vh: int
    vw: int
    flip: bool


def nearest_indices(start: int, count: int, size: int, scaled: int) -> np.ndarray:
    """Source rows (or columns) of scaled pixels ``start .. start + count - 1`` under NEAREST.

    Scaled pixel ``k`` of a ``size -> scaled`` resize samples the source at
    ``(k + 0.5) * size / scaled`` and takes the pixel that covers it:
    ``floor((2k + 1) * size / (2 * scaled))``, computed in integers, so it is exact and the
    same for a window as for the whole frame. (Pillow accumulates the step in floating point
    and may pick either side where the sample falls exactly on a pixel border.)
    """
    k = np.arange(start, start + count, dtype=np.int64)
    return (2 * k + 1) * size // (2 * scaled)


class TrainTransform:
    """Random scale, pad, random crop, random horizontal flip (section 4.1), all in uint8.

    Per sample, with the caller's ``numpy.random.Generator`` (so a worker's stream is
    reproducible), a :class:`Crop` is drawn:

    1. a scale ``s`` uniformly from the discrete set ``scales``: the frame is to be resized
       to ``round(s * H) x round(s * W)``, the image bilinearly, the label with NEAREST;
    2. the scaled frame is padded at the bottom and right to at least ``crop_size``
       (label with ``ignore_index``, image with the mean colour);
    3. a window of exactly ``crop_size`` is cut at a uniformly random offset of the padded
       frame;
    4. with probability 0.5 (if ``flip``) image and label are flipped left-right together.

    ``resize`` says in which order the pixels are made, for the same draw:

    * ``"window"`` (default): the window is mapped back to source coordinates and only it is
      resized (Pillow's ``box``: the same bilinear taps at the same positions as resizing the
      whole frame, up to Pillow holding the box in float32: within 2 grey levels; the label
      through :func:`nearest_indices`, exactly the frame's labels but at NEAREST's ties). At scale 2 a 1024x1024 crop
      of a 1024x2048 Cityscapes frame resizes 1024x1024 output pixels, not 4096x2048.
    * ``"frame"``: the whole frame is resized with Pillow (image bilinear, label NEAREST),
      then cut: the straightforward order, kept as the reference the default is tested and
      benchmarked against.

    Returns ``(image uint8 (h, w, 3), label uint8 (h, w))`` tensors, ``crop_size = (h, w)``;
    the mean subtraction of section 4.1 happens on the training device
    (:func:`normalize_batch`), so a loader moves a quarter of the bytes of float32 and no
    loader process spends time on it. Padded image pixels hold the mean colour rounded to
    uint8 (within ``0.5 / 255 / std`` of 0 once normalised) and are never counted: their
    labels are ``ignore_index``.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scales: tuple[float, ...] = PAPER_TRAIN_SCALES,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
        resize: str = "window",
    ) -> None:
        if len(crop_size) != 2 or any(int(c) != c or c <= 0 for c in crop_size):
            raise ValueError(f"TrainTransform: crop_size must be two positive ints (height, width), got {crop_size!r}")
        if len(scales) == 0 or any(not s > 0 for s in scales):
            raise ValueError(f"TrainTransform: scales must be a non-empty set of positive factors, got {scales!r}")
        if not 0 <= int(ignore_index) <= 255:
            raise ValueError(f"TrainTransform: ignore_index must fit a uint8 label (0..255), got {ignore_index!r}")
        if resize not in RESIZE_ORDERS:
            raise ValueError(f"TrainTransform: resize must be one of {RESIZE_ORDERS}, got {resize!r}")
        _check_mean_std(mean, std, "TrainTransform")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scales = tuple(float(s) for s in scales)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)
        self.resize = resize
        self.pad_colour = np.array([min(255, max(0, round(255 * m))) for m in self.mean], dtype=np.uint8)
        self._pad_canvas = np.empty((*self.crop_size, 3), dtype=np.uint8)
        self._pad_canvas[...] = self.pad_colour  # copied from, never written: padding is two slice copies

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scales={self.scales}, mean={self.mean}, "
            f"std={self.std}, flip={self.flip}, ignore_index={self.ignore_index}, resize={self.resize!r})"
        )

    def draw(self, height: int, width: int, rng: np.random.Generator) -> Crop:
        """Steps 1-4's random choices for a ``height x width`` frame, in a fixed order."""
        ch, cw = self.crop_size
        s = self.scales[int(rng.integers(len(self.scales)))]
        sh, sw = max(1, int(height * s + 0.5)), max(1, int(width * s + 0.5))
        y0 = int(rng.integers(max(sh, ch) - ch + 1))
        x0 = int(rng.integers(max(sw, cw) - cw + 1))
        flip = self.flip and bool(rng.random() < 0.5)
        return Crop(s, sh, sw, y0, x0, min(ch, sh - y0), min(cw, sw - x0), flip)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_image(image, "TrainTransform")
        _check_label(label, image, "TrainTransform")
        crop = self.draw(*label.shape, rng)
        cut = self._window if self.resize == "window" else self._frame
        img_win, lab_win = cut(image, label, crop)  # (vh, vw, 3), (vh, vw)

        # The window's pixels land at the top left, or the top right once flipped (the padding
        # at the bottom and right moves with the content); only the padding is filled.
        ch, cw = self.crop_size
        vh, vw = crop.vh, crop.vw
        out_img = np.empty((ch, cw, 3), dtype=np.uint8)
        out_lab = np.empty((ch, cw), dtype=np.uint8)
        cols = slice(cw - vw, cw) if crop.flip else slice(0, vw)
        if crop.flip:  # pixels as 3-byte items: numpy reverses whole RGB triples, not bytes one by one
            _pixels(out_img)[:vh, cols] = _pixels(np.ascontiguousarray(img_win))[:, ::-1]
            out_lab[:vh, cols] = lab_win[:, ::-1]
        else:
            out_img[:vh, cols] = img_win
            out_lab[:vh, cols] = lab_win
        if (vh, vw) != (ch, cw):
            pad = slice(0, cw - vw) if crop.flip else slice(vw, cw)
            out_img[vh:], out_img[:vh, pad] = self._pad_canvas[vh:], self._pad_canvas[:vh, pad]
            out_lab[vh:], out_lab[:vh, pad] = self.ignore_index, self.ignore_index
        return torch.from_numpy(out_img), torch.from_numpy(out_lab)

    @staticmethod
    def _window(image: np.ndarray, label: np.ndarray, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
        """The window's pixels, resizing only the window (see the class docstring)."""
        h, w = label.shape
        y0, x0, vh, vw = crop.y0, crop.x0, crop.vh, crop.vw
        if (crop.sh, crop.sw) == (h, w):
            return image[y0 : y0 + vh, x0 : x0 + vw], label[y0 : y0 + vh, x0 : x0 + vw]
        # Scaled pixel x covers source [x * w / sw, (x + 1) * w / sw): the window's box in
        # source coordinates, integer products first so the far edge is exactly w (or h).
        box = (x0 * w / crop.sw, y0 * h / crop.sh, (x0 + vw) * w / crop.sw, (y0 + vh) * h / crop.sh)
        img = np.asarray(Image.fromarray(image).resize((vw, vh), Image.Resampling.BILINEAR, box=box))
        rows = nearest_indices(y0, vh, h, crop.sh)
        cols = nearest_indices(x0, vw, w, crop.sw)
        return img, label.take(rows, axis=0).take(cols, axis=1)

    @staticmethod
    def _frame(image: np.ndarray, label: np.ndarray, crop: Crop) -> tuple[np.ndarray, np.ndarray]:
        """The window's pixels, resizing the whole frame first (the reference order)."""
        h, w = label.shape
        if (crop.sh, crop.sw) != (h, w):
            # Pillow's size argument is (width, height).
            image = np.asarray(Image.fromarray(image).resize((crop.sw, crop.sh), Image.Resampling.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((crop.sw, crop.sh), Image.Resampling.NEAREST))
        window = (slice(crop.y0, crop.y0 + crop.vh), slice(crop.x0, crop.x0 + crop.vw))
        return image[window], label[window]


def _pixels(hwc: np.ndarray) -> np.ndarray:
    """A uint8 ``(H, W, 3)`` array viewed as ``(H, W)`` items of 3 bytes (one RGB pixel each)."""
    return hwc.view(np.dtype((np.void, 3)))[..., 0]


def normalize_batch(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` RGB, as :class:`TrainTransform` makes it -> float32 ``(B, 3, H, W)``,
    ``(x / 255 - mean) / std`` (the mean subtraction of section 4.1), on ``images``' device.

    Run after the copy to the training device: the copy moves uint8, and the arithmetic runs
    where the model does.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize_batch: expected uint8 (B, H, W, 3) RGB, got {images.dtype} {tuple(images.shape)}")
    _check_mean_std(mean, std, "normalize_batch")
    scale, bias = (t.to(images.device).view(1, 3, 1, 1) for t in _affine(tuple(mean), tuple(std)))
    return images.permute(0, 3, 1, 2).to(torch.float32).mul_(scale).add_(bias).contiguous()


class EvalTransform:
    """Normalisation only, full image: the evaluation-side counterpart of :class:`TrainTransform`.

    Returns ``(float32 (3, H, W), int64 (H, W))``; multi-scale and flip testing (section 4.3)
    belong to inference, not here.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        _check_mean_std(mean, std, "EvalTransform")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale, self._bias = _affine(self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(mean={self.mean}, std={self.std})"

    def image(self, image: np.ndarray) -> torch.Tensor:
        """The image alone, normalised: uint8 (H, W, 3) RGB -> float32 (3, H, W), as :meth:`__call__`
        normalises it (prediction has no label)."""
        _check_image(image, "EvalTransform")
        return _to_normalised(image, self._scale, self._bias)

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rng`` is accepted and unused, so both transforms share one call signature."""
        _check_image(image, "EvalTransform")
        _check_label(label, image, "EvalTransform")
        return _to_normalised(image, self._scale, self._bias), torch.from_numpy(label.astype(np.int64))
