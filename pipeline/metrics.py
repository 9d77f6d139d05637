"""Confusion matrix, per-class IoU, mean IoU and pixel accuracy (the paper's "Mean IoU%").

The paper reports Mean IoU (Tables 1-7): per class ``IoU = TP / (TP + FP + FN)``,
averaged over classes. Everything here derives from one ``(K, K)`` int64 confusion
matrix, rows = ground truth, columns = prediction.

Distributed evaluation: every rank accumulates its own matrix (e.g. with
:class:`ConfusionMeter`) over its share of the data; the *caller* sums the matrices
across ranks exactly once (``torch.distributed.all_reduce(cm, op=SUM)``) and only then
computes IoU. Averaging per-rank mIoUs instead would be wrong. Nothing in this module
talks to other ranks.

Pixels whose target is ``ignore_index`` (255: void labels, and the padding of training
crops) are never counted.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from sharding.classes import IGNORE_INDEX
from sharding.text import format_table


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Count (ground truth, prediction) pairs: a ``(K, K)`` int64 matrix on the inputs' device.

    ``pred`` and ``target`` are integer class-index tensors of the same shape (any, e.g.
    (B, H, W)); pass ``logits.argmax(1)``, not logits. Pixels with
    ``target == ignore_index`` are skipped. Raises ``ValueError`` if a non-ignored target
    or any prediction lies outside ``[0, K)``: a prediction outside the range means the
    model and ``num_classes`` disagree, wherever it occurs.

    This is the per-rank count; the caller all-reduces (sums) it across ranks once.
    """
    if num_classes <= 0:
        raise ValueError(f"confusion_matrix: num_classes must be positive, got {num_classes}")
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"confusion_matrix: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(
                f"confusion_matrix: {name} must hold integer class indices, got {t.dtype}"
                + (" (pass logits.argmax(dim=1), not logits)" if name == "pred" else "")
            )
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.device != target.device:
        raise ValueError(f"confusion_matrix: pred is on {pred.device}, target on {target.device}")

    k = int(num_classes)
    pred = pred.reshape(-1).long()  # (N,)
    target = target.reshape(-1).long()  # (N,)
    keep = target != ignore_index
    t, p = target[keep], pred[keep]  # (M,) each, M = counted pixels
    # One host sync for both checks; the detailed message is built only on failure.
    bad_pred = (pred < 0) | (pred >= k)
    bad_target = (t < 0) | (t >= k)
    if bool(bad_pred.any() | bad_target.any()):
        if bad_pred.any():
            values = torch.unique(pred[bad_pred]).tolist()[:10]
            raise ValueError(f"confusion_matrix: predictions outside [0, {k}): {values}")
        values = torch.unique(t[bad_target]).tolist()[:10]
        raise ValueError(
            f"confusion_matrix: targets outside [0, {k}) that are not ignore_index={ignore_index}: {values}"
        )
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k)  # (K*K,) -> (K, K)


def _check_cm(cm: torch.Tensor, where: str) -> None:
    if not isinstance(cm, torch.Tensor) or cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        got = tuple(cm.shape) if isinstance(cm, torch.Tensor) else type(cm).__name__
        raise ValueError(f"{where}: expected a square (K, K) confusion matrix, got {got}")


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """Per-class ``IoU = TP / (TP + FP + FN)``, float64 (K,) on the matrix's device.

    A class absent from both the ground truth and the prediction (union 0) gets NaN, so
    it is left out of the mean; a class only predicted (never in the ground truth) gets 0.
    """
    _check_cm(cm, "iou_per_class")
    cm = cm.to(torch.float64)
    tp = cm.diagonal()  # (K,)
    union = cm.sum(dim=1) + cm.sum(dim=0) - tp  # GT pixels + predicted pixels - TP, (K,)
    iou = tp / union
    return torch.where(union > 0, iou, torch.full_like(iou, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes that appear (NaN-mean of :func:`iou_per_class`); NaN if none do."""
    iou = iou_per_class(cm)
    if bool(torch.isnan(iou).all()):
        return float("nan")
    return float(torch.nanmean(iou))


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Correct pixels / counted pixels; NaN for an empty matrix."""
    _check_cm(cm, "pixel_accuracy")
    total = int(cm.sum())
    return float("nan") if total == 0 else int(cm.trace()) / total


class ConfusionMeter:
    """Accumulates :func:`confusion_matrix` over batches, on the device of the inputs.

    ``update(pred, target)`` adds a batch; ``matrix`` is the running ``(K, K)`` int64
    count; ``reset()`` starts over. With ``device`` the matrix lives there from the start,
    so a rank that saw no batch still holds zeros on the right device for the all-reduce;
    without it the matrix follows the first batch (zeros on CPU before any). Per rank
    only: the caller all-reduces ``matrix`` (sum) across ranks once, after the last batch.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None
    ) -> None:
        if num_classes <= 0:
            raise ValueError(f"ConfusionMeter: num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = None if device is None else torch.device(device)
        self._matrix: torch.Tensor | None = None
        self.reset()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self._matrix is None:
            self._matrix = batch
        elif self._matrix.device != batch.device:
            raise ValueError(f"ConfusionMeter: accumulating on {self._matrix.device}, got a batch on {batch.device}")
        else:
            self._matrix += batch

    @property
    def matrix(self) -> torch.Tensor:
        if self._matrix is None:
            return torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)
        return self._matrix

    def reset(self) -> None:
        if self.device is None:
            self._matrix = None
        else:
            self._matrix = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64, device=self.device)


def format_iou_table(cm: torch.Tensor, class_names: Sequence[str]) -> str:
    """A plain-text table, one row per class (name, IoU %, GT pixels), then mIoU and pixel accuracy.

    Classes absent from both ground truth and prediction show ``-`` and are not in the mean.
    """
    _check_cm(cm, "format_iou_table")
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"format_iou_table: {len(class_names)} class names for a {cm.shape[0]}-class matrix")
    iou = iou_per_class(cm).cpu().tolist()
    gt = cm.sum(dim=1).cpu().tolist()
    rows = [(name, "-" if value != value else f"{100 * value:.2f}", f"{count:,}")  # NaN != NaN
            for name, value, count in zip(class_names, iou, gt)]
    summary = [("mIoU", f"{100 * mean_iou(cm):.2f}", ""), ("pixel accuracy", f"{100 * pixel_accuracy(cm):.2f}", "")]
    return format_table(("class", "IoU %", "GT pixels"), rows, footer=summary)
