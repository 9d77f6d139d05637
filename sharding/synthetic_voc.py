"""Synthetic PASCAL VOC 2012 + SBD: object photos written in the real ``VOCdevkit/`` and ``benchmark_RELEASE/`` layouts.

The reader in :mod:`sharding.voc` cannot tell it from the real thing: same folders,
file names and label encodings (VOC palette PNGs with the 255 void border; SBD
``cls/*.mat`` files holding the MATLAB struct ``GTcls.Segmentation``), and VOC/SBD
split lists that overlap the way the real ones do, and unlabelled test photos listed in
``test.txt`` as VOC2012test.tar adds them. :func:`write_segmentation_class_aug` converts the
SBD masks into the other layout users have, ``SegmentationClassAug/`` + ``trainaug.txt``, the
way mmsegmentation's converter does. Images have one to three objects of
different classes on a cluttered background; every class has its own colour family and
shape, some with stripes, under noise and lighting changes. Everything follows from
``seed``: the same arguments write byte-identical files.
"""
from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from sharding.classes import voc_colormap
from sharding.synthetic_drawing import (Canvas, _jitter, _jpeg_bytes, _photograph, _png_bytes, _prepare_out,
                                        _textured, _write_marker)
from sharding.text import bar_disabled
from sharding.voc import AUG_DIR, SBD_DIR, VOC_DIR, read_id_list, read_sbd_mat, train_aug_ids


def voc_object_colour(cls: int) -> tuple[int, int, int]:
    """A distinct colour per VOC class 1..20: ten hues, each light (1-10) and dark (11-20)."""
    hue = ((cls - 1) % 10) / 10.0
    value = 0.95 if cls <= 10 else 0.5
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _object_mask(rng: np.random.Generator, c: Canvas, cls: int) -> np.ndarray:
    """A class-typed shape (ellipse, box, triangle, diamond) at a random place and size."""
    h, w = c.height, c.width
    s = min(h, w) * rng.uniform(0.25, 0.55)
    aspect = rng.uniform(0.6, 1.6)
    rw, rh = s * aspect / 2, s / aspect / 2
    cx, cy = rng.uniform(rw * 0.6, w - rw * 0.6), rng.uniform(rh * 0.6, h - rh * 0.6)
    kind = (cls - 1) % 4
    if kind == 0:
        return c.ellipse((cx - rw, cy - rh, cx + rw, cy + rh))
    if kind == 1:
        return c.rect((cx - rw, cy - rh, cx + rw, cy + rh))
    if kind == 2:
        return c.polygon([(cx, cy - rh), (cx + rw, cy + rh), (cx - rw, cy + rh)])
    return c.polygon([(cx, cy - rh), (cx + rw, cy), (cx, cy + rh), (cx - rw, cy)])


def render_voc(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One object photo: (H, W, 3) uint8 RGB and (H, W) uint8 class indices (0 = background), no border."""
    c = Canvas(height, width, 0, (0, 0, 0))
    base = rng.uniform(80, 170, 3).astype(np.float32) * 0.5 + 60
    c.paint(np.ones((height, width), bool), 0, _textured(rng, c, base, 0.25, max(8, width // 6)))
    for _ in range(rng.integers(0, 4)):  # clutter: background, in greys
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        size = rng.uniform(0.1, 0.3) * min(height, width)
        grey = rng.uniform(70, 200)
        c.paint(c.rect((x0, y0, x0 + size, y0 + size * rng.uniform(0.5, 2))), 0, (grey, grey, grey * 0.95))
    classes = rng.choice(np.arange(1, 21), size=rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]), replace=False)
    for cls in classes:
        cls = int(cls)
        mask = _object_mask(rng, c, cls)
        colour = _jitter(rng, voc_object_colour(cls), 12)
        texture = _textured(rng, c, colour, 0.12, 5)
        if cls % 3 == 0:  # stripes of a darker shade for some classes
            stripes = (np.arange(width)[None, :] + np.arange(height)[:, None]) % 8 < 3
            texture = texture.striped(stripes, 0.7)
        c.paint(mask, cls, texture)
    return _photograph(rng, c.image, 6.0), c.label


def voc_border(indices: np.ndarray, width: int = 2) -> np.ndarray:
    """VOC's void border: 255 on a band about ``2 * width`` pixels wide along every class boundary."""
    size = 2 * width + 1
    edge = ndimage.maximum_filter(indices, size=size) != ndimage.minimum_filter(indices, size=size)
    return np.where(edge, np.uint8(255), indices).astype(np.uint8)


def palette_png(indices: np.ndarray) -> bytes:
    """A mode "P" PNG of class indices with the VOC colour map, like ``SegmentationClass``."""
    image = Image.fromarray(indices.astype(np.uint8))
    image.putpalette([v for colour in voc_colormap(256) for v in colour])
    return _png_bytes(image)


def sbd_mat(indices: np.ndarray) -> bytes:
    """An SBD ``cls/<id>.mat`` file: MATLAB struct ``GTcls`` with ``Segmentation`` and ``CategoriesPresent``.

    ``scipy.io.savemat`` stamps the creation time into the 116-byte text header; it is
    replaced with a fixed text so that the same seed gives the same bytes.
    """
    present = np.array([v for v in np.unique(indices) if 0 < v < 255], dtype=np.uint8)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"GTcls": {"Segmentation": indices.astype(np.uint8), "CategoriesPresent": present}},
                     do_compression=True)
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, Platform: posix, written by sharding.synthetic".ljust(116)
    return bytes(data)


@dataclass(frozen=True)
class VocLists:
    """Image ids of the four split lists, arranged to overlap like the real ones."""

    voc_train: list[str]
    voc_val: list[str]
    sbd_train: list[str]
    sbd_val: list[str]

    @property
    def train_aug(self) -> list[str]:
        return sorted((set(self.voc_train) | set(self.sbd_train) | set(self.sbd_val)) - set(self.voc_val))


def voc_lists(rng: np.random.Generator, train_aug: int, val: int) -> VocLists:
    """Split lists giving exactly ``train_aug`` and ``val`` images, with every kind of overlap.

    train_aug is made of VOC-train-only ids, VOC-train ids also in SBD (VOC's mask must
    win), SBD-train-only and SBD-val-only ids; some VOC val ids are also in SBD lists
    (they must stay out of train_aug).
    """
    if train_aug < 4 or val < 2:
        raise ValueError(f"need at least 4 train_aug and 2 val images to build every overlap, got {train_aug}, {val}")
    n_voc_only = max(1, round(0.25 * train_aug))
    n_voc_sbd = max(1, round(0.15 * train_aug))
    n_sbd_train = max(1, round(0.35 * train_aug))
    n_sbd_val = train_aug - n_voc_only - n_voc_sbd - n_sbd_train
    years = rng.integers(2007, 2012, size=train_aug + val)
    ids = sorted({f"{y}_{n:06d}" for y, n in zip(years, rng.choice(np.arange(1, 8000), train_aug + val, replace=False))})
    ids = [ids[i] for i in rng.permutation(len(ids))]
    cuts = np.cumsum([n_voc_only, n_voc_sbd, n_sbd_train, n_sbd_val])
    voc_only, voc_sbd, sbd_train_only, sbd_val_only, voc_val = np.split(np.array(ids), cuts)
    val_in_sbd = voc_val[: max(2, val // 3)]
    return VocLists(
        voc_train=sorted([*voc_only, *voc_sbd]),
        voc_val=sorted(voc_val),
        sbd_train=sorted([*sbd_train_only, *voc_sbd[0::2], *val_in_sbd[0::2]]),
        sbd_val=sorted([*sbd_val_only, *voc_sbd[1::2], *val_in_sbd[1::2]]),
    )


def voc_test_ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` test ids, sorted, numbered from 8000 up: never one of :func:`voc_lists`' ids (below 8000)."""
    years = rng.integers(2008, 2012, size=count)
    return sorted(f"{y}_{n:06d}" for y, n in zip(years, rng.choice(np.arange(8000, 10000), count, replace=False)))


def make_voc(out: Path | str, *, seed: int = 0, train_aug: int = 64, val: int = 16, test: int = 4,
             min_size: int = 96, max_size: int = 160, show_progress: bool = False) -> dict[str, Any]:
    """Write a synthetic PASCAL VOC 2012 devkit and SBD release under ``out``.

    Args:
        out: the root that will hold ``VOCdevkit/`` and ``benchmark_RELEASE/``.
        seed: everything follows from it.
        train_aug, val: image counts of the ``train_aug`` and ``val`` splits.
        test: unlabelled test photos (``JPEGImages/`` and ``ImageSets/Segmentation/test.txt``);
            none and no ``test.txt`` with 0. They are drawn from random streams of their own,
            so every other file is the same whatever their number.
        min_size, max_size: each image's height and width are drawn from this range.

    Returns:
        The marker written to ``<out>/dfdam_synthetic.json``.
    """
    out = Path(out)
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size} and {max_size}")
    if not 0 <= test <= 2000:
        raise ValueError(f"need 0 <= test <= 2000 test images, got {test}")
    lists = voc_lists(np.random.default_rng([seed, 0]), train_aug, val)
    _prepare_out(out, ("VOCdevkit", "benchmark_RELEASE"))
    voc = out / "VOCdevkit" / "VOC2012"
    sbd = out / "benchmark_RELEASE" / "dataset"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
                   sbd / "img", sbd / "cls"):
        folder.mkdir(parents=True, exist_ok=True)
    in_voc = set(lists.voc_train) | set(lists.voc_val)
    in_sbd = set(lists.sbd_train) | set(lists.sbd_val)
    every = sorted(in_voc | in_sbd)
    for index, image_id in enumerate(tqdm(every, unit="img", desc="synthetic voc", disable=bar_disabled(show_progress))):
        rng = np.random.default_rng([seed, 1, index])
        height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        rgb, indices = render_voc(rng, height, width)
        photo = _jpeg_bytes(rgb)
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(photo)  # VOC holds every photo, as the real one
        if image_id in in_voc:
            (voc / "SegmentationClass" / f"{image_id}.png").write_bytes(palette_png(voc_border(indices)))
        if image_id in in_sbd:
            (sbd / "img" / f"{image_id}.jpg").write_bytes(photo)
            (sbd / "cls" / f"{image_id}.mat").write_bytes(sbd_mat(indices))
    unlabelled = voc_test_ids(np.random.default_rng([seed, 2]), test)
    for index, image_id in enumerate(unlabelled):
        rng = np.random.default_rng([seed, 3, index])
        height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(_jpeg_bytes(render_voc(rng, height, width)[0]))
    segmentation = voc / "ImageSets" / "Segmentation"
    for path, ids in ((segmentation / "train.txt", lists.voc_train), (segmentation / "val.txt", lists.voc_val),
                      (segmentation / "trainval.txt", sorted(in_voc)), (sbd / "train.txt", lists.sbd_train),
                      (sbd / "val.txt", lists.sbd_val), *([(segmentation / "test.txt", unlabelled)] if test else [])):
        path.write_text("".join(f"{i}\n" for i in ids))
    counts = {"train_aug": len(lists.train_aug), "val": len(lists.voc_val), "train": len(lists.voc_train),
              "trainval": len(lists.train_aug) + len(lists.voc_val), "voc_trainval": len(in_voc), **({"test": test} if test else {})}
    return _write_marker(out, "voc", seed, counts, {"min_size": min_size, "max_size": max_size})


def write_segmentation_class_aug(root: Path | str) -> Path:
    """Convert the SBD release under ``root`` into the ``SegmentationClassAug`` layout, as
    mmsegmentation's ``tools/dataset_converters/voc_aug.py`` does; returns the new folder.

    Every ``benchmark_RELEASE/dataset/cls/<id>.mat`` becomes
    ``VOCdevkit/VOC2012/SegmentationClassAug/<id>.png``, a single-channel (mode "L") PNG of its
    ``GTcls.Segmentation``; ``ImageSets/Segmentation/trainaug.txt`` lists (VOC train + SBD train +
    SBD val) - VOC val and ``aug.txt`` lists SBD - (VOC train + val) (sorted here, where the
    converter writes a set's order). ``benchmark_RELEASE/`` is left as it is.
    """
    root = Path(root)
    sbd, lists, aug = root / SBD_DIR, root / VOC_DIR / "ImageSets" / "Segmentation", root / AUG_DIR
    aug.mkdir(parents=True, exist_ok=True)
    for mat in sorted((sbd / "cls").glob("*.mat")):
        (aug / f"{mat.stem}.png").write_bytes(_png_bytes(Image.fromarray(read_sbd_mat(mat))))
    sbd_ids = [*read_id_list(sbd / "train.txt"), *read_id_list(sbd / "val.txt")]
    voc_train, voc_val = read_id_list(lists / "train.txt"), read_id_list(lists / "val.txt")
    aug_only = sorted(set(sbd_ids) - set(voc_train) - set(voc_val))
    for name, ids in (("trainaug.txt", train_aug_ids(voc_train, voc_val, sbd_ids, [])), ("aug.txt", aug_only)):
        (lists / name).write_text("".join(f"{i}\n" for i in ids))
    return aug
