"""The shard reader's tar walk against the standard library's and WebDataset's readers, and the
member names it refuses (hand-made tar files)."""
from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from sharding.manifest import read_manifest
from sharding.storage import shard_samples
from sharding.tarstream import TarError, group_samples, split_name, tar_members
from sharding.verify import verify_shards


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
    long = "city_" + "k" * 150  # over ustar's 100-byte name field
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


def _evil_names(outside: Path) -> list[str]:
    long = "k" * 120  # past ustar's name field: the name travels in a PAX record or a GNU long-name member
    return ["../evil.png", "../../" + long + ".png", f"{outside}/evil.png", "/etc/cron.d/evil.png",
            "city/k.png", f"city/{long}.png", "a\\b.png", "..", "..png", ".hidden.png"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_member_names_that_leave_the_key_space_are_refused(fmt: int, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    for name in _evil_names(outside):
        if fmt == tarfile.USTAR_FORMAT and len(name) > 100 and "/" not in name[-100:]:
            continue  # ustar cannot hold it at all
        data = _tar([("good.png", b"1"), (name, b"x" * 600), ("later.png", b"2")], fmt)
        members = tar_members(io.BytesIO(data), "evil.tar")
        assert next(members) == ("good.png", b"1")  # read up to the bad member, then refused
        with pytest.raises(TarError, match=r"^evil\.tar: member .* refused: expected a flat '<key>\.<ext>' name"):
            next(members)
    assert not outside.exists()


def test_folder_and_link_entries_with_such_names_are_refused_and_links_are_never_followed() -> None:
    for kind, name in ((tarfile.DIRTYPE, "../up"), (tarfile.SYMTYPE, "/abs/link.png")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tar.addfile(info)
        with pytest.raises(TarError, match=f"s.tar: member {name!r} refused"):
            list(tar_members(io.BytesIO(buf.getvalue()), "s.tar"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("k.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert list(tar_members(io.BytesIO(buf.getvalue()), "s.tar")) == []  # a flat link: skipped, not read


def test_loaders_and_verify_refuse_such_a_shard_naming_it_and_the_member(tiny_shards: Path,
                                                                        tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    manifest = read_manifest(copy, "val")
    shard = Path(manifest.shards[0])
    with tarfile.open(shard) as tar:  # the same samples, the first member renamed to climb out of the folder
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    members[0] = ("../" + members[0][0], members[0][1])
    shard.write_bytes(_tar(members))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(TarError, match=f"{shard}: member '\\.\\./{members[0][0][3:]}' refused"):
        list(shard_samples()(iter([{"url": str(shard)}])))
    [check] = verify_shards(copy, ["val"], show_progress=False)
    assert not check.ok
    assert any(shard.name in p and f"member '../{members[0][0][3:]}' refused" in p for p in check.problems), check.problems
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing extracted anywhere
