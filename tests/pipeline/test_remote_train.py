"""Training from shards in an S3-compatible store, with Ray Train's checkpoints going there too.

A real local S3-compatible server (moto's, on 127.0.0.1: ``s3_shards`` in tests/conftest.py)
holds a shard folder uploaded whole; ``run.py train`` runs in a subprocess, as a user runs it,
with the AWS_* variables pointing at that server: its own local Ray cluster's workers read the
shards and write the checkpoints through the same URLs, never through a path on this machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import run

ROOT = Path(__file__).resolve().parents[2]
NAME = "remote-tiny"

pytestmark = pytest.mark.slow  # a Ray Train run in a subprocess (its own local cluster)


def _args(data: str, storage: str, tracking: str, *extra: str) -> list[str]:
    return ["train", "--preset", "synthetic", "--data", data, "--storage", storage, "--name", NAME,
            "--workers", "1", "--epochs", "1",
            "--set", "data.crop_size=64x64", "--set", "data.batch_size=4", "--set", "data.eval_batch_size=2",
            "--set", "train.timeout_s=120", "--set", f"tracking.uri={tracking}", "--set", "tracking.overlays=1",
            *extra]


@pytest.fixture(scope="module")
def s3_run(s3_shards, tmp_path_factory: pytest.TempPathFactory):
    """``run.py train`` (1 worker, 1 epoch) from s3:// shards with train.storage on s3://."""
    work = tmp_path_factory.mktemp("remote-train")
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    storage = f"s3://{s3_shards.bucket}/runs"
    # The subprocess starts a Ray cluster of its own: nothing of this session's Ray (RAY_*) is passed on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | s3_shards.env | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), *_args(s3_shards.url, storage, tracking)],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"run.py train failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout, storage, tracking


def test_training_reads_s3_shards_and_checkpoints_to_s3(s3_run, s3_shards) -> None:
    import fsspec

    stdout, storage, tracking = s3_run
    fs = fsspec.filesystem("s3")
    run_prefix = f"{s3_shards.bucket}/runs/{NAME}"
    points = sorted(p.rsplit("/", 1)[0] for p in fs.glob(f"{run_prefix}/*/checkpoint.json"))
    assert len(points) == 1, fs.find(run_prefix)  # one epoch, one checkpoint, in the bucket
    record = json.loads(fs.cat_file(f"{points[0]}/checkpoint.json"))
    weights = fs.cat_file(f"{points[0]}/checkpoint.pt")
    assert record["epoch"] == 1 and record["bytes"] == len(weights)
    assert record["sha256"] == hashlib.sha256(weights).hexdigest()  # uploaded whole
    assert f"checkpoint: s3://{points[0]}" in stdout  # printed as a URL, not a path on this machine

    [tracked] = MlflowClient(tracking).search_runs(MlflowClient(tracking).search_experiments()[0].experiment_id)
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == NAME
    assert tracked.data.params["data.shards"] == s3_shards.url and tracked.data.params["train.storage"] == storage
    assert 0.0 <= tracked.data.metrics["val_miou"] <= 1.0 and tracked.data.metrics["epoch"] == 1


def test_a_remote_run_is_refused_again_and_its_resume_checks_its_records(s3_run, s3_shards, capsys) -> None:
    """The driver's checks read the bucket before Ray starts: the same name again is refused, and
    a resume that asks for no more epochs than the run's checkpoint records is refused."""
    _, storage, tracking = s3_run
    assert run.main(_args(s3_shards.url, storage, tracking)) == 2
    assert f"a run named {NAME!r} already exists under {storage}: pass --resume" in capsys.readouterr().err
    assert run.main([*_args(s3_shards.url, storage, tracking), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: run {NAME!r} has already trained 1 epoch(s) (checkpoint {storage}/{NAME}/" in err
    assert run.main([*_args(s3_shards.url, storage, tracking), "--name", "never-ran", "--resume"]) == 2  # last --name wins
    assert f"--resume: no run named 'never-ran' under {storage}" in capsys.readouterr().err


def test_a_search_keeps_its_settings_beside_tunes_state_in_the_bucket(s3_shards, tmp_path: Path) -> None:
    """``run.py tune --storage s3://...``: the search's settings (for --resume) are written to the
    bucket and read back from it, and a second search of the same name is refused (no search runs)."""
    from pipeline.config import build_config
    from pipeline.search_space import default_space
    from pipeline.tune import SearchSettings, _save, _saved_or_new

    storage = s3_shards.query_url(f"s3://{s3_shards.bucket}/searches")  # Ray's storage_path form, endpoint included
    cfg = build_config("synthetic", [f"data.shards={s3_shards.url}", f"train.storage={storage}",
                                     f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    settings = SearchSettings(name="remote-search", trials=2, scheduler="asha", search="optuna", max_concurrent=1,
                              workers_per_trial=1)
    space = default_space(cfg)
    with pytest.raises(FileNotFoundError, match=rf"--resume: no search named 'remote-search' under "
                                                rf"s3://{s3_shards.bucket}/searches$"):
        _saved_or_new(storage, cfg, settings, space, resume=True)
    checked, _, _ = _saved_or_new(storage, cfg, settings, space, resume=False)
    _save(storage, checked, settings, space)
    import fsspec

    saved = json.loads(fsspec.filesystem("s3").cat_file(f"{s3_shards.bucket}/searches/remote-search.search.json"))
    assert saved["settings"]["name"] == "remote-search" and saved["config"]["train"]["storage"] == storage
    with pytest.raises(FileExistsError, match=rf"a search named 'remote-search' already exists under "
                                              rf"s3://{s3_shards.bucket}/searches: pass --resume"):
        _saved_or_new(storage, cfg, settings, space, resume=False)
    # Its settings are there but Tune never saved a state: Tune's own check reads the bucket too.
    with pytest.raises(FileNotFoundError, match="--resume: no search named 'remote-search'"):
        _saved_or_new(storage, cfg, settings, space, resume=True)
