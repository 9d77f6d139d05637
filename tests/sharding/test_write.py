"""Shard writing: tar contents, manifest truth, determinism, atomicity, resume, strictness, counts."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharding import cityscapes, voc
from sharding.manifest import read_manifest
from sharding.samples import DatasetError, SampleError
from sharding.verify import tar_samples, verify_shards
from sharding.write import plan_shards, shard_split

REPO = Path(__file__).resolve().parents[2]


def _tar_bytes(folder: Path, pattern: str = "*.tar") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_image_bytes_in_the_tar_equal_the_source_file(dataset: str, request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue(f"{dataset}_root")
    shards = request.getfixturevalue(f"{dataset}_shards")
    split = "train" if dataset == "cityscapes" else "train_aug"
    module = cityscapes if dataset == "cityscapes" else voc
    sources = {s.key: s for s in module.discover(root, split).samples}
    ext = "png" if dataset == "cityscapes" else "jpg"
    packed = {key: members for shard in sorted(shards.glob(f"{split}-*.tar")) for key, members in tar_samples(shard)}
    assert list(packed) == sorted(sources)  # every sample, in key order
    for key, members in packed.items():
        assert set(members) == {ext, "label.png", "json"}
        assert members[ext] == sources[key].image_path.read_bytes()
        label = Image.open(io.BytesIO(members["label.png"]))
        assert label.format == "PNG" and label.mode == "L"
        meta = json.loads(members["json"])
        assert meta == {"key": key, "dataset": dataset, "split": split, "height": label.height, "width": label.width,
                        "image": sources[key].image_path.relative_to(root).as_posix(),
                        "label": sources[key].label_path.relative_to(root).as_posix()}


@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_manifest_counts_and_checksums_match_the_tars(dataset: str, request: pytest.FixtureRequest) -> None:
    shards = request.getfixturevalue(f"{dataset}_shards")
    split = "train" if dataset == "cityscapes" else "train_aug"
    manifest = read_manifest(shards, split)
    num_classes = 19 if dataset == "cityscapes" else 21
    assert manifest.num_classes == num_classes and manifest.dataset == dataset
    assert [s.name for s in manifest.shard_infos] == sorted(p.name for p in shards.glob(f"{split}-*.tar"))
    rows = manifest.table.to_pylist()
    assert len(rows) == manifest.num_samples == sum(manifest.shard_counts)
    start = 0
    for info, path in zip(manifest.shard_infos, manifest.shards):
        data = Path(path).read_bytes()
        assert len(data) == info.bytes and hashlib.sha256(data).hexdigest() == info.sha256
        packed = list(tar_samples(Path(path)))
        assert len(packed) == info.samples
        for (key, members), row in zip(packed, rows[start:start + info.samples]):
            assert row["key"] == key and row["shard"] == info.name
            image, label = members[row["image_ext"]], members["label.png"]
            assert row["image_bytes"] == len(image) and row["image_sha256"] == hashlib.sha256(image).hexdigest()
            assert row["label_bytes"] == len(label) and row["label_sha256"] == hashlib.sha256(label).hexdigest()
            ids = np.asarray(Image.open(io.BytesIO(label)))
            assert (row["height"], row["width"]) == ids.shape
            assert row["class_pixels"] == [int((ids == c).sum()) for c in range(num_classes)]
            assert row["ignore_pixels"] == int((ids == 255).sum())
            assert sum(row["class_pixels"]) + row["ignore_pixels"] == ids.size
        start += info.samples
    assert all(c.ok for c in verify_shards(shards, show_progress=False))


def test_tars_are_what_webdataset_writes_and_reads(cityscapes_shards: Path) -> None:
    import webdataset as wds  # imports torch: only here, never in sharding/

    shard = cityscapes_shards / "train-000000.tar"
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
        for key, members in tar_samples(shard):
            writer.write({"__key__": key, **members})
    assert buf.getvalue() == shard.read_bytes()
    manifest = read_manifest(cityscapes_shards, "train")
    keys = [s["__key__"] for s in wds.WebDataset(manifest.shards, shardshuffle=False, nodesplitter=None)]
    assert keys == manifest.table.column("key").to_pylist()


def test_plan_cuts_sorted_samples_into_fixed_shards(cityscapes_root: Path, tmp_path: Path) -> None:
    samples = cityscapes.discover(cityscapes_root, "train").samples
    tasks = plan_shards(list(reversed(samples)), out_dir=tmp_path, dataset="cityscapes", split="train",
                        num_classes=19, shard_size=4, strict=False)
    assert [t.name for t in tasks] == ["train-000000.tar", "train-000001.tar"]
    assert [[s.key for s in t.samples] for t in tasks] == [[s.key for s in samples[:4]], [s.key for s in samples[4:]]]
    with pytest.raises(ValueError, match="shard size must be at least 1"):
        plan_shards(samples, out_dir=tmp_path, dataset="cityscapes", split="train", num_classes=19,
                    shard_size=0, strict=False)


def test_same_inputs_give_byte_identical_shards_with_any_worker_count(voc_root: Path, tmp_path: Path) -> None:
    one = shard_split("voc", voc_root, "train_aug", tmp_path / "one", shard_size=3, workers=1, show_progress=False)
    two = shard_split("voc", voc_root, "train_aug", tmp_path / "two", shard_size=3, workers=2, show_progress=False)
    assert one.shards == two.shards == 4 and one.samples == two.samples == 10
    first, second = _tar_bytes(tmp_path / "one"), _tar_bytes(tmp_path / "two")
    assert list(first) == [f"train_aug-{i:06d}.tar" for i in range(4)]
    assert first == second
    assert read_manifest(tmp_path / "one", "train_aug").table.equals(read_manifest(tmp_path / "two", "train_aug").table)


def test_rerun_reuses_verified_shards_and_rewrites_a_corrupt_one(cityscapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = shard_split("cityscapes", cityscapes_root, "train", out, shard_size=2, show_progress=False)
    reference = _tar_bytes(out)
    again = shard_split("cityscapes", cityscapes_root, "train", out, shard_size=2, show_progress=False)
    assert (first.shards_reused, again.shards_reused, again.shards) == (0, 3, 3)
    damaged = out / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes: same size, different content
    damaged.write_bytes(bytes(data))
    assert not verify_shards(out, show_progress=False)[0].ok
    repaired = shard_split("cityscapes", cityscapes_root, "train", out, shard_size=2, show_progress=False)
    assert repaired.shards_reused == 2
    assert _tar_bytes(out) == reference
    assert verify_shards(out, show_progress=False)[0].ok


def test_changed_plan_removes_stale_shards(cityscapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard_split("cityscapes", cityscapes_root, "train", out, shard_size=2, show_progress=False)
    report = shard_split("cityscapes", cityscapes_root, "train", out, shard_size=4, show_progress=False)
    assert report.shards == 2 and report.shards_reused == 0  # same names, different contents: rewritten
    assert sorted(p.name for p in out.glob("train-*")) == [
        "train-000000.index.json", "train-000000.tar", "train-000001.index.json", "train-000001.tar"]
    assert verify_shards(out, show_progress=False)[0].ok


_KILL_SCRIPT = """
import os, signal, sys
from sharding.write import shard_split
done = 0
def die(n):
    global done
    done += n
    if done >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
shard_split("cityscapes", sys.argv[1], "train", sys.argv[2], shard_size=2, workers=1, show_progress=False,
            on_progress=die)
"""


def test_a_killed_run_leaves_no_complete_looking_partial_and_resumes(cityscapes_root: Path, tmp_path: Path) -> None:
    reference_dir = tmp_path / "reference"
    shard_split("cityscapes", cityscapes_root, "train", reference_dir, shard_size=2, show_progress=False)
    reference = _tar_bytes(reference_dir)
    out = tmp_path / "out"
    # Killed with SIGKILL right after the 3rd sample: shard 0 done, shard 1 half written.
    killed = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(cityscapes_root), str(out), "3"], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "train.manifest.parquet").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == reference["train-000000.tar"]
    leftovers = list(out.glob(".train-000001.tar.*.tmp"))
    assert len(leftovers) == 1, "the half-written shard lives under a hidden temporary name only"
    resumed = shard_split("cityscapes", cityscapes_root, "train", out, shard_size=2, show_progress=False)
    assert resumed.shards_reused == 1 and resumed.shards == 3 and resumed.samples == 6
    assert _tar_bytes(out) == reference
    assert not list(out.glob(".*.tmp"))
    assert read_manifest(out, "train").table.equals(read_manifest(reference_dir, "train").table)


def _break_two_samples(root: Path) -> tuple[str, str]:
    samples = cityscapes.discover(root, "train").samples
    samples[2].image_path.write_bytes(samples[2].image_path.read_bytes()[:64])
    samples[5].label_path.unlink()
    return samples[2].key, samples[5].key


def test_strict_stops_at_the_first_bad_sample_and_leaves_nothing_half_written(
        cityscapes_copy: Path, tmp_path: Path) -> None:
    samples = cityscapes.discover(cityscapes_copy, "train").samples
    samples[2].image_path.write_bytes(samples[2].image_path.read_bytes()[:64])
    out = tmp_path / "out"
    with pytest.raises(SampleError, match=rf"{samples[2].key}_leftImg8bit.png: unreadable or truncated image"):
        shard_split("cityscapes", cityscapes_copy, "train", out, shard_size=2, strict=True, show_progress=False)
    assert not (out / "train.manifest.parquet").exists()
    assert not list(out.glob(".*.tmp"))
    for shard in out.glob("*.tar"):  # whatever is there is whole (and was finished before the bad sample)
        assert len(list(tar_samples(shard))) == 2
    assert not (out / "train-000001.tar").exists()


def test_strict_rejects_a_missing_label_before_writing(cityscapes_copy: Path, tmp_path: Path) -> None:
    _, missing = _break_two_samples(cityscapes_copy)
    with pytest.raises(SampleError, match=rf"{missing}_leftImg8bit.png: image without its label: expected"):
        shard_split("cityscapes", cityscapes_copy, "train", tmp_path / "out", strict=True, partial=True,
                    show_progress=False)
    assert not (tmp_path / "out").exists()


def test_rejects_without_strict(cityscapes_copy: Path, tmp_path: Path) -> None:
    truncated, missing = _break_two_samples(cityscapes_copy)
    out = tmp_path / "out"
    report = shard_split("cityscapes", cityscapes_copy, "train", out, shard_size=2, show_progress=False)
    assert report.samples == 4 and sorted(r.key for r in report.rejects) == sorted([truncated, missing])
    manifest = read_manifest(out, "train")
    assert manifest.num_rejects == 2 and truncated not in manifest.table.column("key").to_pylist()
    assert len((out / "train.rejects.jsonl").read_text().splitlines()) == 2
    again = shard_split("cityscapes", cityscapes_copy, "train", out, shard_size=2, show_progress=False)
    assert again.shards_reused == again.shards and len(again.rejects) == 2  # rejects survive a resume


def test_count_check_stops_unless_partial(cityscapes_copy: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    first = cityscapes.discover(cityscapes_copy, "val").samples[0]
    first.image_path.unlink()
    first.label_path.unlink()
    with pytest.raises(DatasetError, match=r"split 'val' under .* lists 2 images, expected 3 \(declared by the "
                                           r"synthetic marker.*pass --partial"):
        shard_split("cityscapes", cityscapes_copy, "val", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING):
        report = shard_split("cityscapes", cityscapes_copy, "val", tmp_path / "out", partial=True, show_progress=False)
    assert report.samples == 2
    assert "lists 2 images, expected 3" in caplog.text and "--partial" in caplog.text


def test_real_datasets_are_checked_against_the_official_counts(cityscapes_copy: Path, tmp_path: Path) -> None:
    (cityscapes_copy / "dfdam_synthetic.json").unlink()
    with pytest.raises(DatasetError, match=r"lists 6 images, expected 2975 \(the official count of the full "
                                           r"cityscapes release\)"):
        shard_split("cityscapes", cityscapes_copy, "train", tmp_path / "out", show_progress=False)
    assert voc.OFFICIAL_COUNTS == {"train_aug": 10582, "val": 1449, "train": 1464, "trainval": 12031, "voc_trainval": 2913, "test": 1456}
    assert cityscapes.OFFICIAL_COUNTS == {"train": 2975, "val": 500, "test": 1525}


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset root .*nowhere is not a folder"):
        shard_split("voc", tmp_path / "nowhere", "val", tmp_path / "out", show_progress=False)
    with pytest.raises(DatasetError, match=r"missing folder .*VOCdevkit/VOC2012: expected the PASCAL VOC 2012 devkit"):
        shard_split("voc", tmp_path, "val", tmp_path / "out", show_progress=False)


def test_two_splits_of_one_dataset_do_not_touch_each_other(voc_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard_split("voc", voc_root, "train_aug", out, shard_size=4, show_progress=False)
    before = _tar_bytes(out, "train_aug-*.tar")
    shard_split("voc", voc_root, "train", out, shard_size=1, show_progress=False)  # "train" prefixes "train_aug"
    assert _tar_bytes(out, "train_aug-*.tar") == before
    assert all(check.ok for check in verify_shards(out, show_progress=False))
    shutil.rmtree(out)
