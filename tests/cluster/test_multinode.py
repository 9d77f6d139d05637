"""A real two-node Ray cluster with token authentication: joining it (or failing to, fast and
clearly), and distributed training on it with `run.py train --address` and `ray job submit`.

Each node has 1 CPU and each Ray Train worker asks for 1, so the two workers can only run on
two different nodes; the tests check that they did, through the state API, while training runs.
The cluster lives for this module (``two_node_cluster`` is module-scoped).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient


RUN_TIMEOUT_S = 600
CONNECT = ("import sys\nfrom pipeline.cluster import connect_ray\n"
           "try:\n    connect_ray(sys.argv[1])\n"
           "except ConnectionError as exc:\n    print('ConnectionError:', exc)\n    sys.exit(3)\n"
           "import ray\nprint('connected to', ray.get_runtime_context().gcs_address)\n")


def test_a_missing_token_fails_at_once_and_says_how_to_pass_it(two_node_cluster: Any, tiny_shards: Path,
                                                               tmp_path: Path) -> None:
    env = {k: v for k, v in two_node_cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    started = time.monotonic()
    done = subprocess.run(
        [two_node_cluster.python, "run.py", "train", "--preset", "synthetic", "--data", str(tiny_shards),
         "--address", two_node_cluster.address, "--storage", str(tmp_path / "runs"),
         "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--name", "no-token"],
        cwd=two_node_cluster.repo, env=env, capture_output=True, text=True, timeout=180)
    took = time.monotonic() - started
    print(f"run.py train without the token: {took:.1f} s")
    assert done.returncode == 2, done.stdout + done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("run.py train: error: the Ray cluster at")
    assert "requires an authentication token" in error and "RAY_AUTH_MODE is unset" in error
    assert "token authentication by default" in error
    assert "export RAY_AUTH_MODE=token" in error and "RAY_AUTH_TOKEN" in error and "~/.ray/auth_token" in error
    assert not (tmp_path / "runs" / "no-token").exists()


def test_a_wrong_token_is_refused_at_once(two_node_cluster: Any, tmp_path: Path) -> None:
    env = two_node_cluster.env | {"RAY_AUTH_TOKEN": "not-the-token", "HOME": str(tmp_path)}
    started = time.monotonic()
    done = subprocess.run([two_node_cluster.python, "-c", CONNECT, two_node_cluster.address], cwd=two_node_cluster.repo,
                          env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 3, done.stdout + done.stderr[-3000:]
    assert "refused the authentication token from $RAY_AUTH_TOKEN" in done.stdout



def _train_args(shards: Path, tmp_path: Path, name: str, address: str | None) -> list[str]:
    """`run.py train` on the tiny shards: 2 workers, 2 epochs, everything under ``tmp_path`` (absolute)."""
    return [
        "run.py", "train", "--preset", "synthetic", "--data", str(shards),
        *(["--address", address] if address else []),
        "--workers", "2", "--epochs", "2", "--storage", str(tmp_path / "runs"),
        "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "--set", "data.crop_size=64x64", "--set", "data.batch_size=4", "--set", "data.eval_batch_size=2",
        "--set", "train.timeout_s=120", "--set", "tracking.overlays=0", "--name", name,
    ]


def _run_watching_workers(cluster: Any, argv: list[str], log: Path) -> tuple[int, list[dict], float]:
    """Run ``argv`` (cwd: the repository, the cluster's env) to its end while polling the state
    API for the alive Ray Train workers; returns its exit code, the first full set of workers
    seen (2 of them) and the wall time."""
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=cluster.repo, env=cluster.env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[dict] = []
    try:
        while proc.poll() is None and time.monotonic() - started < RUN_TIMEOUT_S:
            if not seen:
                try:
                    workers = cluster.list_train_workers()
                except (OSError, ValueError, RuntimeError, KeyError):
                    workers = []
                if len(workers) == 2 and all(w.get("node_id") and w.get("pid") for w in workers):
                    # While they live: which node's process tree holds each worker's pid.
                    trees = {cluster.node_id(n): {pid for pid, _ in cluster.node_processes(n)}
                             for n in (cluster.head, *cluster.workers) if n.poll() is None}
                    seen = [w | {"pid_on_node": [n for n, pids in trees.items() if int(w["pid"]) in pids]}
                            for w in workers]
            time.sleep(0.5)
        code = proc.wait(timeout=max(1.0, RUN_TIMEOUT_S - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{shlex.join(argv[:3])} ... still running after {RUN_TIMEOUT_S} s:\n{cluster.tail(log, 60)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: run.py and what it started
            proc.wait()
    return code, seen, time.monotonic() - started


def _assert_on_two_nodes(cluster: Any, workers: list[dict]) -> None:
    assert len(workers) == 2, f"never saw two alive RayTrainWorker actors (last seen: {workers!r})"
    nodes = {w["node_id"] for w in workers}
    assert len(nodes) == 2, f"both Ray Train workers ran on one node: {workers!r}"
    # ... namely the head and the worker node, each worker a process below its own node's raylet.
    assert nodes == {cluster.node_id(cluster.head), cluster.node_id(cluster.worker)}
    for w in workers:
        assert w["pid_on_node"] == [w["node_id"]], f"worker pid {w['pid']} is not a process of node {w['node_id']}"


def _finished_run(tmp_path: Path, name: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name!r}, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_miou")
    assert sorted(m.step for m in history) == [1, 2]
    return run


def test_ray_job_submit_trains_on_the_cluster(two_node_cluster: Any, tiny_shards: Path,
                                              tmp_path: Path) -> None:
    """The job's working directory is an upload of the repository: .gitignore'd paths (.venv:
    gigabytes) stay out of it, and ``python`` is whatever PATH gives on the head node."""
    job_id = f"dfdam-test-{int(time.time())}"
    entrypoint = " && ".join([
        "test ! -e .venv",  # .gitignore'd, so not uploaded
        "test -f run.py",
        "python -c 'import sys; print(\"job python:\", sys.executable)'",
        shlex.join(["python", *_train_args(tiny_shards, tmp_path, "job", None)]),  # RAY_ADDRESS is set by Ray
    ])
    argv = [two_node_cluster.ray_cli, "job", "submit", "--address", two_node_cluster.dashboard, "--submission-id", job_id,
            "--working-dir", str(two_node_cluster.repo), "--", "sh", "-c", entrypoint]  # the CLI quotes each word
    log = tmp_path / "job.log"
    try:
        code, workers, took = _run_watching_workers(two_node_cluster, argv, log)
    except BaseException:  # timed out or interrupted: the job outlives `ray job submit`
        subprocess.run([two_node_cluster.ray_cli, "job", "stop", "--address", two_node_cluster.dashboard, job_id],
                       env=two_node_cluster.env, capture_output=True, timeout=120)
        raise
    print(f"ray job submit on two nodes: {took:.1f} s")
    output = log.read_text(errors="replace")
    assert code == 0, two_node_cluster.tail(log, 60)
    assert f"job python: {two_node_cluster.python}" in output
    status = subprocess.run([two_node_cluster.ray_cli, "job", "status", "--address", two_node_cluster.dashboard, job_id],
                            env=two_node_cluster.env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "succeeded" in status.stdout.lower(), status.stdout + status.stderr
    assert two_node_cluster.job_status(job_id) == "SUCCEEDED"
    _assert_on_two_nodes(two_node_cluster, workers)
    _finished_run(tmp_path, "job")
