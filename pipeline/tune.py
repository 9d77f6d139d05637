"""Ray Tune search over lambda_c, lambda_s and the learning rate; the winner into the registry.

The paper fixed lambda_c = 0.4 and lambda_s = 0.1 by hand (Eq. 12). Here each Tune trial
is one distributed Ray Train run (the Train V2 pattern: a Tune function builds a
``TorchTrainer`` named after its trial id, with ``TuneReportCallback`` forwarding the
per-epoch validation mIoU), ASHA stops weak trials early, and Optuna's TPE proposes the
next point, starting from the paper's values. MLflow holds one parent run per search and
one child run per trial; the best finished trial's model is registered and becomes
``champion`` if it beats the current champion on the same validation data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import Config, ConfigError, apply_overrides
from pipeline.cluster import check_resources, connect_ray
from pipeline.train import absolute_paths, check_inputs, make_trainer, worker_resources
from sharding.manifest import Manifest

# Short names for the paper's three knobs; any numeric config field "section.field" also works.
ALIASES = {"lambda_c": "loss.lambda_c", "lambda_s": "loss.lambda_s", "lr": "optim.lr"}
KINDS = ("uniform", "loguniform", "choice")
TRIAL_DRIVER_RESOURCE = "dfdam_trial_driver"
METRIC, MODE = "val_miou", "max"


class SearchInterrupted(RuntimeError):
    """The search stopped (Ctrl+C) before every trial ended; its state is saved for --resume."""


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``uniform``/``loguniform`` over [low, high], or a ``choice``."""

    name: str  # as the user wrote it (lambda_c, lr, optim.weight_decay, ...)
    key: str  # config field, section.field
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[float, ...] = ()

    def contains(self, value: float) -> bool:
        if self.kind == "choice":
            return value in self.values
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.values)}"
        return f"{self.name} ~ {self.kind}[{self.low:g}, {self.high:g}]"


def default_space(cfg: Config) -> dict[str, Dimension]:
    """lambda_c in [0, 1] and lambda_s in [0, 0.5] (both include the paper's value and 0,
    i.e. the auxiliary loss switched off); lr log-uniform within 10x of the preset's."""
    return {
        "lambda_c": Dimension("lambda_c", "loss.lambda_c", "uniform", 0.0, 1.0),
        "lambda_s": Dimension("lambda_s", "loss.lambda_s", "uniform", 0.0, 0.5),
        "lr": Dimension("lr", "optim.lr", "loguniform", cfg.optim.lr / 10, cfg.optim.lr * 10),
    }


def _numeric_fields(cfg: Config) -> set[str]:
    return {k for k, v in cfg.flat().items() if "." in k and isinstance(v, float)}


def _dimension(name: str, spec: dict[str, Any], cfg: Config, where: str) -> Dimension:
    key = ALIASES.get(name, name)
    allowed = sorted(set(ALIASES) | _numeric_fields(cfg))
    if key not in _numeric_fields(cfg):
        raise ConfigError(f"{where}: unknown search parameter {name!r}: expected one of {allowed}")
    kind = spec.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{where}: {name}: type must be one of {list(KINDS)}, got {kind!r}")
    try:
        if kind == "choice":
            values = tuple(float(v) for v in spec["values"])
            if not values:
                raise ConfigError(f"{where}: {name}: choice needs at least one value")
            return Dimension(name, key, kind, values=values)
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {name}: {kind} needs numeric low and high (choice: values): {exc}") from None
    if not low < high:
        raise ConfigError(f"{where}: {name}: low ({low:g}) must be below high ({high:g})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: {name}: loguniform needs low > 0, got {low:g}")
    if low < 0 and key.startswith("loss.lambda"):
        raise ConfigError(f"{where}: {name}: a loss weight cannot be negative (low {low:g})")
    return Dimension(name, key, kind, low, high)


def parse_space(cfg: Config, specs: list[str] | None = None, file: str | Path | None = None) -> dict[str, Dimension]:
    """The default space, changed by a JSON file and then by ``name=kind:low:high`` strings.

    File: ``{"lambda_c": {"type": "uniform", "low": 0, "high": 1}, "lr": {"type":
    "loguniform", "low": 1e-3, "high": 1e-1}, "lambda_s": {"type": "choice", "values": [0,
    0.1]}}``. Strings: ``lambda_c=uniform:0:1``, ``lr=loguniform:1e-3:1e-1``,
    ``lambda_s=choice:0,0.1,0.2``. Unknown names, kinds and empty ranges are refused.
    """
    space = default_space(cfg)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"search space file {path} not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected an object of name -> {{type, low, high}}")
        for name, spec in data.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"{path}: {name}: expected an object like {{\"type\": \"uniform\", \"low\": 0, \"high\": 1}}")
            space[name] = _dimension(name, spec, cfg, str(path))
    for text in specs or []:
        if "=" not in text or ":" not in text:
            raise ConfigError(f"--space {text!r}: expected name=kind:low:high or name=choice:v1,v2")
        name, rest = text.split("=", 1)
        kind, _, args = rest.partition(":")
        if kind == "choice":
            spec: dict[str, Any] = {"type": kind, "values": [v for v in args.split(",") if v]}
        else:
            bounds = args.split(":")
            spec = {"type": kind, "low": bounds[0], "high": bounds[1] if len(bounds) > 1 else None}
        space[name.strip()] = _dimension(name.strip(), spec, cfg, f"--space {text!r}")
    keys = [d.key for d in space.values()]
    if len(keys) != len(set(keys)):
        raise ConfigError(f"the search space names one config field twice: {sorted(keys)}")
    return space


def paper_point(cfg: Config, space: dict[str, Dimension]) -> dict[str, float] | None:
    """The preset's own values (the paper's lambdas and lr), if the space contains them."""
    flat = cfg.flat()
    point = {name: flat[d.key] for name, d in space.items()}
    return point if all(space[n].contains(v) for n, v in point.items()) else None


def to_param_space(space: dict[str, Dimension]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, d in space.items():
        if d.kind == "uniform":
            out[name] = tune.uniform(d.low, d.high)
        elif d.kind == "loguniform":
            out[name] = tune.loguniform(d.low, d.high)
        else:
            out[name] = tune.choice(list(d.values))
    return out


def validation_fingerprint(manifest: Manifest) -> str:
    """Identity of a validation split: sha256 over its samples' keys and checksums."""
    table = manifest.table.select(["key", "image_sha256", "label_sha256"]).to_pylist()
    digest = hashlib.sha256()
    for row in sorted(table, key=lambda r: r["key"]):
        digest.update(f"{row['key']}:{row['image_sha256']}:{row['label_sha256']}\n".encode())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the trial


def run_trial(params: dict[str, Any], *, base: dict[str, Any], keys: dict[str, str], tracking_uri: str,
              experiment: str, parent_run_id: str) -> None:
    """One Tune trial = one Ray Train run named after the trial id (so a restart resumes it)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_overrides(Config.from_dict(base), [f"{keys[n]}={v!r}" for n, v in params.items()])
    name = f"train-trial_id={trial_id}"
    run_id = tracking.start_run(
        tracking_uri, experiment, name, cfg.flat(),
        tags={"dfdam.trial_id": trial_id, "dfdam.kind": "trial", **{f"dfdam.param.{n}": str(v) for n, v in params.items()}},
        parent_run_id=parent_run_id,
    )
    trainer = make_trainer(cfg, name=name, tracking_uri=tracking_uri, run_id=run_id, callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except BaseException:
        tracking.end_run(tracking_uri, run_id, "FAILED")
        raise
    tracking.set_tags(tracking_uri, run_id, {"dfdam.status": "finished"})
    tracking.end_run(tracking_uri, run_id, "FINISHED")


# ----------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class SearchSettings:
    name: str
    trials: int
    scheduler: str  # asha | fifo
    search: str  # optuna | random
    max_concurrent: int
    workers_per_trial: int
    seed: int = 0


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, float]
    epochs: int
    val_miou: float
    best_val_miou: float
    status: str  # finished | stopped early | error
    run_id: str | None


@dataclass(frozen=True)
class SearchResult:
    name: str
    names: list[str]  # the searched parameters
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    registered: dict[str, Any] | None
    wall_s: float
    grid_epochs: int

    @property
    def stopped_early(self) -> int:
        return sum(r.status == "stopped early" for r in self.rows)

    @property
    def trial_epochs(self) -> int:
        return sum(r.epochs for r in self.rows)


def _settings_path(storage: Path, name: str) -> Path:
    return storage / f"{name}.search.json"


def search(cfg: Config, settings: SearchSettings, space: dict[str, Dimension], *, resume: bool = False,
           address: str | None = None, register_as: str | None = None) -> SearchResult:
    """Run (or resume) a search; every input is checked before anything starts."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    started = time.perf_counter()
    storage = Path(cfg.train.storage).resolve()
    settings_file = _settings_path(storage, settings.name)
    experiment_dir = storage / settings.name
    if resume:
        if not settings_file.is_file() or not tune.Tuner.can_restore(str(experiment_dir)):
            raise FileNotFoundError(f"--resume: no search named {settings.name!r} under {storage}")
        saved = json.loads(settings_file.read_text())
        cfg = Config.from_dict(saved["config"])
        settings = SearchSettings(**saved["settings"])
        space = {n: Dimension(**{**d, "values": tuple(d["values"])}) for n, d in saved["space"].items()}
    elif experiment_dir.exists() or settings_file.exists():
        raise FileExistsError(f"a search named {settings.name!r} already exists under {storage}: "
                              "pass --resume to continue it or choose another --name")
    if settings.trials < 1 or settings.max_concurrent < 1 or settings.workers_per_trial < 1:
        raise ConfigError("--trials, --max-concurrent and --workers-per-trial must be at least 1")
    if settings.scheduler not in ("asha", "fifo") or settings.search not in ("optuna", "random"):
        raise ConfigError("--scheduler takes asha|fifo and --search optuna|random")
    if not space:
        raise ConfigError("the search space is empty")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workers=settings.workers_per_trial))
    cfg = apply_overrides(cfg, [])  # validate (batch divisible by the new worker count)
    _, val_manifest = check_inputs(cfg)
    uri = tracking.resolve_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)
    connect_ray(address, resources={TRIAL_DRIVER_RESOURCE: 1000})
    check_resources(settings.workers_per_trial, worker_resources(cfg), concurrent=settings.max_concurrent)
    cfg = absolute_paths(cfg)

    storage.mkdir(parents=True, exist_ok=True)
    if not resume:
        tmp = settings_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": cfg.to_dict(), "settings": dataclasses.asdict(settings),
                                   "space": {n: dataclasses.asdict(d) for n, d in space.items()}}, indent=2))
        tmp.replace(settings_file)

    experiment = cfg.tracking.experiment or f"dfdam-{cfg.dataset}"
    parent_run_id = tracking.start_run(
        uri, experiment, settings.name,
        {**dataclasses.asdict(settings), **{f"space.{n}": d.describe() for n, d in space.items()}},
        tags={"dfdam.kind": "search"},
    )
    trainable = _trainable(cfg, space, uri, experiment, parent_run_id)
    try:
        if resume:
            tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=to_param_space(space),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode=MODE, num_samples=settings.trials,
                    max_concurrent_trials=settings.max_concurrent,
                    search_alg=_search_alg(settings, cfg, space),
                    # max_t one past the budget: ASHA stops a trial that reaches max_t at once, which
                    # would kill it before rank 0 logs its model; the trial ends by itself instead.
                    scheduler=(ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1,
                                             grace_period=1, reduction_factor=2)
                               if settings.scheduler == "asha" else FIFOScheduler()),
                ),
                run_config=tune.RunConfig(name=settings.name, storage_path=str(storage),
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          verbose=1),  # status tables, not every trial's full result
            )
        with _graceful_interrupt() as interrupted:
            results = tuner.fit()
    except BaseException:
        tracking.end_run(uri, parent_run_id, "KILLED")
        raise
    if interrupted.is_set():
        _close_running_children(uri, experiment, parent_run_id)
        tracking.end_run(uri, parent_run_id, "KILLED")
        ended = results.num_terminated + results.num_errors
        raise SearchInterrupted(
            f"search {settings.name!r} was interrupted ({ended} of {settings.trials} trials had ended); its state "
            "is saved. "
            f"Continue it with: python run.py tune --resume --name {settings.name} --data {cfg.data.shards} "
            f"--storage {storage}"
        )

    try:
        rows = _collect_rows(results, cfg.train.epochs, uri, experiment, parent_run_id, list(space))
        registered = _register_best(rows, uri, register_as or f"dfdam-{cfg.dataset}", cfg, val_manifest)
        wall = time.perf_counter() - started
        result = SearchResult(settings.name, list(space), parent_run_id, uri, rows, registered, wall,
                              grid_epochs=len(rows) * cfg.train.epochs)
        _log_search(result)
    except BaseException:
        tracking.end_run(uri, parent_run_id, "FAILED")
        raise
    tracking.end_run(uri, parent_run_id, "FINISHED")
    return result


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
    previous_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if previous_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous_env


def _trainable(cfg: Config, space: dict[str, Dimension], uri: str, experiment: str, parent_run_id: str):
    import ray
    from ray import tune

    fn = tune.with_parameters(run_trial, base=cfg.to_dict(), keys={n: d.key for n, d in space.items()},
                              tracking_uri=uri, experiment=experiment, parent_run_id=parent_run_id)
    driver = ({TRIAL_DRIVER_RESOURCE: 0.01} if ray.cluster_resources().get(TRIAL_DRIVER_RESOURCE)
              else {"CPU": 0.01})
    return tune.with_resources(fn, driver)


def _search_alg(settings: SearchSettings, cfg: Config, space: dict[str, Dimension]):
    if settings.search == "random":
        return None
    from ray.tune.search.optuna import OptunaSearch

    start = paper_point(cfg, space)
    return OptunaSearch(points_to_evaluate=[start] if start else None, seed=settings.seed)


def _children(uri: str, experiment: str, parent_run_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment_id = tracking.get_experiment_id(client, experiment, uri)
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              max_results=1000)


def _close_running_children(uri: str, experiment: str, parent_run_id: str) -> None:
    for child in _children(uri, experiment, parent_run_id):
        if child.info.status == "RUNNING":
            tracking.end_run(uri, child.info.run_id, "KILLED")


def _collect_rows(results, max_epochs: int, uri: str, experiment: str, parent_run_id: str,
                  names: list[str]) -> list[TrialRow]:
    """One row per trial; children Tune stopped early are closed in MLflow (else RUNNING forever)."""
    children = {r.data.tags.get("dfdam.trial_id"): r for r in _children(uri, experiment, parent_run_id)}
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        epochs = int(metrics.get("training_iteration", 0))
        child = children.get(trial_id)
        if result.error is not None:
            status = "error"
        elif epochs >= max_epochs:
            status = "finished"
        else:
            status = "stopped early"
        expected = {"finished": "FINISHED", "error": "FAILED"}.get(status, "KILLED")
        if child is not None and child.info.status != expected:
            # Tune can stop a trial right after its last report, while it closes its own run
            # (left RUNNING, or marked FAILED by the stop); Tune's view of the trial decides.
            tracking.set_tags(uri, child.info.run_id, {"dfdam.status": status.replace(" ", "_")})
            tracking.end_run(uri, child.info.run_id, expected)
        rows.append(TrialRow(
            trial_id=trial_id,
            params={n: float(result.config[n]) for n in names if n in (result.config or {})},
            epochs=epochs,
            val_miou=float(metrics.get(METRIC, float("nan"))),
            best_val_miou=float(metrics.get("best_val_miou", float("nan"))),
            status=status,
            run_id=child.info.run_id if child is not None else None,
        ))
    rows.sort(key=lambda r: -r.best_val_miou if not math.isnan(r.best_val_miou) else math.inf)
    return rows


def _register_best(rows: list[TrialRow], uri: str, model_name: str, cfg: Config,
                   val_manifest: Manifest) -> dict[str, Any] | None:
    """Register the best finished trial's model; move ``champion`` to it if it wins."""
    finished = [r for r in rows if r.status == "finished" and r.run_id]
    if not finished:
        return None
    best = max(finished, key=lambda r: r.val_miou)
    fingerprint = validation_fingerprint(val_manifest)
    version = tracking.register_model(uri, best.run_id, model_name,
                                      tags={"val_miou": repr(best.val_miou), "val_data": fingerprint,
                                            "val_split": val_manifest.split})
    champion = tracking.get_alias(uri, model_name, "champion")
    champion_miou = None
    if champion is not None:
        if champion.tags.get("val_data") == fingerprint and "val_miou" in champion.tags:
            champion_miou = float(champion.tags["val_miou"])
        else:  # measured on other data: measure it again on this validation split
            from pipeline.evaluate import evaluate_model

            champion_miou = evaluate_model(f"models:/{model_name}@champion", cfg.data.shards,
                                           val_manifest.split, tracking_uri=uri).miou
    promoted = champion is None or best.val_miou > champion_miou
    if promoted:
        tracking.set_alias(uri, model_name, "champion", version)
    return {"model": model_name, "version": version, "trial_id": best.trial_id, "val_miou": best.val_miou,
            "previous_champion": None if champion is None else {"version": champion.version, "val_miou": champion_miou},
            "champion": promoted}


def format_table(rows: list[TrialRow], names: list[str]) -> str:
    header = ["trial", *names, "epochs", "val mIoU", "best mIoU", "status"]
    body = [[r.trial_id, *(f"{r.params.get(n, float('nan')):.4g}" for n in names), str(r.epochs),
             f"{r.val_miou:.4f}", f"{r.best_val_miou:.4f}", r.status] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in (header, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _log_search(result: SearchResult) -> None:
    from pipeline.visualize import search_figure

    names = result.names
    uri, run_id = result.tracking_uri, result.parent_run_id
    tracking.log_text(uri, run_id, format_table(result.rows, names), "search/trials.txt")
    tracking.log_json(uri, run_id, [dataclasses.asdict(r) for r in result.rows], "search/trials.json")
    tracking.log_figure(uri, run_id, search_figure([(r.params, r.best_val_miou, r.status) for r in result.rows], names),
                        "search/miou_vs_params.png")
    tracking.log_metrics(uri, run_id, {
        "trials": len(result.rows), "trials_stopped_early": result.stopped_early, "trial_epochs": result.trial_epochs,
        "grid_epochs": result.grid_epochs, "wall_s": result.wall_s,
        "best_val_miou": max((r.best_val_miou for r in result.rows if not math.isnan(r.best_val_miou)), default=float("nan")),
    }, step=0)
    if result.registered:
        tracking.log_json(uri, run_id, result.registered, "search/registered.json")


def print_result(result: SearchResult) -> None:
    print(f"\nsearch {result.name}: {len(result.rows)} trials, {result.stopped_early} stopped early by the "
          f"scheduler, {result.trial_epochs} trial-epochs run of {result.grid_epochs} for every trial run to the end, "
          f"{result.wall_s:.0f} s\n")
    print(format_table(result.rows, result.names))
    if result.registered:
        reg = result.registered
        verdict = "now champion" if reg["champion"] else "champion unchanged (it scores at least as high)"
        print(f"\nregistered {reg['model']} version {reg['version']} (trial {reg['trial_id']}, val mIoU "
              f"{reg['val_miou']:.4f}): {verdict}")
        print(f"  load it: models:/{reg['model']}@champion")
    print(f"  MLflow parent run: {result.parent_run_id} in {result.tracking_uri}")
