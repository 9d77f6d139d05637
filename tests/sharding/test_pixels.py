"""The lz4 image encoding (`run.py shard --image-encoding lz4`): the codec, shards that decode to
exactly the pixels the original encoding gives, verify, WebDataset's reader, mixed encodings."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import lz4.frame
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import run
from sharding import cityscapes, voc
from sharding.manifest import METADATA_KEY, ManifestError, manifest_path, read_manifest
from sharding.pixels import IMAGE_MEMBER, LABEL_MEMBER, PixelsError, decode_pixels, encode_pixels
from sharding.verify import check_sample, tar_samples, verify_shards
from sharding.write import shard_split

SPLITS = {"cityscapes": "train", "voc": "train_aug"}
ORIGINAL_EXT = {"cityscapes": "png", "voc": "jpg"}
SAMPLES = {"cityscapes": 6, "voc": 10}  # in SPLITS[dataset] of tests/sharding/conftest.py's datasets


def _tars(folder: Path, split: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"{split}-*.tar"))}


def _samples(folder: Path, split: str) -> dict[str, dict[str, bytes]]:
    return {key: members for shard in sorted(folder.glob(f"{split}-*.tar")) for key, members in tar_samples(shard)}


@pytest.fixture(scope="module")
def packed(cityscapes_root: Path, voc_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each dataset's split packed with each encoding: {(dataset, encoding): shard folder}."""
    roots = {"cityscapes": cityscapes_root, "voc": voc_root}
    folders = {}
    for dataset, split in SPLITS.items():
        for encoding in ("original", "lz4"):
            out = tmp_path_factory.mktemp(f"{dataset}-{encoding}")
            shard_split(dataset, roots[dataset], split, out, shard_size=4, show_progress=False, encoding=encoding)
            folders[dataset, encoding] = out
    return folders


# ----------------------------------------------------------------------------- the codec

@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 33, 3)])
def test_image_round_trip_is_exact_and_deterministic(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    data = encode_pixels(image, channels=3)
    assert data == encode_pixels(image.copy(), channels=3)  # the same array, the same bytes
    decoded = decode_pixels(data, "x.npy.lz4", channels=3)
    assert decoded.dtype == np.uint8 and decoded.shape == shape
    np.testing.assert_array_equal(decoded, image)
    # a non-contiguous view encodes its values, not its memory
    np.testing.assert_array_equal(decode_pixels(encode_pixels(image[:, ::-1], channels=3), "v", channels=3),
                                  image[:, ::-1])


def test_label_round_trip_is_exact() -> None:
    label = np.array([[0, 1, 2, 18, 255], [255, 7, 7, 0, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(decode_pixels(encode_pixels(label, channels=None), "x", channels=None), label)


def test_encode_refuses_arrays_that_are_not_pixels() -> None:
    with pytest.raises(ValueError, match=r"holds int16 \(2, 2, 3\), expected uint8 \(H, W, 3\) RGB"):
        encode_pixels(np.zeros((2, 2, 3), np.int16), channels=3)
    with pytest.raises(ValueError, match=r"expected uint8 \(H, W\) train ids"):
        encode_pixels(np.zeros((2, 2, 3), np.uint8), channels=None)
    with pytest.raises(ValueError, match=r"holds uint8 \(2, 2, 4\)"):
        encode_pixels(np.zeros((2, 2, 4), np.uint8), channels=3)


def _npy_lz4(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return lz4.frame.compress(buffer.getvalue())


def test_decode_errors_name_the_member_and_the_problem() -> None:
    image = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    good = encode_pixels(image, channels=3)
    member = "sample 'k': npy.lz4"
    cases = [
        (good[:-3], r"not a valid, complete LZ4 frame.*truncated or corrupted"),
        (good[:8], r"not a valid, complete LZ4 frame"),
        (b"\x89PNG\r\n\x1a\n" + bytes(40), r"not a valid, complete LZ4 frame"),
        (good[:4] + bytes([good[4] ^ 0x01]) + good[5:], r"not a valid, complete LZ4 frame.*headerChecksum"),
        (lz4.frame.compress(b"not an npy file" * 4), r"no \.npy header inside the LZ4 frame"),
        (_npy_lz4(image.astype(np.float32)), r"holds float32 \(4, 5, 3\), expected uint8 \(H, W, 3\) RGB pixels"),
        (_npy_lz4(image[..., 0]), r"holds uint8 \(4, 5\), expected uint8 \(H, W, 3\)"),
        (_npy_lz4(np.asfortranarray(image)), r"Fortran-ordered"),
    ]
    for data, message in cases:
        with pytest.raises(PixelsError, match=message) as info:
            decode_pixels(data, member, channels=3)
        assert str(info.value).startswith(member)


# ----------------------------------------------------------------------------- shards

@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_lz4_members_hold_the_pixels_a_loader_decodes_from_the_source(dataset: str, packed: dict,
                                                                      request: pytest.FixtureRequest) -> None:
    """npy.lz4 = PIL's .convert("RGB") of the source file (for JPEG: its decoded pixels, exactly);
    label.npy.lz4 = the train ids of the original encoding's label.png; the manifest says so."""
    split = SPLITS[dataset]
    module = cityscapes if dataset == "cityscapes" else voc
    sources = {s.key: s for s in module.discover(request.getfixturevalue(f"{dataset}_root"), split).samples}
    original, lz4_samples = _samples(packed[dataset, "original"], split), _samples(packed[dataset, "lz4"], split)
    assert list(lz4_samples) == list(original) == sorted(sources)
    for key, members in lz4_samples.items():
        assert set(members) == {IMAGE_MEMBER, LABEL_MEMBER, "json"}
        assert members["json"] == original[key]["json"]
        with Image.open(sources[key].image_path) as im:
            np.testing.assert_array_equal(decode_pixels(members[IMAGE_MEMBER], key, channels=3),
                                          np.asarray(im.convert("RGB")))
        np.testing.assert_array_equal(decode_pixels(members[LABEL_MEMBER], key, channels=None),
                                      np.asarray(Image.open(io.BytesIO(original[key]["label.png"]))))
    manifest, reference = read_manifest(packed[dataset, "lz4"], split), read_manifest(packed[dataset, "original"], split)
    assert (manifest.encoding, reference.encoding) == ("lz4", "original")
    assert set(manifest.table.column("image_ext").to_pylist()) == {IMAGE_MEMBER}
    assert set(reference.table.column("image_ext").to_pylist()) == {ORIGINAL_EXT[dataset]}
    for column in ("key", "height", "width", "class_pixels", "ignore_pixels", "image_source", "label_source"):
        assert manifest.table.column(column).equals(reference.table.column(column)), column


@pytest.mark.parametrize("dataset", ["cityscapes", "voc"])
def test_both_encodings_load_to_the_same_arrays(dataset: str, packed: dict) -> None:
    """Through pipeline.data.decode_sample and through the evaluation loader: equal by construction."""
    import webdataset as wds

    from pipeline.config import DataConfig
    from pipeline.data import decode_sample, eval_loader

    split = SPLITS[dataset]
    decoded = {}
    for encoding in ("original", "lz4"):
        manifest = read_manifest(packed[dataset, encoding], split)
        samples = wds.DataPipeline(wds.SimpleShardList(manifest.shards),
                                   wds.tarfile_to_samples(handler=wds.reraise_exception), wds.map(decode_sample))
        decoded[encoding] = {s["key"]: (s["image"], s["label"]) for s in samples}
    assert list(decoded["lz4"]) == list(decoded["original"]) and len(decoded["lz4"]) == SAMPLES[dataset]
    for key, (image, label) in decoded["original"].items():
        assert image.dtype == decoded["lz4"][key][0].dtype == np.uint8
        np.testing.assert_array_equal(decoded["lz4"][key][0], image)
        np.testing.assert_array_equal(decoded["lz4"][key][1], label)

    cfg = DataConfig(eval_batch_size=2, loader_workers=0)
    batches = {encoding: list(eval_loader(read_manifest(packed[dataset, encoding], split), cfg))
               for encoding in ("original", "lz4")}
    assert len(batches["lz4"]) == len(batches["original"]) > 0
    for ours, theirs in zip(batches["lz4"], batches["original"]):
        assert ours[2] == theirs[2]  # the same keys in the same batches
        for a, b in zip(ours[:2], theirs[:2]):
            assert a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def test_webdatasets_own_reader_lists_the_lz4_members(packed: dict) -> None:
    import webdataset as wds

    manifest = read_manifest(packed["voc", "lz4"], "train_aug")
    samples = list(wds.WebDataset(manifest.shards, shardshuffle=False, nodesplitter=None))
    assert [s["__key__"] for s in samples] == manifest.table.column("key").to_pylist()
    for sample in samples:
        assert {k for k in sample if not k.startswith("__")} == {"npy.lz4", "label.npy.lz4", "json"}


def _flip_inside(shard: Path, member_suffix: str) -> str:
    """Flip one byte in the middle of the first member ending in ``member_suffix``; its name."""
    with tarfile.open(shard) as tar:
        info = next(i for i in tar if i.name.endswith(member_suffix) and not i.name.endswith("label." + member_suffix))
    data = bytearray(shard.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return info.name


def test_verify_passes_on_lz4_shards_and_catches_a_corrupted_member(packed: dict, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    for path in packed["cityscapes", "lz4"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    assert run.main(["shard", "verify", "--out", str(folder), "--no-progress"]) == 0
    assert "train: 6 samples in 2 shards verified: ok" in capsys.readouterr().out
    name = _flip_inside(folder / "train-000001.tar", IMAGE_MEMBER)  # pixels changed: caught by the sha256s
    assert run.main(["shard", "verify", "--out", str(folder), "--no-progress"]) == 1
    out = capsys.readouterr().out
    key = name.split(".", 1)[0]
    assert "train-000001.tar: sha256 differs from the manifest" in out
    assert f"train-000001.tar: {key}: npy.lz4 sha256 differs from the manifest" in out
    assert "train: 6 samples in 2 shards verified: 2 problem(s)" in out


def test_verify_decodes_members_as_the_loaders_do(packed: dict) -> None:
    """A member whose bytes match its row but do not decode (a writer's bug) is caught too."""
    manifest = read_manifest(packed["cityscapes", "lz4"], "train")
    row = manifest.table.to_pylist()[0]
    members = dict(next(iter(_samples(packed["cityscapes", "lz4"], "train").values())))
    assert check_sample(row, members, manifest) == []
    for member, data, problem in [
        (IMAGE_MEMBER, members[IMAGE_MEMBER][:-100], f"sample '{row['key']}': npy.lz4: not a valid, complete LZ4 frame"),
        (LABEL_MEMBER, encode_pixels(np.zeros((row["height"], row["width"] - 1), np.uint8), channels=None),
         f"sample '{row['key']}': image ({row['height']}, {row['width']}) and label ({row['height']}, "
         f"{row['width'] - 1}) differ in size"),
        (LABEL_MEMBER, encode_pixels(np.full((row["height"], row["width"]), 7, np.uint8), channels=None), None),
    ]:
        column = "image" if member == IMAGE_MEMBER else "label"
        changed = {**row, f"{column}_bytes": len(data), f"{column}_sha256": hashlib.sha256(data).hexdigest()}
        problems = check_sample(changed, {**members, member: data}, manifest)
        if problem is None:
            assert problems == ["label.npy.lz4 class pixel counts differ from the manifest"]
        else:
            assert len(problems) == 1 and problems[0].startswith(f"does not decode ({problem}"), problems


def test_a_manifest_says_its_encoding_and_refuses_a_mixed_split(packed: dict, tmp_path: Path) -> None:
    """No recorded encoding (a manifest written before the choice) reads as original; a manifest whose
    rows disagree with its encoding is refused."""
    cases = [("original", lambda m: m.pop("encoding")), ("lz4", lambda m: m.update(encoding="original")),
             ("original", lambda m: m.update(encoding="lz4")), ("original", lambda m: m.update(encoding="zstd"))]
    for number, (encoding, rewrite) in enumerate(cases):
        folder = tmp_path / f"case-{number}"
        folder.mkdir()
        for path in packed["voc", encoding].iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        path = manifest_path(folder, "train_aug")
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        rewrite(meta)
        pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path)
        if "encoding" not in meta:
            assert read_manifest(folder, "train_aug").encoding == "original"
            assert verify_shards(folder, show_progress=False)[0].ok
        elif meta["encoding"] == "zstd":
            with pytest.raises(ManifestError, match=r"image encoding 'zstd', expected one of original, lz4"):
                read_manifest(folder, "train_aug")
        else:
            with pytest.raises(ManifestError, match=rf"records image encoding '{meta['encoding']}', but "
                                                    r"\d+ of 10 rows have image_ext npy.lz4: one split holds one"):
                read_manifest(folder, "train_aug")


def test_repacking_with_the_other_encoding_rewrites_every_shard(voc_root: Path, packed: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = shard_split("voc", voc_root, "train_aug", out, shard_size=4, show_progress=False)
    assert first.encoding == "original" and _tars(out, "train_aug") == _tars(packed["voc", "original"], "train_aug")
    switched = shard_split("voc", voc_root, "train_aug", out, shard_size=4, show_progress=False, encoding="lz4")
    assert (switched.shards_reused, switched.shards) == (0, 3)
    assert _tars(out, "train_aug") == _tars(packed["voc", "lz4"], "train_aug")  # nothing of the old encoding left
    assert read_manifest(out, "train_aug").encoding == "lz4"
    again = shard_split("voc", voc_root, "train_aug", out, shard_size=4, show_progress=False, encoding="lz4")
    assert again.shards_reused == 3  # an lz4 folder resumes as lz4
    back = shard_split("voc", voc_root, "train_aug", out, shard_size=4, show_progress=False)
    assert back.shards_reused == 0 and _tars(out, "train_aug") == _tars(packed["voc", "original"], "train_aug")
    assert read_manifest(out, "train_aug").encoding == "original"
    assert all(check.ok for check in verify_shards(out, show_progress=False))
    with pytest.raises(ValueError, match="unknown image encoding 'png': expected one of original, lz4"):
        shard_split("voc", voc_root, "train_aug", out, show_progress=False, encoding="png")


def test_cli_packs_lz4_and_reports_the_size_cost(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    assert run.main(["shard", "--dataset", "voc", "--root", str(voc_root), "--out", str(out), "--split", "val",
                     "--workers", "1", "--image-encoding", "lz4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(out, "val")
    assert manifest.encoding == "lz4"
    shard_bytes = sum(info.bytes for info in manifest.shard_infos)
    source = sum(p.stat().st_size for s in voc.discover(voc_root, "val").samples for p in (s.image_path, s.label_path))
    assert (f"val: image encoding lz4, {shard_bytes / 1e6:.1f} MB of shards for {source / 1e6:.1f} MB of source "
            f"files ({shard_bytes / source:.2f}x)") in printed
    sub = next(a for a in run.build_parser()._actions if a.dest == "command")
    assert "--image-encoding {original,lz4}" in " ".join(sub.choices["shard"].format_help().split())


def test_members_of_one_encoding_with_a_label_of_the_other_are_refused(packed: dict) -> None:
    from sharding.samples import decode_members

    lz4_members = next(iter(_samples(packed["voc", "lz4"], "train_aug").values()))
    original = next(iter(_samples(packed["voc", "original"], "train_aug").values()))
    mixed = {"npy.lz4": lz4_members["npy.lz4"], "label.png": original["label.png"]}
    with pytest.raises(ValueError, match=r"sample 'k' from s.tar: expected an image \(png/jpg/jpeg\) and label.png, "
                                         r"or npy.lz4 and label.npy.lz4; found \['label.png', 'npy.lz4'\]"):
        decode_members(mixed, "k", "s.tar")
