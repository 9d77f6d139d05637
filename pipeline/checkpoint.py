"""Training checkpoints: one folder per epoch, ``checkpoint.pt`` plus ``checkpoint.json``.

``checkpoint.pt`` holds the model (unwrapped from DDP), optimizer and grad-scaler states,
the poly schedule, the epoch just finished, the global step, the config and the dataset's
class metadata, so that training can continue exactly and a model can be rebuilt for
evaluation without the shards. ``checkpoint.json`` is written after it and records its size
and sha256: a checkpoint whose file does not match (a copy cut short by a lost node, say)
is *incomplete* and is never chosen (:func:`latest_checkpoint`) nor loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import DFDAM, build_dfdam
from pipeline.config import Config, ModelConfig

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "checkpoint.json"

log = logging.getLogger(__name__)


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder whose file is missing, cut short or does not match its record."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler | None, epoch: int, step: int, config: Config,
                    dataset: dict[str, Any], metrics: dict[str, float],
                    schedule: dict[str, Any] | None = None) -> Path:
    """Write ``folder/checkpoint.pt`` then its record ``checkpoint.json``; returns the .pt path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedule": schedule,
        "epoch": epoch,
        "step": step,
        "config": config.to_dict(),
        "dataset": dataset,
        "metrics": metrics,
    }
    path = folder / CHECKPOINT_FILE
    _write_atomic(path, lambda tmp: torch.save(state, tmp))
    record = {"file": CHECKPOINT_FILE, "bytes": path.stat().st_size, "sha256": _sha256(path),
              "epoch": epoch + 1, "step": step, "metrics": metrics}
    _write_atomic(folder / RECORD_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=1, sort_keys=True)))
    return path


def check_complete(folder: str | Path) -> dict[str, Any]:
    """The record of a complete checkpoint folder; :class:`IncompleteCheckpointError` otherwise."""
    folder = Path(folder)
    path, record_path = folder / CHECKPOINT_FILE, folder / RECORD_FILE
    if not path.is_file() or not record_path.is_file():
        raise IncompleteCheckpointError(f"{folder}: expected {CHECKPOINT_FILE} and {RECORD_FILE}, "
                                        f"found {sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'nothing'}")
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        raise IncompleteCheckpointError(f"{record_path} is cut short or not JSON") from None
    size = path.stat().st_size
    if size != record.get("bytes") or _sha256(path) != record.get("sha256"):
        raise IncompleteCheckpointError(f"{path} ({size} bytes) does not match its record "
                                        f"({record.get('bytes')} bytes, sha256 {record.get('sha256', '?')[:12]}...): "
                                        "the copy was cut short")
    return record


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder of the newest *complete* checkpoint below a Ray Train run folder, or None.

    Folders are ordered by their recorded step; incomplete ones are skipped with a warning.
    """
    newest: tuple[int, Path] | None = None
    for pt in sorted(Path(run_dir).glob(f"*/{CHECKPOINT_FILE}")):
        folder = pt.parent
        try:
            step = int(check_complete(folder)["step"])
        except IncompleteCheckpointError as exc:
            log.warning("skipping an incomplete checkpoint: %s", exc)
            continue
        if newest is None or step > newest[0]:
            newest = (step, folder)
    return None if newest is None else newest[1]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file, or the ``checkpoint.pt`` inside a folder (checked against its record)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if (path.parent / RECORD_FILE).is_file():
        check_complete(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a {CHECKPOINT_FILE} file or a folder holding one")
    state = torch.load(path, map_location=map_location, weights_only=False)
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
