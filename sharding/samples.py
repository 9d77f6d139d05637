"""One sample from source files to the bytes that go into a shard.

A dataset reader (``cityscapes.py``, ``voc.py``) lists :class:`SourceSample` s: a key,
an image file, a label file and the function that turns that label file into train
ids. :func:`encode_sample` then reads and checks one of them and returns the tar
members and the manifest row, in one of two encodings (:data:`sharding.pixels.ENCODINGS`):
the image file's own bytes with a label PNG, or both as decoded pixels (``npy.lz4``).
:func:`decode_members` reads either back; the shard verifier and the training and
evaluation loaders all decode through it. Every problem with one sample is a
:class:`SampleError` that names the file and says what was expected; problems with a
whole dataset (a missing folder, a wrong count) are :class:`DatasetError` s.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from sharding.classes import IGNORE_INDEX
from sharding.pixels import (DEFAULT_ENCODING, IMAGE_MEMBER, LABEL_MEMBER, check_encoding, decode_pixels,
                             encode_pixels)

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
"""Image extension in the shard -> the format PIL must find in the file's bytes."""

ORIGINAL_IMAGE_MEMBERS = ("png", "jpg", "jpeg")
"""Image members :func:`decode_members` reads as image files (with ``label.png``)."""
LABEL_PNG = "label.png"
"""The label's member under the original encoding: a mode "L" PNG of train ids."""

LabelReader = Callable[[Path], np.ndarray]
"""Reads one label file and returns its train ids, (H, W) uint8, 255 = ignore."""


class DatasetError(ValueError):
    """A problem with a whole dataset or split: a missing folder or list, a wrong count."""


class SampleError(ValueError):
    """A problem with one sample's files; names the file and what was expected."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class SourceSample:
    """A sample as it is on disk.

    Attributes:
        key: stable id from the source file name (no dots), e.g. ``aachen_000000_000019``.
        root: dataset root; the json entry records paths relative to it.
        image_path: the photo, packed byte for byte.
        label_path: the annotation, or ``None`` for an unlabelled split (every pixel 255).
        read_label: turns ``label_path`` into train ids; raises :class:`SampleError`.
    """

    key: str
    root: Path
    image_path: Path
    label_path: Path | None
    read_label: LabelReader

    @property
    def image_ext(self) -> str:
        """The image's own extension, used as its member name in the shard."""
        return self.image_path.suffix.lower().lstrip(".")

    def relative(self, path: Path | None) -> str | None:
        """``path`` relative to the dataset root, POSIX style (None stays None)."""
        if path is None:
            return None
        return Path(os.path.relpath(path, self.root)).as_posix()


@dataclass(frozen=True)
class Reject:
    """A sample that was left out, with the file at fault and why."""

    key: str
    path: str
    reason: str

    @classmethod
    def from_error(cls, key: str, error: SampleError) -> "Reject":
        return cls(key=key, path=error.path, reason=error.reason)

    def message(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "path": self.path, "reason": self.reason}


@dataclass
class Discovery:
    """What a dataset reader found for one split.

    Attributes:
        samples: complete samples (image and label present), sorted by key.
        rejects: samples that cannot be packed (image without label, or the reverse).
        listed: how many images the split lists, compared against the expected count.
    """

    samples: list[SourceSample]
    rejects: list[Reject] = field(default_factory=list)
    listed: int = 0


@dataclass(frozen=True)
class EncodedSample:
    """A checked sample: its tar members (name -> bytes) and its manifest row."""

    key: str
    members: dict[str, bytes]
    row: dict


def check_key(key: str, path: Path) -> None:
    """Raise unless ``key`` can be a WebDataset key (no dots, no slashes, not empty)."""
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise SampleError(path, f"cannot derive a sample key: {key!r} must be non-empty, "
                                "without '.' or '/', and must not start with '_'")


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``, or a :class:`SampleError` saying which ``what`` is missing."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SampleError(path, f"{what} file is missing") from None
    except OSError as exc:
        raise SampleError(path, f"cannot read {what} file: {exc.strerror or exc}") from None


def _read_image(path: Path, data: bytes, ext: str, *, rgb: bool) -> tuple[int, int, np.ndarray | None]:
    """(height, width, RGB pixels when ``rgb``) of an image file's bytes, fully decoded;
    see :func:`image_size`."""
    expected = IMAGE_FORMATS.get(ext)
    if expected is None:
        raise SampleError(path, f"unsupported image extension .{ext}: expected one of "
                                f"{', '.join('.' + e for e in IMAGE_FORMATS)}")
    pixels = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            found = im.format
            im.load()
            width, height = im.size
            if rgb and found == expected:
                pixels = np.asarray(im.convert("RGB"))
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise SampleError(path, f"unreadable or truncated image ({type(exc).__name__}: {exc}); "
                                f"expected a complete {expected} file") from None
    if found != expected:
        raise SampleError(path, f"file content is {found}, expected {expected} for a .{ext} file")
    return height, width, pixels


def image_size(path: Path, data: bytes, ext: str) -> tuple[int, int]:
    """Decode ``data`` fully (to find truncation) and return its (height, width).

    Raises :class:`SampleError` when the bytes are unreadable, truncated, or not the
    format their extension promises.
    """
    height, width, _ = _read_image(path, data, ext, rgb=False)
    return height, width


def image_pixels(path: Path, data: bytes, ext: str) -> np.ndarray:
    """The uint8 (H, W, 3) RGB pixels of an image file's bytes, as PIL's ``.convert("RGB")``
    gives them (what a loader decodes from the original bytes); errors as :func:`image_size`."""
    return _read_image(path, data, ext, rgb=True)[2]


def read_index_png(path: Path, modes: tuple[str, ...], expected: str) -> np.ndarray:
    """Read a single-channel PNG as its stored indices, never converted to RGB.

    ``modes`` are the PIL modes accepted (e.g. ``("P", "L")``); any other mode (an RGB
    colour mask, say) is a :class:`SampleError` that says ``expected``.
    """
    data = read_file(path, "label")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            if fmt == "PNG" and mode in modes:
                im.load()
                array = np.asarray(im)
    except Exception as exc:
        raise SampleError(path, f"unreadable or truncated label ({type(exc).__name__}: {exc}); "
                                f"expected {expected}") from None
    if fmt != "PNG":
        raise SampleError(path, f"label file is {fmt}, expected {expected}")
    if mode not in modes:
        raise SampleError(path, f"label PNG has mode {mode}, expected {expected}")
    return array


def values_present(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array, sorted (a 256-bin count for uint8: fast)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def encode_label_png(train_ids: np.ndarray) -> bytes:
    """Lossless single-channel (mode "L") PNG of a (H, W) uint8 train-id map."""
    if train_ids.dtype != np.uint8 or train_ids.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 train-id map, got {train_ids.dtype} {train_ids.shape}")
    buf = io.BytesIO()
    Image.fromarray(train_ids).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def class_pixel_counts(train_ids: np.ndarray, num_classes: int) -> tuple[list[int], int]:
    """Pixels per train id ``0 .. num_classes - 1`` and pixels equal to 255.

    Raises ``ValueError`` if any pixel holds another value (a bug in a reader).
    """
    counts = np.bincount(train_ids.ravel(), minlength=256)
    stray = int(counts[num_classes:IGNORE_INDEX].sum())
    if stray:
        raise ValueError(f"{stray} pixels hold train ids between {num_classes} and {IGNORE_INDEX - 1}")
    return [int(c) for c in counts[:num_classes]], int(counts[IGNORE_INDEX])


def label_member(encoding: str) -> str:
    """The label's member name under ``encoding``: ``label.png`` or ``label.npy.lz4``."""
    return LABEL_MEMBER if check_encoding(encoding) == "lz4" else LABEL_PNG


def encode_sample(sample: SourceSample, *, dataset: str, split: str, num_classes: int,
                  encoding: str = DEFAULT_ENCODING) -> EncodedSample:
    """Read, check and encode one sample into tar members and a manifest row.

    Members, with ``encoding="original"``: ``<ext>`` (the image file's bytes, unchanged),
    ``label.png`` (train ids, 255 = ignore) and ``json`` (source paths, size, dataset,
    split). With ``"lz4"``: ``npy.lz4`` (the image's decoded RGB pixels) and
    ``label.npy.lz4`` (the train ids) instead of the first two (:mod:`sharding.pixels`);
    the row's ``image_ext`` is then ``npy.lz4`` and its sizes and sha256 are the members'.
    """
    lz4 = check_encoding(encoding) == "lz4"
    check_key(sample.key, sample.image_path)
    ext = sample.image_ext
    image = read_file(sample.image_path, "image")
    height, width, pixels = _read_image(sample.image_path, image, ext, rgb=lz4)
    if sample.label_path is None:
        train_ids = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    else:
        train_ids = sample.read_label(sample.label_path)
        if train_ids.shape != (height, width):
            lh, lw = train_ids.shape[:2]
            raise SampleError(sample.label_path,
                              f"label is {lw}x{lh} (WxH) but its image {sample.image_path.name} is "
                              f"{width}x{height}; expected the same size")
    try:
        class_pixels, ignore_pixels = class_pixel_counts(train_ids, num_classes)
    except ValueError as exc:
        raise SampleError(sample.label_path or sample.image_path, str(exc)) from None
    if lz4:
        ext, image = IMAGE_MEMBER, encode_pixels(pixels, channels=3)
        label = encode_pixels(train_ids, channels=None)
    else:
        label = encode_label_png(train_ids)
    meta = {
        "key": sample.key,
        "dataset": dataset,
        "split": split,
        "image": sample.relative(sample.image_path),
        "label": sample.relative(sample.label_path),
        "height": height,
        "width": width,
    }
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    row = {
        "key": sample.key,
        "image_ext": ext,
        "image_bytes": len(image),
        "label_bytes": len(label),
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "label_sha256": hashlib.sha256(label).hexdigest(),
        "height": height,
        "width": width,
        "class_pixels": class_pixels,
        "ignore_pixels": ignore_pixels,
        "image_source": meta["image"],
        "label_source": meta["label"],
    }
    return EncodedSample(key=sample.key, members={ext: image, label_member(encoding): label, "json": meta_bytes},
                         row=row)


def _cause(exc: Exception) -> str:
    """PIL's error in a line (``UnidentifiedImageError`` names a BytesIO's address: left out)."""
    if isinstance(exc, UnidentifiedImageError):
        return "UnidentifiedImageError: not a PNG or JPEG file, or its header is damaged"
    return f"{type(exc).__name__}: {exc}"


def decode_members(members: Mapping[str, bytes], key: str, source: str = "") -> tuple[np.ndarray, np.ndarray]:
    """A sample's tar members -> (image uint8 (H, W, 3) RGB, label uint8 (H, W) train ids).

    Reads either encoding: ``png``/``jpg``/``jpeg`` with ``label.png`` (the image as PIL's
    ``.convert("RGB")`` gives it; the label PNG's stored indices, never converted), or
    ``npy.lz4`` with ``label.npy.lz4``. The one decoder of shard samples: ``run.py shard
    verify`` and the training and evaluation loaders (``pipeline.data.decode_sample``) use it.

    Args:
        members: extension -> bytes, as WebDataset groups a sample (``__key__`` and other
            ``__``-names are ignored).
        key: the sample's key, for errors.
        source: where the sample came from (its shard), for errors.

    Raises:
        ValueError: naming the sample, when members are missing, do not decode, the label
            is not single-channel, or image and label differ in size.
    """
    where = f"sample {key!r}" + (f" from {source}" if source else "")
    if IMAGE_MEMBER in members and LABEL_MEMBER in members:
        image = decode_pixels(members[IMAGE_MEMBER], f"{where}: {IMAGE_MEMBER}", channels=3)
        label = decode_pixels(members[LABEL_MEMBER], f"{where}: {LABEL_MEMBER}", channels=None)
    else:
        ext = next((e for e in ORIGINAL_IMAGE_MEMBERS if e in members), None)
        if ext is None or LABEL_PNG not in members:
            found = sorted(k for k in members if not k.startswith("__"))
            raise ValueError(f"{where}: expected an image ({'/'.join(ORIGINAL_IMAGE_MEMBERS)}) and {LABEL_PNG}, "
                             f"or {IMAGE_MEMBER} and {LABEL_MEMBER}; found {found}")
        try:
            with Image.open(io.BytesIO(members[ext])) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise ValueError(f"{where}: {ext} does not decode ({_cause(exc)})") from None
        try:
            with Image.open(io.BytesIO(members[LABEL_PNG])) as im:
                mode = im.mode
                label = np.asarray(im, dtype=np.uint8) if mode in ("L", "P") else None
        except Exception as exc:
            raise ValueError(f"{where}: {LABEL_PNG} does not decode ({_cause(exc)})") from None
        if label is None:
            raise ValueError(f"{where}: {LABEL_PNG} must be single-channel (L), got mode {mode}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"{where}: image {image.shape[:2]} and label {label.shape} differ in size")
    return image, label
