"""What the run-the-pipeline benchmarks share (``train_scaling.py``, ``search_efficiency.py``):
pipeline commands run as subprocesses on a machine other people use too.

- the load average: printed, warned about, waited on, and sampled while a run goes;
- :func:`run_logged`: one ``run.py`` subprocess to its end, its output in a log file, stopped
  (it and every process below it, by pid) when it overruns or the benchmark is interrupted
  (:func:`interrupt_on_signals`: SIGTERM too);
- :func:`make_shards`: a synthetic Cityscapes generated and sharded in a work folder;
- :func:`add_run_options`: the command-line options both share (waiting for a quiet machine,
  the run timeout, the work folder);
- :func:`mean_finite`, :func:`json_safe`: small arithmetic and output helpers.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

HIGH_LOAD = 0.5  # a 1-minute load average above this on the cores a run needs is worth a warning


# ----------------------------------------------------------------------------- the load average


def add_run_options(p: argparse.ArgumentParser, what: str) -> None:
    """--wait-load, --wait-max-s, --run-timeout-s and --workdir; ``what`` is one timed unit ("run", "search")."""
    p.add_argument("--wait-load", type=float, default=0.0, metavar="LOAD",
                   help=f"before each {what}, wait for the 1-minute load average to fall to LOAD (default 0: no wait)")
    p.add_argument("--wait-max-s", type=float, default=300.0, help="longest wait for --wait-load (default 300)")
    p.add_argument("--run-timeout-s", type=float, default=1800.0, help=f"stop a {what} after this long (default 1800)")
    p.add_argument("--workdir", type=Path, help="keep data, runs, MLflow store and logs here (default: a temporary "
                                                 "folder, removed at the end)")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def warn_if_loaded(what: str, stream=sys.stdout) -> None:
    """A warning line when the 1-minute load average is above :data:`HIGH_LOAD`."""
    one = os.getloadavg()[0]
    if one > HIGH_LOAD:
        print(f"warning: 1-minute load average {one:.2f} on {os.cpu_count()} CPUs: other work shares the cores; "
              f"{what}", file=stream, flush=True)


def wait_for_quiet(threshold: float, max_s: float) -> None:
    """Sleep until the 1-minute load average is at most ``threshold`` or ``max_s`` have passed
    (no wait when either is 0)."""
    if threshold <= 0 or max_s <= 0:
        return
    deadline = time.monotonic() + max_s
    if os.getloadavg()[0] > threshold:
        print(f"  waiting up to {max_s:.0f} s for the 1-minute load average to fall to {threshold:g} "
              f"({load_line()})", flush=True)
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        time.sleep(5)


@contextlib.contextmanager
def sampled_load(every_s: float = 5.0) -> Iterator[list[float]]:
    """The 1-minute load average as the block starts, every ``every_s`` while it runs, and as it ends."""
    samples: list[float] = [os.getloadavg()[0]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            samples.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, name="load-sampler", daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        samples.append(os.getloadavg()[0])


# ----------------------------------------------------------------------------- subprocess runs


@dataclass(frozen=True)
class Finished:
    """A subprocess run that ended by itself: exit code, its output, wall seconds, the load."""

    code: int
    output: str
    wall_s: float
    load_before: float  # 1-minute load average as it started
    load_mean: float  # ... its mean while it ran (its own busy processes count too)

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def find(self, pattern: re.Pattern[str]) -> str | None:
        """The first group of the first match of ``pattern`` in the output, or None."""
        found = pattern.search(self.output)
        return found.group(1) if found else None


def run_logged(argv: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path, timeout_s: float,
               what: str) -> Finished:
    """Run ``argv`` to its end with stdout and stderr in ``log``; on overrun (``timeout_s``) or an
    interrupt, stop it and every process below it (a local Ray it started included) and raise
    ``SystemExit`` naming ``what`` and the log."""
    started = time.monotonic()
    with sampled_load() as loads, open(log, "wb") as out:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_tree(proc)
            raise SystemExit(f"{what} still ran after {timeout_s:.0f} s and was stopped; its log: {log}") from None
        except BaseException:
            stop_tree(proc)
            raise
    return Finished(code, log.read_text(errors="replace"), time.monotonic() - started, loads[0], mean_finite(loads))


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop ``proc`` (started in a session of its own) and every process below it, by pid."""
    # (pid, start time) pairs from /proc: a pid reused by someone else's process is never signalled.
    from tests.cluster.conftest import _kill, _tree

    procs = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    _kill(procs)
    proc.wait(timeout=30)


def interrupt_on_signals() -> None:
    """SIGTERM, and SIGINT even where a background shell set it to be ignored, raise
    KeyboardInterrupt in this process, so every run and cluster a benchmark started is stopped
    (by :func:`run_logged` and the cluster's context manager) on the way out."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def local_env() -> dict[str, str]:
    """This environment without RAY_* (no inherited address: ``run.py`` starts its own local
    cluster on 127.0.0.1), usage stats off, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                  "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}  # Ray's 60 s is short on a loaded 2-core machine


# ----------------------------------------------------------------------------- data


def make_shards(work: Path, images: int, val_images: int, size: tuple[int, int], shard_size: int) -> Path:
    """A synthetic Cityscapes (``sharding.synthetic``, seed 0) in ``work/raw``, its train and val
    splits sharded into ``work/shards`` with ``shard_size`` samples per shard."""
    from sharding.synthetic import make_cityscapes
    from sharding.write import shard_dataset

    raw, shards = work / "raw", work / "shards"
    make_cityscapes(raw, seed=0, train=images, val=val_images, test=1, height=size[0], width=size[1])
    shard_dataset("cityscapes", raw, shards, splits=["train", "val"], shard_size=shard_size, workers=1,
                  show_progress=False)
    return shards


# ----------------------------------------------------------------------------- small helpers


def mean_finite(values: Sequence[float]) -> float:
    """The mean of the values that are not NaN (NaN if none)."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def json_safe(value: object) -> object:
    """``value`` with every NaN as None and tuples and paths as JSON has them (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
