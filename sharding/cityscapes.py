"""Cityscapes as users download it: ``leftImg8bit/`` photos and ``gtFine/`` label ids.

Layout read (fine annotations only; ``gtCoarse`` and ``train_extra`` are never read)::

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label ids become the 19 train ids through the official table of
``cityscapesscripts.helpers.labels``; every other id becomes 255. The test split's
labels are not public, so its samples get an all-255 label and no label file is read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _LABELS

from sharding.classes import IGNORE_INDEX
from sharding.samples import (DatasetError, Discovery, Reject, SampleError, SourceSample, read_index_png,
                              values_present)

SPLITS = ("train", "val", "test")
UNLABELLED_SPLITS = frozenset({"test"})
OFFICIAL_COUNTS = {"train": 2975, "val": 500, "test": 1525}
"""Images per split of the full Cityscapes fine release."""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LAYOUT = ("leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
          "gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png")


def label_ids() -> frozenset[int]:
    """Every label id of the official table that can appear in a labelIds PNG (0..33)."""
    return frozenset(label.id for label in _LABELS if 0 <= label.id < 256)


def train_id_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table: label id -> train id (255 for ignored ids).

    Ids absent from the table also map to 255 here; :func:`read_label_ids` rejects
    them before the table is applied.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in _LABELS:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_INDEX:
            lut[label.id] = label.trainId
    return lut


def label_id_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table: train id -> Cityscapes label id, the inverse of
    :func:`train_id_lut` on the 19 train ids (train id 0 'road' -> label id 7, ..., 18
    'bicycle' -> 33), from the same official table.

    The official evaluation (``cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling``)
    and the test server read predictions as label ids, not train ids. Every other entry
    (the ignore index 255 included) maps to 0, 'unlabeled', which the evaluation does not score.
    """
    lut = np.zeros(256, dtype=np.uint8)
    seen: dict[int, int] = {}
    for label in _LABELS:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_INDEX:
            if label.trainId in seen:
                raise RuntimeError(f"cityscapesscripts gives train id {label.trainId} to label ids "
                                   f"{seen[label.trainId]} and {label.id}: no inverse")
            seen[label.trainId] = label.id
            lut[label.trainId] = label.id
    return lut


_LUT = train_id_lut()
_VALID = np.zeros(256, dtype=bool)
_VALID[sorted(label_ids())] = True


def read_label_ids(path: Path) -> np.ndarray:
    """Read a ``*_gtFine_labelIds.png`` and map it to train ids, (H, W) uint8.

    Raises :class:`SampleError` for a colour PNG, an unreadable file, or an id that
    is not in the official table.
    """
    ids = read_index_png(path, ("L", "P", "I", "I;16"),
                         "a single-channel PNG of Cityscapes label ids 0-33 (mode L), "
                         "as in *_gtFine_labelIds.png, not the *_gtFine_color.png")
    if ids.ndim != 2:
        raise SampleError(path, f"label has shape {ids.shape}, expected (H, W) label ids")
    if ids.dtype != np.uint8:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > 255):
            bad = int(ids.max()) if int(ids.max()) > 255 else int(ids.min())
            raise SampleError(path, f"label id {bad} is not in the Cityscapes label table "
                                    f"(expected ids {min(label_ids())}-{max(label_ids())})")
        ids = ids.astype(np.uint8)
    present = values_present(ids)
    unknown = present[~_VALID[present]]
    if unknown.size:
        raise SampleError(path, f"label id{'s' if unknown.size > 1 else ''} "
                                f"{', '.join(str(int(i)) for i in unknown[:10])} not in the Cityscapes "
                                f"label table (expected ids {min(label_ids())}-{max(label_ids())})")
    return _LUT[ids]


def _require_dir(path: Path, root: Path) -> None:
    if not path.is_dir():
        raise DatasetError(f"Cityscapes root {root}: missing folder {path}; expected the layout {LAYOUT}")


def _files_by_key(folder: Path, suffix: str) -> dict[str, Path]:
    """``{key: path}`` of every ``<city>/<key><suffix>`` under ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.glob(f"*/*{suffix}")):
        if path.is_file():
            found[path.name[: -len(suffix)]] = path
    return found


def discover(root: Path, split: str) -> Discovery:
    """List the samples of one Cityscapes split, sorted by key.

    An image without its labelIds file, or a labelIds file without its image, becomes
    a :class:`Reject`; a missing split folder is a :class:`DatasetError`.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown Cityscapes split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not (root / "leftImg8bit").is_dir() and (root / "VOCdevkit").is_dir():
        raise DatasetError(f"Cityscapes root {root}: missing folder {root / 'leftImg8bit'}; expected the layout "
                           f"{LAYOUT}. {root} looks like a PASCAL VOC root (VOCdevkit/): use --dataset voc")
    label_dir = root / "gtFine" / split
    _require_dir(image_dir, root)
    labelled = split not in UNLABELLED_SPLITS
    if labelled:
        _require_dir(label_dir, root)
    images = _files_by_key(image_dir, IMAGE_SUFFIX)
    labels = _files_by_key(label_dir, LABEL_SUFFIX) if labelled else {}
    samples: list[SourceSample] = []
    rejects: list[Reject] = []
    for key in sorted(set(images) | set(labels)):
        image = images.get(key)
        if image is None:
            label = labels[key]
            expected = image_dir / label.parent.name / f"{key}{IMAGE_SUFFIX}"
            rejects.append(Reject(key, str(label), f"label without its image: expected {expected}"))
            continue
        label = labels.get(key)
        if labelled and label is None:
            expected = label_dir / image.parent.name / f"{key}{LABEL_SUFFIX}"
            rejects.append(Reject(key, str(image), f"image without its label: expected {expected}"))
            continue
        samples.append(SourceSample(key=key, root=root, image_path=image, label_path=label,
                                    read_label=read_label_ids))
    return Discovery(samples=samples, rejects=rejects, listed=len(images))
