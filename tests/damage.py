"""Damage real shards the way disks and copies do, for the corrupt-data tests: bytes of one
member flipped in place (same length), a member's first bytes overwritten (its format no longer
recognised), a shard cut short, a shard replaced by another of the same size."""
from __future__ import annotations

import shutil
import tarfile
from pathlib import Path


def copy_shards(source: Path, target: Path) -> Path:
    """A private copy of a shard folder that a test may break."""
    return Path(shutil.copytree(source, target))


def member(shard: Path, index: int, suffix: str) -> tarfile.TarInfo:
    """The member ending in ``.suffix`` of the ``index``-th sample of ``shard`` (``png`` is the
    image, never ``label.png``)."""
    with tarfile.open(shard) as tar:
        found = [m for m in tar.getmembers() if m.name.partition(".")[2] == suffix]
    return found[index]


def damage_member(shard: Path, index: int, suffix: str, how: str) -> str:
    """Damage one member in place and return its sample's key.

    ``how``: ``"flip"`` flips the bits of 8 bytes in the middle of the member (the shard keeps
    its size and its tar headers; only the member's sha256, and for PNG and LZ4 its checksums,
    tell), ``"header"`` flips its first 16 bytes (no decoder recognises it any more).
    """
    info = member(shard, index, suffix)
    data = bytearray(shard.read_bytes())
    start = info.offset_data + (info.size // 2 if how == "flip" else 0)
    for offset in range(start, start + (8 if how == "flip" else 16)):
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    return info.name.partition(".")[0]


def truncate_inside(shard: Path, index: int, suffix: str) -> str:
    """Cut ``shard`` in the middle of a member (as a copy interrupted there); its sample's key."""
    info = member(shard, index, suffix)
    shard.write_bytes(shard.read_bytes()[: info.offset_data + info.size // 2])
    return info.name.partition(".")[0]


def replace_with(shard: Path, other: Path) -> None:
    """Overwrite ``shard`` with ``other``'s bytes, cut or zero-padded to ``shard``'s size (a
    shard swapped for another that a size check alone does not tell apart)."""
    size = shard.stat().st_size
    shard.write_bytes(other.read_bytes()[:size].ljust(size, b"\0"))
