"""The synthetic datasets: real layouts, determinism, declared counts, learnable content."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from sharding import cityscapes, voc
from sharding.marker import MARKER, read_marker
from sharding.synthetic import make_cityscapes, make_voc, render_cityscapes, render_voc


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cityscapes_layout_and_names(cityscapes_root: Path) -> None:
    files = sorted(p.relative_to(cityscapes_root).as_posix() for p in cityscapes_root.rglob("*.png"))
    pattern = re.compile(r"(leftImg8bit|gtFine)/(train|val|test)/([a-z]+)/\3_\d{6}_\d{6}_"
                         r"(leftImg8bit|gtFine_labelIds|gtFine_color)\.png")
    assert files and all(pattern.fullmatch(f) for f in files)
    for split, count in (("train", 6), ("val", 3), ("test", 2)):
        assert len(list((cityscapes_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))) == count
        assert len(list((cityscapes_root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))) == count
    assert {p.name for p in (cityscapes_root / "leftImg8bit" / "train").iterdir()} == {"aachen", "bochum"}
    image = Image.open(next((cityscapes_root / "leftImg8bit" / "val").glob("*/*.png")))
    label = Image.open(next((cityscapes_root / "gtFine" / "val").glob("*/*_labelIds.png")))
    assert (image.mode, image.size, label.mode, label.size) == ("RGB", (64, 32), "L", (64, 32))


def test_voc_layout_and_mat_files_read_like_the_real_ones(voc_root: Path) -> None:
    devkit = voc_root / "VOCdevkit" / "VOC2012"
    mask = Image.open(next((devkit / "SegmentationClass").glob("*.png")))
    assert mask.mode == "P" and mask.getpalette()[3:6] == [128, 0, 0]
    assert (np.asarray(mask) == 255).any(), "VOC masks carry the void border"
    photo = Image.open(next((devkit / "JPEGImages").glob("*.jpg")))
    assert photo.format == "JPEG" and 24 <= min(photo.size) and max(photo.size) <= 40
    mat_path = next((voc_root / "benchmark_RELEASE" / "dataset" / "cls").glob("*.mat"))
    segmentation = scipy.io.loadmat(mat_path, struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation
    assert segmentation.dtype == np.uint8 and segmentation.ndim == 2
    assert set(np.unique(segmentation)) <= set(range(21)), "SBD masks have no border"
    assert (devkit / "ImageSets" / "Segmentation" / "trainval.txt").is_file()


def test_marker_declares_the_counts_the_readers_find(cityscapes_root: Path, voc_root: Path) -> None:
    marker = read_marker(cityscapes_root)
    assert marker["layout"] == "cityscapes" and marker["expected_counts"] == {"train": 6, "val": 3, "test": 2}
    for split, count in marker["expected_counts"].items():
        assert cityscapes.discover(cityscapes_root, split).listed == count
    marker = read_marker(voc_root)
    assert marker["expected_counts"]["train_aug"] == 10 and marker["expected_counts"]["val"] == 4
    for split, count in marker["expected_counts"].items():
        found = voc.discover(voc_root, split)
        assert found.listed == len(found.samples) == count
    assert read_marker(voc_root / "VOCdevkit") is None


@pytest.mark.parametrize("layout", ["cityscapes", "voc"])
def test_same_seed_same_bytes_other_seed_other_data(layout: str, tmp_path: Path, synthetic_sizes: dict) -> None:
    make = make_cityscapes if layout == "cityscapes" else make_voc
    size = synthetic_sizes[layout]
    make(tmp_path / "a", seed=3, **size)
    make(tmp_path / "b", seed=3, **size)
    make(tmp_path / "c", seed=4, **size)
    a, b, c = _tree(tmp_path / "a"), _tree(tmp_path / "b"), _tree(tmp_path / "c")
    assert a == b
    assert a != c
    if layout == "voc":
        assert any(name.endswith(".mat") for name in a)


def test_regenerating_replaces_a_synthetic_dataset_but_never_other_data(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_cityscapes(root, seed=0, train=4, val=2, test=2, height=32, width=64)
    make_cityscapes(root, seed=0, train=2, val=2, test=2, height=32, width=64)
    assert cityscapes.discover(root, "train").listed == 2
    assert json.loads((root / MARKER).read_text())["expected_counts"]["train"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"is not empty and holds no dfdam_synthetic.json"):
        make_voc(other, train_aug=4, val=2)
    assert (other / "precious.txt").read_text() == "keep"


def test_voc_needs_enough_images_for_every_overlap(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="need at least 4 train_aug and 2 val images"):
        make_voc(tmp_path / "v", train_aug=3, val=2)


def test_cityscapes_scenes_use_the_table_widely() -> None:
    lut = cityscapes.train_id_lut()
    ids = np.stack([render_cityscapes(np.random.default_rng(s), 64, 128)[1] for s in range(24)])
    train_ids = set(np.unique(lut[ids])) - {255}
    assert len(train_ids) >= 15, sorted(train_ids)
    assert {1, 2, 3} <= set(np.unique(ids)), "ego vehicle, rectification border and out of roi appear"
    assert {4, 9} & set(np.unique(ids)), "static and parking (void in train ids) appear"
    sky, road = lut[ids][:, :5, :].ravel(), lut[ids][:, -12:-8, 40:88].ravel()
    assert np.mean(sky == 10) > 0.5, "sky at the top"
    assert np.mean(road == 0) > 0.5, "road at the bottom"


def _nearest_colour_miou(kind: str) -> float:
    """mIoU of a per-pixel nearest-class-mean colour classifier, fit on 30 images, scored on 15."""
    lut = cityscapes.train_id_lut()

    def pixels(seeds: range) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for seed in seeds:
            if kind == "cityscapes":
                rgb, ids = render_cityscapes(np.random.default_rng(seed), 48, 96)
                target = lut[ids]
            else:
                rgb, target = render_voc(np.random.default_rng(seed), 48, 48)
            xs.append(rgb.reshape(-1, 3).astype(np.float32))
            ys.append(target.ravel())
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = pixels(range(30))
    x_val, y_val = pixels(range(1000, 1015))
    classes = np.array([c for c in np.unique(y_train) if c != 255])
    means = np.stack([x_train[y_train == c].mean(0) for c in classes])
    scored = y_val != 255
    pred = classes[np.argmin(((x_val[scored][:, None] - means[None]) ** 2).sum(-1), axis=1)]
    truth = y_val[scored]
    ious = [((pred == c) & (truth == c)).sum() / ((pred == c) | (truth == c)).sum()
            for c in classes if ((pred == c) | (truth == c)).any()]
    return float(np.mean(ious))


@pytest.mark.parametrize("kind", ["cityscapes", "voc"])
def test_colour_carries_signal_but_does_not_solve_it(kind: str) -> None:
    miou = _nearest_colour_miou(kind)
    assert 0.15 < miou < 0.8, miou
