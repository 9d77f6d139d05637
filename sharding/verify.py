"""Re-read every shard and compare it with its manifest, sample by sample.

Checked: each shard's byte size and sha256; the samples it holds, their order and
their members (``<ext>``, ``label.png``, ``json``, or ``npy.lz4``, ``label.npy.lz4``,
``json`` for the lz4 encoding); each member's size and sha256; that image and label
decode (through :func:`sharding.samples.decode_members`, as the loaders decode them) to
the recorded size and the label's per-class pixel counts match; and that the ``json`` entry agrees with the row. The shard folder may be a
local path or a URL (``sharding/storage.py``): each shard is read once, front to back, its
sha256 taken on the way. Every problem names the shard file and, for a sample, its key; a shard
cut short (or damaged inside a tar header) still has the samples before the damage checked, and
names those it no longer holds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

from tqdm import tqdm

from sharding import storage
from sharding.manifest import Manifest, ManifestError, list_splits, read_manifest
from sharding.samples import class_pixel_counts, decode_members, label_member
from sharding.tarstream import TarError, group_samples, tar_members
from sharding.text import bar_disabled


@dataclass
class SplitCheck:
    """The outcome of verifying one split."""

    split: str
    samples: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class _Hashing:
    """A read-only stream that takes the sha256 of everything read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """Read what is left (a tar's zero padding) and return the sha256 of the whole stream."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


def tar_samples(source: Path | str | IO[bytes], where: str = "shard") -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of a tar, grouped as WebDataset groups them.

    ``source``: a shard's location (a path or a URL) or a binary stream, read front to back once;
    ``where`` names a stream in errors.
    """
    if isinstance(source, (str, Path)):
        with storage.open_binary(source, expected="a tar shard") as stream:
            yield from tar_samples(stream, storage.display(source))
        return
    yield from group_samples(tar_members(source, where), where)


def check_sample(row: dict[str, Any], members: dict[str, bytes], manifest: Manifest) -> list[str]:
    """Problems of one sample's tar members against its manifest row (empty when it matches)."""
    problems: list[str] = []
    label_name = label_member(manifest.encoding)
    expected = {row["image_ext"], label_name, "json"}
    if set(members) != expected:
        problems.append(f"members {sorted(members)}, expected {sorted(expected)}")
    for name, column in ((row["image_ext"], "image"), (label_name, "label")):
        data = members.get(name)
        if data is None:
            continue
        if len(data) != row[f"{column}_bytes"]:
            problems.append(f"{name} has {len(data)} bytes, the manifest says {row[f'{column}_bytes']}")
        elif hashlib.sha256(data).hexdigest() != row[f"{column}_sha256"]:
            problems.append(f"{name} sha256 differs from the manifest")
    if row["image_ext"] in members and label_name in members:
        try:
            image, train_ids = decode_members(members, row["key"])
        except ValueError as exc:
            problems.append(f"does not decode ({exc})")
        else:
            size = (row["height"], row["width"])
            if image.shape != (*size, 3) or train_ids.shape != size:
                problems.append(f"decodes to an image of {image.shape[1]}x{image.shape[0]} and a label of "
                                f"{train_ids.shape[1]}x{train_ids.shape[0]}, expected {size[1]}x{size[0]}")
            else:
                try:
                    counts, ignore = class_pixel_counts(train_ids, manifest.num_classes)
                except ValueError as exc:
                    problems.append(f"{label_name}: {exc}")
                else:
                    if counts != row["class_pixels"] or ignore != row["ignore_pixels"]:
                        problems.append(f"{label_name} class pixel counts differ from the manifest")
    meta = members.get("json")
    if meta is not None:
        try:
            info = json.loads(meta)
            wanted = {"key": row["key"], "dataset": manifest.dataset, "split": manifest.split,
                      "height": row["height"], "width": row["width"]}
            wrong = {k: info.get(k) for k, v in wanted.items() if info.get(k) != v}
            if wrong:
                problems.append(f"json disagrees with the manifest on {wrong}")
        except ValueError as exc:
            problems.append(f"json does not parse ({exc})")
    return problems


def verify_split(shard_dir: Path | str, split: str, *, show_progress: bool = True) -> SplitCheck:
    """Verify every shard of ``split`` in ``shard_dir`` against its manifest."""
    check = SplitCheck(split=split)
    try:
        manifest = read_manifest(shard_dir, split, check_files=False)
    except ManifestError as exc:
        check.problems.append(str(exc))
        return check
    rows = manifest.table.to_pylist()
    bar = tqdm(total=len(rows), unit="img", desc=f"verify {split}", disable=bar_disabled(show_progress))
    start = 0
    for info in manifest.shard_infos:
        shard_rows = rows[start:start + info.samples]
        start += info.samples
        check.shards += 1
        path = manifest.shard_location(info.name)
        where = info.name
        try:
            size = storage.size(path, expected=f"shard {info.name}")
        except FileNotFoundError:
            check.problems.append(f"{where}: missing (expected {storage.display(path)})")
            bar.update(len(shard_rows))
            continue
        except OSError as exc:
            check.problems.append(f"{where}: {exc}")
            bar.update(len(shard_rows))
            continue
        if size != info.bytes:
            check.problems.append(f"{where}: {size} bytes, the manifest says {info.bytes}")
        unreadable: BaseException | None = None
        try:
            with storage.open_binary(path, expected=f"shard {info.name}") as raw:
                stream = _Hashing(raw)
                found: list[tuple[str, dict[str, bytes]]] = []
                try:
                    for sample in tar_samples(stream, info.name):  # the samples before a cut are checked too
                        found.append(sample)
                except TarError as exc:
                    unreadable = exc
                sha256 = stream.hexdigest_to_end()
        except OSError as exc:
            check.problems.append(f"{where}: unreadable tar ({type(exc).__name__}: {exc})")
            bar.update(len(shard_rows))
            continue
        if size == info.bytes and sha256 != info.sha256:
            check.problems.append(f"{where}: sha256 differs from the manifest")
        keys = [key for key, _ in found]
        expected_keys = [row["key"] for row in shard_rows]
        if unreadable is not None:
            lost = expected_keys[len(keys):] if keys == expected_keys[:len(keys)] else []
            check.problems.append(f"{where}: unreadable tar ({type(unreadable).__name__}: {unreadable})"
                                  + (f"; samples not read: {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}"
                                     if lost else ""))
            if lost:
                expected_keys = expected_keys[:len(keys)]  # the samples read are still checked below
                bar.update(len(lost))
                shard_rows = shard_rows[:len(keys)]
        if keys != expected_keys:
            missing = sorted(set(expected_keys) - set(keys))
            extra = sorted(set(keys) - set(expected_keys))
            check.problems.append(f"{where}: holds {len(keys)} samples, the manifest lists {len(expected_keys)}"
                                  f"{'; missing ' + ', '.join(missing[:5]) if missing else ''}"
                                  f"{'; not in the manifest ' + ', '.join(extra[:5]) if extra else ''}"
                                  f"{'; order differs' if not missing and not extra else ''}")
        by_key = dict(found)
        for row in shard_rows:
            members = by_key.get(row["key"])
            if members is not None:
                check.problems.extend(f"{where}: {row['key']}: {p}" for p in check_sample(row, members, manifest))
                check.samples += 1
            bar.update(1)
    bar.close()
    return check


def verify_shards(shard_dir: Path | str, splits: Sequence[str] | None = None, *,
                  show_progress: bool = True) -> list[SplitCheck]:
    """Verify the named splits, or every split with a manifest in ``shard_dir``."""
    names = list(splits) if splits else list_splits(shard_dir)
    if not names:
        return [SplitCheck(split="-", problems=[f"{shard_dir}: no *.manifest.parquet found; nothing to verify"])]
    return [verify_split(shard_dir, name, show_progress=show_progress) for name in names]


def format_checks(checks: Sequence[SplitCheck], max_problems: int = 20) -> str:
    """One line per split, then the first problems of each."""
    lines = []
    for check in checks:
        status = "ok" if check.ok else f"{len(check.problems)} problem(s)"
        lines.append(f"{check.split}: {check.samples} samples in {check.shards} shards verified: {status}")
        lines.extend(f"  {p}" for p in check.problems[:max_problems])
        if len(check.problems) > max_problems:
            lines.append(f"  ... and {len(check.problems) - max_problems} more")
    return "\n".join(lines)
