#!/usr/bin/env python3
"""Images/s of a whole Ray Train job with 1 worker against 2, on a local Ray cluster and on a
real two-node cluster: data-parallel scaling of the project's own training (issue 11, "Scaling,
measured"; the target is a speed-up of at least 1.7x from 1 to 2 workers).

Every row is one real ``run.py train --preset synthetic`` subprocess: Ray Train workers with
``train.cpus_per_worker = 1`` (so one torch thread each, ``pipeline/worker.py``), DDP over gloo,
the WebDataset shard reader, every epoch evaluated, checkpointed and logged to MLflow, on a
synthetic Cityscapes (``sharding.synthetic``) generated and sharded in a work folder first.

Settings:

* ``local``: ``run.py train`` without ``--address`` starts its own single-node cluster on
  127.0.0.1 (``pipeline/cluster.py``), as the demo does; Ray sees every CPU of the machine.
* ``cluster``: a head and a worker node, each a real ``ray start --block`` process on
  127.0.0.1 with 1 CPU and token authentication (``tests/cluster/conftest.py: start_cluster``,
  the test suite's two-node cluster, stopped afterwards by the pids it started), joined with
  ``run.py train --address``. With 2 workers Ray Train puts one worker on each node, so the
  gradients' all-reduce crosses node boundaries (loopback TCP here). Both nodes run on this
  machine's cores: a two-node cluster on a 2-core machine still has 2 cores in all.

What is measured (weak scaling, as data-parallel benchmarks report images/s per device): each
worker trains ``--batch-per-worker`` images a step, so the global batch (``data.batch_size``)
is that times the workers and an epoch of ``--images`` images takes half the steps with 2
workers. ``images/s`` is the job's training throughput over the steady-state epochs: every
epoch each rank times its own training loop (``pipeline/loop.py: train_one_epoch``: loader,
forward, joint loss, backward with the all-reduce, SGD step) and reports its images/s; the
ranks' mean, times the workers, is logged to MLflow as ``train_images_per_s`` (mean) per epoch;
the first ``--skip-epochs`` epochs (process start-up, first-step allocations, DDP's bucket
set-up) are left out, and the rest are combined as total images / total time. ``epoch-wall
img/s`` is the same epochs' images over the wall time between their MLflow records, so it
also pays validation, checkpointing and Ray Train's per-epoch report; ``job s`` is the
subprocess's whole wall time, start-up included. ``data wait`` is the share of the training
loop spent waiting for the loader (``train_data_wait_share``).

``CPU/worker`` is how much of a core each worker got while its loop ran (``train_cpu_share``:
the worker process's CPU seconds per wall second, ranks' mean): about 1 when a worker has its
core to itself, less when other work on the machine takes it (or when a worker waits for its
peer at the all-reduce). ``full-core img/s`` divides the images by the workers' CPU seconds
instead of wall seconds: the throughput had each worker had a whole core, an *estimate* that
takes contention out (it also forgives waits for a starved peer, which an idle machine would
mostly not have), and ``speed-up (full core)`` compares those. The pass/fail verdict is on the
measured ``images/s`` alone.

Why 256x256 crops and 4 images per worker (the defaults): DF-DAM-R18 has 11.7 M parameters,
so every step all-reduces 47 MB of fp32 gradients; gloo over loopback took 55-80 ms for that
on this machine, while one worker's step at 256x256, batch 4, 1 thread takes about 2.2 s
(this benchmark's 1-worker rows: 1.6-1.8 images/s on a whole core; ~1 s at 128x128, from
``benchmarks/train_throughput.py``). Communication is then ~3 % of a step, so the speed-up
measures the cores, not the all-reduce. Smaller crops or batches
make the all-reduce's share larger (at the demo's 128x128 with 4 images per worker, ~7 %).

This machine is shared: the 1-minute load average is printed before the runs and beside every
row (as the run started, and its mean sampled during the run, which includes the run's own
busy workers: about one per worker, plus Ray's start-up), and warned about when it is high. A
2-worker job needs both cores; anything else running takes its share of them, and only rows
run at a low load say what the code can do. Ray starts its workers at niceness 15
(``RAY_worker_niceness``), so an ordinary process of someone else's (niceness 0) on the same
core takes nearly all of it: ``CPU/worker`` shows when that happened. ``--wait-load`` waits
(up to ``--wait-max-s``) for a quieter machine before each run.

Examples::

    python benchmarks/train_scaling.py                          # local and two-node, 1 vs 2 workers (~12 min idle)
    python benchmarks/train_scaling.py --settings local --wait-load 0.5 --json scaling.json
    python benchmarks/train_scaling.py --quick                  # a smoke run: tiny images, 2 epochs (~3 min)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_machine import (REPO, add_run_options, interrupt_on_signals, json_safe,  # noqa: E402
                            load_line, local_env, make_shards, mean_finite, run_logged, wait_for_quiet, warn_if_loaded)

from sharding.atomic import atomic_write_bytes  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402

TARGET = 1.7  # issue 11: 2 workers train at least 1.7x the images/s of 1
RUN_ID_LINE = re.compile(r"MLflow run:\s+(\S+) in ")  # pipeline/train.py: print_result
SETTINGS = ("local", "cluster")
LOAD_WARNING = ("a 2-worker job needs both cores, so its images/s (and the speed-up) come out lower than on an "
                "idle machine")


# ----------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Epoch:
    """One epoch as MLflow holds it: the job's training images/s (ranks' mean x workers), when it
    was logged, the share of the loop spent waiting for data, and the share of a core each
    worker's process got (ranks' mean)."""

    epoch: int
    images_per_s: float
    logged_ms: int
    data_wait_share: float = math.nan
    cpu_share: float = math.nan


@dataclass
class Run:
    setting: str
    workers: int
    global_batch: int
    images_per_epoch: int
    epochs: list[Epoch] = field(default_factory=list)
    wall_s: float = math.nan  # the whole subprocess, start-up included
    load_before: float = math.nan  # 1-minute load average as the run started
    load_mean: float = math.nan  # ... sampled during the run: the run's own workers add about one each
    run_id: str = ""


def steady(epochs: Sequence[Epoch], skip: int) -> list[Epoch]:
    """The epochs after the first ``skip`` (start-up); refused if none is left."""
    kept = sorted(epochs, key=lambda e: e.epoch)[skip:]
    if not kept:
        raise ValueError(f"{len(epochs)} epoch(s) logged and {skip} skipped: nothing left to measure; "
                         "train more epochs (--epochs) or skip fewer (--skip-epochs)")
    return kept


def training_images_per_s(epochs: Sequence[Epoch], images_per_epoch: int, skip: int) -> float:
    """Steady-state training images/s of the job: total images / total training-loop time."""
    kept = steady(epochs, skip)
    return len(kept) * images_per_epoch / sum(images_per_epoch / e.images_per_s for e in kept)


def full_core_images_per_s(epochs: Sequence[Epoch], images_per_epoch: int, skip: int) -> float:
    """Steady-state images per worker-CPU-second: total images / total CPU seconds of one worker
    (each epoch's loop time x its CPU share), the job's images/s had each worker had a whole
    core; NaN when the CPU share was not logged."""
    kept = steady(epochs, skip)
    return len(kept) * images_per_epoch / sum(e.cpu_share * images_per_epoch / e.images_per_s for e in kept)


def epoch_wall_images_per_s(epochs: Sequence[Epoch], images_per_epoch: int, skip: int) -> float:
    """The steady epochs' images over the wall time between their MLflow records (the record of
    the last skipped epoch opens the span), so validation and checkpoints are paid too; NaN
    with ``skip`` 0 (nothing opens the first epoch's span)."""
    ordered = sorted(epochs, key=lambda e: e.epoch)
    kept = steady(ordered, skip)
    if skip < 1:
        return math.nan
    span_s = (kept[-1].logged_ms - ordered[skip - 1].logged_ms) / 1000
    return len(kept) * images_per_epoch / span_s if span_s > 0 else math.nan


def speedups(runs: Sequence[Run], skip: int, target: float = TARGET) -> list[dict[str, object]]:
    """One row per run: images/s and, against the 1-worker run of the same setting, the speed-up
    and whether it meets ``target`` (1-worker rows are the reference: no verdict)."""
    base = {r.setting: (training_images_per_s(r.epochs, r.images_per_epoch, skip),
                        full_core_images_per_s(r.epochs, r.images_per_epoch, skip)) for r in runs if r.workers == 1}
    rows = []
    for r in runs:
        ips = training_images_per_s(r.epochs, r.images_per_epoch, skip)
        full_core = full_core_images_per_s(r.epochs, r.images_per_epoch, skip)
        ref, ref_full_core = base.get(r.setting, (math.nan, math.nan))
        speedup = ips / ref if ref else math.nan
        verdict = "-" if r.workers == 1 or math.isnan(speedup) else ("pass" if speedup >= target else "FAIL")
        rows.append({"setting": r.setting, "workers": r.workers, "images_per_s": ips,
                     "epoch_wall_images_per_s": epoch_wall_images_per_s(r.epochs, r.images_per_epoch, skip),
                     "speedup": speedup, "target": target if r.workers > 1 else math.nan, "verdict": verdict,
                     "data_wait": mean_finite([e.data_wait_share for e in steady(r.epochs, skip)]),
                     "cpu_share": mean_finite([e.cpu_share for e in steady(r.epochs, skip)]),
                     "full_core_images_per_s": full_core,
                     "full_core_speedup": full_core / ref_full_core if ref_full_core else math.nan,
                     "wall_s": r.wall_s, "load_before": r.load_before, "load_mean": r.load_mean})
    return rows


def scaling_table(rows: Sequence[dict[str, object]]) -> str:
    def num(value: object, fmt: str) -> str:
        return "-" if not isinstance(value, (int, float)) or math.isnan(value) else format(value, fmt)

    header = ["setting", "workers", "images/s", "speed-up", "target", "pass/fail", "CPU/worker", "full-core img/s",
              "speed-up (full core)", "epoch-wall img/s", "data wait", "job s", "load before/during"]
    body = [[r["setting"], r["workers"], num(r["images_per_s"], ".2f"), num(r["speedup"], ".2f") + "x",
             num(r["target"], ".1f") + ("x" if r["workers"] != 1 else ""), r["verdict"],
             num(r["cpu_share"], ".2f"), num(r["full_core_images_per_s"], ".2f"),
             num(r["full_core_speedup"], ".2f") + "x", num(r["epoch_wall_images_per_s"], ".2f"),
             num(r["data_wait"], ".1%"), num(r["wall_s"], ".0f"),
             f"{num(r['load_before'], '.2f')}/{num(r['load_mean'], '.2f')}"] for r in rows]
    return format_table(header, body, align="lrrrrlrrrrrrr")


# ----------------------------------------------------------------------------- runs


def train_argv(args: argparse.Namespace, shards: Path, work: Path, name: str, workers: int,
               address: str | None) -> list[str]:
    crop = "x".join(map(str, args.crop))
    return [sys.executable, str(REPO / "run.py"), "train", "--preset", "synthetic", "--data", str(shards),
            *(["--address", address] if address else []),
            "--workers", str(workers), "--epochs", str(args.epochs), "--name", name, "--storage", str(work / "runs"),
            "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "--set", f"data.crop_size={crop}", "--set", f"data.batch_size={args.batch_per_worker * workers}",
            "--set", "train.cpus_per_worker=1", "--set", "tracking.overlays=0", "--set", "tracking.log_model=false"]


def run_training(args: argparse.Namespace, shards: Path, work: Path, setting: str, workers: int,
                 env: dict[str, str], address: str | None) -> Run:
    """One ``run.py train`` subprocess to its end; its per-epoch figures read back from MLflow."""
    from pipeline import tracking

    name = f"scaling-{setting}-{workers}w"
    log = work / f"{name}.log"
    argv = train_argv(args, shards, work, name, workers, address)
    global_batch = args.batch_per_worker * workers
    run = Run(setting, workers, global_batch, math.ceil(args.images / global_batch) * global_batch)
    wait_for_quiet(args.wait_load, args.wait_max_s)
    print(f"  {setting}, {workers} worker(s): run.py train ... (log: {log}; {load_line()})", flush=True)
    done = run_logged(argv, cwd=work, env=env, log=log, timeout_s=args.run_timeout_s,
                      what=f"train_scaling: run.py train ({setting}, {workers} worker(s))")
    run.wall_s, run.load_before, run.load_mean = done.wall_s, done.load_before, done.load_mean
    run_id = done.find(RUN_ID_LINE)
    if done.code != 0 or not run_id:
        raise SystemExit(f"train_scaling: run.py train ({setting}, {workers} worker(s)) exited with {done.code}"
                         f"{'' if run_id else ' and printed no MLflow run id'}; the end of {log}:\n{done.tail()}")
    run.run_id = run_id
    uri = f"sqlite:///{work / 'mlflow.db'}"
    speeds = tracking.metric_history(uri, run.run_id, "train_images_per_s")
    waits, cpus = ({step: value for step, value, _ in tracking.metric_history(uri, run.run_id, key)}
                   for key in ("train_data_wait_share", "train_cpu_share"))
    run.epochs = [Epoch(step, value * workers, logged, waits.get(step, math.nan), cpus.get(step, math.nan))
                  for step, value, logged in speeds]
    if len(run.epochs) != args.epochs:
        raise SystemExit(f"train_scaling: MLflow run {run.run_id} holds {len(run.epochs)} epoch(s) of "
                         f"train_images_per_s, expected {args.epochs}")
    print(f"    {run.wall_s:.0f} s; images/s per epoch: " + ", ".join(f"{e.images_per_s:.2f}" for e in run.epochs)
          + "; CPU per worker: " + ", ".join(f"{e.cpu_share:.2f}" for e in run.epochs), flush=True)
    return run


def measure(args: argparse.Namespace, work: Path) -> list[Run]:
    # At least 2 validation shards, so each of 2 ranks validates its own.
    shards = make_shards(work, args.images, args.val_images, args.image_size,
                         shard_size=max(1, min(8, args.val_images // 2)))
    print(f"data: synthetic Cityscapes, {args.images} train + {args.val_images} val frames of "
          f"{args.image_size[0]}x{args.image_size[1]}, shards in {shards}", flush=True)
    runs = []
    if "local" in args.settings:
        for workers in (1, 2):
            runs.append(run_training(args, shards, work, "local", workers, local_env(), None))
    if "cluster" in args.settings:
        from tests.cluster.conftest import start_cluster

        print(f"  starting a two-node cluster (head + worker node, 1 CPU each, ray start on 127.0.0.1; {load_line()})",
              flush=True)
        with start_cluster(worker_nodes=1) as cluster:
            for workers in (1, 2):
                runs.append(run_training(args, shards, work, "cluster", workers, cluster.env, cluster.address))
    return runs


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="local,cluster",
                   help="comma-separated: local (run.py's own single-node cluster), cluster (two `ray start` nodes "
                        "of 1 CPU each on 127.0.0.1) (default: both)")
    p.add_argument("--crop", type=parse_size, default=None, metavar="HxW",
                   help="training crop, data.crop_size (default 256x256; --quick 64x64)")
    p.add_argument("--batch-per-worker", type=int, default=None,
                   help="images per worker per step; data.batch_size = this x workers (default 4; --quick 2)")
    p.add_argument("--images", type=int, default=None, help="synthetic training frames (default 48; --quick 8)")
    p.add_argument("--val-images", type=int, default=None, help="synthetic validation frames (default 8; --quick 2)")
    p.add_argument("--image-size", type=parse_size, default=None, metavar="HxW",
                   help="synthetic frame size (default 256x512, Cityscapes' aspect; --quick 64x128)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4; --quick 2)")
    p.add_argument("--skip-epochs", type=int, default=1, help="first epochs left out as start-up (default 1)")
    p.add_argument("--target", type=float, default=TARGET, help=f"speed-up 2 workers must reach (default {TARGET})")
    add_run_options(p, "run")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON (atomically)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 8 frames of 64x128, 64x64 crops, 2 per worker, 2 epochs (figures meaningless)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"crop": ((64, 64), (256, 256)), "batch_per_worker": (2, 4), "images": (8, 48),
                "val_images": (2, 8), "image_size": ((64, 128), (256, 512)), "epochs": (2, 4)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = set(args.settings) - set(SETTINGS)
    if unknown or not args.settings:
        p.error(f"--settings: expected a comma-separated subset of {', '.join(SETTINGS)}, got {sorted(unknown)}")
    if args.epochs <= args.skip_epochs:
        p.error(f"--epochs {args.epochs} must be more than --skip-epochs {args.skip_epochs}")
    if args.val_images < 2 or args.images < 1 or args.batch_per_worker < 1:
        p.error("--val-images must be at least 2 (one validation shard per rank), --images and --batch-per-worker "
                "at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    print(f"train_scaling: Ray Train, 1 vs 2 workers ({', '.join(args.settings)}); crop {args.crop[0]}x{args.crop[1]}, "
          f"{args.batch_per_worker} image(s) per worker per step, cpus_per_worker 1 (1 torch thread), "
          f"{args.epochs} epochs of {args.images} frames, first {args.skip_epochs} left out; {load_line()}", flush=True)
    warn_if_loaded(LOAD_WARNING)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
            if any(work.iterdir()):
                raise SystemExit(f"train_scaling: --workdir {work} is not empty; give a new or empty folder")
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dfdam-scaling-")))
        runs = measure(args, work)
    rows = speedups(runs, args.skip_epochs, args.target)
    print(f"\nRay Train images/s, 1 vs 2 workers (steady state: epochs {args.skip_epochs + 1}-{args.epochs}; "
          f"weak scaling, {args.batch_per_worker} image(s) per worker per step, crop "
          f"{args.crop[0]}x{args.crop[1]}):\n")
    print(scaling_table(rows))
    print(f"\n{load_line()} at the end")
    warn_if_loaded(LOAD_WARNING)
    if args.json:
        payload = {"settings": vars(args), "rows": rows, "runs": [asdict(r) for r in runs]}
        atomic_write_bytes(args.json, json.dumps(json_safe(payload), indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
