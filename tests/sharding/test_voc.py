"""VOC 2012 + SBD: palette PNGs as indices, .mat labels, the train_aug arithmetic, bad input."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sharding import voc
from sharding.classes import voc_classes, voc_colormap
from sharding.manifest import read_manifest
from sharding.samples import DatasetError, SampleError, encode_sample
from sharding.synthetic import write_segmentation_class_aug
from sharding.write import shard_split


def _palette_png(indices: np.ndarray) -> bytes:
    image = Image.fromarray(indices.astype(np.uint8))
    image.putpalette([v for colour in voc_colormap() for v in colour])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_voc_class_table_and_standard_colormap() -> None:
    classes = voc_classes()
    assert classes.num_classes == 21 and classes.ignore_index == 255
    assert classes.names[0] == "background" and classes.names[15] == "person" and classes.names[20] == "tvmonitor"
    cmap = voc_colormap()
    assert cmap[0] == (0, 0, 0) and cmap[1] == (128, 0, 0) and cmap[2] == (0, 128, 0)
    assert cmap[3] == (128, 128, 0) and cmap[15] == (192, 128, 128) and cmap[20] == (0, 64, 128)
    assert cmap[255] == (224, 224, 192)
    assert list(classes.palette) == cmap[:21]


def test_palette_png_decodes_to_indices_never_rgb(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 15, 255], [20, 7, 0, 255]], dtype=np.uint8)
    path = tmp_path / "2007_000032.png"
    path.write_bytes(_palette_png(indices))
    assert Image.open(path).mode == "P"
    out = voc.read_class_png(path)
    assert out.shape == (2, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, indices)


def test_rgb_colour_mask_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "2007_000032.png"
    rgb = np.array(voc_colormap(), dtype=np.uint8)[np.array([[0, 1], [15, 255]])]  # (2, 2, 3) colours
    Image.fromarray(rgb).save(path)
    with pytest.raises(SampleError, match=r"2007_000032.png: label PNG has mode RGB, expected a palette \(mode P\)"):
        voc.read_class_png(path)


def test_label_value_outside_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "2007_000033.png"
    path.write_bytes(_palette_png(np.array([[0, 21], [30, 255]])))
    with pytest.raises(SampleError, match=r"label values 21, 30 outside the VOC classes; expected class indices 0-20"):
        voc.read_class_png(path)


def test_sbd_mat_labels_are_read(tmp_path: Path) -> None:
    seg = np.array([[0, 0, 3], [3, 12, 0]], dtype=np.uint8)
    path = tmp_path / "2008_000002.mat"
    scipy.io.savemat(path, {"GTcls": {"Segmentation": seg, "CategoriesPresent": np.array([3, 12], np.uint8)}})
    np.testing.assert_array_equal(voc.read_sbd_mat(path), seg)
    scipy.io.savemat(path, {"Other": {"Segmentation": seg}})
    with pytest.raises(SampleError, match="no GTcls.Segmentation in the .mat file"):
        voc.read_sbd_mat(path)
    path.write_bytes(b"MATLAB 5.0 but truncated")
    with pytest.raises(SampleError, match=r"unreadable .mat file"):
        voc.read_sbd_mat(path)


def test_train_aug_arithmetic_on_a_constructed_case() -> None:
    voc_train = ["a", "b", "c"]
    voc_val = ["d", "e"]
    sbd_train = ["b", "d", "f"]
    sbd_val = ["c", "e", "g", "h", "f"]
    assert voc.train_aug_ids(voc_train, voc_val, sbd_train, sbd_val) == ["a", "b", "c", "f", "g", "h"]
    assert voc.train_aug_ids([], ["x"], ["x"], ["x"]) == []


def _read_list(path: Path) -> list[str]:
    return path.read_text().split()


def test_synthetic_lists_overlap_and_split_arithmetic_holds(voc_root: Path) -> None:
    lists = voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    sbd = voc_root / "benchmark_RELEASE/dataset"
    voc_train, voc_val = set(_read_list(lists / "train.txt")), set(_read_list(lists / "val.txt"))
    sbd_train, sbd_val = set(_read_list(sbd / "train.txt")), set(_read_list(sbd / "val.txt"))
    sbd_all = sbd_train | sbd_val
    assert voc_train & sbd_all, "some VOC train ids must also be SBD ids (VOC mask wins)"
    assert voc_val & sbd_train and voc_val & sbd_val, "some VOC val ids must be in SBD lists (excluded)"
    assert sbd_all - voc_train - voc_val, "some ids must come from SBD alone"
    found = voc.discover(voc_root, "train_aug")
    keys = [s.key for s in found.samples]
    assert keys == sorted((voc_train | sbd_train | sbd_val) - voc_val)
    marker = json.loads((voc_root / "dfdam_synthetic.json").read_text())
    assert len(keys) == found.listed == marker["expected_counts"]["train_aug"] == 10
    by_key = {s.key: s for s in found.samples}
    for key in voc_train:
        assert by_key[key].label_path == voc_root / f"VOCdevkit/VOC2012/SegmentationClass/{key}.png"
        assert by_key[key].image_path == voc_root / f"VOCdevkit/VOC2012/JPEGImages/{key}.jpg"
    for key in sbd_all - voc_train - voc_val:
        assert by_key[key].label_path == sbd / "cls" / f"{key}.mat"
        assert by_key[key].image_path == sbd / "img" / f"{key}.jpg"
    val = voc.discover(voc_root, "val")
    assert [s.key for s in val.samples] == sorted(voc_val)
    assert all(s.label_path.suffix == ".png" for s in val.samples)


def test_voc_mask_wins_in_the_shards(voc_root: Path, voc_shards: Path) -> None:
    """VOC masks carry the 255 border; SBD's do not: the label tells which one was packed."""
    sbd = voc_root / "benchmark_RELEASE/dataset"
    voc_train = set(_read_list(voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"))
    both = voc_train & (set(_read_list(sbd / "train.txt")) | set(_read_list(sbd / "val.txt")))
    assert both
    seen = {}
    for shard in sorted(voc_shards.glob("train_aug-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "label.png":
                    seen.setdefault(key, {})["label"] = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                elif ext == "json":
                    seen.setdefault(key, {})["meta"] = json.loads(tar.extractfile(member).read())
    for key in both:
        assert seen[key]["meta"]["label"] == f"VOCdevkit/VOC2012/SegmentationClass/{key}.png"
        assert (seen[key]["label"] == 255).any()
        np.testing.assert_array_equal(
            seen[key]["label"], np.asarray(Image.open(voc_root / f"VOCdevkit/VOC2012/SegmentationClass/{key}.png")))
    sbd_only = [k for k, v in seen.items() if v["meta"]["label"].endswith(".mat")]
    assert sbd_only
    for key in sbd_only:
        assert not (seen[key]["label"] == 255).any()
        mat = scipy.io.loadmat(sbd / "cls" / f"{key}.mat", struct_as_record=False, squeeze_me=True)
        np.testing.assert_array_equal(seen[key]["label"], mat["GTcls"].Segmentation)


def test_missing_sbd_is_named_and_val_needs_no_sbd(voc_copy: Path) -> None:
    (voc_copy / "benchmark_RELEASE").rename(voc_copy / "moved")
    with pytest.raises(DatasetError, match=r"train_aug needs SBD's masks .*: expected the SBD release at "
                                           r"benchmark_RELEASE/dataset .* or its PNG conversion at "
                                           r"VOCdevkit/VOC2012/SegmentationClassAug with "
                                           r"ImageSets/Segmentation/trainaug.txt"):
        voc.discover(voc_copy, "train_aug")
    assert len(voc.discover(voc_copy, "val").samples) == 4
    assert len(voc.discover(voc_copy, "voc_trainval").samples) == 8


def test_missing_split_list_is_named(voc_copy: Path) -> None:
    (voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing split list .*Segmentation/val.txt; expected a text file"):
        voc.discover(voc_copy, "val")


def test_missing_label_and_missing_image(voc_copy: Path) -> None:
    root = voc_copy / "VOCdevkit/VOC2012"
    val_ids = _read_list(root / "ImageSets/Segmentation/val.txt")
    (root / "SegmentationClass" / f"{val_ids[0]}.png").unlink()
    (root / "JPEGImages" / f"{val_ids[1]}.jpg").unlink()
    found = voc.discover(voc_copy, "val")
    messages = {r.key: r.message() for r in found.rejects}
    assert messages[val_ids[0]] == (f"{root / 'JPEGImages' / (val_ids[0] + '.jpg')}: image without its label: "
                                    f"expected {root / 'SegmentationClass' / (val_ids[0] + '.png')}")
    assert messages[val_ids[1]] == (f"{root / 'SegmentationClass' / (val_ids[1] + '.png')}: label without its "
                                    f"image: expected {root / 'JPEGImages' / (val_ids[1] + '.jpg')}")
    assert len(found.samples) == 2 and found.listed == 4


def test_sbd_only_id_without_mat_names_both_candidates(voc_copy: Path) -> None:
    sbd = voc_copy / "benchmark_RELEASE/dataset"
    sbd_only = sorted(set(_read_list(sbd / "train.txt")) - set(voc.read_id_list(
        voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt")) - set(voc.read_id_list(
        voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt")))
    (sbd / "cls" / f"{sbd_only[0]}.mat").unlink()
    reject = next(r for r in voc.discover(voc_copy, "train_aug").rejects if r.key == sbd_only[0])
    assert reject.reason.startswith("image without its label: expected ")
    assert f"SegmentationClass/{sbd_only[0]}.png or " in reject.reason and f"cls/{sbd_only[0]}.mat" in reject.reason


def test_jpeg_bytes_must_be_a_jpeg_and_complete(voc_copy: Path, tmp_path: Path) -> None:
    samples = voc.discover(voc_copy, "val").samples
    png_as_jpg, truncated = samples[0], samples[1]
    buf = io.BytesIO()
    Image.open(png_as_jpg.image_path).save(buf, format="PNG")
    png_as_jpg.image_path.write_bytes(buf.getvalue())
    with pytest.raises(SampleError, match=r"file content is PNG, expected JPEG for a .jpg file"):
        encode_sample(png_as_jpg, dataset="voc", split="val", num_classes=21)
    data = truncated.image_path.read_bytes()
    truncated.image_path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SampleError, match=r"unreadable or truncated image .*expected a complete JPEG file"):
        encode_sample(truncated, dataset="voc", split="val", num_classes=21)
    report = shard_split("voc", voc_copy, "val", tmp_path / "out", shard_size=2, show_progress=False)
    assert report.samples == 2 and {r.key for r in report.rejects} == {png_as_jpg.key, truncated.key}


def _shard_members(shards: Path, split: str) -> dict[str, dict[str, bytes]]:
    """``{key: {member: bytes}}`` of every sample in ``split``'s shards."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_trainval_is_train_aug_and_val(voc_root: Path) -> None:
    found = voc.discover(voc_root, "trainval")
    parts = {split: {s.key: s.label_path for s in voc.discover(voc_root, split).samples} for split in ("train_aug", "val")}
    assert not parts["train_aug"].keys() & parts["val"].keys()
    assert {s.key: s.label_path for s in found.samples} == parts["train_aug"] | parts["val"]
    assert [s.key for s in found.samples] == sorted(s.key for s in found.samples) and not found.rejects


def test_voc_trainval_is_voc_train_and_val_with_vocs_own_masks(voc_root: Path, tmp_path: Path) -> None:
    lists = voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    found = voc.discover(voc_root, "voc_trainval")
    keys = [s.key for s in found.samples]
    assert keys == sorted(set(_read_list(lists / "train.txt")) | set(_read_list(lists / "val.txt")))
    assert keys == _read_list(lists / "trainval.txt")  # the devkit's own trainval list
    assert all(s.label_path == voc_root / f"VOCdevkit/VOC2012/SegmentationClass/{s.key}.png" for s in found.samples)
    report = shard_split("voc", voc_root, "voc_trainval", tmp_path, shard_size=4, show_progress=False)
    assert report.samples == found.listed == 8 and not report.rejects


def test_test_split_is_unlabelled_and_packs(voc_root: Path, tmp_path: Path) -> None:
    ids = _read_list(voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt")
    assert len(ids) == 4
    everything_else = {s.key for split in ("train_aug", "val") for s in voc.discover(voc_root, split).samples}
    assert not set(ids) & everything_else
    found = voc.discover(voc_root, "test")
    assert [s.key for s in found.samples] == sorted(ids) and all(s.label_path is None for s in found.samples)
    report = shard_split("voc", voc_root, "test", tmp_path, shard_size=3, show_progress=False)
    assert report.samples == 4 and report.shards == 2
    manifest = read_manifest(tmp_path, "test")
    rows = manifest.table.to_pylist()
    assert [r["label_source"] for r in rows] == [None] * 4
    assert all(r["ignore_pixels"] == r["height"] * r["width"] and sum(r["class_pixels"]) == 0 for r in rows)
    members = _shard_members(tmp_path, "test")
    assert sorted(members) == sorted(ids)
    for key, m in members.items():
        assert m["jpg"] == (voc_root / f"VOCdevkit/VOC2012/JPEGImages/{key}.jpg").read_bytes()
        assert (np.asarray(Image.open(io.BytesIO(m["label.png"]))) == 255).all()
        assert json.loads(m["json"])["label"] is None


def test_test_split_needs_its_list(voc_copy: Path) -> None:
    (voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing split list .*test.txt; expected the VOC 2012 test set"):
        voc.discover(voc_copy, "test")


def test_segmentation_class_aug_layout_gives_the_same_samples_and_labels(voc_copy: Path, voc_shards: Path,
                                                                        tmp_path: Path) -> None:
    """mmsegmentation's conversion (SBD .mat -> SegmentationClassAug/*.png + trainaug.txt), without
    benchmark_RELEASE/, shards into the keys, labels and photos of the SBD release."""
    aug = write_segmentation_class_aug(voc_copy)
    lists = voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    assert Image.open(next(aug.glob("*.png"))).mode == "L"
    sbd = voc_copy / "benchmark_RELEASE/dataset"
    assert sorted(p.stem for p in aug.glob("*.png")) == sorted(p.stem for p in (sbd / "cls").glob("*.mat"))
    shutil.rmtree(voc_copy / "benchmark_RELEASE")
    ids = _read_list(lists / "trainaug.txt")
    (lists / "trainaug.txt").write_text("".join(f"{i}\n" for i in reversed(ids)))  # the converter writes a set's order
    found = voc.discover(voc_copy, "train_aug")
    assert found.listed == 10 and not found.rejects
    assert {s.label_path.parent.name for s in found.samples} == {"SegmentationClass", "SegmentationClassAug"}
    report = shard_split("voc", voc_copy, "train_aug", tmp_path, shard_size=4, show_progress=False)
    assert report.samples == 10
    from_sbd, from_aug = _shard_members(voc_shards, "train_aug"), _shard_members(tmp_path, "train_aug")
    assert sorted(from_aug) == sorted(from_sbd) == sorted(ids)
    for key in from_sbd:
        assert from_aug[key]["label.png"] == from_sbd[key]["label.png"], key
        assert from_aug[key]["jpg"] == from_sbd[key]["jpg"], key
    expected = read_manifest(voc_shards, "train_aug").table.select(["key", "label_sha256", "image_sha256"])
    assert read_manifest(tmp_path, "train_aug").table.select(["key", "label_sha256", "image_sha256"]).equals(expected)


def test_train_aug_list_of_the_aug_layout_is_found_and_checked(voc_copy: Path) -> None:
    write_segmentation_class_aug(voc_copy)
    shutil.rmtree(voc_copy / "benchmark_RELEASE")
    lists = voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    ids = _read_list(lists / "trainaug.txt")
    (lists / "trainaug.txt").rename(lists / "train_aug.txt")  # the other name converters use, DeepLab's line format
    (lists / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    assert [s.key for s in voc.discover(voc_copy, "train_aug").samples] == sorted(ids)
    val_id = _read_list(lists / "val.txt")[0]
    (lists / "train_aug.txt").write_text("".join(f"{i}\n" for i in [*ids, val_id]))
    with pytest.raises(DatasetError, match=rf"train_aug.txt lists 1 VOC val id\(s\) \({val_id}, ...\); train_aug "
                                           r"must exclude VOC val"):
        voc.discover(voc_copy, "train_aug")
    (lists / "train_aug.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing split list .*trainaug.txt \(or train_aug.txt\)"):
        voc.discover(voc_copy, "train_aug")
