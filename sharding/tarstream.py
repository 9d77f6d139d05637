"""Reading tar shards front to back, each member with one read.

The shards ``sharding/pack.py`` writes are plain tar files (PAX format: ustar headers, with a
PAX record only for a name ustar cannot hold). :func:`tar_members` walks one as a stream -- a
local file, an HTTP response, an object-store stream -- reading each 512-byte header and then
the member's bytes in a single ``read``. The standard library's streaming mode
(``tarfile.open(mode="r|")``, which WebDataset's ``tar_file_expander`` uses) gathers every
member in 10 KiB records and joins them: for a Cityscapes sample of decoded pixels (8 MB) that
cost 4x the time of the LZ4 decompression it feeds (``benchmarks/train_throughput.py``).

:func:`group_samples` groups consecutive members into WebDataset samples by WebDataset's rule:
the key is the member name up to the first dot of its base name, the rest (lower-cased) is the
member's extension. The loaders (``sharding.storage.shard_samples``) and ``run.py shard verify``
read shards through these two functions.

Members are read into memory, never extracted to disk, and a shard is refused (:class:`TarError`
naming the shard and the member) when a member's name is not a flat ``<key>.<ext>``: a name with
``/`` or ``\\`` (a folder, an absolute path, ``../``), or one that starts with a dot (``..``, a hidden
file, an empty key). ``run.py shard`` writes only flat names (:func:`sharding.samples.check_key`),
so such a member means the shard came from elsewhere; refusing it keeps every consumer of a key
(``run.py predict`` names its output files after them) inside its own folder.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from typing import IO

BLOCK = tarfile.BLOCKSIZE  # 512: a header, and the unit members are padded to


class TarError(ValueError):
    """A shard that is not a tar file, is cut short, holds a sample twice or a member whose name is
    not a flat ``<key>.<ext>``; names the shard."""


def _read(stream: IO[bytes], size: int, where: str, what: str) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarError(f"{where}: truncated tar: {what} needs {size} bytes, the shard ends after {len(data)}")
    return data


def _pax_path(records: bytes, where: str) -> str | None:
    """The ``path`` record of a PAX extended header ("<length> <key>=<value>\\n" records)."""
    pos, path = 0, None
    try:
        while pos < len(records):
            space = records.index(b" ", pos)
            length = int(records[pos:space])
            key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
            if key == b"path":
                path = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError:
        raise TarError(f"{where}: a corrupted PAX header (records {records[:60]!r}...)") from None
    return path


def check_member_name(name: str, where: str) -> None:
    """Refuse a member name that is not a flat ``<key>.<ext>`` (see the module doc)."""
    if not name or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise TarError(f"{where}: member {name!r} refused: expected a flat '<key>.<ext>' name as `run.py shard` "
                       "writes (no '/', '\\', absolute path or '..', no leading dot); this shard was not written "
                       "by `run.py shard`")


def tar_members(stream: IO[bytes], where: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of each regular file in a tar stream, in order; ``where`` names the
    shard in errors. Folders, links and PAX global headers are skipped; PAX and GNU long names
    apply to the member after them. Every member's name (folders and links too) must pass
    :func:`check_member_name`; nothing is written to disk."""
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if not header or header == tarfile.NUL * BLOCK:  # the end-of-archive blocks (or none)
            return
        if len(header) != BLOCK:
            raise TarError(f"{where}: truncated tar: a member header is cut after {len(header)} of {BLOCK} bytes")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise TarError(f"{where}: not a tar file, or a corrupted member header ({exc}); expected a "
                           "WebDataset tar shard written by `run.py shard`") from None
        data = _read(stream, info.size, where, f"member {long_name or info.name!r}")
        if info.size % BLOCK:
            _read(stream, BLOCK - info.size % BLOCK, where, f"the padding after {long_name or info.name!r}")
        if info.type == tarfile.XHDTYPE:
            long_name = _pax_path(data, where) or long_name
        elif info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type not in (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK):  # headers of no member
            name = long_name or info.name
            check_member_name(name, where)
            if info.type in tarfile.REGULAR_TYPES:
                yield name, data
            long_name = None


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)`` of a member name: ``"a/b.label.png"`` -> ``("a/b", "label.png")``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def group_samples(members: Iterable[tuple[str, bytes]], where: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each run of consecutive members sharing a key."""
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in members:
        prefix, ext = split_name(name)
        if prefix != key:
            if key is not None:
                yield key, sample
            key, sample = prefix, {}
        if ext in sample:
            raise TarError(f"{where}: sample {key!r} holds member .{ext} twice")
        sample[ext] = data
    if key is not None:
        yield key, sample
