"""SGD parameter groups and the poly learning-rate policy (section 4.1)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimConfig


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float = 0.9) -> float:
    """``base_lr * (1 - iter / max_iter) ** power``: the paper's 'poly' policy (section 4.1)."""
    if max_iter <= 0:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    return base_lr * (1.0 - min(iteration, max_iter) / max_iter) ** power


@dataclass(frozen=True)
class PolySchedule:
    """The poly policy as one segment: ``base_lr * (1 - (t - start) / (end - start)) ** power``.

    A fresh run is ``start = 0``, ``end = epochs * steps``: exactly :func:`poly_lr`. The
    segment is saved in every checkpoint, so a resume continues it step for step. Resuming
    with another ``--epochs`` (another ``end``) does not recompute the rate from the start,
    which would make it jump back up: :meth:`retarget` begins a new segment at the rate
    already reached, decaying to zero at the new end.
    """

    base_lr: float
    end: int  # the step at which the rate reaches zero
    power: float = 0.9
    start: int = 0  # the step this segment begins at

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"PolySchedule: need 0 <= start < end, got start={self.start}, end={self.end}")

    def lr(self, step: int) -> float:
        """The base rate at global step ``step`` (0-based: the rate of the step's update)."""
        if self.start == 0:
            return poly_lr(self.base_lr, step, self.end, self.power)
        return poly_lr(self.base_lr, step - self.start, self.end - self.start, self.power)

    def retarget(self, step: int, end: int) -> "PolySchedule":
        """The schedule to continue with from ``step`` when training now ends at ``end``."""
        if end == self.end:
            return self
        if end <= step:
            raise ValueError(f"cannot end the schedule at step {end}: {step} steps are already done")
        return PolySchedule(self.lr(step), end, self.power, start=step)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups: {backbone, head} x {decayed, not decayed}.

    Head (everything outside ``model.backbone``) learns at ``head_lr_mult`` times the base
    rate; BatchNorm weights and all biases get no weight decay when ``no_decay_norm_bias``
    (the practice of the DFN/BiSeNet code the paper follows). Each group carries
    ``lr_mult`` so that :func:`set_lr` can apply the poly schedule to all of them.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full = f"{module_name}.{name}" if module_name else name
            is_backbone = full.startswith("backbone.") or ".backbone." in f".{full}"
            no_decay = cfg.no_decay_norm_bias and (
                name == "bias" or isinstance(module, nn.modules.batchnorm._NormBase) or isinstance(module, nn.GroupNorm)
            )
            groups.setdefault((is_backbone, no_decay), []).append(param)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params,
            "lr_mult": 1.0 if is_backbone else cfg.head_lr_mult,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            "name": f"{'backbone' if is_backbone else 'head'}{'/no_decay' if no_decay else ''}",
        })
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    groups = parameter_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, schedule: PolySchedule, step: int) -> float:
    """Set every group's rate to ``schedule.lr(step) * lr_mult``; returns the base rate used."""
    lr = schedule.lr(step)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
