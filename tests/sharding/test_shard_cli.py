"""`run.py make-synthetic` and `run.py shard [pack|verify]` from the command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import run
from sharding.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True)


def _help(command: str) -> str:
    sub = next(a for a in run.build_parser()._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_help_explains_both_commands() -> None:
    text = _help("make-synthetic")
    for word in ("--layout", "--out", "--seed", "leftImg8bit", "SegmentationClass", "GTcls.Segmentation",
                 "dfdam_synthetic.json"):
        assert word in text, word
    text = _help("shard")
    for word in ("{pack,verify}", "--dataset", "--root", "--out", "--split", "--shard-size", "--workers",
                 "--partial", "--strict", "train_aug", "manifest.parquet", "rejects.jsonl", "resumes"):
        assert word in text, word


def test_make_synthetic_shard_and_verify(tmp_path: Path) -> None:
    data, shards = tmp_path / "data", tmp_path / "shards"
    made = _run("make-synthetic", "--layout", "cityscapes", "--out", str(data), "--train", "4", "--val", "2",
                "--test", "2", "--size", "32x64")
    assert made.returncode == 0, made.stderr
    assert "train 4, val 2, test 2 images" in made.stdout
    packed = _run("shard", "--dataset", "cityscapes", "--root", str(data), "--out", str(shards), "--split", "train",
                  "val", "--shard-size", "3", "--workers", "2", "--no-progress")
    assert packed.returncode == 0, packed.stderr
    lines = packed.stdout.splitlines()
    assert lines[0].split() == ["split", "samples", "shards", "reused", "MB", "out", "seconds", "img/s", "MB/s",
                                "in", "rejects"]
    assert lines[2].split()[:4] == ["train", "4", "2", "0"] and lines[3].split()[:4] == ["val", "2", "1", "0"]
    assert read_manifest(shards, "train").num_samples == 4
    verified = _run("shard", "verify", "--out", str(shards), "--no-progress")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "train: 4 samples in 2 shards verified: ok" in verified.stdout
    shard = shards / "train-000000.tar"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[1000] ^= 0x55
    shard.write_bytes(bytes(data_bytes))
    broken = _run("shard", "verify", "--out", str(shards), "--split", "train", "--no-progress")
    assert broken.returncode == 1
    assert "train-000000.tar: sha256 differs from the manifest" in broken.stdout


def test_voc_shard_reports_rejects(tmp_path: Path) -> None:
    data, shards = tmp_path / "voc", tmp_path / "shards"
    assert _run("make-synthetic", "--layout", "voc", "--out", str(data), "--train", "4", "--val", "2",
                "--min-size", "24", "--max-size", "32").returncode == 0
    val_id = (data / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split()[0]
    (data / "VOCdevkit/VOC2012/SegmentationClass" / f"{val_id}.png").unlink()
    packed = _run("shard", "--dataset", "voc", "--root", str(data), "--out", str(shards), "--split", "val",
                  "--workers", "1", "--no-progress")
    assert packed.returncode == 0, packed.stderr
    assert f"val: 1 rejected, listed in {shards / 'val.rejects.jsonl'}" in packed.stdout
    assert f"{val_id}.jpg: image without its label: expected" in packed.stdout
    assert json.loads((shards / "val.rejects.jsonl").read_text())["key"] == val_id
    strict = _run("shard", "--dataset", "voc", "--root", str(data), "--out", str(shards), "--split", "val",
                  "--strict", "--no-progress")
    assert strict.returncode == 2
    assert "image without its label" in strict.stderr and "--strict" in strict.stderr


@pytest.mark.parametrize("args, message", [
    (["shard", "--out", "x"], "pack needs --dataset and --root"),
    (["shard", "--dataset", "voc", "--root", "/nonexistent/voc", "--out", "x"], "/nonexistent/voc is not a folder"),
    (["shard", "verify", "--out", "/nonexistent/shards"], "shard folder /nonexistent/shards does not exist"),
    (["shard", "--dataset", "voc", "--root", ".", "--out", "x", "--shard-size", "0"],
     "--shard-size and --workers must be at least 1"),
    (["make-synthetic", "--layout", "voc", "--out", "/nonexistent/v", "--train", "3"],
     "need at least 4 train_aug and 2 val images"),
])
def test_clear_errors(args: list[str], message: str) -> None:
    result = _run(*args)
    assert result.returncode in (1, 2)
    assert message in result.stderr + result.stdout


def test_sharding_imports_no_torch_ray_or_mlflow() -> None:
    code = ("import sys, run, sharding, sharding.write, sharding.verify, sharding.synthetic; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
