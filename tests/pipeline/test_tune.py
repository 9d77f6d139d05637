"""Ray Tune over Ray Train: search space, trials in MLflow, registry alias, resume."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import run
from pipeline.search_space import default_space
from pipeline.trials import SearchResult
from pipeline.tune import SearchSettings, search

ROOT = Path(__file__).resolve().parents[2]


def _finished_trials(db: Path) -> int:
    """Trials whose run is tagged finished, read with plain sqlite3 (read-only: an MLflow client
    here would race the search process's own creation of the database)."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM tags WHERE key = 'dfdam.status' AND value = 'finished'").fetchone()[0]
    except sqlite3.Error:
        return 0


@dataclass(frozen=True)
class Interrupted:
    """What the shared search went through: ``run.py tune``'s exit code and output after Ctrl+C,
    the trials finished by then, the first finished trial's id, and the resumed search's result."""

    returncode: int
    output: str
    finished_at_interrupt: int
    first_trial: str | None
    resumed: SearchResult
    db: Path


@pytest.fixture(scope="module")
def interrupted_search(ray_cluster, tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """One search of 2 one-epoch trials that the tests below share (a trial costs a trial driver,
    Ray Train's controller and a worker group, far more than its epoch): ``run.py tune`` in a
    subprocess runs one trial at a time, the paper's point first, and gets Ctrl+C once that
    trial has finished; the search is then resumed in this process, runs the other trial (an
    Optuna draw) and registers the champion. The tests assert; this only records."""
    from tests.conftest import _tiny_config

    tmp_path = tmp_path_factory.mktemp("search")
    db = tmp_path / "mlflow.db"
    argv = [sys.executable, str(ROOT / "run.py"), "tune", "--preset", "synthetic", "--data", str(tiny_shards),
            "--trials", "2", "--max-concurrent", "1", "--workers-per-trial", "1", "--epochs", "1", "--name", "cut",
            "--storage", str(tmp_path / "runs"), "--set", "data.crop_size=64x64", "--set", "data.batch_size=4",
            "--set", "data.eval_batch_size=2", "--set", f"tracking.uri=sqlite:///{db}", "--set", "tracking.overlays=0",
            # The test's own cluster, where the search is resumed: a second Ray instance on the machine
            # would leave Ray Train's placement-group cleaner unable to find its cluster (it looks the
            # cluster up by scanning the machine), so stopped trials' CPUs would never come back.
            "--address", ray_cluster.get_runtime_context().gcs_address]
    # The test's cluster listens on 127.0.0.1 alone (pipeline.cluster.start_local_cluster); a process
    # joining it must not let Ray rewrite 127.0.0.1 to the host's outward address, so it runs the same way.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {
        "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    deadline = time.monotonic() + 300
    while _finished_trials(db) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    if proc.poll() is not None:
        pytest.fail(f"the search ended before it could be interrupted:\n{proc.communicate()[0][-3000:]}")
    finished = _finished_trials(db)
    proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves its state and stops
    output, _ = proc.communicate(timeout=180)

    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("dfdam-synthetic")
    done = client.search_runs([experiment.experiment_id], filter_string="tags.`dfdam.status` = 'finished'")
    first_trial = done[0].data.tags["dfdam.trial_id"] if done else None

    cfg = _tiny_config(tiny_shards, tmp_path, "tracking.overlays=0")
    resumed = search(cfg, SearchSettings(name="cut", trials=0, scheduler="asha", search="optuna", max_concurrent=1,
                                         workers_per_trial=1), {}, resume=True)
    return Interrupted(proc.returncode, output, finished, first_trial, resumed, db)


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(interrupted_search: Interrupted) -> None:
    cut = interrupted_search
    assert cut.finished_at_interrupt == 1, "no trial finished in time"
    assert cut.returncode == 130, cut.output[-3000:]
    assert "--resume --name cut" in cut.output

    assert len(cut.resumed.rows) == 2 and {r.status for r in cut.resumed.rows} == {"finished"}
    assert cut.first_trial in {r.trial_id for r in cut.resumed.rows}
    # The finished trial was not run again: its run still holds one epoch of metrics.
    client = MlflowClient(f"sqlite:///{cut.db}")
    experiment = client.get_experiment_by_name("dfdam-synthetic")
    trial_runs = client.search_runs([experiment.experiment_id],
                                    filter_string=f"tags.`dfdam.trial_id` = '{cut.first_trial}'")
    assert len(trial_runs) == 1
    assert len(client.get_metric_history(trial_runs[0].info.run_id, "val_miou")) == 1


def test_search_registers_a_champion_that_loads_and_predicts(interrupted_search: Interrupted, tiny_shards: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The shared search, once resumed, ends as any search does: one parent run and one child run
    per trial in MLflow, its report, and the best trial's model registered as the champion."""
    result = interrupted_search.resumed

    assert len(result.rows) == 2 and all(r.status == "finished" and r.epochs == 1 for r in result.rows)
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials"] == 2
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["dfdam.trial_id"] for c in children} == {r.trial_id for r in result.rows}
    # The first trial is the paper's point; the other differs.
    lambdas = sorted((float(c.data.params["loss.lambda_c"]), float(c.data.params["loss.lambda_s"])) for c in children)
    assert (0.4, 0.1) in lambdas and len(set(lambdas)) == 2
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "search")} >= {
        "search/trials.txt", "search/miou_vs_params.png"}

    registered = result.registered
    assert registered is not None and registered["champion"] is True and registered["model"] == "dfdam-synthetic"
    champion = client.get_model_version_by_alias("dfdam-synthetic", "champion")
    assert str(champion.version) == registered["version"]
    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pytorch.load_model("models:/dfdam-synthetic@champion")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 128)).shape == (1, 19, 64, 128)

    capsys.readouterr()  # drop what the search printed
    code = run.main(["evaluate", "--model", "models:/dfdam-synthetic@champion", "--data", str(tiny_shards),
                     "--tracking-uri", result.tracking_uri, "--format", "json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["miou"] == pytest.approx(registered["val_miou"], abs=1e-3)


def test_impossible_resources_are_refused_before_anything_starts(ray_cluster, tiny_config, tiny_shards: Path,
                                                                 tmp_path: Path) -> None:
    from pipeline.cluster import ResourceError

    cfg = tiny_config(tiny_shards, tmp_path)
    settings = SearchSettings(name="too-big", trials=2, scheduler="asha", search="optuna", max_concurrent=3,
                              workers_per_trial=1)
    with pytest.raises(ResourceError, match="3 concurrent trials"):
        search(cfg, settings, default_space(cfg))
    assert not (tmp_path / "runs" / "too-big").exists()
