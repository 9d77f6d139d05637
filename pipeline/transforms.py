"""Joint (image, label) transforms of the paper's training recipe (section 4.1).

"We adopt random horizontal flip, mean subtraction and random scale on the input images
in training process, the scales contains {0.75, 1.0, 1.25, 1.5, 1.75, 2.0}. Besides, we
randomly crop the input image, the crop size is 1024x1024 and 512x512 for Cityscapes and
PASCAL VOC 2012." (section 4.1)

Conventions shared by every function here:

- Input: ``image`` a uint8 numpy ``(H, W, 3)`` RGB array, ``label`` a uint8 numpy
  ``(H, W)`` array of train ids, ``ignore_index`` (255) marking "not counted".
- Output: image ``torch.float32 (3, h, w)`` normalised as ``(x / 255 - mean) / std``;
  label ``torch.int64 (h, w)``.
- Labels are only ever resized with NEAREST, so a transformed label holds nothing but the
  values of its input and ``ignore_index``.
- Padding: the label is padded with ``ignore_index``, the image with **0 in normalised
  space**, i.e. with the mean colour in pixel space. Padded pixels therefore carry no
  signal to the network and are never counted by the loss or the confusion matrix.

These run in data-loader workers on CPU: resizing is done once on uint8 with Pillow and
only the cropped window is converted to float and normalised.
"""
from __future__ import annotations

from collections.abc import Sequence
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


class TrainTransform:
    """Random scale, pad, random crop, random horizontal flip, normalise (section 4.1).

    Per sample, with the caller's ``numpy.random.Generator`` (so a worker's stream is
    reproducible):

    1. a scale ``s`` drawn uniformly from the discrete set ``scales``; the image is resized
       to ``round(s * H) x round(s * W)`` bilinearly, the label with NEAREST;
    2. the scaled pair is padded at the bottom and right to at least ``crop_size``
       (label with ``ignore_index``, image with 0 after normalisation = the mean colour);
    3. a window of exactly ``crop_size`` is cut at a uniformly random offset;
    4. with probability 0.5 (if ``flip``) image and label are flipped left-right together;
    5. the image is normalised ``(x / 255 - mean) / std``.

    ``crop_size`` is ``(height, width)``.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scales: tuple[float, ...] = PAPER_TRAIN_SCALES,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        if len(crop_size) != 2 or any(int(c) != c or c <= 0 for c in crop_size):
            raise ValueError(f"TrainTransform: crop_size must be two positive ints (height, width), got {crop_size!r}")
        if len(scales) == 0 or any(not s > 0 for s in scales):
            raise ValueError(f"TrainTransform: scales must be a non-empty set of positive factors, got {scales!r}")
        _check_mean_std(mean, std, "TrainTransform")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scales = tuple(float(s) for s in scales)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)
        self._scale, self._bias = _affine(self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scales={self.scales}, mean={self.mean}, "
            f"std={self.std}, flip={self.flip}, ignore_index={self.ignore_index})"
        )

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_image(image, "TrainTransform")
        _check_label(label, image, "TrainTransform")
        ch, cw = self.crop_size

        # 1. random scale from the discrete set.
        s = self.scales[int(rng.integers(len(self.scales)))]
        h, w = label.shape
        sh, sw = max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))
        if (sh, sw) != (h, w):
            # Pillow's size argument is (width, height).
            image = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize((sw, sh), Image.Resampling.NEAREST))

        # 2.-3. pad bottom/right to at least the crop size, then a random window in the
        # padded canvas. Only the part of the window inside the image is real data; it
        # lands at the window's top-left because the padding is at the bottom/right.
        y0 = int(rng.integers(max(sh, ch) - ch + 1))
        x0 = int(rng.integers(max(sw, cw) - cw + 1))
        img_win = image[y0 : y0 + ch, x0 : x0 + cw]  # (vh, vw, 3), vh <= ch, vw <= cw
        lab_win = label[y0 : y0 + ch, x0 : x0 + cw]  # (vh, vw)
        vh, vw = lab_win.shape

        out_img = torch.zeros((3, ch, cw), dtype=torch.float32)  # 0 == mean colour once normalised
        out_lab = torch.full((ch, cw), self.ignore_index, dtype=torch.int64)
        # 5. normalise only the real pixels of the window.
        out_img[:, :vh, :vw] = _to_normalised(img_win, self._scale, self._bias)
        out_lab[:vh, :vw] = torch.from_numpy(np.array(lab_win, copy=True))

        # 4. horizontal flip, image and label together (padding moves with the content).
        if self.flip and rng.random() < 0.5:
            out_img = out_img.flip(-1)
            out_lab = out_lab.flip(-1)
        return out_img, out_lab


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
