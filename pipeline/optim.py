"""SGD parameter groups and the poly learning-rate policy (section 4.1)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import OptimConfig


def poly_lr(base_lr: float, iteration: int, max_iter: int, power: float = 0.9) -> float:
    """``base_lr * (1 - iter / max_iter) ** power``: the paper's 'poly' policy (section 4.1)."""
    if max_iter <= 0:
        raise ValueError(f"max_iter must be positive, got {max_iter}")
    return base_lr * (1.0 - min(iteration, max_iter) / max_iter) ** power


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


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, iteration: int, max_iter: int, power: float) -> float:
    """Set every group's rate to ``poly_lr(...) * lr_mult``; returns the base rate used."""
    lr = poly_lr(base_lr, iteration, max_iter, power)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
