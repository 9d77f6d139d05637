"""`run.py shard verify` on shards damaged after sharding: every problem names the shard file
and the sample key, for the original encoding (PNG, JPEG) and for lz4 shards, and a manifest
that no longer matches its shards is refused by the cheap check every reader runs."""
from __future__ import annotations

from pathlib import Path

import pytest

import run
from sharding.manifest import ManifestError, read_manifest
from sharding.verify import verify_shards
from sharding.write import shard_dataset
from tests.damage import copy_shards, damage_member, replace_with, truncate_inside


@pytest.fixture(scope="module")
def lz4_shards(cityscapes_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic Cityscapes' train split as lz4 shards, 4 samples per shard (2 shards)."""
    out = tmp_path_factory.mktemp("cityscapes-lz4")
    shard_dataset("cityscapes", cityscapes_root, out, splits=["train"], shard_size=4, workers=1,
                  show_progress=False, encoding="lz4")
    return out


def _problems(folder: Path, split: str) -> list[str]:
    (check,) = verify_shards(folder, [split], show_progress=False)
    return check.problems


CASES = [  # (shards, split, member, how, what verify says beside the member's sha256)
    ("cityscapes", "train", "png", "flip", "png does not decode"),  # PNG's chunk CRC
    ("cityscapes", "train", "png", "header", "png does not decode (UnidentifiedImageError"),
    ("cityscapes", "train", "label.png", "flip", "label.png does not decode"),
    ("cityscapes", "train", "label.png", "header", "label.png does not decode"),
    ("voc", "train_aug", "jpg", "flip", None),  # JPEG has no checksum: it still decodes, to other pixels
    ("voc", "train_aug", "jpg", "header", "jpg does not decode"),
    ("lz4", "train", "npy.lz4", "flip", None),  # no checksum in the frame: other pixels
    ("lz4", "train", "npy.lz4", "header", "npy.lz4: not a valid, complete LZ4 frame"),
    ("lz4", "train", "label.npy.lz4", "flip", "label.npy.lz4: not a valid, complete LZ4 frame"),
]


@pytest.mark.parametrize(("shards", "split", "suffix", "how", "decode"), CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_a_damaged_member_is_named_by_shard_and_key(shards: str, split: str, suffix: str, how: str,
                                                    decode: str | None, request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    source = request.getfixturevalue({"cityscapes": "cityscapes_shards", "voc": "voc_shards",
                                      "lz4": "lz4_shards"}[shards])
    folder = copy_shards(source, tmp_path / "shards")
    shard = f"{split}-000001.tar"
    key = damage_member(folder / shard, 1, suffix, how)
    problems = _problems(folder, split)
    assert f"{shard}: sha256 differs from the manifest" in problems  # same size: the shard's sha256 tells
    assert f"{shard}: {key}: {suffix} sha256 differs from the manifest" in problems
    decoding = [p for p in problems if "does not decode" in p]
    if decode is None:
        assert decoding == []
        assert len(problems) == 2
    else:
        assert len(decoding) == 1 and decoding[0].startswith(f"{shard}: {key}: does not decode (")
        assert decode in decoding[0]
        assert "object at 0x" not in decoding[0]  # PIL's BytesIO address is left out
        assert len(problems) == 3


@pytest.mark.parametrize("shards", ["cityscapes", "lz4"])
def test_a_shard_cut_short_names_the_samples_not_read_and_checks_the_others(
        shards: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = request.getfixturevalue({"cityscapes": "cityscapes_shards", "lz4": "lz4_shards"}[shards])
    folder = copy_shards(source, tmp_path / "shards")
    keys = read_manifest(folder, "train").table.column("key").to_pylist()[:4]  # shard 0's samples
    suffix = "png" if shards == "cityscapes" else "npy.lz4"
    cut = truncate_inside(folder / "train-000000.tar", 2, suffix)
    assert cut == keys[2]
    problems = _problems(folder, "train")
    assert problems[0].startswith("train-000000.tar: ") and "bytes, the manifest says" in problems[0]
    assert problems[1].startswith("train-000000.tar: unreadable tar (TarError: train-000000.tar: truncated tar: ")
    assert problems[1].endswith(f"; samples not read: {keys[2]}, {keys[3]}")
    assert len(problems) == 2  # the two samples before the cut were read and match their rows
    assert run.main(["shard", "verify", "--out", str(folder), "--split", "train", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "train: 4 samples in 2 shards verified: 2 problem(s)" in out  # 2 before the cut + shard 1's 2
    assert f"samples not read: {keys[2]}, {keys[3]}" in out


@pytest.mark.parametrize("fault", ["deleted", "cut short", "replaced"])
def test_a_manifest_that_no_longer_matches_its_shards_is_refused(fault: str, cityscapes_shards: Path,
                                                                 tmp_path: Path) -> None:
    folder = copy_shards(cityscapes_shards, tmp_path / "shards")
    shard = folder / "train-000001.tar"
    if fault == "deleted":
        shard.unlink()
        expected = r"train-000001\.tar, but .*train-000001\.tar is missing \(deleted or moved"
    elif fault == "cut short":
        truncate_inside(shard, 0, "png")
        expected = r"train-000001\.tar with \d+ bytes, but .*train-000001\.tar has \d+ \(cut short, or replaced"
    else:
        replace_with(shard, folder / "train-000000.tar")  # a size check alone passes
        assert shard.stat().st_size == read_manifest(folder, "train", check_files=False).shard_infos[1].bytes
        first = read_manifest(folder, "train", check_files=False).table.column("key").to_pylist()[4]
        expected = (rf"train-000001\.tar beginning with sample '{first}', but .*train-000001\.tar begins with "
                    r"'\w+' \(replaced by another shard\?\)")
    with pytest.raises(ManifestError, match=expected + r".*`run.py shard verify` checks every byte \(sha256\)"):
        read_manifest(folder, "train")
    read_manifest(folder, "val")  # the other split's shards are untouched


def test_a_file_that_is_no_tar_in_place_of_a_shard_is_refused(cityscapes_shards: Path, tmp_path: Path) -> None:
    folder = copy_shards(cityscapes_shards, tmp_path / "shards")
    shard = folder / "val-000000.tar"
    shard.write_bytes(b"\x89PNG" * (shard.stat().st_size // 4))
    with pytest.raises(ManifestError, match=r"val-000000\.tar begins with no sample \(not a tar file\)"):
        read_manifest(folder, "val")
