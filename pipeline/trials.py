"""A search's trials after the fact: one row per trial, their MLflow runs set straight, the report.

Tune's view of a trial decides its outcome (finished, stopped early by the scheduler, or
error); a trial's MLflow run that says otherwise (Tune may stop a trial right after its last
report, while it closes its own run) is corrected here, so no run stays RUNNING forever.
The search's table, figure and totals go to the parent run and to the console; a search
with a grid also gets its ablation table (``pipeline/ablation.py``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from sharding.text import format_table

METRIC, MODE = "val_miou", "max"  # what a search maximises: the validation mIoU every epoch reports


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, float | str]  # sampled values as numbers, grid values as their text
    epochs: int
    val_miou: float
    best_val_miou: float
    status: str  # finished | stopped early | error
    run_id: str | None


@dataclass(frozen=True)
class SearchResult:
    name: str
    names: list[str]  # the searched parameters
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    registered: dict[str, Any] | None
    wall_s: float
    grid_epochs: int
    grid: list[str] = dataclasses.field(default_factory=list)  # the parameters given as a grid
    ablation: str = ""  # the grid's table beside the paper's (pipeline/ablation.py), if a grid

    @property
    def stopped_early(self) -> int:
        return sum(r.status == "stopped early" for r in self.rows)

    @property
    def trial_epochs(self) -> int:
        return sum(r.epochs for r in self.rows)


def close_running_children(uri: str, experiment: str, parent_run_id: str) -> None:
    """After an interrupted search: every trial run still RUNNING is KILLED."""
    for child in tracking.child_runs(uri, experiment, parent_run_id):
        if child.status == "RUNNING":
            tracking.end_run(uri, child.run_id, "KILLED")


def collect_rows(results, max_epochs: int, uri: str, experiment: str, parent_run_id: str,
                 names: list[str]) -> list[TrialRow]:
    """One row per trial of Tune's ``ResultGrid``, best first; each trial's run closed as Tune saw it."""
    children = {c.tags.get("dfdam.trial_id"): c for c in tracking.child_runs(uri, experiment, parent_run_id)}
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        epochs = int(metrics.get("training_iteration", 0))
        child = children.get(trial_id)
        if result.error is not None:
            status = "error"
        elif epochs >= max_epochs:
            status = "finished"
        else:
            status = "stopped early"
        expected = {"finished": "FINISHED", "error": "FAILED"}.get(status, "KILLED")
        if child is not None and child.status != expected:
            tracking.set_tags(uri, child.run_id, {"dfdam.status": status.replace(" ", "_")})
            tracking.end_run(uri, child.run_id, expected)
        rows.append(TrialRow(
            trial_id=trial_id,
            params={n: _param(result.config[n]) for n in names if n in (result.config or {})},
            epochs=epochs,
            val_miou=float(metrics.get(METRIC, float("nan"))),
            best_val_miou=float(metrics.get("best_val_miou", float("nan"))),
            status=status,
            run_id=child.run_id if child is not None else None,
        ))
    rows.sort(key=lambda r: -r.best_val_miou if not math.isnan(r.best_val_miou) else math.inf)
    return rows


def _param(value: Any) -> float | str:
    """A trial's value of a parameter: a grid's text as it is, a sampled number as a float."""
    return value if isinstance(value, str) else float(value)


def _cell(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4g}"


def trials_table(rows: list[TrialRow], names: list[str]) -> str:
    header = ["trial", *names, "epochs", "val mIoU", "best mIoU", "status"]
    body = [[r.trial_id, *(_cell(r.params.get(n, float("nan"))) for n in names), str(r.epochs),
             f"{r.val_miou:.4f}", f"{r.best_val_miou:.4f}", r.status] for r in rows]
    return format_table(header, body, align="l" * len(header))


def log_search(result: SearchResult) -> None:
    """The parent run's artifacts: the trials as text, JSON and a figure; the search's totals."""
    from pipeline.visualize import search_figure

    names = result.names
    uri, run_id = result.tracking_uri, result.parent_run_id
    tracking.log_text(uri, run_id, trials_table(result.rows, names), "search/trials.txt")
    tracking.log_json(uri, run_id, [dataclasses.asdict(r) for r in result.rows], "search/trials.json")
    numeric = [n for n in names if all(not isinstance(r.params.get(n), str) for r in result.rows)]
    if numeric:  # a grid's values (variants, backbones) are in the ablation table instead
        tracking.log_figure(uri, run_id,
                            search_figure([(r.params, r.best_val_miou, r.status) for r in result.rows], numeric),
                            "search/miou_vs_params.png")
    if result.ablation:
        tracking.log_text(uri, run_id, result.ablation, "search/ablation.txt")
    tracking.log_metrics(uri, run_id, {
        "trials": len(result.rows), "trials_stopped_early": result.stopped_early, "trial_epochs": result.trial_epochs,
        "grid_epochs": result.grid_epochs, "wall_s": result.wall_s,
        "best_val_miou": max((r.best_val_miou for r in result.rows if not math.isnan(r.best_val_miou)), default=float("nan")),
    }, step=0)
    if result.registered:
        tracking.log_json(uri, run_id, result.registered, "search/registered.json")


def print_result(result: SearchResult) -> None:
    print(f"\nsearch {result.name}: {len(result.rows)} trials, {result.stopped_early} stopped early by the "
          f"scheduler, {result.trial_epochs} trial-epochs run of {result.grid_epochs} for every trial run to the end, "
          f"{result.wall_s:.0f} s\n")
    print(trials_table(result.rows, result.names))
    if result.ablation:
        print(f"\nablation over {', '.join(result.grid)} (the paper's section 4.2, Tables 1-2):\n")
        print(result.ablation)
    if result.grid and not result.registered:
        print("\nregistered nothing: a search with a grid is a comparison, not a candidate for the champion "
              "(pass --register-as NAME to register its best model)")
    if result.registered:
        reg = result.registered
        verdict = f"now {reg['alias']}" if reg["champion"] else f"{reg['alias']} unchanged (it scores at least as high)"
        print(f"\nregistered {reg['model']} version {reg['version']} (trial {reg['trial_id']}, val mIoU "
              f"{reg['val_miou']:.4f}): {verdict}")
        print(f"  load it: models:/{reg['model']}@{reg['alias']}")
    print(f"  MLflow parent run: {result.parent_run_id} in {result.tracking_uri}")
