"""PASCAL VOC 2012 with the SBD augmentation, as users download them.

Layout read, under one ``--root`` (symlinks are fine)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      palette PNG: class indices, 255 border
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
    benchmark_RELEASE/dataset/img/<id>.jpg
    benchmark_RELEASE/dataset/cls/<id>.mat            MATLAB struct GTcls.Segmentation
    benchmark_RELEASE/dataset/{train,val}.txt

Splits: ``train_aug`` = (VOC train + SBD train + SBD val) - VOC val, where VOC's own
mask (and photo) wins when both exist; ``val`` = VOC val; ``train`` = VOC train alone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sharding.classes import IGNORE_INDEX, VOC_CLASS_NAMES
from sharding.samples import (DatasetError, Discovery, Reject, SampleError, SourceSample, read_index_png,
                              values_present)

SPLITS = ("train_aug", "val", "train")
DEFAULT_SPLITS = ("train_aug", "val")
OFFICIAL_COUNTS = {"train_aug": 10582, "val": 1449, "train": 1464}
"""Images per split on the full VOC 2012 + SBD release."""

VOC_DIR = Path("VOCdevkit") / "VOC2012"
SBD_DIR = Path("benchmark_RELEASE") / "dataset"
NUM_CLASSES = len(VOC_CLASS_NAMES)
_EXPECTED_VALUES = f"class indices 0-{NUM_CLASSES - 1} or {IGNORE_INDEX} (void)"


def _check_indices(path: Path, indices: np.ndarray) -> np.ndarray:
    """Return ``indices`` as uint8 after checking every value is a VOC class or 255."""
    if indices.ndim != 2:
        raise SampleError(path, f"label has shape {indices.shape}, expected (H, W) {_EXPECTED_VALUES}")
    present = values_present(indices)
    bad = present[((present >= NUM_CLASSES) & (present != IGNORE_INDEX)) | (present < 0)]
    if bad.size:
        raise SampleError(path, f"label value{'s' if bad.size > 1 else ''} "
                                f"{', '.join(str(int(v)) for v in bad[:10])} outside the VOC classes; "
                                f"expected {_EXPECTED_VALUES}")
    return indices.astype(np.uint8, copy=False)


def read_class_png(path: Path) -> np.ndarray:
    """Read a VOC ``SegmentationClass`` palette PNG as class indices, (H, W) uint8.

    The PNG is read in its own palette mode ("P"), so each pixel is its class index
    (the palette only colours it); it is never converted to RGB. Mode "L" files of
    indices are accepted too.
    """
    indices = read_index_png(path, ("P", "L"), f"a palette (mode P) PNG of {_EXPECTED_VALUES}")
    return _check_indices(path, indices)


def read_sbd_mat(path: Path) -> np.ndarray:
    """Read an SBD ``cls/<id>.mat`` file: ``GTcls.Segmentation`` as class indices."""
    import scipy.io  # only VOC's SBD labels need it: kept out of every worker's start-up

    if not path.is_file():
        raise SampleError(path, "label file is missing")
    try:
        mat = scipy.io.loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except Exception as exc:
        raise SampleError(path, f"unreadable .mat file ({type(exc).__name__}: {exc}); expected a "
                                "MATLAB file with the struct GTcls and its field Segmentation") from None
    gtcls = mat.get("GTcls")
    segmentation = getattr(gtcls, "Segmentation", None)
    if segmentation is None:
        raise SampleError(path, "no GTcls.Segmentation in the .mat file; expected SBD's struct GTcls "
                                "with the field Segmentation")
    segmentation = np.asarray(segmentation)
    if not np.issubdtype(segmentation.dtype, np.integer):
        raise SampleError(path, f"GTcls.Segmentation is {segmentation.dtype}, expected integer {_EXPECTED_VALUES}")
    return _check_indices(path, segmentation)


def read_id_list(path: Path) -> list[str]:
    """The image ids of a split list (one per line), in file order, without duplicates."""
    if not path.is_file():
        raise DatasetError(f"missing split list {path}; expected a text file with one image id per line")
    seen: dict[str, None] = {}
    for line in path.read_text().splitlines():
        token = line.strip().split()[0] if line.strip() else ""
        if token:
            seen.setdefault(token, None)
    return list(seen)


def train_aug_ids(voc_train: list[str], voc_val: list[str],
                  sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """The ``train_aug`` ids: (VOC train + SBD train + SBD val) - VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"missing folder {path}: expected {what}")


def discover(root: Path, split: str) -> Discovery:
    """List the samples of one VOC split, sorted by id.

    For each id the VOC mask ``SegmentationClass/<id>.png`` with its photo
    ``JPEGImages/<id>.jpg`` is used when the mask exists; otherwise (``train_aug``
    only) the SBD mask ``cls/<id>.mat`` with its photo ``img/<id>.jpg``. An id with
    no mask, or with a mask but no photo, becomes a :class:`Reject`.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    voc = root / VOC_DIR
    _require_dir(voc, f"the PASCAL VOC 2012 devkit at {VOC_DIR} under the root {root}")
    for sub, what in (("JPEGImages", "VOC photos <id>.jpg"),
                      ("SegmentationClass", "VOC palette masks <id>.png"),
                      ("ImageSets/Segmentation", "VOC split lists train.txt and val.txt")):
        _require_dir(voc / sub, what)
    lists = voc / "ImageSets" / "Segmentation"
    voc_val = read_id_list(lists / "val.txt")
    voc_train = read_id_list(lists / "train.txt")
    sbd_ids: set[str] = set()
    sbd = root / SBD_DIR
    if split == "val":
        ids = sorted(voc_val)
    elif split == "train":
        ids = sorted(voc_train)
    else:
        _require_dir(sbd, f"the SBD release at {SBD_DIR} under the root {root} (needed for train_aug)")
        _require_dir(sbd / "img", "SBD photos <id>.jpg")
        _require_dir(sbd / "cls", "SBD masks <id>.mat")
        sbd_train = read_id_list(sbd / "train.txt")
        sbd_val = read_id_list(sbd / "val.txt")
        sbd_ids = set(sbd_train) | set(sbd_val)
        ids = train_aug_ids(voc_train, voc_val, sbd_train, sbd_val)
    samples: list[SourceSample] = []
    rejects: list[Reject] = []
    for image_id in ids:
        voc_mask = voc / "SegmentationClass" / f"{image_id}.png"
        if voc_mask.is_file():
            image, label, reader = voc / "JPEGImages" / f"{image_id}.jpg", voc_mask, read_class_png
        elif image_id in sbd_ids and (sbd / "cls" / f"{image_id}.mat").is_file():
            image, label, reader = sbd / "img" / f"{image_id}.jpg", sbd / "cls" / f"{image_id}.mat", read_sbd_mat
        else:
            expected = str(voc_mask) + (f" or {sbd / 'cls' / f'{image_id}.mat'}" if image_id in sbd_ids else "")
            photo = voc / "JPEGImages" / f"{image_id}.jpg"
            if photo.is_file():
                rejects.append(Reject(image_id, str(photo), f"image without its label: expected {expected}"))
            else:
                rejects.append(Reject(image_id, str(photo), f"id {image_id} is listed for {split} but neither "
                                                            f"its image nor its label exists; expected {expected}"))
            continue
        if not image.is_file():
            rejects.append(Reject(image_id, str(label), f"label without its image: expected {image}"))
            continue
        samples.append(SourceSample(key=image_id, root=root, image_path=image, label_path=label,
                                    read_label=reader))
    return Discovery(samples=samples, rejects=rejects, listed=len(ids))
