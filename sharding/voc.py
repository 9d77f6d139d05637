"""PASCAL VOC 2012 with the SBD augmentation, as users download them.

Layout read, under one ``--root`` (symlinks are fine)::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg                 trainval photos (+ test photos, VOC2012test.tar)
    VOCdevkit/VOC2012/SegmentationClass/<id>.png          palette PNG: class indices, 255 border
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt (+ test.txt, VOC2012test.tar)

and, for ``train_aug``, the SBD masks in one of two layouts::

    benchmark_RELEASE/dataset/img/<id>.jpg                SBD as released (benchmark.tgz)
    benchmark_RELEASE/dataset/cls/<id>.mat                MATLAB struct GTcls.Segmentation
    benchmark_RELEASE/dataset/{train,val}.txt
  or
    VOCdevkit/VOC2012/SegmentationClassAug/<id>.png       SBD's masks as single-channel PNGs of class
                                                          indices, as mmsegmentation's voc_aug.py (and
                                                          DeepLab's converters) write them
    VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt the 10,582 ids (mmsegmentation's name;
                                                          train_aug.txt is read too)

``benchmark_RELEASE/`` is read when it is there, else ``SegmentationClassAug/``; both give the
same samples and the same labels (photos come from ``JPEGImages/`` in the second).

Splits (the paper's, section 4 and 4.5):

* ``train_aug`` = (VOC train + SBD train + SBD val) - VOC val, 10,582 images, where VOC's own
  mask (and photo) wins when both exist;
* ``val`` = VOC val (1,449); ``train`` = VOC train alone (1,464);
* ``trainval`` = ``train_aug`` + ``val`` (12,031), every labelled image, for the final
  fine-tune before the test server;
* ``voc_trainval`` = VOC train + val (2,913), VOC's own masks only: the "PASCAL VOC 2012
  trainval set" the paper names for that fine-tune, for its better annotations (section 4.5);
* ``test`` = the 1,456 test photos, unlabelled (every pixel 255), for predictions to submit.
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import numpy as np

from sharding.classes import IGNORE_INDEX, VOC_CLASS_NAMES
from sharding.samples import (DatasetError, Discovery, LabelReader, Reject, SampleError, SourceSample,
                              read_index_png, values_present)

SPLITS = ("train_aug", "val", "train", "trainval", "voc_trainval", "test")
DEFAULT_SPLITS = ("train_aug", "val")
UNLABELLED_SPLITS = frozenset({"test"})
OFFICIAL_COUNTS = {"train_aug": 10582, "val": 1449, "train": 1464, "trainval": 12031, "voc_trainval": 2913, "test": 1456}
"""Images per split on the full VOC 2012 + SBD release (and VOC2012test.tar for ``test``)."""

VOC_DIR = Path("VOCdevkit") / "VOC2012"
SBD_DIR = Path("benchmark_RELEASE") / "dataset"
AUG_DIR = VOC_DIR / "SegmentationClassAug"
AUG_LISTS = ("trainaug.txt", "train_aug.txt")
"""Names of the train_aug list next to train.txt in the SegmentationClassAug layout, in the
order looked for: mmsegmentation's voc_aug.py writes ``trainaug.txt``."""
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


_ID = re.compile(r"[A-Za-z0-9_-]+")
"""An image id as VOC and SBD name them (``2007_000032``): a plain file stem, no dot (a
WebDataset key ends at the first dot), no path."""
LIST_FOLDERS = frozenset({"JPEGImages", "SegmentationClass", "SegmentationClassAug", "img", "cls"})
"""The folders a DeepLab-style list line may name a file in (``/JPEGImages/<id>.jpg``)."""


def list_token_id(token: str) -> str | None:
    """The image id a split-list token names, or None when it is not one.

    A token is a plain id (``2007_000032``) or, as DeepLab's lists write them, one file in a
    dataset folder (``/JPEGImages/2007_000032.jpg``, ``SegmentationClassAug/2007_000032.png``).
    Anything else (an absolute path elsewhere, ``..``, a deeper path) is refused, so that a
    list can never make the sharder read a file outside the dataset root.
    """
    if _ID.fullmatch(token):
        return token
    parts = PurePosixPath(token).parts
    if parts and parts[0] == "/":
        parts = parts[1:]
    if len(parts) == 2 and parts[0] in LIST_FOLDERS:
        stem = PurePosixPath(parts[1]).stem
        if _ID.fullmatch(stem) and parts[1] in (f"{stem}.jpg", f"{stem}.png", f"{stem}.mat"):
            return stem
    return None


def read_id_list(path: Path) -> list[str]:
    """The image ids of a split list (one per line), in file order, without duplicates.

    A line may also name files, as DeepLab's lists do (``/JPEGImages/<id>.jpg
    /SegmentationClassAug/<id>.png``): the id is then the first file's name without suffix.
    A line naming anything else (``../x``, ``/etc/passwd``) is a :class:`DatasetError`
    (:func:`list_token_id`).
    """
    if not path.is_file():
        raise DatasetError(f"missing split list {path}; expected a text file with one image id per line")
    seen: dict[str, None] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        token = line.strip().split()[0] if line.strip() else ""
        if not token:
            continue
        image_id = list_token_id(token)
        if image_id is None:
            raise DatasetError(f"{path} line {number}: {token!r} is not an image id; expected an image id such as "
                               "2007_000032 (letters, digits, '_', '-') or DeepLab's /JPEGImages/<id>.jpg: a split "
                               "list names images under the dataset root only")
        seen.setdefault(image_id, None)
    return list(seen)


def train_aug_ids(voc_train: list[str], voc_val: list[str],
                  sbd_train: list[str], sbd_val: list[str]) -> list[str]:
    """The ``train_aug`` ids: (VOC train + SBD train + SBD val) - VOC val, sorted."""
    return sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(voc_val))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"missing folder {path}: expected {what}")


Source = tuple[Path, Path, LabelReader]
"""Where one sample's photo and mask are, and the reader of that mask."""


def _sbd_sources(root: Path, voc_train: list[str], voc_val: list[str]) -> tuple[list[str], dict[str, Source]]:
    """The ``train_aug`` ids and the SBD mask of each id that has one, from either SBD layout."""
    voc = root / VOC_DIR
    sbd, aug = root / SBD_DIR, root / AUG_DIR
    if sbd.is_dir():
        _require_dir(sbd / "img", "SBD photos <id>.jpg")
        _require_dir(sbd / "cls", "SBD masks <id>.mat")
        sbd_train = read_id_list(sbd / "train.txt")
        sbd_val = read_id_list(sbd / "val.txt")
        return (train_aug_ids(voc_train, voc_val, sbd_train, sbd_val),
                {i: (sbd / "img" / f"{i}.jpg", sbd / "cls" / f"{i}.mat", read_sbd_mat) for i in {*sbd_train, *sbd_val}})
    if aug.is_dir():
        lists = voc / "ImageSets" / "Segmentation"
        found = [lists / name for name in AUG_LISTS if (lists / name).is_file()]
        if not found:
            raise DatasetError(f"missing split list {lists / AUG_LISTS[0]} (or {AUG_LISTS[1]}): the "
                               "SegmentationClassAug layout needs the list of the 10,582 train_aug ids, as "
                               "mmsegmentation's voc_aug.py writes it")
        ids = read_id_list(found[0])
        leaked = sorted(set(ids) & set(voc_val))
        if leaked:
            raise DatasetError(f"{found[0]} lists {len(leaked)} VOC val id(s) ({', '.join(leaked[:3])}, ...); "
                               "train_aug must exclude VOC val (expected (VOC train + SBD) - VOC val)")
        return sorted(ids), {i: (voc / "JPEGImages" / f"{i}.jpg", aug / f"{i}.png", read_class_png) for i in ids}
    raise DatasetError(f"train_aug needs SBD's masks under the root {root}: expected the SBD release at {SBD_DIR} "
                       f"(benchmark.tgz: img/, cls/*.mat, train.txt, val.txt) or its PNG conversion at {AUG_DIR} "
                       f"with ImageSets/Segmentation/{AUG_LISTS[0]} (mmsegmentation's voc_aug.py)")


def _test_split(root: Path, lists: Path) -> Discovery:
    """The unlabelled VOC 2012 test photos listed in ``test.txt`` (from VOC2012test.tar)."""
    photos = root / VOC_DIR / "JPEGImages"
    if not (lists / "test.txt").is_file():
        raise DatasetError(f"missing split list {lists / 'test.txt'}; expected the VOC 2012 test set (VOC2012test.tar, "
                           f"unpacked over the same VOCdevkit/) with one image id per line")
    ids = sorted(read_id_list(lists / "test.txt"))
    samples, rejects = [], []
    for image_id in ids:
        photo = photos / f"{image_id}.jpg"
        if photo.is_file():
            samples.append(SourceSample(key=image_id, root=root, image_path=photo, label_path=None,
                                        read_label=read_class_png))
        else:
            rejects.append(Reject(image_id, str(photo), f"id {image_id} is listed for test but its image is missing"))
    return Discovery(samples=samples, rejects=rejects, listed=len(ids))


def discover(root: Path, split: str) -> Discovery:
    """List the samples of one VOC split, sorted by id.

    For each id the VOC mask ``SegmentationClass/<id>.png`` with its photo
    ``JPEGImages/<id>.jpg`` is used when the mask exists; otherwise (``train_aug``
    and ``trainval``) the SBD mask (``cls/<id>.mat`` with ``img/<id>.jpg``, or
    ``SegmentationClassAug/<id>.png`` with ``JPEGImages/<id>.jpg``). An id with no mask,
    or with a mask but no photo, becomes a :class:`Reject`. ``test`` reads photos only.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown VOC split {split!r}: expected one of {', '.join(SPLITS)}")
    root = Path(root)
    voc = root / VOC_DIR
    if not voc.is_dir() and (root / "leftImg8bit").is_dir():
        raise DatasetError(f"missing folder {voc}: expected the PASCAL VOC 2012 devkit at {VOC_DIR} under the root "
                           f"{root}, which looks like a Cityscapes root (leftImg8bit/): use --dataset cityscapes")
    _require_dir(voc, f"the PASCAL VOC 2012 devkit at {VOC_DIR} under the root {root}")
    lists = voc / "ImageSets" / "Segmentation"
    _require_dir(voc / "JPEGImages", "VOC photos <id>.jpg")
    if split in UNLABELLED_SPLITS:
        _require_dir(lists, "VOC split lists (test.txt for the test split)")
        return _test_split(root, lists)
    for sub, what in (("SegmentationClass", "VOC palette masks <id>.png"),
                      ("ImageSets/Segmentation", "VOC split lists train.txt and val.txt")):
        _require_dir(voc / sub, what)
    voc_val = read_id_list(lists / "val.txt")
    voc_train = read_id_list(lists / "train.txt")
    sbd: dict[str, Source] = {}
    if split == "val":
        ids = sorted(voc_val)
    elif split == "train":
        ids = sorted(voc_train)
    elif split == "voc_trainval":
        ids = sorted({*voc_train, *voc_val})
    else:
        ids, sbd = _sbd_sources(root, voc_train, voc_val)
        if split == "trainval":
            ids = sorted({*ids, *voc_val})
    samples: list[SourceSample] = []
    rejects: list[Reject] = []
    for image_id in ids:
        voc_mask = voc / "SegmentationClass" / f"{image_id}.png"
        if voc_mask.is_file():
            image, label, reader = voc / "JPEGImages" / f"{image_id}.jpg", voc_mask, read_class_png
        elif image_id in sbd and sbd[image_id][1].is_file():
            image, label, reader = sbd[image_id]
        else:
            expected = str(voc_mask) + (f" or {sbd[image_id][1]}" if image_id in sbd else "")
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
