"""Eq. 12 on hand-made cases."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import joint_loss


def _ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


def test_joint_loss_equals_eq_12_and_ignores_255() -> None:
    # One image of 1 x 3 pixels, 2 classes; the third pixel is ignored.
    p = [[0.0, 1.0], [2.0, -1.0], [5.0, -5.0]]
    c = [[1.0, 1.0], [0.5, 0.0], [-3.0, 3.0]]
    s = [[-1.0, 2.0], [0.0, 0.0], [9.0, 0.0]]
    target = torch.tensor([[[1, 0, 255]]])

    def as_logits(rows):  # (1, K=2, H=1, W=3)
        return torch.tensor(rows).T.reshape(1, 2, 1, 3)

    outputs = {"out": as_logits(p), "aux_context": as_logits(c), "aux_spatial": as_logits(s)}
    expected_p = (_ce(p[0], 1) + _ce(p[1], 0)) / 2
    expected_c = (_ce(c[0], 1) + _ce(c[1], 0)) / 2
    expected_s = (_ce(s[0], 1) + _ce(s[1], 0)) / 2
    loss, parts = joint_loss(outputs, target, lambda_c=0.4, lambda_s=0.1)
    assert loss.item() == pytest.approx(expected_p + 0.4 * expected_c + 0.1 * expected_s, rel=1e-6)
    assert parts["loss_p"].item() == pytest.approx(expected_p, rel=1e-6)
    assert parts["loss_c"].item() == pytest.approx(expected_c, rel=1e-6)
    assert parts["loss_s"].item() == pytest.approx(expected_s, rel=1e-6)

    # Changing the logits at the ignored pixel changes nothing.
    outputs["out"][..., 2] = torch.tensor([-50.0, 50.0]).view(1, 2, 1)
    again, _ = joint_loss(outputs, target, lambda_c=0.4, lambda_s=0.1)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


def test_lambdas_weight_the_auxiliary_terms() -> None:
    torch.manual_seed(0)
    outputs = {k: torch.randn(2, 3, 4, 4, requires_grad=True) for k in ("out", "aux_context", "aux_spatial")}
    target = torch.randint(0, 3, (2, 4, 4))
    base, parts = joint_loss(outputs, target, lambda_c=0.0, lambda_s=0.0)
    assert base.item() == pytest.approx(parts["loss_p"].item())
    full, parts = joint_loss(outputs, target, lambda_c=0.4, lambda_s=0.1)
    assert full.item() == pytest.approx((parts["loss_p"] + 0.4 * parts["loss_c"] + 0.1 * parts["loss_s"]).item())
    # lambda = 0 still keeps the aux heads in the graph (zero gradient, not None): DDP needs it.
    base.backward()
    assert outputs["aux_context"].grad is not None and outputs["aux_context"].grad.abs().sum() == 0


def test_prediction_only_and_all_ignored() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss, parts = joint_loss({"out": logits}, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0 and set(parts) == {"loss_p"}
    loss.backward()  # still differentiable
    with pytest.raises(TypeError, match="int64"):
        joint_loss({"out": logits}, torch.zeros(1, 2, 2, dtype=torch.int32))
