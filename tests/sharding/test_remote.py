"""Shard folders at URLs read exactly as local ones: a real ``http.server`` and a real S3-compatible
server (moto's) on 127.0.0.1, each serving a copy of the same shards (fixtures in tests/conftest.py)."""
from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

import run
from pipeline.config import DataConfig
from pipeline.data import eval_loader, train_loader
from sharding import storage
from sharding.manifest import ManifestError, read_manifest
from sharding.verify import verify_shards

CFG = DataConfig(crop_size=(48, 64), scales=(0.75, 1.25), batch_size=4, eval_batch_size=2, loader_workers=0,
                 shuffle_buffer=8)


def _same_batches(remote: Iterable, local: Iterable) -> int:
    """Assert two loaders yield equal batches (tensors equal to the byte, keys equal); returns the count."""
    remote, local = list(remote), list(local)
    assert len(remote) == len(local) > 0
    for got, want in zip(remote, local):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            else:
                assert a == b
    return len(remote)


def _same_manifest(url: str, local: Path) -> None:
    for split in ("train", "val"):
        remote, here = read_manifest(url, split), read_manifest(local, split)
        assert remote.table.equals(here.table) and remote.shard_infos == here.shard_infos
        assert (remote.dataset, remote.num_classes, remote.class_names, remote.palette) == \
            (here.dataset, here.num_classes, here.class_names, here.palette)
        assert remote.root == url and remote.path == f"{url}/{split}.manifest.parquet"
        assert remote.shards == [f"{url}/{info.name}" for info in here.shard_infos]  # relative to the manifest


def _same_samples(url: str, local: Path, *, loader_workers: int, ranks: tuple[int, ...] = (0, 1)) -> None:
    """The eval loader and the train loader (ranks of a world of 2) read from ``url`` with
    ``loader_workers`` processes give the batches this process reads from ``local`` (one loader
    process deals every shard and seeds itself as this process does: worker id 0)."""
    remote_cfg = dataclasses.replace(CFG, loader_workers=loader_workers)
    val, val_here = read_manifest(url, "val"), read_manifest(local, "val")
    assert _same_batches(eval_loader(val, remote_cfg), eval_loader(val_here, CFG)) == 4  # 2 shards of 3: 2+1 each
    train, train_here = read_manifest(url, "train"), read_manifest(local, "train")
    for rank in ranks:  # ranks resample shards by index: the same shards, from either place
        assert _same_batches(train_loader(train, remote_cfg, rank=rank, world_size=2, epoch=1, seed=5),
                             train_loader(train_here, CFG, rank=rank, world_size=2, epoch=1, seed=5)) == 3


# ----------------------------------------------------------------------------- locations (no server)


def test_locations_join_below_a_url_and_keep_its_query() -> None:
    assert storage.join("https://host:8000/data/shards/", "train-000000.tar") == \
        "https://host:8000/data/shards/train-000000.tar"
    assert storage.join("s3://bucket/shards?endpoint_override=h:9000&scheme=http", "val.manifest.parquet") == \
        "s3://bucket/shards/val.manifest.parquet?endpoint_override=h:9000&scheme=http"
    assert storage.display("s3://bucket/shards?endpoint_override=h:9000") == "s3://bucket/shards"
    assert storage.name("gs://bucket/a/train-000003.tar") == "train-000003.tar"
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/data/shards") and not storage.is_remote("file:///x")
    assert storage.join("/nfs/shards", "train-000000.tar") == "/nfs/shards/train-000000.tar"
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x"


def test_an_unknown_s3_query_parameter_is_refused_before_any_request() -> None:
    with pytest.raises(storage.StorageError, match=r"s3://bucket/shards/train.manifest.parquet: unknown query parameter\(s\) "
                                                   r"access_key; an s3:// location takes endpoint_override"):
        read_manifest("s3://bucket/shards?access_key=AKIA", "train")


# ----------------------------------------------------------------------------- http


def test_http_manifest_and_loaders_equal_the_local_folder(http_shards, tiny_shards: Path) -> None:
    _same_manifest(http_shards.url, tiny_shards)
    _same_samples(http_shards.url, tiny_shards, loader_workers=0)


def test_http_loader_processes_read_the_same_samples(http_shards, tiny_shards: Path) -> None:
    """A loader process (forked after this one opened HTTP sessions) reads what this process reads."""
    _same_samples(http_shards.url, tiny_shards, loader_workers=1, ranks=(1,))


def test_http_errors_name_the_url_and_what_was_expected(http_shards, tiny_shards: Path,
                                                        tmp_path: Path) -> None:
    base = http_shards.url.rsplit("/datasets/", 1)[0]
    with pytest.raises(ManifestError, match=rf"{base}/datasets/nowhere/train.manifest.parquet: no manifest for split "
                                            r"'train' \(.*\); write it with `python run.py shard` and upload"):
        read_manifest(f"{base}/datasets/nowhere", "train")
    with pytest.raises(storage.StorageError, match=rf"{base}/private/tiny-shards/train.manifest.parquet: access denied "
                                                   r"\(.*403.*\); expected the manifest of split 'train' readable"):
        read_manifest(f"{base}/private/tiny-shards", "train")
    with socket.socket() as blocker:  # a port bound but not listening: connections to it are refused
        blocker.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{blocker.getsockname()[1]}/shards"
        with pytest.raises(storage.StorageError, match=rf"{dead}/val.manifest.parquet: cannot reach "
                                                       r"127.0.0.1:\d+ \(.*\); expected a server answering there"):
            read_manifest(dead, "val")
    # A shard gone after the manifest was read (404 while training): the loader names it.
    manifest = read_manifest(http_shards.url, "val")
    missing = dataclasses.replace(manifest, root=f"{base}/datasets/elsewhere")
    with pytest.raises(FileNotFoundError, match=rf"{base}/datasets/elsewhere/val-000000.tar: not found .*expected a "
                                                "WebDataset tar shard"):
        list(eval_loader(missing, CFG))


def test_shard_verify_checks_a_served_folder(http_shards, capsys: pytest.CaptureFixture) -> None:
    assert run.main(["shard", "verify", "--out", http_shards.url, "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines() == ["train: 12 samples in 4 shards verified: ok",
                                                    "val: 6 samples in 2 shards verified: ok"]


def test_shard_verify_reports_a_damaged_remote_shard(http_shards, tiny_shards: Path) -> None:
    """The served files are read over HTTP: a shard altered on the server (same size) fails its sha256."""
    shard = http_shards.folder / "val-000001.tar"
    original = shard.read_bytes()
    try:
        damaged = bytearray(original)
        damaged[-2000] ^= 0xFF  # inside the last member or the tar's padding: the same size
        shard.write_bytes(bytes(damaged))
        [check] = verify_shards(http_shards.url, ["val"], show_progress=False)
        assert "val-000001.tar: sha256 differs from the manifest" in check.problems
    finally:
        shard.write_bytes(original)


# ----------------------------------------------------------------------------- s3


def test_s3_manifest_and_loaders_equal_the_local_folder(s3_shards, tiny_shards: Path) -> None:
    _same_manifest(s3_shards.url, tiny_shards)
    _same_samples(s3_shards.url, tiny_shards, loader_workers=1, ranks=(1,))


def test_s3_endpoint_in_the_location_instead_of_the_environment(s3_shards, tiny_shards: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``?endpoint_override=HOST:PORT&scheme=http``, the form Ray's storage_path takes, works for shards too."""
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        url = s3_shards.query_url(s3_shards.url)
        manifest = read_manifest(url, "val")
        assert manifest.shards[0] == s3_shards.query_url(f"{s3_shards.url}/val-000000.tar")
        assert _same_batches(eval_loader(manifest, CFG), eval_loader(read_manifest(tiny_shards, "val"), CFG)) == 4
        assert all(check.ok for check in verify_shards(url, show_progress=False))
        with pytest.raises(ManifestError, match=rf"s3://{s3_shards.bucket}/datasets/none/val.manifest.parquet: "
                                                "no manifest for split 'val'"):
            read_manifest(s3_shards.query_url(f"s3://{s3_shards.bucket}/datasets/none"), "val")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
