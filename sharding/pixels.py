"""Decoded pixels as a shard member: a ``.npy`` array compressed with LZ4 (``npy.lz4``).

``run.py shard --image-encoding lz4`` stores each sample's decoded RGB image (what PIL's
``.convert("RGB")`` gives for the source file) and its train-id label this way instead of
the original PNG/JPEG bytes and a label PNG. Reading one back is an LZ4 decompression:
at Cityscapes' 1024x2048 a few milliseconds instead of the tens of milliseconds a PNG
decode takes, for larger shards (1.6x the synthetic frames' PNGs, 10x VOC-sized JPEGs;
``benchmarks/decode_throughput.py`` measures both). Decoding is the floor of the data
path that feeds training (section 4.1's crops are cut from the decoded frame).

A member is self-describing: numpy's ``.npy`` format (a header with dtype and shape, then
the C-ordered bytes), wrapped in an LZ4 frame that records its content size, so a truncated
member is an error, never a short image. The frame carries no content checksum: hashing a
6 MB frame (xxHash32) took 3-4 ms, more than decompressing it (1.2-1.4 ms); integrity is what the
manifest's per-member sha256 and ``run.py shard verify`` are for (JPEG bytes carry no
checksum either). The same array always gives the same bytes.
"""
from __future__ import annotations

import io

import lz4.frame
import numpy as np

ENCODINGS = ("original", "lz4")
"""Image encodings of ``run.py shard``: the source file's bytes and a label PNG, or decoded pixels."""
DEFAULT_ENCODING = "original"

IMAGE_MEMBER = "npy.lz4"
"""The image's member (and ``image_ext``) under the lz4 encoding: uint8 (H, W, 3) RGB."""
LABEL_MEMBER = "label.npy.lz4"
"""The label's member under the lz4 encoding: uint8 (H, W) train ids, 255 = ignore."""

_LZ4 = {"content_checksum": False, "store_size": True}


class PixelsError(ValueError):
    """An ``npy.lz4`` member that is not lz4, is truncated or corrupted, or holds the wrong array."""


def check_encoding(encoding: str) -> str:
    """``encoding`` if it is one of :data:`ENCODINGS`, else a ``ValueError`` listing them."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown image encoding {encoding!r}: expected one of {', '.join(ENCODINGS)}")
    return encoding


def _expected(channels: int | None) -> str:
    return "uint8 (H, W, 3) RGB pixels" if channels else "uint8 (H, W) train ids"


def _check_array(shape: tuple[int, ...], dtype: np.dtype, channels: int | None) -> str | None:
    """What is wrong with an array of ``shape`` and ``dtype`` (None when it is right)."""
    wanted = 3 if channels else 2
    if dtype != np.uint8 or len(shape) != wanted or (channels and shape[2] != channels) or 0 in shape:
        return f"holds {dtype} {tuple(shape)}, expected {_expected(channels)}"
    return None


def encode_pixels(array: np.ndarray, *, channels: int | None) -> bytes:
    """An ``npy.lz4`` member: ``array`` (uint8, (H, W, channels) or (H, W) when ``channels``
    is None) as a ``.npy`` file in an LZ4 frame."""
    problem = _check_array(array.shape, array.dtype, channels)
    if problem is not None:
        raise ValueError(f"cannot encode pixels: array {problem}")
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return lz4.frame.compress(buffer.getvalue(), **_LZ4)


def decode_pixels(data: bytes, member: str, *, channels: int | None) -> np.ndarray:
    """The array of an ``npy.lz4`` member (read-only, like ``np.asarray`` of a PIL image).

    Args:
        data: the member's bytes.
        member: names the member in errors, e.g. ``"aachen_000000_000019.npy.lz4 (train-000000.tar)"``.
        channels: 3 for an RGB image, None for a (H, W) label.

    Raises:
        PixelsError: naming ``member``, when the bytes are not an LZ4 frame, are truncated
            or corrupted (checksum), or hold anything but the expected uint8 array.
    """
    try:
        raw = lz4.frame.decompress(data)
    except RuntimeError as exc:  # lz4 reports a bad magic, a short frame and a checksum alike
        raise PixelsError(f"{member}: not a valid, complete LZ4 frame ({exc}); expected {_expected(channels)} "
                          "as .npy in an LZ4 frame (truncated or corrupted?)") from None
    handle = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0")
    except ValueError as exc:
        raise PixelsError(f"{member}: no .npy header inside the LZ4 frame ({exc}); "
                          f"expected {_expected(channels)}") from None
    problem = _check_array(shape, dtype, channels)
    if problem is None and fortran:
        problem = "is Fortran-ordered, expected C order"
    if problem is not None:
        raise PixelsError(f"{member}: {problem}")
    offset = handle.tell()
    size = int(np.prod(shape))
    if len(raw) - offset != size:
        raise PixelsError(f"{member}: {len(raw) - offset} bytes of pixels for shape {tuple(shape)}, "
                          f"expected {size}")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=offset).reshape(shape)
