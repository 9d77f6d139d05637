"""Training checkpoints: one folder per epoch, ``checkpoint.pt`` plus ``checkpoint.json``.

``checkpoint.pt`` holds the model (unwrapped from DDP), optimizer and grad-scaler states,
the poly schedule, the epoch just finished, the global step, the config and the dataset's
class metadata, so that training can continue exactly and a model can be rebuilt for
evaluation without the shards. ``checkpoint.json`` is written after it and records its size
and sha256, epoch, step, metrics and model section (read without loading the weights): a
checkpoint whose file does not match (a copy cut short by a lost node, say) is *incomplete*
and is never chosen (:func:`latest_checkpoint`) nor loaded.

A checkpoint holds only tensors, numbers, strings, booleans, None, lists, tuples and dicts:
:func:`save_checkpoint` turns numpy values into Python numbers and tensors and refuses
anything else, and :func:`load_checkpoint` reads with ``torch.load(..., weights_only=True)``,
so a file that carries a pickled Python object (which unpickling could run as code) is
refused, never executed.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import DFDAM, build_dfdam
from pipeline.config import Config, ModelConfig

CHECKPOINT_FILE = "checkpoint.pt"
RECORD_FILE = "checkpoint.json"

log = logging.getLogger(__name__)


CHECKPOINT_CONTENT = ("a DF-DAM checkpoint written by `run.py train` (a torch file of tensors, numbers, "
                      "strings, lists and dicts)")


class CheckpointError(ValueError):
    """A file that is not a DF-DAM checkpoint, or one that cannot be used; names the file."""


class IncompleteCheckpointError(CheckpointError):
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


_PLAIN = (str, int, float, bool, type(None))


def plain_state(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with numpy scalars as Python numbers and numpy arrays as tensors, so that
    ``torch.load(..., weights_only=True)`` reads it back; ``TypeError`` naming the entry
    (``where``) for anything else that is not a tensor, number, string, list, tuple or dict."""
    import numpy as np

    if isinstance(value, np.generic):  # before the exact types: numpy's float64 is a float subclass
        return value.item()
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):  # subclasses (enums...) would pickle by name
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        # An OrderedDict stays one, with its _metadata (the module versions load_state_dict reads).
        out = copy.copy(value) if type(value) is OrderedDict else {}
        out.clear()
        for k, v in value.items():
            out[plain_state(k, f"{where} key {k!r}")] = plain_state(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds only "
                    "tensors, numbers, strings, lists, tuples and dicts (it is read with weights_only=True)")


def save_checkpoint(folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler | None, epoch: int, step: int, config: Config,
                    dataset: dict[str, Any], metrics: dict[str, float],
                    schedule: dict[str, Any] | None = None) -> Path:
    """Write ``folder/checkpoint.pt`` then its record ``checkpoint.json``; returns the .pt path.

    The state passes through :func:`plain_state` first, so the file always loads with
    ``weights_only=True`` (:func:`load_checkpoint`), and an entry that would not fails here,
    at save time, naming the entry.
    """
    state = plain_state({
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "schedule": schedule,
        "epoch": epoch,
        "step": step,
        "config": config.to_dict(),
        "dataset": dataset,
        "metrics": metrics,
    })
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    _write_atomic(path, lambda tmp: torch.save(state, tmp))
    record = {"file": CHECKPOINT_FILE, "bytes": path.stat().st_size, "sha256": _sha256(path),
              "epoch": epoch + 1, "step": step, "metrics": state["metrics"], "model": state["config"]["model"]}
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


def _read_failure(path: Path, exc: Exception) -> CheckpointError:
    """The one-line refusal for a file ``torch.load(..., weights_only=True)`` could not read."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in text.lower():
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            return CheckpointError(f"{path} carries a pickled Python object ({found.group(1)}): refused, since "
                                   f"loading it could run code; expected {CHECKPOINT_CONTENT}")
        reason = next((line.strip() for line in text.splitlines() if line.strip().startswith("Unsupported")),
                      "a pickle the safe loader refuses")
        return CheckpointError(f"{path} is not a torch checkpoint ({reason[:160]}); expected {CHECKPOINT_CONTENT}")
    with path.open("rb") as f:
        head = f.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle
        cause = "neither a zip archive nor a pickle: not written by torch.save" if head else "an empty file"
    else:
        first = text.strip().splitlines()[0][:160] if text.strip() else "no detail"
        cause = f"damaged, cut short or not from torch.save: {type(exc).__name__}: {first}"
    return CheckpointError(f"{path} is not a readable torch checkpoint ({cause}); expected {CHECKPOINT_CONTENT}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file, or the ``checkpoint.pt`` inside a folder (checked against its record).

    Read with ``torch.load(..., weights_only=True)``: tensors, numbers, strings, lists and dicts
    only, never a pickled object.

    Raises:
        FileNotFoundError: no such file (nor a folder holding one).
        CheckpointError: a file that is not a torch checkpoint (a text file, a zip of anything
            else, one cut short), one carrying a pickled Python object, or one without the
            entries of a DF-DAM checkpoint; :class:`IncompleteCheckpointError` for a folder
            whose file does not match its record. The message names the file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if (path.parent / RECORD_FILE).is_file():
        check_complete(path.parent)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: expected a {CHECKPOINT_FILE} file or a folder holding one")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises anything from IndexError to RuntimeError on junk
        raise _read_failure(path, exc) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict; expected {CHECKPOINT_CONTENT}")
    for key in ("model", "epoch", "config", "dataset"):
        if key not in state:
            raise CheckpointError(f"{path} is not a DF-DAM checkpoint: it lacks {key!r}; expected {CHECKPOINT_CONTENT}")
    if not isinstance(state["model"], dict) or not isinstance(state["config"], dict) \
            or not isinstance(state["dataset"], dict) or "num_classes" not in state["dataset"]:
        raise CheckpointError(f"{path} is not a DF-DAM checkpoint: its model, config and dataset entries must be "
                              f"dicts (the dataset's with num_classes); expected {CHECKPOINT_CONTENT}")
    return state


def model_from_checkpoint(state: dict[str, Any], source: str | Path = "the checkpoint") -> DFDAM:
    """Rebuild the model a checkpoint was trained as (backbone weights come from the checkpoint);
    :class:`CheckpointError` naming ``source`` when its weights do not fit that model."""
    config = Config.from_dict(state["config"])
    # No backbone weights are loaded (nor downloaded): the checkpoint holds every weight.
    model = build_model(config.model, state["dataset"]["num_classes"], pretrained=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # the weights are not those of the model its own config describes
        detail = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{source}: its weights do not fit the model its config describes ({config.model.backbone}, "
            f"{config.model.variant}, {state['dataset']['num_classes']} classes): "
            f"{detail[1].strip() if len(detail) > 1 else detail[0]}"[:400]
        ) from None
    return model
