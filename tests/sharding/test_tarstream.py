"""The shard reader's tar walk against the standard library's and WebDataset's readers."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from sharding.manifest import read_manifest
from sharding.storage import shard_samples
from sharding.tarstream import TarError, group_samples, split_name, tar_members


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("a_folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a folder entry: skipped by the readers
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_project_shard_reads_as_tarfile_and_webdataset_read_it(tiny_shards: Path) -> None:
    manifest = read_manifest(tiny_shards, "train")
    for shard in manifest.shards:
        with tarfile.open(shard) as tar:
            expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        with open(shard, "rb") as stream:
            assert list(tar_members(stream, shard)) == expected
    ours = list(shard_samples()(iter({"url": s} for s in manifest.shards)))
    theirs = list(wds.tarfile_to_samples()(iter({"url": s} for s in manifest.shards)))
    assert [s["__key__"] for s in ours] == list(manifest.table.column("key").to_pylist())
    assert ours == theirs  # keys, urls, every member's bytes


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_and_non_ascii_names_come_through(fmt: int) -> None:
    long = "city/" + "k" * 150  # over ustar's 100-byte name field
    members = [(f"{long}.png", b"1" * 700), (f"{long}.json", b"{}"), ("caf\u00e9.label.png", b"")]
    assert list(tar_members(io.BytesIO(_tar(members, fmt)), "mem")) == members
    samples = list(group_samples(members, "mem"))
    assert samples == [(long, {"png": b"1" * 700, "json": b"{}"}), ("caf\u00e9", {"label.png": b""})]


def test_webdataset_keys_and_extensions() -> None:
    assert split_name("aachen_000000_000019.label.npy.lz4") == ("aachen_000000_000019", "label.npy.lz4")
    assert split_name("a/b.PNG") == ("a/b", "png")


def test_broken_shards_fail_with_the_shards_name() -> None:
    data = _tar([("k.png", b"x" * 1000), ("k.json", b"{}")])
    with pytest.raises(TarError, match=r"s\.tar: truncated tar: member 'k\.png' needs 1000 bytes"):
        list(tar_members(io.BytesIO(data[:512 * 2 + 100]), "s.tar"))  # folder header, k.png header, 100 bytes
    with pytest.raises(TarError, match="s.tar: truncated tar: a member header is cut"):
        list(tar_members(io.BytesIO(data[:700]), "s.tar"))
    with pytest.raises(TarError, match="s.tar: not a tar file"):
        list(tar_members(io.BytesIO(b"\x89PNG" + b"\x01" * 600), "s.tar"))
    with pytest.raises(TarError, match="sample 'k' holds member .png twice"):
        list(group_samples([("k.png", b""), ("k.png", b"")], "s.tar"))
