"""MLflow at the edge: the only module that imports mlflow.

Embedded default: a SQLite tracking and registry store ``mlflow.db`` and an artifact
folder ``mlartifacts/`` in the working directory (both absolute, since Ray workers change
directory). ``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) points at a real server instead.

The driver creates one run per training job (looked up again by its Ray run name when a
job is resumed); rank 0 logs into it by run id with an ``MlflowClient``, so no global
MLflow state crosses process boundaries.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

# MLflow's own INFO lines (store creation, database migrations) stay out of the console.
logging.getLogger("mlflow").setLevel(logging.WARNING)

# MLflow's HTTP client retries a failed request 7 times with a backoff factor of 2 (minutes
# before it gives up) and waits 120 s for an answer: a tracking server that is away would hold
# every epoch's logging call that long. Bounded here (a caller's own settings win), so an outage
# costs a few seconds per call; what could not be sent waits in the run's :class:`Outbox`.
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
    os.environ.setdefault(_name, _value)

RUN_TAG = "dfdam.ray_run"  # the Ray Train run name a MLflow run belongs to
MODEL_URI_TAG = "dfdam.model_uri"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used."""


def resolve_uri(uri: str | None = None, workdir: str | Path | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<workdir>/mlflow.db`` (absolute)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # Relative SQLite paths would land in Ray's session folder on the workers.
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri
    base = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Artifact folder beside an embedded SQLite store; a server chooses its own (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any work, when the tracking store cannot be used."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow SQLite store {uri}: folder {folder} does not exist or is not writable")
        return
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered /health with HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} answered /health with HTTP {exc.code} ({exc.reason}): expected "
                "200 from a working MLflow server; check the server's log or the URI"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({exc}); start it "
                "(mlflow server --host 127.0.0.1 ...) or unset MLFLOW_TRACKING_URI to use the embedded SQLite store"
            ) from None
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow 3 refuses plain file stores and the model registry needs a "
            "database; use sqlite:////abs/path/mlflow.db or http://host:port"
        )


def get_experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(uri))


def start_run(uri: str, experiment: str, ray_run: str, params: dict[str, Any], tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> str:
    """The run for Ray run ``ray_run`` (the existing one on resume, else a new one); returns its id."""
    client = MlflowClient(uri)
    experiment_id = get_experiment_id(client, experiment, uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{ray_run}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {RUN_TAG: ray_run, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=ray_run, tags=all_tags)
    run_id = run.info.run_id
    items = [Param(k, _short(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])
    return run_id


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int, timestamp: int | None = None) -> None:
    now = int(time.time() * 1000) if timestamp is None else int(timestamp)
    items = [Metric(k, v, now, step) for k, v in _finite(metrics).items()]
    MlflowClient(uri).log_batch(run_id, metrics=items)


def log_metrics_once(uri: str, run_id: str, metrics: dict[str, float], step: int, key: str = "val_miou",
                     timestamp: int | None = None) -> bool:
    """Log ``metrics`` at ``step`` unless the run's ``key`` history already has that step (a batch
    is stored whole, so one key tells)."""
    if any(m.step == step for m in MlflowClient(uri).get_metric_history(run_id, key)):
        return False
    log_metrics(uri, run_id, metrics, step, timestamp)
    return True


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """Run ``run_id``'s values of ``key`` as ``(step, value, timestamp ms)``, by step (benchmarks read
    per-epoch figures back with it)."""
    return sorted((m.step, m.value, m.timestamp) for m in MlflowClient(uri).get_metric_history(run_id, key))


def log_json(uri: str, run_id: str, data: Any, name: str) -> None:
    MlflowClient(uri).log_dict(run_id, data, name)


def read_json(uri: str, run_id: str, name: str) -> Any | None:
    """A JSON file the run logged (:func:`log_json`), or None when it has none."""
    import tempfile

    if not has_artifact(uri, run_id, name):
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=folder, tracking_uri=uri)
        return json.loads(Path(path).read_text())


def log_image(uri: str, run_id: str, image: np.ndarray, name: str) -> None:
    MlflowClient(uri).log_image(run_id, image, name)


def log_figure(uri: str, run_id: str, figure: Any, name: str) -> None:
    MlflowClient(uri).log_figure(run_id, figure, name)


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    MlflowClient(uri).log_text(run_id, text, name)


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Close a run: FINISHED, FAILED or KILLED (a run left RUNNING looks alive forever)."""
    MlflowClient(uri).set_terminated(run_id, status=status)


def run_state(uri: str, run_id: str) -> str:
    """RUNNING, FINISHED, FAILED or KILLED."""
    return MlflowClient(uri).get_run(run_id).info.status


@contextlib.contextmanager
def run_status(uri: str, run_id: str, *, killed: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
               outbox: Outbox | None = None) -> Iterator[str]:
    """Close run ``run_id`` as its block ends: FINISHED, KILLED on ``killed`` (Ctrl+C), else FAILED.

    The one place that decides a tracked run's final status, for a training run, a trial
    and a search alike; the exception itself goes on. With an ``outbox``, a server that is
    away does not fail the block: the status waits in the outbox for ``run.py track sync``.
    """
    def close(status: str) -> None:
        if status != "FINISHED" and _already_finished(uri, run_id):
            return  # a trial closed FINISHED by its search, whose process Tune stopped after its last report
        if outbox is None:
            end_run(uri, run_id, status)
        else:
            outbox.send(uri, run_id, {"kind": "status", "status": status})

    try:
        yield run_id
    except killed:
        close("KILLED")
        raise
    except BaseException:
        close("FAILED")
        raise
    close("FINISHED")


def _already_finished(uri: str, run_id: str) -> bool:
    """Whether run ``run_id`` is FINISHED already (False when the store cannot say)."""
    try:
        return MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    except Exception:  # noqa: BLE001 - a store that is away cannot say: the status goes as usual
        return False


# ----------------------------------------------------------------------------- outbox

OUTBOX_FILE = "mlflow_outbox.jsonl"


def server_answers(uri: str, timeout_s: float = 3.0) -> bool:
    """Whether the tracking store at ``uri`` answers now (an embedded SQLite store always does)."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        check_reachable(uri, timeout_s)
    except TrackingError:
        return False
    return True


class Outbox:
    """What could not reach a tracking server that is away, kept until it is back.

    Each call that finds the server away (connection refused, timeout, HTTP 5xx after MLflow's
    bounded retries; told apart from a refused request by asking ``/health``) becomes an entry:
    kept in memory and appended, one JSON line each, to ``path`` (``mlflow_outbox.jsonl`` in the
    run's storage folder) so that nothing is lost if the process dies. Every later call first
    sends what is pending, in order; an entry sent again never doubles (metrics by step, files
    by name, a status once). Entries: ``metrics`` (one epoch's, with its step and timestamp),
    ``json`` / ``text`` (small files, with their content), ``tags``, ``status`` (the run's end) and
    ``missing`` (a figure, image or the model, too large to keep: ``run.py track sync``
    rebuilds the model and the confusion-matrix figure from the run folder). ``path`` None
    (remote storage) keeps entries in memory only.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.pending: list[dict[str, Any]] = []
        self.away = False  # the last call found the server away: ask /health before trying again

    @classmethod
    def for_run(cls, run_dir: str) -> Outbox:
        """The outbox file of a run folder (in memory only under s3:// or gs:// storage)."""
        return cls(None if "://" in run_dir else Path(run_dir) / OUTBOX_FILE)

    def __getstate__(self) -> dict[str, Any]:  # a copy for another process starts empty
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])

    def send(self, uri: str, run_id: str, entry: dict[str, Any], call: Any = None) -> bool:
        """Send what is pending, then ``entry`` (by ``call`` if given, else :func:`deliver`);
        True when it reached the server, False when it was kept for later."""
        entry = {**entry, "uri": uri, "run_id": run_id}
        if self.flush() and (not self.away or server_answers(uri)):
            try:
                (call or (lambda: deliver(entry)))()
                self.away = False
                return True
            except Exception:  # noqa: BLE001 - kept only when the server is away, else raised
                if server_answers(uri):
                    raise
        self.away = True
        self._keep(entry)
        return False

    def log_metrics(self, uri: str, run_id: str, metrics: dict[str, float], step: int, once: bool = False) -> bool:
        """:func:`log_metrics` (``once``: :func:`log_metrics_once`) through the outbox."""
        entry = {"kind": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                 "metrics": _finite(metrics)}
        call = None if once else (lambda: log_metrics(uri, run_id, metrics, step, entry["timestamp"]))
        return self.send(uri, run_id, entry, call)

    def flush(self) -> bool:
        """Send the pending entries, oldest first; False when the server is still away."""
        while self.pending:
            entry = self.pending[0]
            if self.away and not server_answers(entry["uri"]):
                return False
            try:
                deliver(entry)
            except Exception:  # noqa: BLE001
                if server_answers(entry["uri"]):
                    raise
                self.away = True
                return False
            self.away = False
            self.pending.pop(0)
        return True

    def _keep(self, entry: dict[str, Any]) -> None:
        if entry["kind"] != "missing":
            self.pending.append(entry)
        if self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one write per line: appends do not interleave
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())


def read_outbox(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an outbox file (a last line cut short by a crash is skipped)."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def has_artifact(uri: str, run_id: str, name: str) -> bool:
    folder = name.rsplit("/", 1)[0] if "/" in name else None
    return any(a.path == name for a in MlflowClient(uri).list_artifacts(run_id, folder))


def deliver(entry: dict[str, Any]) -> bool:
    """Send one outbox entry unless the run already has it; True when something was sent."""
    uri, run_id, kind = entry["uri"], entry["run_id"], entry["kind"]
    if kind == "metrics":
        if not entry["metrics"]:
            return False
        return log_metrics_once(uri, run_id, entry["metrics"], entry["step"], key=sorted(entry["metrics"])[0],
                                timestamp=entry.get("timestamp"))
    if kind in ("json", "text"):
        if has_artifact(uri, run_id, entry["name"]):
            return False
        (log_json if kind == "json" else log_text)(uri, run_id, entry["data"], entry["name"])
        return True
    if kind == "tags":
        tags = MlflowClient(uri).get_run(run_id).data.tags
        if all(tags.get(k) == v for k, v in entry["tags"].items()):
            return False
        set_tags(uri, run_id, entry["tags"])
        return True
    if kind == "status":
        if run_state(uri, run_id) == entry["status"]:
            return False
        end_run(uri, run_id, entry["status"])
        return True
    return False  # "missing": nothing kept to send (pipeline/track_sync.py rebuilds what it can)


def has_model(uri: str, run_id: str) -> bool:
    return bool(MlflowClient(uri).get_run(run_id).data.tags.get(MODEL_URI_TAG))


@dataclass(frozen=True)
class ChildRun:
    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    tags: dict[str, str]


def child_runs(uri: str, experiment: str, parent_run_id: str) -> list[ChildRun]:
    """The runs whose parent is ``parent_run_id`` (a search's trials)."""
    client = MlflowClient(uri)
    experiment_id = get_experiment_id(client, experiment, uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                               max_results=1000)
    return [ChildRun(r.info.run_id, r.info.status, dict(r.data.tags)) for r in found]


def model_signature(num_classes: int) -> ModelSignature:
    """float32 images (B, 3, H, W) -> float32 logits (B, K, H, W), free in batch, height and width.

    The input tensor is unnamed on purpose: MLflow's generic interface
    (``mlflow.pyfunc.load_model(...).predict``, ``mlflow models serve``) then hands a float32
    array, or the JSON ``{"inputs": [...]}`` / ``{"instances": [...]}`` nested list cast to
    float32, to the model as one tensor and returns its logits as an array. A named input
    makes pyfunc wrap the array in a dict, which the PyTorch flavour refuses (``TypeError``).
    """
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes, -1, -1), "logits")]),
    )


def log_model(uri: str, run_id: str, model: torch.nn.Module, num_classes: int, code_path: str | Path,
              metadata: dict[str, Any] | None = None) -> str:
    """Log an eval-mode, logits-only model with :func:`model_signature`.

    Pickle serialisation with the ``models`` package bundled as code, so the model loads as
    a full ``nn.Module`` (``mlflow.pytorch.load_model``) without this project installed, and
    through ``mlflow.pyfunc`` / ``mlflow models serve`` as images in, logits out.
    Returns the model URI and records it on the run (tag ``dfdam.model_uri``).
    """
    signature = model_signature(num_classes)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model.eval().cpu(),
            name="model",
            signature=signature,
            code_paths=[str(code_path)],
            serialization_format="pickle",
            metadata=metadata or {},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "torchvision", "cloudpickle"],
        )
    set_tags(uri, run_id, {MODEL_URI_TAG: info.model_uri})
    # start_run(run_id) closes the run on exit; the driver decides its final status.
    MlflowClient(uri).update_run(run_id, status="RUNNING")
    return info.model_uri


def resolve_model_uri(uri: str, reference: str) -> str:
    """``models:/...`` and ``runs:/...`` as they are; a bare run id -> the model it logged."""
    if reference.startswith(("models:/", "runs:/")):
        return reference
    try:
        run = MlflowClient(uri).get_run(reference)
    except MlflowException as exc:
        raise TrackingError(f"{reference!r} is neither a models:/ URI, a checkpoint, nor a run id in {uri}: {exc.message}") from None
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise TrackingError(f"run {reference} in {uri} has no logged model (tag {MODEL_URI_TAG})")
    return model_uri


def load_model(uri: str, model_uri: str) -> torch.nn.Module:
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except MlflowException as exc:
        raise TrackingError(f"cannot load {model_uri} from {uri}: {exc.message}{_expected_model(model_uri)}") from None


def model_details(uri: str, model_uri: str) -> tuple[dict[str, Any], str | None]:
    """The metadata a model was logged with (dataset, classes, palette, normalisation) and the
    id of the run that logged it (None when the MLmodel file names none)."""
    mlflow.set_tracking_uri(uri)
    try:
        info = mlflow.models.get_model_info(model_uri)
    except MlflowException as exc:
        raise TrackingError(f"cannot read {model_uri} from {uri}: {exc.message}{_expected_model(model_uri)}") from None
    return dict(info.metadata or {}), info.run_id or None


def _expected_model(model_uri: str) -> str:
    """What a models:/ reference was expected to name (registered models are listed by MLflow's UI)."""
    if not model_uri.startswith("models:/"):
        return ""
    return ("; expected models:/NAME/VERSION or models:/NAME@ALIAS of a registered model (run.py tune "
            "registers its champion as NAME@champion; see the registry in the MLflow UI)")


# ----------------------------------------------------------------------------- model registry


def register_model(uri: str, run_id: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Register the model run ``run_id`` logged as a new version of ``name``; returns the version."""
    # MLflow's SQL registry store resolves models:/m-... through the *global* tracking URI.
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    model_uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise TrackingError(f"run {run_id} logged no model: nothing to register")
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DF-DAM segmentation models (see run tags for data and metrics)")
    # A logged model's URI is models:/m-<id>: a tracking server (unlike the SQL store in this
    # process) accepts it as a source only with that id given as model_id.
    model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags or {}, model_id=model_id)
    return str(version.version)


def get_alias(uri: str, name: str, alias: str):
    """The model version ``name@alias``, or None when the model or alias does not exist."""
    try:
        return MlflowClient(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    MlflowClient(uri).set_registered_model_alias(name, alias, version)
