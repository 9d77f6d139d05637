"""Faults on a real two-node Ray cluster, each injected by the test: a training worker killed,
a node lost, the driver killed, a Tune trial's worker killed.

What must hold after each: the run continues from its latest complete checkpoint (or fails with
one clear line when it may not), its MLflow run is one run holding exactly one ``val_miou`` per
epoch, and its status says how it ended. Every recovery is timed and printed (``pytest -s``).

Starting a run (the driver, then Ray Train's worker group) costs far more here than an epoch of
the tiny shards, so the faults a run survives are injected into one run, an epoch apart: a
worker killed during epoch 2, the worker node lost during epoch 3, the driver killed during
epoch 4 and the run resumed. A run that must fail (no restart left) is a run of its own.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import check_complete, latest_checkpoint

RUN_TIMEOUT_S = 600
EPOCHS = 3


def _train(cluster: Any, shards: Path, tmp_path: Path, name: str, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return [cluster.python, "run.py", "train", "--preset", "synthetic", "--data", str(shards),
            "--address", cluster.address, "--workers", "2", "--epochs", str(epochs),
            "--storage", str(tmp_path / "runs"), "--name", name,
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "data.crop_size=64x64",
            "--set", "data.batch_size=4", "--set", "data.eval_batch_size=2", "--set", "train.timeout_s=60",
            "--set", "tracking.overlays=0", *extra]


def _start(cluster: Any, argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, cwd=cluster.repo, env=cluster.env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _epochs_logged(db: Path) -> list[int]:
    """The steps of every ``val_miou`` in the store, read-only with sqlite3 (an MLflow client here
    would race the run's own creation of the database)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return sorted(r[0] for r in con.execute("SELECT step FROM metrics WHERE key = 'val_miou'"))
    except sqlite3.Error:
        return []


def _wait(proc: subprocess.Popen, log: Path, cluster: Any, until, what: str, timeout_s: float = RUN_TIMEOUT_S) -> float:
    """Poll until ``until()`` is true; fail if ``proc`` ends first. Returns the seconds waited."""
    started = time.monotonic()
    while not until():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{cluster.tail(log, 60)}")
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"no {what} after {timeout_s:.0f} s:\n{cluster.tail(log, 60)}")
        time.sleep(0.2)
    return time.monotonic() - started


def _run_until_first_epoch(cluster: Any, shards: Path, tmp_path: Path, name: str, *extra: str,
                           epochs: int = EPOCHS) -> tuple[subprocess.Popen, list[str], Path, Path]:
    """Start ``run.py train`` on the cluster (log and MLflow store in ``tmp_path``) and wait until
    its first epoch is logged; returns the process, its argv, the log and the MLflow database."""
    log, db = tmp_path / "train.log", tmp_path / "mlflow.db"
    argv = _train(cluster, shards, tmp_path, name, *extra, epochs=epochs)
    proc = _start(cluster, argv, log)
    _wait(proc, log, cluster, lambda: len(_epochs_logged(db)) >= 1, "first epoch")
    return proc, argv, log, db


def _until_epoch(proc: subprocess.Popen, log: Path, db: Path, cluster: Any, epoch: int) -> float:
    return _wait(proc, log, cluster, lambda: len(_epochs_logged(db)) >= epoch, f"epoch {epoch}")


def _finish(proc: subprocess.Popen, log: Path, cluster: Any) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end within {RUN_TIMEOUT_S} s:\n{cluster.tail(log, 60)}")


def _one_run(tmp_path: Path, name: str, status: str, epochs: int = EPOCHS):
    """The run's MLflow record: exactly one run, ``status``, one ``val_miou`` per epoch 1..epochs."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name!r}, found {len(runs)}"
    run = runs[0]
    assert run.info.status == status
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_miou"))
    assert steps == list(range(1, epochs + 1)), f"val_miou steps {steps}: one value per epoch expected"
    return run


def _replace_lost_node(cluster: Any) -> None:
    """Once Ray has marked the lost node dead (its heartbeats stop for ~15 s), start another."""
    cluster.wait_for_nodes(1)
    cluster.add_worker_node()


def _checkpoints_complete(run_dir: Path) -> list[Path]:
    """Every epoch folder Ray Train kept is complete (file and record agree)."""
    folders = sorted(p for p in run_dir.glob("epoch_*") if p.is_dir())
    for folder in folders:
        check_complete(folder)
    return folders


def test_one_run_survives_a_killed_worker_a_lost_node_and_a_killed_driver(two_node_cluster: Any, tiny_shards: Path,
                                                                            tmp_path: Path) -> None:
    """Three faults an epoch apart in one 4-epoch run (3 restarts allowed: 2 used, 1 to spare)."""
    cluster, epochs = two_node_cluster, 4
    proc, argv, log, db = _run_until_first_epoch(cluster, tiny_shards, tmp_path, "faults", "--max-failures", "3",
                                                 epochs=epochs)

    # 1. A training worker killed (epoch 2): Ray Train replaces the worker group.
    workers = cluster.list_train_workers()
    # `run.py train --address ... --workers 2`: one worker on each node (1 CPU each), by the state API.
    assert len(workers) == 2 and {w["node_id"] for w in workers} == {cluster.node_id(cluster.head),
                                                                     cluster.node_id(cluster.worker)}, workers
    victim = int(workers[0]["pid"])
    os.kill(victim, signal.SIGKILL)  # mid-run: epoch 2's training, evaluation or checkpoint

    def replaced() -> bool:
        pids = {int(w["pid"]) for w in cluster.list_train_workers()}
        return len(pids) == 2 and victim not in pids

    back = _wait(proc, log, cluster, replaced, "replacement worker group")
    print(f"\nworker SIGKILL: a new worker group after {back:.1f} s")

    # 2. The worker node lost (epoch 3): the run waits for resources, then restores.
    _until_epoch(proc, log, db, cluster, 2)
    lost_at = time.monotonic()
    cluster.kill_node(cluster.worker)
    _replace_lost_node(cluster)  # a replacement node joins, as an autoscaler would bring one
    joined = time.monotonic() - lost_at
    _until_epoch(proc, log, db, cluster, 3)
    print(f"node lost: Ray marked it dead and a new node joined after {joined:.1f} s; epoch 3 logged "
          f"{time.monotonic() - lost_at:.1f} s after the loss")

    # 3. The driver killed (epoch 4): `--resume` continues into the same MLflow run.
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: Ray ends the job's workers itself
    proc.wait()
    killed_at = time.monotonic()
    done_before = _epochs_logged(db)
    assert len(done_before) < epochs
    resumed = _start(cluster, [*argv, "--resume"], log)
    assert _finish(resumed, log, cluster) == 0, cluster.tail(log, 60)
    print(f"driver SIGKILL after epoch(s) {done_before}: `--resume` finished the run "
          f"{time.monotonic() - killed_at:.1f} s later")
    assert "resuming from the checkpoint of epoch" in log.read_text(errors="replace")

    # One MLflow run, FINISHED, one val_miou per epoch whatever was run twice; every checkpoint complete.
    _one_run(tmp_path, "faults", "FINISHED", epochs=epochs)
    assert len(_checkpoints_complete(tmp_path / "runs" / "faults")) >= 1


def test_a_lost_node_ends_the_run_clearly_when_no_restart_is_allowed(two_node_cluster: Any, tiny_shards: Path,
                                                                     tmp_path: Path) -> None:
    cluster = two_node_cluster
    proc, _, log, db = _run_until_first_epoch(cluster, tiny_shards, tmp_path, "lost-node", "--max-failures", "0")
    lost_at = time.monotonic()
    cluster.kill_node(cluster.worker)
    try:
        code = _finish(proc, log, cluster)
        print(f"\nnode lost, max_failures 0: the run ended {time.monotonic() - lost_at:.1f} s after the loss")
        output = log.read_text(errors="replace")
        assert code == 1, cluster.tail(log, 60)
        # One line of ours (Ray's own worker logs may be printed around it, in any order).
        errors = [line for line in output.splitlines() if line.startswith("run.py train: error:")]
        assert len(errors) == 1, output[-3000:]
        assert errors[0].startswith("run.py train: error: training run 'lost-node' failed after 0 restart(s) allowed")
        assert "latest complete checkpoint is" in errors[0] and "--resume --name lost-node" in errors[0]
        client = MlflowClient(f"sqlite:///{db}")
        run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
        assert run.info.status == "FAILED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")]
        assert len(steps) == len(set(steps)) >= 1
        folders = _checkpoints_complete(tmp_path / "runs" / "lost-node")  # never a half-written one kept
        assert latest_checkpoint(tmp_path / "runs" / "lost-node") == folders[-1]
    finally:
        _replace_lost_node(cluster)  # the next tests need two nodes again


def test_a_tune_trials_killed_worker_restores_and_the_search_registers_a_champion(
        two_node_cluster: Any, tiny_shards: Path, tmp_path: Path) -> None:
    cluster, log, db = two_node_cluster, tmp_path / "tune.log", tmp_path / "mlflow.db"
    argv = [cluster.python, "run.py", "tune", "--preset", "synthetic", "--data", str(tiny_shards),
            "--address", cluster.address, "--trials", "1", "--scheduler", "fifo", "--workers-per-trial", "2",
            "--epochs", "3", "--max-failures", "1", "--storage", str(tmp_path / "runs"), "--name", "search",
            "--register-as", "dfdam-faults", "--set", f"tracking.uri=sqlite:///{db}",
            "--set", "data.crop_size=64x64", "--set", "data.batch_size=4", "--set", "data.eval_batch_size=2",
            "--set", "train.timeout_s=60", "--set", "tracking.overlays=0"]
    proc = _start(cluster, argv, log)
    _wait(proc, log, cluster, lambda: len(_epochs_logged(db)) >= 1, "the trial's first epoch")
    victim = int(cluster.list_train_workers()[0]["pid"])
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    assert _finish(proc, log, cluster) == 0, cluster.tail(log, 60)
    print(f"\ntrial worker SIGKILL: the search finished {time.monotonic() - killed_at:.1f} s after the kill")
    assert "registered dfdam-faults version 1" in log.read_text(errors="replace")
    client = MlflowClient(f"sqlite:///{db}")
    champion = client.get_model_version_by_alias("dfdam-faults", "champion")
    trial_run = client.get_run(champion.run_id)
    assert trial_run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(champion.run_id, "val_miou"))
    assert steps == [1, 2, 3]
