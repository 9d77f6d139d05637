"""Ray Tune search over lambda_c, lambda_s and the learning rate; the winner into the registry.

The paper fixed lambda_c = 0.4 and lambda_s = 0.1 by hand (Eq. 12). Here each Tune trial
is one distributed Ray Train run (the Train V2 pattern: a Tune function, :func:`run_trial`,
builds a ``TorchTrainer`` named after its trial id, with ``TuneReportCallback`` forwarding
the per-epoch validation mIoU), ASHA stops weak trials early, and Optuna's TPE proposes
the next point, starting from the paper's values. A space with a grid (the paper's
ablation, section 4.2: ``--grid model.variant=sum,dafm,dafm+2dpam``) is run point by point
instead, by Tune's basic variant generator and without early stopping, and reported as the
paper's Tables 1-2 (``pipeline/ablation.py``). MLflow holds one parent run per search and
one child run per trial. The space is ``pipeline/search_space.py``; the trials' rows and
report ``pipeline/trials.py``; the registry policy ``pipeline/champion.py``. The console
shows one line per trial result and the final table; Tune's own output stays in its log
files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline import tracking
from pipeline.ablation import ablation_table
from pipeline.champion import register_best, registry_name
from pipeline.cluster import check_resources, connect_ray, environment
from pipeline.config import Config, ConfigError, apply_overrides
from pipeline.console import trial_line
from pipeline.search_space import (GRID, Dimension, check_grid, grid_points, has_grid, paper_point,
                                   resolve_settings, trial_config)
from pipeline.train import absolute_paths, check_inputs, make_trainer, worker_resources
from pipeline.trials import METRIC, MODE, SearchResult, close_running_children, collect_rows, log_search
from sharding.storage import absolute, display, join, storage_exists, storage_read_text, storage_write_text

TRIAL_DRIVER_RESOURCE = "dfdam_trial_driver"


class SearchInterrupted(RuntimeError):
    """The search stopped (Ctrl+C) before every trial ended; its state is saved for --resume."""


@dataclass(frozen=True)
class SearchSettings:
    name: str
    trials: int  # with a grid: samples per grid point (pipeline.search_space.resolve_settings)
    scheduler: str  # asha | fifo (fifo with a grid)
    search: str  # optuna | random (random with a grid: Tune's basic variant generator)
    max_concurrent: int
    workers_per_trial: int
    seed: int = 0


# ----------------------------------------------------------------------------- the trial


def run_trial(params: dict[str, Any], *, base: dict[str, Any], space: dict[str, Dimension], tracking_uri: str,
              experiment: str, parent_run_id: str) -> None:
    """One Tune trial = one Ray Train run named after the trial id (so a restart resumes it)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(Config.from_dict(base), space, params)
    name = f"train-trial_id={trial_id}"
    run_id = tracking.start_run(
        tracking_uri, experiment, name, cfg.flat(),
        tags={"dfdam.trial_id": trial_id, "dfdam.kind": "trial", **{f"dfdam.param.{n}": str(v) for n, v in params.items()}},
        parent_run_id=parent_run_id,
    )
    outbox = tracking.Outbox.for_run(join(cfg.train.storage, name))
    trainer = make_trainer(cfg, name=name, tracking_uri=tracking_uri, run_id=run_id, callbacks=[TuneReportCallback()],
                           outbox=outbox)
    with tracking.run_status(tracking_uri, run_id, killed=(), outbox=outbox):  # a trial that does not finish failed
        trainer.fit()
        outbox.send(tracking_uri, run_id, {"kind": "tags", "tags": {"dfdam.status": "finished"}})


# ----------------------------------------------------------------------------- the driver


def search(cfg: Config, settings: SearchSettings, space: dict[str, Dimension], *, resume: bool = False,
           address: str | None = None, register_as: str | None = None) -> SearchResult:
    """Run (or resume) a search; every input is checked before anything starts."""
    started = time.perf_counter()
    storage = absolute(cfg.train.storage)  # a folder, or s3:// / gs:// as Ray Tune takes it
    cfg, settings, space = _saved_or_new(storage, cfg, settings, space, resume)
    _, val_manifest = check_inputs(cfg)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    ray_logs = connect_ray(address, resources={TRIAL_DRIVER_RESOURCE: 1000})
    check_resources(settings.workers_per_trial, worker_resources(cfg), concurrent=settings.max_concurrent)
    cfg = absolute_paths(cfg)
    if not resume:
        _save(storage, cfg, settings, space)
    trials = settings.trials * grid_points(space)
    print(f"{'resuming' if resume else 'searching'} {settings.name}: {trials} trials of {cfg.train.epochs} "
          f"epochs ({settings.max_concurrent} at once) over {', '.join(d.describe() for d in space.values())}; "
          f"Ray's and Tune's own output: {ray_logs}", flush=True)

    experiment = cfg.tracking.experiment or f"dfdam-{cfg.dataset}"
    parent_run_id = tracking.start_run(
        uri, experiment, settings.name,
        {**dataclasses.asdict(settings), **{f"space.{n}": d.describe() for n, d in space.items()}},
        tags={"dfdam.kind": "search"},
    )
    with tracking.run_status(uri, parent_run_id, killed=(KeyboardInterrupt, SearchInterrupted),
                             outbox=tracking.Outbox.for_run(join(storage, settings.name))):
        tuner = _tuner(storage, cfg, settings, space, resume, _trainable(cfg, space, uri, experiment, parent_run_id))
        # Tune's new output engine prints a banner and hints even at verbose=0; its classic
        # reporter prints nothing at 0: trial_printer's lines are the console.
        with _graceful_interrupt() as interrupted, environment({"RAY_AIR_NEW_OUTPUT": "0"}):
            results = tuner.fit()
        if interrupted.is_set():
            close_running_children(uri, experiment, parent_run_id)
            ended = results.num_terminated + results.num_errors
            raise SearchInterrupted(
                f"search {settings.name!r} was interrupted ({ended} of {trials} trials had ended); its "
                f"state is saved. Continue it with: python run.py tune --resume --name {settings.name} "
                f"--data {cfg.data.shards} --storage {storage}")
        with _tracked_end(uri, settings.name, f"--data {cfg.data.shards} --storage {storage}"):
            rows = collect_rows(results, cfg.train.epochs, uri, experiment, parent_run_id, list(space))
            model_name = registry_name(cfg.dataset, register_as, has_grid(space))
            registered = register_best(rows, uri, model_name, cfg, val_manifest) if model_name else None
            grid = [d for d in space.values() if d.kind == GRID]
            ablation = (ablation_table(rows, grid, dataset=cfg.dataset, backbone=cfg.model.backbone,
                                       variant=cfg.model.variant, epochs=cfg.train.epochs) if grid else "")
            result = SearchResult(settings.name, list(space), parent_run_id, uri, rows, registered,
                                  time.perf_counter() - started, grid_epochs=len(rows) * cfg.train.epochs,
                                  grid=[d.name for d in grid], ablation=ablation)
            log_search(result)
    return result


@contextlib.contextmanager
def _tracked_end(uri: str, name: str, where: str) -> Iterator[None]:
    """The search's end (trials' runs set straight, registry, report) with the tracking server away:
    one :class:`~pipeline.tracking.TrackingError` saying what is saved and how to finish, not MLflow's
    traceback. The search's own run is closed by the resumed search (its FAILED waits in the outbox)."""
    try:
        yield
    except Exception as exc:
        if tracking.server_answers(uri):
            raise
        raise tracking.TrackingError(
            f"MLflow server {uri} went away at the end of search {name!r}: its trials are done and saved with "
            "Tune's state, but the trials' runs, the registry and the search's report were not all written. Once "
            f"the server is back, finish it with: python run.py tune --resume --name {name} {where}") from exc


def _tuner(storage: str, cfg: Config, settings: SearchSettings, space: dict[str, Dimension], resume: bool,
           trainable):
    """Tune's ``Tuner``: restored from ``storage`` on resume, else new with the scheduler and searcher."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if resume:
        return tune.Tuner.restore(join(storage, settings.name), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=to_param_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=settings.trials, max_concurrent_trials=settings.max_concurrent,
            search_alg=_search_alg(settings, cfg, space),
            # max_t one past the budget: ASHA stops a trial that reaches max_t at once, which
            # would kill it before rank 0 logs its model; the trial ends by itself instead.
            scheduler=(ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1, grace_period=1,
                                     reduction_factor=2)
                       if settings.scheduler == "asha" else FIFOScheduler()),
        ),
        run_config=tune.RunConfig(name=settings.name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[trial_printer(list(space), cfg.train.epochs)],
                                  verbose=0),  # Tune's own tables stay out: trial_printer says what happened
    )


def _settings_path(storage: str, name: str) -> str:
    return join(storage, f"{name}.search.json")


def _saved_or_new(storage: str, cfg: Config, settings: SearchSettings, space: dict[str, Dimension],
                  resume: bool) -> tuple[Config, SearchSettings, dict[str, Dimension]]:
    """On resume, the search's saved config, settings and space; else the given ones, checked."""
    from ray import tune

    settings_file = _settings_path(storage, settings.name)
    experiment_dir = join(storage, settings.name)
    if resume:
        if not storage_exists(settings_file) or not tune.Tuner.can_restore(experiment_dir):
            raise FileNotFoundError(f"--resume: no search named {settings.name!r} under {display(storage)}")
        saved = json.loads(storage_read_text(settings_file))
        cfg = Config.from_dict(saved["config"])
        settings = SearchSettings(**saved["settings"])
        space = {n: Dimension(**{**d, "values": tuple(d["values"])}) for n, d in saved["space"].items()}
    elif storage_exists(experiment_dir) or storage_exists(settings_file):
        raise FileExistsError(f"a search named {settings.name!r} already exists under {display(storage)}: "
                              "pass --resume to continue it or choose another --name")
    if settings.trials < 1 or settings.max_concurrent < 1 or settings.workers_per_trial < 1:
        raise ConfigError("--trials, --max-concurrent and --workers-per-trial must be at least 1")
    if settings.scheduler not in ("asha", "fifo") or settings.search not in ("optuna", "random"):
        raise ConfigError("--scheduler takes asha|fifo and --search optuna|random")
    if not space:
        raise ConfigError("the search space is empty")
    resolve_settings(space, settings.trials, settings.scheduler, settings.search)  # a grid: random, fifo
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workers=settings.workers_per_trial))
    cfg = apply_overrides(cfg, [])  # validated (batch divisible by the new worker count)
    check_grid(cfg, space)
    return cfg, settings, space


def _save(storage: str, cfg: Config, settings: SearchSettings, space: dict[str, Dimension]) -> None:
    """The search's config, settings and space beside Tune's state, for ``--resume`` (written whole:
    a temporary name and a rename locally, one upload to an object store)."""
    storage_write_text(_settings_path(storage, settings.name),
                       json.dumps({"config": cfg.to_dict(), "settings": dataclasses.asdict(settings),
                                   "space": {n: dataclasses.asdict(d) for n, d in space.items()}}, indent=2))


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[threading.Event]:
    """Ctrl+C during ``tuner.fit()``: remember it, and ask Tune for its graceful stop.

    Tune's own SIGINT handler stops the search, saves its state and returns normally, so the
    caller could not tell an interrupted search from a finished one. Here SIGINT sets an
    event and sends SIGUSR1, which Tune treats as the same graceful stop; a second Ctrl+C
    raises KeyboardInterrupt at once.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        with environment({"TUNE_DISABLE_SIGINT_HANDLER": "1"}):
            yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous_handler)


def _trainable(cfg: Config, space: dict[str, Dimension], uri: str, experiment: str, parent_run_id: str):
    import ray
    from ray import tune

    fn = tune.with_parameters(run_trial, base=cfg.to_dict(), space=space,
                              tracking_uri=uri, experiment=experiment, parent_run_id=parent_run_id)
    driver = ({TRIAL_DRIVER_RESOURCE: 0.01} if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE)
              else {"CPU": 0.01})
    return tune.with_resources(fn, driver)


def _search_alg(settings: SearchSettings, cfg: Config, space: dict[str, Dimension]):
    if settings.search == "random":
        return None
    import logging

    from ray.tune.search.optuna import OptunaSearch

    logging.getLogger("optuna").setLevel(logging.WARNING)  # its INFO lines ("A new study created") stay out
    start = paper_point(cfg, space)
    return OptunaSearch(points_to_evaluate=[start] if start else None, seed=settings.seed)


def to_param_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """Tune's sampling domains for a space; a grid is ``tune.grid_search`` (every value, each
    sample: ``num_samples`` = ``settings.trials`` samples per grid point)."""
    from ray import tune

    kinds = {"uniform": lambda d: tune.uniform(d.low, d.high), "loguniform": lambda d: tune.loguniform(d.low, d.high),
             "choice": lambda d: tune.choice(list(d.values)), GRID: lambda d: tune.grid_search(list(d.values))}
    return {name: kinds[d.kind](d) for name, d in space.items()}


def trial_printer(names: list[str], epochs: int, stream=None):
    """A Tune callback (in the driver) printing one line per trial result and one per trial's end."""
    from ray.tune import Callback

    class TrialPrinter(Callback):
        def _print(self, line: str) -> None:
            print(line, file=stream or sys.stdout, flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self._print(trial_line(trial.trial_id, {n: trial.config.get(n) for n in names},
                                   int(result.get("training_iteration", 0)), epochs,
                                   float(result.get(METRIC, float("nan"))),
                                   float(result.get("best_val_miou", float("nan")))))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            done = int((trial.last_result or {}).get("training_iteration", 0))
            self._print(f"trial {trial.trial_id}  ended after {done}/{epochs} epochs"
                        + ("" if done >= epochs else " (stopped early by the scheduler)"))

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._print(f"trial {trial.trial_id}  failed: see {trial.local_path or 'its folder'}")

    return TrialPrinter()
