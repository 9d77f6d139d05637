#!/usr/bin/env python3
"""What ASHA's early stopping saves in the demo's search, and what it costs: trial-epochs run and
the best validation mIoU reached, ASHA beside the same trials run to the end (issue 11,
"Scaling, measured").

Two real ``run.py tune`` subprocesses on the same synthetic Cityscapes shards, the demo's
search (``make demo``: ``run.py tune --preset synthetic --trials 4 --epochs 4 --max-concurrent
2 --workers-per-trial 1``), differing only in ``--scheduler``:

* ``asha`` (the default): Tune's ASHAScheduler on the per-epoch validation mIoU (grace period
  1 epoch, reduction factor 2, ``pipeline/tune.py``) stops trials that fall behind;
* ``fifo``: Tune's FIFOScheduler, every trial to its last epoch.

Both use Optuna's TPE with the same ``--seed``, starting from the paper's point (lambda_c 0.4,
lambda_s 0.1, the preset's lr). With fewer trials than TPE's start-up count (10) every other
point is a seeded random draw that does not depend on earlier results, so both searches train
the same points; the per-trial table pairs trials by their sampled values (as tagged on their
MLflow runs), and its ``same point`` column says whether both searches trained each point (a
``NO`` means the comparison is not like for like, and a warning says so).

Reported per search: trials, trial-epochs run (the sum of every trial's epochs, the search's
compute), trials stopped early, the best validation mIoU of any trial and which trial reached
it, the search's wall time (Tune's start to the registry; trials run ``--max-concurrent`` at a
time), and the 1-minute load average as it started and its mean while it ran (its own trials
count too). The figures come from the searches' MLflow runs (the parent run's totals, each
trial's ``val_miou`` history), read back through ``pipeline/tracking.py``.

The defaults are the demo's search on the demo's dataset (48 training and 12 validation frames
of 128x256, 8 per shard): 4 trials of 4 epochs, 2 at a time; on this 2-core machine 6-7 minutes
per search at a load average of 10-12 (others' work), less when it is quiet. ``--images``,
``--trials`` and ``--epochs`` shrink or grow it.

Examples::

    python benchmarks/search_efficiency.py                       # the demo's search, ASHA vs FIFO
    python benchmarks/search_efficiency.py --trials 8 --epochs 6 --json search.json
    python benchmarks/search_efficiency.py --quick               # a smoke run: 2 tiny trials of 2 epochs
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
                            load_line, local_env, make_shards, run_logged, wait_for_quiet, warn_if_loaded)

from sharding.atomic import atomic_write_bytes  # noqa: E402
from sharding.text import format_table, parse_size  # noqa: E402

SCHEDULERS = ("asha", "fifo")
PARENT_RUN_LINE = re.compile(r"MLflow parent run:\s+(\S+) in ")  # pipeline/trials.py: print_result
EXPERIMENT = "search-efficiency"
PARAM_TAG = "dfdam.param."  # pipeline/tune.py: run_trial tags each trial's run with its sampled values


@dataclass(frozen=True)
class Trial:
    index: int  # the order Tune created the trials in (1 = the first: the paper's point), from its trial folder
    trial_id: str
    params: dict[str, str]  # as tagged: the sampled values' text
    epochs: int  # epochs run (val_miou records)
    best_val_miou: float


@dataclass
class Search:
    scheduler: str
    trials: list[Trial] = field(default_factory=list)
    trial_epochs: int = 0  # the parent run's total
    stopped_early: int = 0
    best_val_miou: float = math.nan
    wall_s: float = math.nan  # the search itself, as the parent run logs it
    command_s: float = math.nan  # the whole run.py tune subprocess (Ray's start included)
    load_before: float = math.nan
    load_mean: float = math.nan
    parent_run_id: str = ""

    @property
    def best_trial(self) -> Trial | None:
        scored = [t for t in self.trials if not math.isnan(t.best_val_miou)]
        return max(scored, key=lambda t: t.best_val_miou) if scored else None


def trial_index(folder_name: str, trial_id: str) -> int | None:
    """The creation index in a Tune trial folder's name (``run_trial_<id>_<index>_<params>_<date>``)."""
    found = re.search(rf"_{re.escape(trial_id)}_(\d+)_", folder_name)
    return int(found.group(1)) if found else None


def paired(searches: Sequence[Search]) -> list[dict[str, Trial]]:
    """The searches' trials side by side, one row per point trained (the same sampled values in
    each search's trial-run tags): ``[{scheduler: trial}]``, in the first search's creation order,
    then any points only later searches trained."""
    rows: dict[tuple[tuple[str, str], ...], dict[str, Trial]] = {}
    for s in searches:
        for t in sorted(s.trials, key=lambda t: t.index):
            rows.setdefault(tuple(sorted(t.params.items())), {})[s.scheduler] = t
    return list(rows.values())


def same_point(trials: dict[str, Trial], searches: Sequence[Search]) -> bool:
    """Whether every search trained this point."""
    return all(s.scheduler in trials for s in searches)


def trials_table(searches: Sequence[Search]) -> str:
    names = sorted({n for s in searches for t in s.trials for n in t.params})
    header = ["trial", *names, *(f"{s.scheduler} {c}" for s in searches for c in ("epochs", "best mIoU")), "same point"]
    body = []
    for trials in paired(searches):
        first = next(iter(trials.values()))
        cells = [str(first.index), *(_short(first.params.get(n, "-")) for n in names)]
        for s in searches:
            t = trials.get(s.scheduler)
            cells += [str(t.epochs), f"{t.best_val_miou:.4f}"] if t else ["-", "-"]
        body.append([*cells, "yes" if same_point(trials, searches) else "NO"])
    return format_table(header, body, align="l" + "r" * (len(header) - 2) + "l")


def summary_table(searches: Sequence[Search], epochs: int) -> str:
    header = ["scheduler", "trials", "trial-epochs", "of (all to the end)", "saved", "stopped early",
              "best val mIoU", "best trial", "search s", "load before/during"]
    body = []
    for s in searches:
        full = len(s.trials) * epochs
        best = s.best_trial
        body.append([s.scheduler, len(s.trials), s.trial_epochs, full,
                     f"{1 - s.trial_epochs / full:.0%}" if full else "-", s.stopped_early,
                     f"{s.best_val_miou:.4f}", best.index if best else "-", f"{s.wall_s:.0f}",
                     f"{s.load_before:.2f}/{s.load_mean:.2f}"])
    return format_table(header, body)


def _short(text: str) -> str:
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


# ----------------------------------------------------------------------------- runs


def tune_argv(args: argparse.Namespace, shards: Path, work: Path, scheduler: str) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), "tune", "--preset", "synthetic", "--data", str(shards),
            "--trials", str(args.trials), "--epochs", str(args.epochs), "--max-concurrent", str(args.max_concurrent),
            "--workers-per-trial", "1", "--scheduler", scheduler, "--seed", str(args.seed),
            "--name", f"search-{scheduler}", "--storage", str(work / "runs"), "--register-as", f"bench-{scheduler}",
            "--set", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "--set", f"tracking.experiment={EXPERIMENT}",
            *(["--set", f"data.crop_size={args.crop[0]}x{args.crop[1]}"] if args.crop else [])]


def run_search(args: argparse.Namespace, shards: Path, work: Path, scheduler: str) -> Search:
    """One ``run.py tune`` subprocess to its end; its totals and trials read back from MLflow."""
    from pipeline import tracking

    log = work / f"search-{scheduler}.log"
    wait_for_quiet(args.wait_load, args.wait_max_s)
    print(f"  {scheduler}: run.py tune ... (log: {log}; {load_line()})", flush=True)
    what = f"search_efficiency: run.py tune --scheduler {scheduler}"
    done = run_logged(tune_argv(args, shards, work, scheduler), cwd=work, env=local_env(), log=log,
                      timeout_s=args.run_timeout_s, what=what)
    parent = done.find(PARENT_RUN_LINE)
    if done.code != 0 or not parent:
        raise SystemExit(f"{what} exited with {done.code}{'' if parent else ' and printed no MLflow parent run'}; "
                         f"the end of {log}:\n{done.tail()}")
    uri = f"sqlite:///{work / 'mlflow.db'}"

    def total(key: str) -> float:
        history = tracking.metric_history(uri, parent, key)
        if not history:
            raise SystemExit(f"{what}: its MLflow parent run {parent} has no {key!r}")
        return history[-1][1]

    search = Search(scheduler, trial_epochs=int(total("trial_epochs")),
                    stopped_early=int(total("trials_stopped_early")),
                    best_val_miou=total("best_val_miou"), wall_s=total("wall_s"), command_s=done.wall_s,
                    load_before=done.load_before, load_mean=done.load_mean, parent_run_id=parent)
    folders = [p.name for p in (work / "runs" / f"search-{scheduler}").iterdir() if p.is_dir()]
    for child in tracking.child_runs(uri, EXPERIMENT, parent):
        trial_id = child.tags.get("dfdam.trial_id", "")
        index = next((i for name in folders if (i := trial_index(name, trial_id)) is not None), 0)
        history = [value for _, value, _ in tracking.metric_history(uri, child.run_id, "val_miou")]
        search.trials.append(Trial(index, trial_id,
                                   {k[len(PARAM_TAG):]: v for k, v in child.tags.items() if k.startswith(PARAM_TAG)},
                                   len(history), max(history, default=math.nan)))
    search.trials.sort(key=lambda t: t.index)
    counted = sum(t.epochs for t in search.trials)
    if counted != search.trial_epochs or len(search.trials) != args.trials:
        print(f"  note: {scheduler}: the trials' runs hold {len(search.trials)} trial(s) and {counted} epoch records; "
              f"the search counted {args.trials} and {search.trial_epochs}", flush=True)
    print(f"    {done.wall_s:.0f} s; {search.trial_epochs} trial-epochs, best val mIoU {search.best_val_miou:.4f}",
          flush=True)
    return search


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=None, help="trials per search (default 4, the demo's; --quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 4, the demo's; --quick 2)")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2, the demo's)")
    p.add_argument("--seed", type=int, default=0, help="Optuna's seed, the same for both searches (default 0)")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic training frames (default 48, make-synthetic's and the demo's; --quick 8)")
    p.add_argument("--val-images", type=int, default=None, help="synthetic validation frames (default 12; --quick 2)")
    p.add_argument("--image-size", type=parse_size, default=None, metavar="HxW",
                   help="synthetic frame size (default 128x256, the demo's; --quick 64x128)")
    p.add_argument("--crop", type=parse_size, default=None, metavar="HxW",
                   help="training crop (default: the synthetic preset's 128x128; --quick 64x64)")
    p.add_argument("--shard-size", type=int, default=8, help="samples per shard (default 8, the demo's)")
    add_run_options(p, "search")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write both searches as JSON (atomically)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 trials of 2 epochs on 8 frames of 64x128, 64x64 crops (figures meaningless)")
    args = p.parse_args(argv)
    defaults = {"trials": (2, 4), "epochs": (2, 4), "images": (8, 48), "val_images": (2, 12),
                "image_size": ((64, 128), (128, 256)), "crop": ((64, 64), None)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    if args.quick:
        args.shard_size = min(args.shard_size, 2)
    if min(args.trials, args.epochs, args.max_concurrent, args.images, args.val_images, args.shard_size) < 1:
        p.error("--trials, --epochs, --max-concurrent, --images, --val-images and --shard-size must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_signals()
    crop = f"{args.crop[0]}x{args.crop[1]}" if args.crop else "the preset's 128x128"
    print(f"search_efficiency: run.py tune, ASHA vs FIFO on the same {args.trials} trials of {args.epochs} epochs "
          f"({args.max_concurrent} at a time, 1 worker each, Optuna seed {args.seed}); {args.images} train + "
          f"{args.val_images} val frames of {args.image_size[0]}x{args.image_size[1]}, crop {crop}; {load_line()}",
          flush=True)
    warning = "the searches' wall times come out longer (trial-epochs and mIoU do not depend on it)"
    warn_if_loaded(warning)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
            if any(work.iterdir()):
                raise SystemExit(f"search_efficiency: --workdir {work} is not empty; give a new or empty folder")
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dfdam-search-")))
        shards = make_shards(work, args.images, args.val_images, args.image_size, args.shard_size)
        searches = [run_search(args, shards, work, scheduler) for scheduler in SCHEDULERS]
    print(f"\nThe demo's search, ASHA against the same trials run to the end ({args.trials} trials x {args.epochs} "
          f"epochs):\n")
    print(summary_table(searches, args.epochs))
    print("\nper trial (paired by their sampled values; trial: the order Tune created them in, 1 is the paper's "
          "point):\n")
    print(trials_table(searches))
    if not all(same_point(trials, searches) for trials in paired(searches)):
        print("\nwarning: the searches did not train the same points (same point: NO): the best mIoU of each is not "
              "a like-for-like comparison")
    print(f"\n{load_line()} at the end")
    warn_if_loaded(warning)
    if args.json:
        payload = {"settings": vars(args), "searches": [asdict(s) for s in searches]}
        atomic_write_bytes(args.json, json.dumps(json_safe(payload), indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
