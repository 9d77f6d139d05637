"""Atomic file writes: write a hidden temporary file, flush it to disk, then rename.

A reader (or a re-run after a crash) therefore sees either the old file, no file,
or the complete new one, never a truncated file under the final name. Temporary
files are named ``.<name>.<pid>.tmp`` next to their target, so that
:func:`remove_temporaries` can clear what a killed run left behind.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

TMP_SUFFIX = ".tmp"


def temporary_path(path: Path) -> Path:
    """The hidden temporary name used while ``path`` is being written by this process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file for ``path``; on success fsync and rename it into place.

    On any exception (or KeyboardInterrupt) the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as handle:
        handle.write(data)


def remove_temporaries(folder: Path, prefix: str) -> list[Path]:
    """Delete temporary files of targets whose names start with ``prefix`` in ``folder``."""
    removed = []
    for tmp in Path(folder).glob(f".{prefix}*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
