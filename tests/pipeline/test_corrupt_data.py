"""Shards damaged after sharding, as the loaders meet them: training skips a sample that does not
decode (or the rest of a shard cut short) with a warning naming the shard and the key, counts it
(``data_skipped``) and stops past ``data.max_skipped``; evaluation never skips, it fails naming
the sample; a manifest that no longer matches its shards is refused before Ray starts."""
from __future__ import annotations

import dataclasses
import io
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from pipeline.checkpoint import build_model, save_checkpoint
from pipeline.config import ConfigError, DataConfig, build_config
from pipeline.data import DamagedSampleError, TooManySkipped, eval_loader, steps_per_epoch, train_loader
from pipeline.evaluate import EvaluationError, ShardJob, evaluate_model, evaluate_shard
from pipeline.loop import dataset_info
from sharding.manifest import read_manifest
from sharding.tarstream import tar_members
from tests.damage import copy_shards, damage_member, replace_with, truncate_inside

# One pass over 12 samples in 3 batches of 4, read in shard order (a shuffle buffer of 1), in this process.
CFG = DataConfig(crop_size=(64, 64), scales=(1.0,), batch_size=4, eval_batch_size=2, loader_workers=0,
                 shuffle_buffer=1, max_skipped=10)
SAMPLE_WARNING = re.compile(r"training skips shard (train-\d{6}\.tar), sample '(\w+)': (.+) \(\d+ skipped in epoch 1, "
                            r"data\.max_skipped = \d+\)$")


@pytest.fixture(scope="module")
def first_damaged(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """tiny_shards with the first sample's PNG image of every train shard damaged in place
    (4 shards of 3: each shard read gives a bad sample, then 2 good ones); {key: shard}."""
    folder = copy_shards(tiny_shards, tmp_path_factory.mktemp("first-damaged") / "shards")
    return folder, {damage_member(shard, 0, "png", "flip"): shard.name for shard in sorted(folder.glob("train-*.tar"))}


def _skip_warnings(caplog: pytest.LogCaptureFixture) -> list[re.Match]:
    found = [SAMPLE_WARNING.match(r.getMessage()) for r in caplog.records if r.name == "pipeline.data"]
    assert all(found), [r.getMessage() for r in caplog.records]
    return found


def test_training_skips_and_counts_each_damaged_sample(first_damaged, caplog: pytest.LogCaptureFixture) -> None:
    """Read in shard order, 12 good samples take 6 shard reads, each beginning with its damaged
    sample: exactly 6 skips, each warned about by shard and key, and the epoch still has its 3
    full batches of good samples; train_one_epoch reports the count as data_skipped."""
    from models import build_dfdam
    from pipeline.loop import train_one_epoch
    from pipeline.optim import PolySchedule, build_optimizer

    folder, damaged = first_damaged
    manifest = read_manifest(folder, "train")  # same sizes, same first keys: the cheap check passes
    cfg = build_config("synthetic", [f"data.shards={folder}", "data.crop_size=64x64", "data.batch_size=4",
                                     "data.shuffle_buffer=1", "data.loader_workers=0", "data.scales=1.0"])
    torch.manual_seed(0)
    model = build_dfdam(manifest.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    batches = train_loader(manifest, cfg.data, rank=0, world_size=1, epoch=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        stats = train_one_epoch(model, batches, optimizer, cfg, epoch=0, steps=3, schedule=PolySchedule(cfg.optim.lr, 3),
                                device=torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert stats["data_skipped"] == 6.0 and batches.skipped == 6
    warnings = _skip_warnings(caplog)
    assert len(warnings) == 6
    for match in warnings:
        assert damaged[match[2]] == match[1]  # the damaged sample, in its own shard
        assert match[3].startswith("png does not decode (")
    assert np.isfinite(stats["loss"])


def test_loader_processes_carry_their_skips_to_the_training_process(first_damaged,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    folder, damaged = first_damaged
    manifest = read_manifest(folder, "train")
    cfg = dataclasses.replace(CFG, loader_workers=2, shuffle_buffer=4)
    batches = train_loader(manifest, cfg, rank=0, world_size=1, epoch=0, seed=3)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        got = list(batches)
    assert len(got) == steps_per_epoch(manifest, cfg.batch_size) == 3
    assert all(images.shape == (4, 64, 64, 3) for images, _ in got)
    warnings = _skip_warnings(caplog)  # warned here, in the process that trains
    assert batches.skipped == len(warnings) >= 1
    assert {m[2] for m in warnings} <= set(damaged)


def test_past_max_skipped_training_stops_naming_the_threshold_and_the_last_samples(first_damaged) -> None:
    folder, damaged = first_damaged
    manifest = read_manifest(folder, "train")
    with pytest.raises(TooManySkipped) as raised:
        list(train_loader(manifest, dataclasses.replace(CFG, max_skipped=2), rank=0, world_size=1, epoch=0))
    message = str(raised.value)
    assert message.startswith("3 damaged samples skipped in epoch 1, more than data.max_skipped = 2; last: ")
    names = re.findall(r"shard (train-\d{6}\.tar), sample '(\w+)': png does not decode", message)
    assert len(names) == 3 and all(damaged[key] == shard for shard, key in names)  # shards drawn at random
    assert "`run.py shard verify --out SHARD_DIR`" in message


def test_max_skipped_is_checked(tiny_shards: Path) -> None:
    assert build_config("synthetic", ["data.max_skipped=0"]).data.max_skipped == 0
    with pytest.raises(ConfigError, match=r"data\.max_skipped must be >= 0"):
        build_config("synthetic", ["data.max_skipped=-1"])


def test_a_label_of_another_size_than_its_image_is_skipped(tiny_shards: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Every train shard's second sample gets a label PNG one column narrower than its image
    (the tar rewritten with the new member): a valid PNG, so only the size check tells."""
    folder = copy_shards(tiny_shards, tmp_path / "shards")
    keys = set()
    for shard in folder.glob("train-*.tar"):
        with shard.open("rb") as stream:
            members = list(tar_members(stream, shard.name))
        name, data = [m for m in members if m[0].endswith(".label.png")][1]
        keys.add(name.partition(".")[0])
        with Image.open(io.BytesIO(data)) as im:
            narrow = np.asarray(im)[:, 1:]
        buf = io.BytesIO()
        Image.fromarray(narrow).save(buf, format="PNG")
        with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
            for member_name, member_data in members:
                member_data = buf.getvalue() if member_name == name else member_data
                info = tarfile.TarInfo(member_name)
                info.size = len(member_data)
                tar.addfile(info, io.BytesIO(member_data))
    manifest = read_manifest(folder, "train", check_files=False)  # the sizes changed: the manifest refuses them
    batches = train_loader(manifest, CFG, rank=0, world_size=1, epoch=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert len(list(batches)) == 3
    warnings = _skip_warnings(caplog)
    # [good, bad, good] per shard read: the 12th good sample ends the 6th read, after its bad one
    assert batches.skipped == len(warnings) == 6
    for match in warnings:
        assert match[2] in keys and match[3] == "image (64, 128) and label (64, 127) differ in size"


def test_a_shard_cut_short_skips_the_samples_it_no_longer_holds(tiny_shards: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Every train shard cut inside its second sample's image: each read gives one good sample
    and a skip of the 2 samples after it; 12 good samples take 12 reads, so 11 skips of 2."""
    folder = copy_shards(tiny_shards, tmp_path / "shards")
    first = {truncate_inside(shard, 1, "png"): shard.name for shard in folder.glob("train-*.tar")}
    manifest = read_manifest(folder, "train", check_files=False)
    first = {read_manifest(tiny_shards, "train").table.column("key").to_pylist()[i]: name
             for i, name in zip(range(0, 12, 3), sorted(first.values()))}
    batches = train_loader(manifest, dataclasses.replace(CFG, max_skipped=100), rank=0, world_size=1, epoch=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data"):
        assert len(list(batches)) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "pipeline.data"]
    assert batches.skipped == 22 and len(messages) == 11
    for message in messages:
        match = re.match(r"training skips shard (train-\d{6}\.tar): truncated tar: member '\w+\.png' needs \d+ bytes, "
                         r"the shard ends after \d+ \(2 sample\(s\) after sample '(\w+)' not read\)", message)
        assert match and first[match[2]] == match[1], message


# ----------------------------------------------------------------------------- evaluation never skips


@pytest.fixture(scope="module")
def val_damaged(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """tiny_shards with the first val image damaged (an evaluation fails before any prediction);
    the folder and that key."""
    folder = copy_shards(tiny_shards, tmp_path_factory.mktemp("val-damaged") / "shards")
    return folder, damage_member(folder / "val-000000.tar", 0, "png", "header")


@pytest.fixture(scope="module")
def untrained(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DF-DAM-R18 saved as a training checkpoint for the tiny shards."""
    from tests.conftest import _tiny_config

    folder = tmp_path_factory.mktemp("untrained")
    torch.manual_seed(0)
    manifest = read_manifest(tiny_shards, "val")
    cfg = _tiny_config(tiny_shards, folder)
    model = build_model(cfg.model, manifest.num_classes, pretrained=False).eval()
    return save_checkpoint(folder / "epoch_0001", model=model, optimizer=None, scaler=None, epoch=0, step=0,
                           config=cfg, dataset=dataset_info(manifest), metrics={})


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_evaluation_fails_naming_the_damaged_sample(val_damaged, loader_workers: int) -> None:
    folder, key = val_damaged
    manifest = read_manifest(folder, "val")
    seen: list[str] = []
    with pytest.raises(DamagedSampleError) as raised:
        for _, _, keys in eval_loader(manifest, dataclasses.replace(CFG, eval_batch_size=1,
                                                                    loader_workers=loader_workers)):
            seen += keys
    assert str(raised.value).startswith(f"shard val-000000.tar, sample '{key}': png does not decode "
                                        "(UnidentifiedImageError: ")
    assert "evaluation reads every sample, so it stops here" in str(raised.value)
    assert seen == []


def test_evaluation_fails_on_a_shard_cut_short(tiny_shards: Path, tmp_path: Path) -> None:
    folder = copy_shards(tiny_shards, tmp_path / "shards")
    truncate_inside(folder / "val-000000.tar", 2, "label.png")
    keys = read_manifest(folder, "val", check_files=False).table.column("key").to_pylist()
    with pytest.raises(DamagedSampleError, match=rf"^shard val-000000\.tar: truncated tar: member '{keys[2]}\.label"
                                                 rf"\.png' needs .*\(1 sample\(s\) after sample '{keys[1]}' not read\)"):
        list(eval_loader(read_manifest(folder, "val", check_files=False), CFG))


def test_run_py_evaluate_fails_in_one_line_naming_the_sample(untrained: Path, val_damaged,
                                                             capsys: pytest.CaptureFixture) -> None:
    folder, key = val_damaged
    assert run.main(["evaluate", "--model", str(untrained), "--data", str(folder), "--no-log",
                     "--format", "json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"run.py evaluate: error: shard val-000000.tar, sample '{key}': png does not decode")
    # The same error from the function a Ray task runs for one shard:
    manifest = read_manifest(folder, "val")
    job = ShardJob(manifest.shards[0], CFG, build_config("synthetic").inference, manifest.num_classes,
                   manifest.ignore_index)
    model = build_model(build_config("synthetic").model, manifest.num_classes, pretrained=False).eval()
    with pytest.raises(EvaluationError, match=rf"^shard val-000000\.tar, sample '{key}'"):
        evaluate_shard(model, job, torch.device("cpu"))


def test_ray_workers_pass_the_evaluation_error_on_whole(ray_cluster, untrained: Path, val_damaged) -> None:
    folder, key = val_damaged
    with pytest.raises(EvaluationError) as raised:
        evaluate_model(str(untrained), folder, "val", log=False, workers=2)
    assert str(raised.value).startswith(f"shard val-000000.tar, sample '{key}': png does not decode")
    assert "Traceback" not in str(raised.value)


# ----------------------------------------------------------------------------- refused before Ray starts


@pytest.mark.parametrize("command", ["train", "tune", "evaluate"])
def test_a_shard_replaced_after_sharding_is_refused_before_ray_starts(command: str, tiny_shards: Path,
                                                                      untrained: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """Refused from the manifest alone: --address names a port nothing listens on, so had Ray been
    joined the error would be another; no MLflow store or run, no run folder is left."""
    folder = copy_shards(tiny_shards, tmp_path / "shards")
    shard = folder / "val-000001.tar"
    replace_with(shard, folder / "val-000000.tar")
    db, runs = tmp_path / "mlflow.db", tmp_path / "runs"
    nowhere = ["--address", "127.0.0.1:1"]
    if command == "evaluate":
        args = ["evaluate", "--model", str(untrained), "--data", str(folder), "--workers", "2",
                "--tracking-uri", f"sqlite:///{db}", *nowhere]
    else:
        args = [command, "--preset", "synthetic", "--data", str(folder), "--set", f"train.storage={runs}",
                "--set", f"tracking.uri=sqlite:///{db}", "--name", "refused", *nowhere]
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.match(rf"run\.py {command}: error: .*val\.manifest\.parquet: lists shard val-000001\.tar beginning "
                    r"with sample '\w+', but .*val-000001\.tar begins with '\w+' \(replaced by another shard\?\); "
                    r"`run\.py shard verify` checks every byte \(sha256\)", err), err
    assert not db.exists() and not runs.exists()
