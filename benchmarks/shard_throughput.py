#!/usr/bin/env python3
"""Sharding throughput beside this machine's limit for the same bytes.

Generates a synthetic dataset in a real layout (or takes ``--root``), then, in one run
and from a warm page cache:

1. the limit: the same image and label files copied into one plain tar with
   ``tarfile`` (read + write, nothing decoded), one process;
2. ``sharding.write.shard_split`` with 1 worker and with ``--workers`` workers (full
   decode of every image to catch truncation, label mapping, label PNG encoding,
   sha256, manifest);
3. where one worker's time goes, per sample, stage by stage.

Images/s and MB/s count the source bytes (image + label files) in every row; each row
is the fastest of ``--repeat`` runs, and sharding runs start from an empty folder.
"CPU s" is the CPU time of the run, workers included: images per CPU-second is the
per-core rate, which holds even when other work shares the machine.

    python benchmarks/shard_throughput.py                       # Cityscapes-sized frames
    python benchmarks/shard_throughput.py --layout voc --images 400
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.classes import DATASETS  # noqa: E402
from sharding.samples import encode_label_png, image_size  # noqa: E402
from sharding.synthetic import make_cityscapes, make_voc  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402
from sharding.write import discover, shard_split  # noqa: E402


def _mb(n: int) -> float:
    return n / 1e6


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the sharding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(run) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``run()``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def copy_into_tar(files: list[Path], out: Path) -> None:
    """Copy ``files`` into a plain, uncompressed tar: the I/O limit for these bytes."""
    with tarfile.open(out, "w") as tar:
        for path in files:
            tar.add(path, arcname=path.name)


def stage_times(samples: list, limit: int = 16) -> dict[str, float]:
    """Mean seconds per sample of each step of packing, on one core."""
    totals = dict.fromkeys(["read files", "decode image (check)", "read + map label", "encode label PNG",
                            "sha256"], 0.0)
    chosen = samples[:limit]
    for sample in chosen:
        t0 = time.perf_counter()
        image = sample.image_path.read_bytes()
        sample.label_path.read_bytes()
        t1 = time.perf_counter()
        image_size(sample.image_path, image, sample.image_ext)
        t2 = time.perf_counter()
        ids = sample.read_label(sample.label_path)
        t3 = time.perf_counter()
        label = encode_label_png(ids)
        t4 = time.perf_counter()
        hashlib.sha256(image).hexdigest()
        hashlib.sha256(label).hexdigest()
        t5 = time.perf_counter()
        for name, dt in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            totals[name] += dt
    return {name: total / len(chosen) for name, total in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", choices=DATASETS, default="cityscapes")
    parser.add_argument("--root", type=Path, help="an existing dataset instead of a generated one")
    parser.add_argument("--split", help="split to shard (default: train for cityscapes, train_aug for voc)")
    parser.add_argument("--images", type=int, default=24, help="images to generate")
    parser.add_argument("--size", default="1024x2048", help="Cityscapes image size HxW (the real one: 1024x2048)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    parser.add_argument("--tmp", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="shard-bench-", dir=args.tmp))
    try:
        split = args.split or ("train" if args.layout == "cityscapes" else "train_aug")
        root = args.root
        if root is None:
            root = scratch / "data"
            t0 = time.perf_counter()
            if args.layout == "cityscapes":
                height, width = parse_size(args.size)
                make_cityscapes(root, train=args.images, val=2, test=2, height=height, width=width)
            else:
                make_voc(root, train_aug=args.images, val=4, min_size=300, max_size=500)
            print(f"generated {args.images} synthetic {args.layout} images in {time.perf_counter() - t0:.1f} s")
        samples = discover(args.layout, root, split).samples
        files = [p for s in samples for p in (s.image_path, s.label_path) if p is not None]
        total = sum(p.stat().st_size for p in files)
        for path in files:  # warm the page cache so every row reads from memory
            path.read_bytes()
        n = len(samples)
        load = os.getloadavg()[0]
        print(f"{n} samples, {_mb(total):.1f} MB of source files (image + label), {os.cpu_count()} CPU cores, "
              f"load average {load:.2f} before the runs (other work on the machine slows the parallel rows)\n")

        rows = []  # (method, processes, wall seconds, CPU seconds, bytes out), fastest of --repeat
        copies = [timed(lambda: copy_into_tar(files, scratch / "plain.tar")) for _ in range(args.repeat)]
        rows.append(("copy into plain tar (tarfile)", 1, *min(copies), (scratch / "plain.tar").stat().st_size))
        for workers in sorted({1, args.workers}):
            out = scratch / f"shards-{workers}"
            runs = []
            for _ in range(args.repeat):
                # from an empty folder, so nothing is re-used; includes starting the worker processes
                runs.append(timed(lambda: shard_split(args.layout, root, split, out, shard_size=args.shard_size,
                                                      workers=workers, show_progress=False, partial=True)))
                out_bytes = sum(p.stat().st_size for p in out.glob("*.tar"))
                shutil.rmtree(out)
            rows.append((f"run.py shard (--workers {workers})", workers, *min(runs), out_bytes))

        print(format_table(
            ("method", "procs", "seconds", "images/s", "MB/s", "CPU s", "img/CPU-s", "MB out"),
            [(name, procs, f"{secs:.2f}", f"{n / secs:.1f}", f"{_mb(total) / secs:.1f}", f"{cpu:.2f}",
              f"{n / cpu:.1f}", f"{_mb(out_bytes):.1f}") for name, procs, secs, cpu, out_bytes in rows]))
        limit = rows[0][2]
        best = min(r[2] for r in rows[1:])
        print(f"\nsharding runs at {limit / best:.1%} of the plain-tar copy rate on these bytes")
        print("\none worker, mean milliseconds per sample:")
        for stage, secs in stage_times(samples).items():
            print(f"  {stage:22s} {secs * 1e3:8.1f}")
    finally:
        if args.tmp is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
