#!/usr/bin/env python3
"""The data loader's samples/s reading the same shards from a local folder, a loopback HTTP
server and a local S3-compatible server, each beside the local folder in the same run.

Issue 11 ("Shards on the storage clusters actually use"): ``--data`` takes ``https://`` and
``s3://`` locations (``sharding/storage.py``: fsspec streams, read front to back). This
measures what reading through them costs the loader against reading the same bytes from
the local disk. The shards are written once (or taken from ``--shards``) and served, as they
are, by

* ``http``: ``python -m http.server --bind 127.0.0.1`` (a separate process), read at
  ``http://127.0.0.1:PORT/<folder>``;
* ``s3``: moto's S3-compatible server (``moto_server -H 127.0.0.1``, a separate process; the
  ``moto[server]`` test extra), the folder uploaded whole with s3fs, read at
  ``s3://BUCKET/<folder>`` with ``AWS_ENDPOINT_URL`` pointing at it (``--no-s3`` skips it).

Both servers run in processes of their own, so their work does not share this process's
interpreter; on a small machine they still share its cores (the load average is printed).
Loopback has no network latency or bandwidth limit: these rows measure the client's cost of
the remote path (HTTP/S3 requests, fsspec's buffering, the extra copies), not a network.

Stages, one loader process (``data.loader_workers = 0``), every source read once before timing:

* ``read only``: the tar samples (``sharding.storage.shard_samples``), no decoding;
* ``decode only``: plus ``pipeline.data.decode_sample`` (image RGB, train-id label);
* ``full train_loader``: ``pipeline.data.train_loader`` itself (resampled shards, shuffle
  buffer, decode, augmentation, batches of ``--batch``).

Each row counts ``--samples`` samples after the first (pipeline start and the first request
are excluded) and reports the fastest of ``--repeat`` runs; ``vs local`` = the row's
samples/s over the local folder's at the same stage (1.00: no cost; below 1: slower).
``loader cpu ms/sample`` is this process's CPU time per sample (fsspec's I/O thread included):
what the remote path costs the loader itself; the rest of a slower row's time is the server's
(on this machine it shares the cores) and waiting for it.

Examples::

    python benchmarks/remote_throughput.py                       # synthetic Cityscapes, 256x512 frames
    python benchmarks/remote_throughput.py --size 1024x2048 --crop 1024x1024 --batch 2 --images 12 \
        --shard-size 4 --samples 8 --repeat 2 --shuffle-buffer 4       # Cityscapes-size frames (README)
    python benchmarks/remote_throughput.py ... --image-encoding lz4    # the same, shards of decoded pixels
    python benchmarks/remote_throughput.py --shards /data/shards/cityscapes --no-s3 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core's work, as a loader process has

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import DataConfig  # noqa: E402
from pipeline.data import decode_sample, train_loader  # noqa: E402
from sharding.manifest import read_manifest  # noqa: E402
from sharding.pixels import ENCODINGS  # noqa: E402
from sharding.storage import shard_samples  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402

SPLIT = "train"
BUCKET = "dfdam-bench"
STAGES = ("read only", "decode only", "full train_loader")


@dataclass
class Row:
    source: str
    stage: str
    samples: int
    seconds: float
    cpu_seconds: float  # this process's CPU time (all its threads: fsspec's I/O thread too)

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds


# ----------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on 127.0.0.1:{port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def serving(command: list[str], port: int, what: str) -> Iterator[None]:
    """Run a server process (ours: stopped by its pid at the end) until the block ends."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- measuring


def _samples(stage: str, location: str, cfg: DataConfig) -> Iterator[int]:
    """An endless stream of sample counts (1 per sample, ``batch`` per batch) at ``stage``."""
    manifest = read_manifest(location, SPLIT)
    if stage == "full train_loader":
        epoch = 0
        while True:
            for images, _ in train_loader(manifest, cfg, rank=0, world_size=1, epoch=epoch, seed=0):
                yield len(images)
            epoch += 1
    while True:
        for sample in shard_samples()({"url": url} for url in manifest.shards):
            if stage == "decode only":
                decode_sample(sample)
            yield 1


def measure(stage: str, location: str, cfg: DataConfig, samples: int, repeat: int) -> tuple[int, float, float]:
    """(samples counted, seconds, CPU seconds of this process) of the fastest of ``repeat`` runs,
    after each run's first item."""
    best: tuple[int, float, float] | None = None
    for _ in range(repeat):
        stream = _samples(stage, location, cfg)
        next(stream)  # the pipeline's start and first request: not the steady state
        counted, start, cpu = 0, time.perf_counter(), time.process_time()
        while counted < samples:
            counted += next(stream)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        stream.close()
        if best is None or counted / seconds > best[0] / best[1]:
            best = (counted, seconds, cpu)
    assert best is not None
    return best


def warm(folder: Path) -> None:
    """Every file read once: the rows read from the page cache, whichever server sends them."""
    for path in folder.iterdir():
        if path.is_file():
            path.read_bytes()


# ----------------------------------------------------------------------------- main


def _shards(args: argparse.Namespace, work: Path) -> Path:
    if args.shards:
        return args.shards
    from sharding.synthetic import make_cityscapes
    from sharding.write import shard_dataset

    height, width = args.size
    make_cityscapes(work / "raw", seed=0, train=args.images, val=1, test=1, height=height, width=width)
    out = work / "site" / "shards"
    shard_dataset("cityscapes", work / "raw", out, splits=[SPLIT], shard_size=args.shard_size, workers=1,
                  show_progress=False, encoding=args.image_encoding)
    return out


def _upload(folder: Path, endpoint: str) -> str:
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    fs.put(f"{folder}/", f"{BUCKET}/{folder.name}/", recursive=True)
    return f"s3://{BUCKET}/{folder.name}"


def run(args: argparse.Namespace) -> list[Row]:
    cfg = DataConfig(crop_size=args.crop, batch_size=args.batch, loader_workers=0,
                     shuffle_buffer=args.shuffle_buffer)
    work = Path(tempfile.mkdtemp(prefix="remote-throughput-"))
    try:
        shards = _shards(args, work).resolve()
        manifest = read_manifest(shards, SPLIT)
        print(f"{manifest.num_samples} samples in {len(manifest.shards)} shards "
              f"({sum(s.bytes for s in manifest.shard_infos) / 1e6:.1f} MB) from {shards}; crop "
              f"{cfg.crop_size[0]}x{cfg.crop_size[1]}, batch {cfg.batch_size}; {args.samples} samples a row, "
              f"best of {args.repeat}; load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores",
              flush=True)
        warm(shards)
        sources: dict[str, str] = {"local": str(shards)}
        with contextlib.ExitStack() as stack:
            http_port = _free_port()
            stack.enter_context(serving([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                                         "--directory", str(shards.parent)], http_port, "python -m http.server"))
            sources["http"] = f"http://127.0.0.1:{http_port}/{shards.name}"
            if not args.no_s3:
                moto = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
                if not Path(moto).exists():
                    raise SystemExit("moto_server not found: pip install 'moto[server]' (the test extra), or --no-s3")
                s3_port = _free_port()
                stack.enter_context(serving([moto, "-H", "127.0.0.1", "-p", str(s3_port)], s3_port, "moto_server"))
                endpoint = f"http://127.0.0.1:{s3_port}"
                os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
                sources["s3"] = _upload(shards, endpoint)
            rows = []
            for stage in args.stages:
                for source, location in sources.items():
                    counted, seconds, cpu = measure(stage, location, cfg, args.samples, args.repeat)
                    rows.append(Row(source, stage, counted, seconds, cpu))
                    print(f"  {stage:<18} {source:<5} {counted / seconds:8.1f} samples/s", file=sys.stderr, flush=True)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(rows: list[Row]) -> str:
    local = {r.stage: r.per_s for r in rows if r.source == "local"}
    return format_table(
        ["stage", "source", "samples/s", "ms/sample", "loader cpu ms/sample", "vs local"],
        [[r.stage, r.source, f"{r.per_s:.1f}", f"{1000 / r.per_s:.2f}", f"{1000 * r.cpu_seconds / r.samples:.2f}",
          f"{r.per_s / local[r.stage]:.2f}"] for r in rows],
        align="llrrrr")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--shards", type=Path, help="a shard folder with a train split (default: a synthetic Cityscapes)")
    p.add_argument("--size", type=parse_size, default=(256, 512), metavar="HxW", help="synthetic frame size")
    p.add_argument("--images", type=int, default=32, help="synthetic training images")
    p.add_argument("--shard-size", type=int, default=16, help="synthetic samples per shard")
    p.add_argument("--image-encoding", default="original", choices=ENCODINGS,
                   help="the synthetic shards' image members (run.py shard --image-encoding)")
    p.add_argument("--crop", type=parse_size, default=(256, 256), metavar="HxW", help="train_loader's crop")
    p.add_argument("--batch", type=int, default=4, help="train_loader's batch")
    p.add_argument("--shuffle-buffer", type=int, default=8, help="train_loader's shuffle buffer (samples)")
    p.add_argument("--samples", type=int, default=64, help="samples counted per row")
    p.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, metavar="STAGE",
                   help=f"stages to measure (default: all: {', '.join(map(repr, STAGES))})")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 rows (no moto_server)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.samples < 1 or args.repeat < 1 or args.images < 1 or args.shard_size < 1 or args.batch < 1:
        p.error("--samples, --repeat, --images, --shard-size and --batch must be at least 1")
    print(f"remote_throughput: python {platform.python_version()}, {platform.machine()}", flush=True)
    rows = run(args)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"samples_per_s": r.per_s} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
