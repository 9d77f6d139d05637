"""Confusion matrix, IoU and mIoU on hand-computed cases; padding and ignore never counted."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import (
    ConfusionMeter,
    confusion_matrix,
    format_iou_table,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
)

# Ten pixels as one (1, 2, 5) image; the last two are ignored (255).
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 255, 255]).reshape(1, 2, 5)
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 0]).reshape(1, 2, 5)
# Counted (gt, pred) pairs: (0,0) (0,0) (0,1) (1,1) (1,2) (2,2) (2,2) (2,0)
#                 pred:  0  1  2
HAND_CM = [[2, 1, 0],  # gt 0
           [0, 1, 1],  # gt 1
           [1, 0, 2]]  # gt 2
# IoU = TP / (GT + Pred - TP):
#   class 0: 2 / (3 + 3 - 2) = 2/4 = 0.5
#   class 1: 1 / (2 + 2 - 1) = 1/3
#   class 2: 2 / (3 + 3 - 2) = 2/4 = 0.5
# mIoU = (1/2 + 1/3 + 1/2) / 3 = 4/9; pixel accuracy = 5 correct / 8 counted = 0.625
HAND_IOU = [0.5, 1 / 3, 0.5]
HAND_MIOU = 4 / 9
HAND_ACC = 5 / 8


def test_confusion_matrix_and_miou_match_the_hand_computed_case() -> None:
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    assert cm.dtype == torch.int64 and cm.shape == (3, 3)
    assert cm.tolist() == HAND_CM
    iou = iou_per_class(cm)
    assert iou.dtype == torch.float64
    assert iou.tolist() == pytest.approx(HAND_IOU)
    assert mean_iou(cm) == pytest.approx(HAND_MIOU)
    assert pixel_accuracy(cm) == pytest.approx(HAND_ACC)


def test_ignored_pixels_are_excluded_whatever_is_predicted_there() -> None:
    cm = confusion_matrix(PRED, TARGET, num_classes=3)
    assert int(cm.sum()) == 8  # 10 pixels, 2 ignored
    other = PRED.clone()
    other[TARGET == 255] = 2  # change only the predictions at ignored pixels
    assert torch.equal(confusion_matrix(other, TARGET, num_classes=3), cm)
    # Another ignore value is honoured, and 255 then counts as out of range.
    target_254 = torch.where(TARGET == 255, torch.tensor(254), TARGET)
    assert torch.equal(confusion_matrix(PRED, target_254, num_classes=3, ignore_index=254), cm)
    with pytest.raises(ValueError, match="targets outside"):
        confusion_matrix(PRED, target_254, num_classes=3)


def test_matches_a_brute_force_count() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 7, 9), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, 5, (2, 7, 9), generator=g)
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            expected[t, p] += 1
    assert confusion_matrix(pred, target, 5).numpy().tolist() == expected.tolist()
    # Narrow integer dtypes are accepted.
    assert torch.equal(confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 5), torch.from_numpy(expected))


def test_absent_classes_are_nan_and_predicted_only_classes_count_as_zero() -> None:
    cm = torch.zeros(4, 4, dtype=torch.int64)
    cm[:3, :3] = torch.tensor(HAND_CM)
    iou = iou_per_class(cm)
    assert math.isnan(iou[3].item())
    assert mean_iou(cm) == pytest.approx(HAND_MIOU)  # class 3 left out of the mean

    cm[0, 3] = 4  # class 3 predicted on 4 ground-truth-0 pixels, never in the ground truth
    iou = iou_per_class(cm)
    assert iou[3].item() == 0.0
    assert iou[0].item() == pytest.approx(2 / (7 + 3 - 2))  # GT 0 grew to 7 pixels
    assert mean_iou(cm) == pytest.approx((2 / 8 + 1 / 3 + 1 / 2 + 0) / 4)

    empty = torch.zeros(3, 3, dtype=torch.int64)
    assert math.isnan(mean_iou(empty)) and math.isnan(pixel_accuracy(empty))


@pytest.mark.parametrize("bad", [3, 7, -1])
def test_out_of_range_predictions_raise(bad: int) -> None:
    pred = PRED.clone()
    pred[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"predictions outside \[0, 3\)"):
        confusion_matrix(pred, TARGET, num_classes=3)
    pred = PRED.clone()
    pred[0, 1, 4] = bad  # also where the target is ignored: K disagrees with the model
    with pytest.raises(ValueError, match="predictions outside"):
        confusion_matrix(pred, TARGET, num_classes=3)


def test_out_of_range_targets_and_bad_inputs_raise() -> None:
    target = TARGET.clone()
    target[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"targets outside \[0, 3\).*\[5\]"):
        confusion_matrix(PRED, target, num_classes=3)
    with pytest.raises(TypeError, match="argmax"):
        confusion_matrix(PRED.float(), TARGET, num_classes=3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(PRED[..., :4], TARGET, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(PRED, TARGET, num_classes=0)


def test_confusion_meter_accumulates_and_resets() -> None:
    meter = ConfusionMeter(num_classes=3)
    assert meter.matrix.tolist() == [[0] * 3] * 3
    meter.update(PRED, TARGET)
    meter.update(PRED[:, :1], TARGET[:, :1])  # first row: pairs (0,0) (0,0) (0,1) (1,1) (1,2)
    assert meter.matrix.tolist() == [[4, 2, 0], [0, 2, 2], [1, 0, 2]]
    assert meter.matrix.dtype == torch.int64 and meter.matrix.device == PRED.device
    meter.reset()
    meter.update(PRED, TARGET)
    assert meter.matrix.tolist() == HAND_CM
    with pytest.raises(ValueError, match="predictions outside"):
        ConfusionMeter(num_classes=2).update(PRED, TARGET)


def test_confusion_meter_with_a_device_holds_zeros_there_before_any_batch() -> None:
    # A rank that evaluated no batch must still all-reduce a (K, K) tensor on its device.
    meter = ConfusionMeter(num_classes=3, device="cpu")
    assert meter.matrix.device == torch.device("cpu") and meter.matrix.tolist() == [[0] * 3] * 3
    meter.update(PRED, TARGET)
    meter.reset()
    assert meter.matrix.tolist() == [[0] * 3] * 3
    # Batches on another device than the matrix are refused ("meta" stands in for a GPU).
    elsewhere = ConfusionMeter(num_classes=3, device="meta")
    assert elsewhere.matrix.device.type == "meta"
    with pytest.raises(ValueError, match="accumulating on meta"):
        elsewhere.update(PRED, TARGET)


def test_iou_table_is_aligned_and_ends_with_the_summary() -> None:
    cm = torch.zeros(4, 4, dtype=torch.int64)
    cm[:3, :3] = torch.tensor(HAND_CM)
    table = format_iou_table(cm, ["road", "sidewalk", "building", "traffic light"])
    lines = table.splitlines()
    rows = {line.split("  ")[0].strip(): line for line in lines}
    assert "50.00" in rows["road"] and "33.33" in rows["sidewalk"] and "50.00" in rows["building"]
    assert rows["road"].rstrip().endswith("3") and rows["sidewalk"].rstrip().endswith("2")
    assert " - " in rows["traffic light"] + " "  # absent class: no IoU
    class_rows = [rows[n] for n in ("road", "sidewalk", "building", "traffic light")]
    assert len({len(r) for r in [lines[0], *class_rows]}) == 1  # header and rows aligned
    assert lines[-2].startswith("mIoU") and "44.44" in lines[-2]
    assert lines[-1].startswith("pixel accuracy") and "62.50" in lines[-1]
    with pytest.raises(ValueError, match="3 class names"):
        format_iou_table(cm, ["a", "b", "c"])
