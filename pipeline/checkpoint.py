"""Training checkpoints: one ``checkpoint.pt`` per epoch, written atomically.

A checkpoint holds the model (unwrapped from DDP), optimizer and grad-scaler states, the
epoch just finished, the global step, the config and the dataset's class metadata, so that
training can continue and a model can be rebuilt for evaluation without the shards.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import DFDAM, build_dfdam
from pipeline.config import Config, ModelConfig

CHECKPOINT_FILE = "checkpoint.pt"


def build_model(cfg: ModelConfig, num_classes: int, pretrained: bool = True) -> DFDAM:
    """DF-DAM from the config's model section; ``pretrained=False`` skips ``cfg.weights``."""
    return build_dfdam(
        num_classes,
        backbone=cfg.backbone,  # type: ignore[arg-type]
        variant=cfg.variant,  # type: ignore[arg-type]
        weights=cfg.weights if pretrained else None,
        channels=cfg.channels,
        gate_hidden=cfg.gate_hidden,
        refine_channels=cfg.refine_channels,
        aux_channels=cfg.aux_channels,
    )


def save_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler | None, epoch: int, step: int, config: Config,
                    dataset: dict[str, Any], metrics: dict[str, float]) -> Path:
    """Write ``folder/checkpoint.pt`` (temp file, then rename); returns its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step": step,
        "config": config.to_dict(),
        "dataset": dataset,
        "metrics": metrics,
    }
    path = folder / CHECKPOINT_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file, or the ``checkpoint.pt`` inside a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a {CHECKPOINT_FILE} file or a folder holding one")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("model", "epoch", "config", "dataset"):
        if key not in state:
            raise ValueError(f"{path} is not a DF-DAM checkpoint: it lacks {key!r}")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> DFDAM:
    """Rebuild the model a checkpoint was trained as (backbone weights come from the checkpoint)."""
    config = Config.from_dict(state["config"])
    # No backbone weights are loaded (nor downloaded): the checkpoint holds every weight.
    model = build_model(config.model, state["dataset"]["num_classes"], pretrained=False)
    model.load_state_dict(state["model"])
    return model
