"""Complete a tracked run from what its run folder kept while the tracking server was away.

A training run whose MLflow server goes away does not stop: each call that could not reach
it waits in the run's outbox (``<storage>/<name>/mlflow_outbox.jsonl``,
:class:`pipeline.tracking.Outbox`), and the checkpoints hold the weights. :func:`sync_run`
sends what the outbox holds (epoch metrics by step, small files by name: never twice), logs
the model from the newest checkpoint when the run has none, draws the confusion-matrix figure
again from its kept matrix, and closes the run with the status it ended with. The end of a
training run calls it (waiting up to ``tracking.outbox_wait_s`` for the server); ``run.py
track sync RUN_FOLDER`` calls it later. Running it again changes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from models import LogitsOnly
from pipeline import tracking
from pipeline.config import Config

CONFUSION_JSON, CONFUSION_FIGURE = "eval/confusion_matrix.json", "eval/confusion_matrix.png"


@dataclass
class SyncReport:
    outbox: str  # the outbox file read ("" when the run folder has none)
    sent: list[str] = field(default_factory=list)  # what reached the server now
    lost: list[str] = field(default_factory=list)  # what was not kept and cannot be rebuilt
    waiting: list[str] = field(default_factory=list)  # what still waits: the server is away

    @property
    def complete(self) -> bool:
        return not self.waiting


def log_trained_model(uri: str, run_id: str, model: torch.nn.Module, cfg: Config, info: dict[str, Any]) -> str:
    """Log a trained DF-DAM as logits only, with its dataset and normalisation (the one form
    every run's model is logged in: by rank 0 after the last epoch, or from its checkpoint here)."""
    return tracking.log_model(uri, run_id, LogitsOnly(model).eval(), info["num_classes"],
                              code_path=Path(models.__file__).parent,
                              metadata={**info, "mean": list(cfg.data.mean), "std": list(cfg.data.std)})


def describe(entries: list[dict[str, Any]]) -> list[str]:
    """What outbox entries hold, in words: ``metrics of epoch(s) 2, 3``, file names, ``status FINISHED``."""
    steps = sorted({e["step"] for e in entries if e["kind"] == "metrics"})
    words = [f"metrics of epoch(s) {', '.join(map(str, steps))}"] if steps else []
    words += [e["name"] for e in entries if e["kind"] in ("json", "text", "missing")]
    words += [f"tag {k}={v}" for e in entries if e["kind"] == "tags" for k, v in e["tags"].items()]
    words += [f"status {e['status']}" for e in entries if e["kind"] == "status"][-1:]
    return list(dict.fromkeys(words))


def sync_run(run_dir: str | Path, uri: str | None = None, wait_s: float = 0.0, statuses: bool = True) -> SyncReport:
    """Send what run folder ``run_dir`` kept for its MLflow run(s) (``uri`` replaces the tracking
    URI the entries name); waits up to ``wait_s`` seconds for the server to answer. ``statuses``
    False leaves the run's status alone (the end of a run sets its own)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: expected a training run's folder "
                                "(train.storage/NAME, e.g. runs/my-run)")
    path = run_dir / tracking.OUTBOX_FILE
    if not path.is_file():
        return SyncReport("")
    entries = [e | ({"uri": uri} if uri else {}) for e in tracking.read_outbox(path)]
    report = SyncReport(str(path))
    deadline = time.monotonic() + wait_s
    while not all(tracking.server_answers(u) for u in {e["uri"] for e in entries}):
        if time.monotonic() >= deadline:
            report.waiting = describe(entries)
            return report
        time.sleep(1.0)
    try:
        for entry in entries:
            if entry["kind"] in ("metrics", "json", "text", "tags") and tracking.deliver(entry):
                report.sent += describe([entry])
        for entry in entries:
            if entry["kind"] == "missing":
                _rebuild(entry, entries, run_dir, report)
        ends = [e for e in entries if e["kind"] == "status"] if statuses else []
        last_status: dict[str, dict[str, Any]] = {e["run_id"]: e for e in ends}
        for entry in last_status.values():  # after the model: logging one reopens the run
            if tracking.deliver(entry):
                report.sent += describe([entry])
    except Exception:
        if all(tracking.server_answers(u) for u in {e["uri"] for e in entries}):
            raise
        report.waiting = describe(entries)  # away again: the next sync sends the rest, never twice
    return report


def _rebuild(entry: dict[str, Any], entries: list[dict[str, Any]], run_dir: Path, report: SyncReport) -> None:
    """Log a file the outbox could not keep, from what the run folder holds, unless the run has it."""
    from pipeline.checkpoint import latest_checkpoint, load_checkpoint, model_from_checkpoint

    uri, run_id, name = entry["uri"], entry["run_id"], entry["name"]
    if name == "model":
        if tracking.has_model(uri, run_id):
            return
        folder = latest_checkpoint(run_dir)
        if folder is None:
            report.lost.append(f"model (no complete checkpoint in {run_dir})")
            return
        state = load_checkpoint(folder)
        log_trained_model(uri, run_id, model_from_checkpoint(state), Config.from_dict(state["config"]),
                          state["dataset"])
        report.sent.append(f"model (from {folder.name})")
    elif name == CONFUSION_FIGURE:
        if tracking.has_artifact(uri, run_id, name):
            return
        kept = [e for e in entries if e["kind"] == "json" and e["name"] == CONFUSION_JSON and e["run_id"] == run_id]
        # The matrix is in the outbox, or on the server: it went out before the server left.
        data = kept[-1]["data"] if kept else tracking.read_json(uri, run_id, CONFUSION_JSON)
        if data is None:
            report.lost.append(name)
            return
        from pipeline.visualize import confusion_matrix_figure

        tracking.log_figure(uri, run_id, confusion_matrix_figure(np.array(data["matrix"]), data["class_names"]), name)
        report.sent.append(name)
    elif not tracking.has_artifact(uri, run_id, name):
        report.lost.append(name)  # an overlay image: `run.py predict` draws them again
