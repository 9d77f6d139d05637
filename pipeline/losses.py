"""The joint loss of DF-DAM (Eq. 11-12)."""
from __future__ import annotations

import torch
from torch.nn import functional as F

from sharding.classes import IGNORE_INDEX


def joint_loss(
    outputs: dict[str, torch.Tensor],
    target: torch.Tensor,
    lambda_c: float = 0.4,
    lambda_s: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss = L_p(y_p) + lambda_c * L_c(y_c) + lambda_s * L_s(y_s)`` (Eq. 12).

    Every term is the softmax (cross-entropy) loss of Eq. 11, averaged over the pixels
    whose label is not ``ignore_index``. ``outputs`` is the model's dict: ``"out"`` (y_p)
    and, when present, ``"aux_context"`` (y_c) and ``"aux_spatial"`` (y_s), each
    (B, K, H, W) logits; ``target`` is (B, H, W) int64. An auxiliary output that is absent
    (evaluation mode, or a model built without aux heads) contributes nothing. Returns the
    joint loss and its detached parts (``loss_p``, ``loss_c``, ``loss_s``) for logging.
    """
    if target.dtype != torch.int64:
        raise TypeError(f"target must be int64 class indices, got {target.dtype}")
    terms = {
        "loss_p": (outputs["out"], 1.0),
        "loss_c": (outputs.get("aux_context"), lambda_c),
        "loss_s": (outputs.get("aux_spatial"), lambda_s),
    }
    total = outputs["out"].new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    valid = (target != ignore_index).sum().clamp_min(1)  # an all-ignored batch gives 0, not NaN
    for name, (logits, weight) in terms.items():
        if logits is None:
            continue
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"{name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in size")
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / valid
        parts[name] = loss.detach()
        # A zero weight still adds the term, so every head joins the graph (DDP needs that).
        total = total + weight * loss
    return total, parts
