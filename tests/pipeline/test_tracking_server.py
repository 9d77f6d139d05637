"""Tracking on a real MLflow server over HTTP: training, a search and the registry; the server
taken away mid-training (back within the run, and never back until ``run.py track sync``); and a
tracking URI that cannot be used, refused before any work.

The server is ``mlflow server`` in a process of its own (``mlflow_server`` in tests/conftest.py),
killed with SIGKILL and started again on the same port and database. What a run could not send
waits in its folder's outbox (``pipeline.tracking.Outbox``).
"""
from __future__ import annotations

import io
import json
import socket
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import run
from pipeline import tracking
from pipeline.track_sync import sync_run

# ----------------------------------------------------------------------------- without a server


def _refused_port() -> socket.socket:
    """A 127.0.0.1 port bound but not listening: connections to it are refused at once."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    return blocker


class _Failing(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_error(500, "Internal Server Error")

    def log_message(self, format, *args):  # noqa: A002
        pass


@pytest.mark.parametrize("kind", ["folder", "unreachable", "http-500"])
def test_an_unusable_tracking_uri_is_refused_before_any_work(kind: str, tiny_shards: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    blocker, server = _refused_port(), None
    try:
        if kind == "folder":
            uri, expected = str(tmp_path), "refuses plain file stores"
        elif kind == "unreachable":
            uri, expected = f"http://127.0.0.1:{blocker.getsockname()[1]}", "is unreachable"
        else:
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            uri, expected = f"http://127.0.0.1:{server.server_address[1]}", "answered /health with HTTP 500"
        code = run.main(["train", "--preset", "synthetic", "--data", str(tiny_shards), "--epochs", "1",
                         "--storage", str(tmp_path / "runs"), "--name", "never", "--set", "data.crop_size=64x64",
                         "--set", f"tracking.uri={uri}"])
    finally:
        blocker.close()
        if server is not None:
            server.shutdown()
            server.server_close()
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and uri in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "runs" / "never").exists()


def test_sync_sends_what_an_outbox_kept_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries kept while a server was away (a refused port) go to the store ``sync`` is given:
    metrics by step, files by name, the status last; a second sync sends nothing."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused is refused: no backoff to wait out
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(store, "dfdam-test", "r", {"p": 1})
    tracking.log_metrics(store, run_id, {"val_miou": 0.25, "epoch": 1}, step=1)
    run_dir = tmp_path / "runs" / "r"
    blocker = _refused_port()
    try:
        away = f"http://127.0.0.1:{blocker.getsockname()[1]}"
        outbox = tracking.Outbox.for_run(str(run_dir))
        assert outbox.log_metrics(away, run_id, {"val_miou": 0.25, "epoch": 1}, step=1) is False
        assert outbox.log_metrics(away, run_id, {"val_miou": 0.5, "epoch": 2, "bad": float("nan")}, step=2) is False
        outbox.send(away, run_id, {"kind": "text", "name": "eval/per_class_iou.txt", "data": "road 0.5\n"})
        outbox.send(away, run_id, {"kind": "missing", "name": "model"}, lambda: pytest.fail("not called: away"))
        outbox.send(away, run_id, {"kind": "tags", "tags": {"dfdam.status": "finished"}})
        outbox.send(away, run_id, {"kind": "status", "status": "FINISHED"})
        assert len(outbox.pending) == 5  # the model is named in the file only
        assert sync_run(run_dir, wait_s=0).waiting  # the server is still away
    finally:
        blocker.close()
    assert [e["kind"] for e in tracking.read_outbox(run_dir / tracking.OUTBOX_FILE)] == [
        "metrics", "metrics", "text", "missing", "tags", "status"]

    report = sync_run(run_dir, uri=store)
    assert report.complete and report.sent == ["metrics of epoch(s) 2", "eval/per_class_iou.txt",
                                               "tag dfdam.status=finished", "status FINISHED"]
    assert report.lost == [f"model (no complete checkpoint in {run_dir})"]
    client = MlflowClient(store)
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_miou")) == [(1, 0.25), (2, 0.5)]
    assert client.get_metric_history(run_id, "bad") == []
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["dfdam.status"] == "finished"
    again = sync_run(run_dir, uri=store)
    assert again.sent == [] and len(client.get_metric_history(run_id, "val_miou")) == 2


def test_sync_draws_the_figure_from_a_matrix_that_reached_the_server(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The server left between the confusion matrix's JSON (sent) and its figure (kept by name
    only): sync draws the figure from the JSON the run already has (seen in a full suite run)."""
    from pipeline.track_sync import CONFUSION_FIGURE, CONFUSION_JSON

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(store, "dfdam-test", "r", {"p": 1})
    tracking.log_json(store, run_id, {"class_names": ["road", "sky"], "matrix": [[3, 1], [0, 4]]}, CONFUSION_JSON)
    run_dir = tmp_path / "runs" / "r"
    blocker = _refused_port()
    try:
        away = f"http://127.0.0.1:{blocker.getsockname()[1]}"
        figure = {"kind": "missing", "name": CONFUSION_FIGURE}
        assert tracking.Outbox.for_run(str(run_dir)).send(away, run_id, figure, lambda: tracking.log_figure(
            away, run_id, None, CONFUSION_FIGURE)) is False
    finally:
        blocker.close()
    report = sync_run(run_dir, uri=store)
    assert report.sent == [CONFUSION_FIGURE] and report.lost == []
    assert tracking.has_artifact(store, run_id, CONFUSION_FIGURE)
    assert sync_run(run_dir, uri=store).sent == []


def test_a_trial_stopped_after_its_search_closed_it_stays_finished(tmp_path: Path) -> None:
    """Tune stops a trial's process after its last report, and the search may close the trial's
    run FINISHED first (trials.collect_rows): the trial's own late FAILED must not undo it (seen
    in a full suite run); a run not yet FINISHED still ends FAILED."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    closed, open_ = (tracking.start_run(store, "dfdam-test", name, {}) for name in ("closed", "open"))
    for run_id in (closed, open_):
        with pytest.raises(KeyboardInterrupt), tracking.run_status(store, run_id, killed=()):
            if run_id == closed:
                tracking.end_run(store, run_id, "FINISHED")  # what the search did meanwhile
            raise KeyboardInterrupt
    client = MlflowClient(store)
    assert client.get_run(closed).info.status == "FINISHED" and client.get_run(open_).info.status == "FAILED"


def test_a_search_ending_while_the_server_is_away_says_how_to_finish(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    from pipeline.tune import _tracked_end

    blocker = _refused_port()
    try:
        away = f"http://127.0.0.1:{blocker.getsockname()[1]}"
        with pytest.raises(tracking.TrackingError, match="went away at the end of search 's'.*"
                           "python run.py tune --resume --name s --data D --storage S"):
            with _tracked_end(away, "s", "--data D --storage S"):
                raise MlflowException("API request failed")
    finally:
        blocker.close()
    with pytest.raises(MlflowException, match="refused request"):  # a server that answers: its error as it is
        with _tracked_end(f"sqlite:///{tmp_path / 'm.db'}", "s", ""):
            raise MlflowException("refused request")


# ----------------------------------------------------------------------------- a real server


def _up(server) -> str:
    if server.process is None:
        server.start()
    return server.uri


def _epochs_landed(db: Path, name: str) -> int:
    """Epochs of run ``name`` in the server's database, read with plain sqlite3 (read-only)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute(
                "SELECT COUNT(DISTINCT m.step) FROM metrics m JOIN tags t ON m.run_uuid = t.run_uuid "
                "WHERE t.key = 'dfdam.ray_run' AND t.value = ? AND m.key = 'val_miou'", (name,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_for(condition, what: str, trainer: threading.Thread, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not trainer.is_alive():
            pytest.fail(f"training ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout_s} s")
        time.sleep(0.2)


def _kept_metrics(outbox: Path) -> list[int]:
    return [e["step"] for e in tracking.read_outbox(outbox) if e["kind"] == "metrics"] if outbox.is_file() else []


class _Training(threading.Thread):
    """``fit`` in a thread, its console in a buffer, its result or exception kept."""

    def __init__(self, cfg, name: str) -> None:
        super().__init__(daemon=True)
        self.cfg, self.name, self.console = cfg, name, io.StringIO()
        self.result, self.error = None, None

    def run(self) -> None:
        from pipeline.train import fit

        try:
            self.result = fit(self.cfg, name=self.name, stream=self.console)
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self.error = exc

    def finish(self):
        self.join(timeout=900)
        assert not self.is_alive(), "training did not end"
        if self.error is not None:
            raise self.error
        return self.result


def _assert_complete(uri: str, run_id: str, epochs: int) -> None:
    """FINISHED, each epoch's metrics once, the files, and a model that loads and predicts."""
    client = MlflowClient(uri)
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED"
    for key in ("val_miou", "train_loss", "epoch"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), key
    eval_files = {a.path for a in client.list_artifacts(run_id, "eval")}
    assert {"eval/confusion_matrix.json", "eval/confusion_matrix.png", "eval/per_class_iou.txt"} <= eval_files
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(tracked.data.tags[tracking.MODEL_URI_TAG], map_location="cpu")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)


def test_search_over_http_registers_the_champion(ray_cluster, mlflow_server, tiny_config, tiny_shards: Path,
                                                 tmp_path: Path) -> None:
    from pipeline.search_space import default_space
    from pipeline.tune import SearchSettings, search

    uri = _up(mlflow_server)
    cfg = tiny_config(tiny_shards, tmp_path, f"tracking.uri={uri}", "tracking.overlays=0")
    result = search(cfg, SearchSettings(name="http-search", trials=2, scheduler="fifo", search="random",
                                        max_concurrent=2, workers_per_trial=1), default_space(cfg))
    client = MlflowClient(uri)
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert len(result.rows) == 2 and {r.status for r in result.rows} == {"finished"}
    for row in result.rows:
        assert client.get_run(row.run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(row.run_id, "val_miou")] == [1]
    registered = result.registered
    assert registered is not None and registered["champion"] is True
    champion = client.get_model_version_by_alias(registered["model"], "champion")
    assert str(champion.version) == registered["version"]
    assert champion.run_id in {r.run_id for r in result.rows}
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/{registered['model']}@champion", map_location="cpu")
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 128)).shape == (1, 19, 64, 128)


def test_server_lost_mid_training_and_back_within_the_run(ray_cluster, mlflow_server, tiny_config,
                                                          tiny_shards: Path, tmp_path: Path) -> None:
    """Killed once epoch 1's metrics are on it, started again once an epoch waits in the outbox:
    the run goes on, and ends FINISHED over HTTP with every epoch's metrics once and its model."""
    uri = _up(mlflow_server)
    cfg = tiny_config(tiny_shards, tmp_path, f"tracking.uri={uri}", "train.workers=1", "train.epochs=3",
                      "tracking.overlays=1", "tracking.outbox_wait_s=600")
    outbox = tmp_path / "runs" / "lost" / tracking.OUTBOX_FILE
    training = _Training(cfg, "lost")
    training.start()
    _wait_for(lambda: _epochs_landed(mlflow_server.db, "lost") >= 1, "epoch 1's metrics on the server", training)
    mlflow_server.kill()
    _wait_for(lambda: bool(_kept_metrics(outbox)), "epoch in the outbox", training)
    mlflow_server.start()
    result = training.finish()

    assert max(_kept_metrics(outbox)) >= 2  # what the outage kept (epoch 1 too if cut off before its answer)
    console = training.console.getvalue()
    assert "left RUNNING" not in console and "not kept: eval/overlays/" in console, console
    _assert_complete(uri, result.run_id, 3)


def test_server_never_back_then_track_sync_completes_the_run(ray_cluster, mlflow_server, tiny_config,
                                                             tiny_shards: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Away from epoch 2 to the end: training ends, says how to complete the run and leaves it
    RUNNING; with the server back, ``run.py track sync`` sends the rest (the model from the
    checkpoint); a second sync changes nothing."""
    uri = _up(mlflow_server)
    cfg = tiny_config(tiny_shards, tmp_path, f"tracking.uri={uri}", "train.workers=1", "train.epochs=2",
                      "tracking.overlays=1", "tracking.outbox_wait_s=0")
    run_dir = tmp_path / "runs" / "gone"
    training = _Training(cfg, "gone")
    training.start()
    _wait_for(lambda: _epochs_landed(mlflow_server.db, "gone") >= 1, "epoch 1's metrics on the server", training)
    mlflow_server.kill()
    result = training.finish()
    console = training.console.getvalue()
    assert f"python run.py track sync {run_dir}" in console and "left RUNNING" in console, console
    # Epoch 2 waits; epoch 1 too when the kill came between its commit and the server's answer (it
    # is then on the server and in the outbox: sent once all the same, as the history below shows).
    assert _kept_metrics(run_dir / tracking.OUTBOX_FILE) in ([2], [1, 2])
    statuses = [e["status"] for e in tracking.read_outbox(run_dir / tracking.OUTBOX_FILE) if e["kind"] == "status"]
    assert statuses == ["FINISHED"]

    mlflow_server.start()
    client = MlflowClient(uri)
    assert client.get_run(result.run_id).info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_miou")] == [1]
    capsys.readouterr()
    assert run.main(["track", "sync", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "metrics of epoch(s) 2" in out and "model (from" in out and "status FINISHED" in out, out
    assert "eval/overlays/" in out  # not kept: named as not sent
    _assert_complete(uri, result.run_id, 2)

    def snapshot():
        tracked = client.get_run(result.run_id)
        history = {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(result.run_id, k)]
                   for k in tracked.data.metrics}
        files = sorted(a.path for a in client.list_artifacts(result.run_id, "eval"))
        return tracked.info.status, tracked.data.tags, history, files, json.dumps(
            [v.version for v in client.search_model_versions(f"run_id = '{result.run_id}'")])

    before = snapshot()
    assert run.main(["track", "sync", str(run_dir)]) == 0
    assert "nothing left to send" in capsys.readouterr().out
    assert snapshot() == before
