"""Inference as the paper evaluates (sections 4.4-4.5, Tables 3 and 5): whole-image or
sliding-window, over a set of input scales, with left-right flips.

For every scale ``s`` of :class:`~pipeline.config.InferenceConfig` ``scales`` the image is
resized bilinearly to ``round(s * H) x round(s * W)``; the model's logits for it (and, with
``flip``, for its mirror image, flipped back) are resized to the input's H x W, turned into
a softmax, and the softmax is averaged over all scales and flips::

    P(x) = 1 / (|S| |F|)  sum_{s in S} sum_{f in F}  f^-1( softmax( up_HxW( logits(f(x_s)) ) ) )

The softmax is taken after resizing to H x W, as mmsegmentation's and DFN's test-time
augmentation do. With one scale of 1.0 and no flip, the result is the logits themselves
(their argmax is the same prediction, with no softmax to round).

``mode="slide"`` runs each (scaled) image in windows of ``crop`` (at most the image's own
size: an image is never padded, so no window sees pixels that are not there) placed
``stride`` apart, the last window of a row or column flush with the image's edge; the
softmax of overlapping windows is averaged per pixel. A crop the size of the image is
exactly whole-image inference.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import InferenceConfig


def model_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) logits: DF-DAM's ``"out"``, or the tensor an MLflow/LogitsOnly model returns."""
    out = model(images)
    return out["out"] if isinstance(out, dict) else out


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets of windows of ``crop`` over ``size`` pixels, ``stride`` apart; the last ends at ``size``.

    ``crop`` is taken as at most ``size``; every pixel is covered; no window starts twice.
    """
    crop = min(crop, size)
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] + crop < size:
        starts.append(size - crop)
    return starts


def windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) slices of every sliding window over an ``height x width`` image."""
    for top in window_starts(height, crop[0], stride[0]):
        for left in window_starts(width, crop[1], stride[1]):
            yield slice(top, top + min(crop[0], height)), slice(left, left + min(crop[1], width))


def default_stride(crop: tuple[int, int]) -> tuple[int, int]:
    """2/3 of the crop (one third overlap), as DeepLab's and PSPNet's sliding evaluation."""
    return max(1, (2 * crop[0]) // 3), max(1, (2 * crop[1]) // 3)


def slide_probs(model: nn.Module, images: torch.Tensor, crop: tuple[int, int],
                stride: tuple[int, int] | None = None) -> torch.Tensor:
    """Softmax (B, K, H, W) of ``images`` averaged over overlapping ``crop`` windows."""
    stride = stride or default_stride(crop)
    height, width = images.shape[-2:]
    total: torch.Tensor | None = None
    count = torch.zeros((1, 1, height, width), device=images.device)
    for rows, cols in windows(height, width, crop, stride):
        probs = model_logits(model, images[:, :, rows, cols]).softmax(1)
        if total is None:
            total = images.new_zeros((images.shape[0], probs.shape[1], height, width), dtype=probs.dtype)
        total[:, :, rows, cols] += probs
        count[:, :, rows, cols] += 1
    assert total is not None  # at least one window: window_starts never returns []
    return total / count


def _probs_at(model: nn.Module, images: torch.Tensor, settings: InferenceConfig,
              size: tuple[int, int]) -> torch.Tensor:
    """Softmax at ``size`` of one (scaled, maybe flipped) batch, whole or sliding."""
    if settings.mode == "slide":
        assert settings.crop is not None, "validated by pipeline.config.inference_checks"
        probs = slide_probs(model, images, settings.crop, settings.stride)
        if probs.shape[-2:] != size:
            # Resizing a softmax keeps it one (bilinear weights sum to 1).
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        return probs
    logits = model_logits(model, images)
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.softmax(1)


def is_single_pass(settings: InferenceConfig) -> bool:
    """One whole-image forward pass: nothing to average."""
    return settings.scales == (1.0,) and not settings.flip and settings.mode == "whole"


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``round(scale * H) x round(scale * W)``, at least 1 x 1."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@torch.no_grad()
def predict_scores(model: nn.Module, images: torch.Tensor,
                   settings: InferenceConfig = InferenceConfig()) -> torch.Tensor:
    """(B, K, H, W) class scores of normalised ``images`` (B, 3, H, W) whose argmax is the prediction.

    The averaged softmax of the module docstring; with the default settings (one pass), the
    logits. ``model`` must be in eval mode (BatchNorm statistics, no auxiliary heads).
    """
    if is_single_pass(settings):
        return model_logits(model, images)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    total: torch.Tensor | None = None
    passes = 0
    for scale in settings.scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, size=scaled_size(size, scale), mode="bilinear", align_corners=False)
        for flip in ((False, True) if settings.flip else (False,)):
            probs = _probs_at(model, scaled.flip(-1) if flip else scaled, settings, size)
            probs = probs.flip(-1) if flip else probs
            total = probs if total is None else total + probs
            passes += 1
    assert total is not None
    return total / passes


def segment(model: nn.Module, images: torch.Tensor, settings: InferenceConfig = InferenceConfig()) -> torch.Tensor:
    """(B, H, W) predicted train ids."""
    return predict_scores(model, images, settings).argmax(1)
