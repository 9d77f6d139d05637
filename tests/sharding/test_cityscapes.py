"""Cityscapes: label ids -> train ids by the official table, layout discovery, bad input."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as official_labels
from PIL import Image

from sharding import cityscapes
from sharding.classes import cityscapes_classes
from sharding.samples import DatasetError, SampleError, encode_sample
from sharding.write import shard_split


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _official_train_id(label_id: int) -> int:
    label = next(l for l in official_labels if l.id == label_id)
    return label.trainId if 0 <= label.trainId < 255 else 255


def test_every_label_id_maps_as_the_official_table_says(tmp_path: Path) -> None:
    ids = sorted(l.id for l in official_labels if l.id >= 0)
    assert ids == list(range(34))
    ids_image = np.tile(np.array(ids, dtype=np.uint8), (3, 1))  # (3, 34): one column per id
    path = tmp_path / "x_000000_000000_gtFine_labelIds.png"
    path.write_bytes(_png(ids_image))
    train_ids = cityscapes.read_label_ids(path)
    assert train_ids.dtype == np.uint8 and train_ids.shape == (3, 34)
    for column, label_id in enumerate(ids):
        assert (train_ids[:, column] == _official_train_id(label_id)).all(), label_id
    assert sorted(set(np.unique(train_ids)) - {255}) == list(range(19))


def test_class_table_comes_from_cityscapesscripts() -> None:
    classes = cityscapes_classes()
    by_train_id = {l.trainId: l for l in official_labels if 0 <= l.trainId < 255}
    assert classes.num_classes == 19
    assert list(classes.names) == [by_train_id[t].name for t in range(19)]
    assert list(classes.palette) == [tuple(by_train_id[t].color) for t in range(19)]
    assert classes.names[0] == "road" and classes.names[18] == "bicycle"


def test_discovers_the_layout_sorted_by_key(cityscapes_root: Path) -> None:
    found = cityscapes.discover(cityscapes_root, "train")
    keys = [s.key for s in found.samples]
    assert keys == sorted(keys) and len(keys) == 6 and found.listed == 6 and not found.rejects
    assert {k.split("_")[0] for k in keys} == {"aachen", "bochum"}
    assert all(re.fullmatch(r"[a-z]+_\d{6}_\d{6}", k) for k in keys)
    sample = found.samples[0]
    assert sample.image_path.name == f"{sample.key}_leftImg8bit.png"
    assert sample.label_path.name == f"{sample.key}_gtFine_labelIds.png"  # not the _color.png beside it
    assert sample.label_path.parent == cityscapes_root / "gtFine" / "train" / sample.key.split("_")[0]


def test_shard_labels_are_the_mapped_source_labels(cityscapes_root: Path, cityscapes_shards: Path) -> None:
    lut = cityscapes.train_id_lut()
    void_seen = False
    for shard in sorted(cityscapes_shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.name.endswith(".label.png"):
                    continue
                key = member.name.split(".")[0]
                label = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                city = key.split("_")[0]
                source = np.asarray(Image.open(
                    cityscapes_root / "gtFine" / "train" / city / f"{key}_gtFine_labelIds.png"))
                np.testing.assert_array_equal(label, lut[source])
                void = np.isin(source, [1, 2, 3])  # ego vehicle, rectification border, out of roi
                void_seen |= bool(void.any())
                assert (label[void] == 255).all()
    assert void_seen, "the synthetic data should exercise ids that map to 255"


def test_test_split_labels_are_all_ignore(cityscapes_shards: Path) -> None:
    with tarfile.open(cityscapes_shards / "test-000000.tar") as tar:
        labels = [m for m in tar if m.name.endswith(".label.png")]
        assert len(labels) == 2
        for member in labels:
            label = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
            assert (label == 255).all()
        meta = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    assert all(m["label"] is None and m["split"] == "test" for m in meta)


def test_missing_folder_names_it(cityscapes_copy: Path) -> None:
    (cityscapes_copy / "gtFine" / "val").rename(cityscapes_copy / "gtFine" / "elsewhere")
    with pytest.raises(DatasetError, match=r"missing folder .*gtFine/val; expected the layout"):
        cityscapes.discover(cityscapes_copy, "val")
    with pytest.raises(DatasetError, match="unknown Cityscapes split 'train_extra'"):
        cityscapes.discover(cityscapes_copy, "train_extra")


def test_image_without_label_and_label_without_image(cityscapes_copy: Path) -> None:
    found = cityscapes.discover(cityscapes_copy, "train")
    first, second = found.samples[0], found.samples[1]
    first.label_path.unlink()
    second.image_path.unlink()
    found = cityscapes.discover(cityscapes_copy, "train")
    assert len(found.samples) == 4 and found.listed == 5
    messages = {r.key: r.message() for r in found.rejects}
    assert messages[first.key] == (f"{first.image_path}: image without its label: expected {first.label_path}")
    assert messages[second.key] == (f"{second.label_path}: label without its image: expected {second.image_path}")


def _sample(root: Path, split: str = "train", index: int = 0):
    return cityscapes.discover(root, split).samples[index]


def _encode(sample) -> None:
    encode_sample(sample, dataset="cityscapes", split="train", num_classes=19)


def test_size_mismatch_names_both_files(cityscapes_copy: Path) -> None:
    sample = _sample(cityscapes_copy)
    ids = np.asarray(Image.open(sample.label_path))
    sample.label_path.write_bytes(_png(ids[:, :-8]))
    with pytest.raises(SampleError) as error:
        _encode(sample)
    assert error.value.path == str(sample.label_path)
    assert f"label is 56x32 (WxH) but its image {sample.image_path.name} is 64x32; expected the same size" \
        in str(error.value)


def test_truncated_image(cityscapes_copy: Path) -> None:
    sample = _sample(cityscapes_copy)
    data = sample.image_path.read_bytes()
    sample.image_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match=r"unreadable or truncated image .*expected a complete PNG file") as error:
        _encode(sample)
    assert error.value.path == str(sample.image_path)


def test_unreadable_image_that_is_not_an_image(cityscapes_copy: Path) -> None:
    sample = _sample(cityscapes_copy)
    sample.image_path.write_bytes(b"this is not a PNG")
    with pytest.raises(SampleError, match="unreadable or truncated image"):
        _encode(sample)


def test_label_id_outside_the_table(cityscapes_copy: Path) -> None:
    sample = _sample(cityscapes_copy)
    ids = np.array(Image.open(sample.label_path))
    ids[0, :3] = 40
    ids[1, 0] = 77
    sample.label_path.write_bytes(_png(ids))
    with pytest.raises(SampleError, match=r"label ids 40, 77 not in the Cityscapes label table \(expected ids 0-33\)"):
        _encode(sample)


def test_colour_mask_instead_of_label_ids(cityscapes_copy: Path) -> None:
    sample = _sample(cityscapes_copy)
    colour = sample.label_path.with_name(sample.key + "_gtFine_color.png")
    sample.label_path.write_bytes(colour.read_bytes())
    with pytest.raises(SampleError, match=r"label PNG has mode RGB, expected a single-channel PNG of Cityscapes"):
        _encode(sample)


def test_bad_samples_are_rejected_and_the_run_goes_on(cityscapes_copy: Path, tmp_path: Path) -> None:
    samples = cityscapes.discover(cityscapes_copy, "train").samples
    truncated, out_of_table = samples[1], samples[4]
    truncated.image_path.write_bytes(truncated.image_path.read_bytes()[:100])
    ids = np.array(Image.open(out_of_table.label_path))
    ids[5, 5] = 200
    out_of_table.label_path.write_bytes(_png(ids))
    out = tmp_path / "shards"
    report = shard_split("cityscapes", cityscapes_copy, "train", out, shard_size=2, show_progress=False)
    assert report.samples == 4
    assert [r.key for r in report.rejects] == [truncated.key, out_of_table.key]
    lines = [json.loads(line) for line in (out / "train.rejects.jsonl").read_text().splitlines()]
    assert [l["key"] for l in lines] == [truncated.key, out_of_table.key]
    assert lines[0]["path"] == str(truncated.image_path) and "truncated" in lines[0]["reason"]
    assert lines[1]["path"] == str(out_of_table.label_path) and "label id 200" in lines[1]["reason"]
