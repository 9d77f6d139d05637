"""Fixtures shared by more than one test folder (tiny generated shards, a tiny training config),
and the test tiers.

``tests/pipeline`` (Ray in the pytest process) and ``tests/cluster`` (Ray in subprocesses)
both train on these.

Tiers (markers registered in pyproject.toml): ``slow`` is every test that starts Ray, a
pipeline run in a subprocess, an MLflow server, ``make`` or the GPU check's CPU smoke;
``cluster`` is every test of ``tests/cluster``. ``pytest -m "not slow"`` (``make test-fast``)
runs the rest in under a minute; ``make test`` runs everything. The hook below marks a test
``slow`` when it uses a fixture that starts Ray (:data:`SLOW_FIXTURES`), so new tests get the
right tier by using them; a test that starts such things itself carries ``@pytest.mark.slow``
(or its module ``pytestmark``), and a few that cost seconds for other reasons are listed in
:data:`SLOW_TESTS`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

# One compute thread per process (torch, numpy, and the processes the tests start, unless the
# caller set it): the tests run on a shared 2-core machine, where every process's 2-thread
# OpenMP pool spins against the others' (measured there, one DeepLabV3 training step: 15 s
# with 2 threads under load, 1 s with 1; no difference on an idle machine). Ray gives its
# workers one thread per CPU anyway. Set before anything imports numpy or torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipeline.config import Config, build_config  # noqa: E402
from sharding.synthetic import make_cityscapes  # noqa: E402
from sharding.write import shard_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Cityscapes, 12 train / 6 val images of 64x128, 3 samples per shard."""
    root = tmp_path_factory.mktemp("tiny-cityscapes")
    make_cityscapes(root, seed=1, train=12, val=6, test=1, height=64, width=128)
    out = tmp_path_factory.mktemp("tiny-shards")
    shard_dataset("cityscapes", root, out, splits=["train", "val"], shard_size=3, workers=1, show_progress=False)
    return out


def _tiny_config(shards: Path, tmp_path: Path, *overrides: str) -> Config:
    return build_config("synthetic", [
        f"data.shards={shards}", "data.crop_size=64x64", "data.batch_size=4", "data.eval_batch_size=2",
        "train.epochs=1", "train.workers=2", "train.timeout_s=120", f"train.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.overlays=2", *overrides,
    ])


@pytest.fixture
def tiny_config():
    """Factory: the synthetic preset shrunk for tests (64x64 crops, batch 4, 1 epoch, 2 workers,
    MLflow and Ray storage in the given folder): ``tiny_config(shards, tmp_path, *overrides)``."""
    return _tiny_config


@pytest.fixture
def offline_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty torch cache (``$TORCH_HOME``) on a machine that cannot reach download.pytorch.org.

    HTTP(S) goes through a proxy address on a 127.0.0.1 port that is bound but not listening, so
    every connection is refused by this machine's own network stack, whatever internet it has: the
    download path runs for real and fails the way an offline node's does, in milliseconds.
    """
    import socket

    home = tmp_path / "torch-home"
    home.mkdir()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # held, never listening: connections to it are refused
        proxy = f"http://127.0.0.1:{blocker.getsockname()[1]}"
        monkeypatch.setenv("TORCH_HOME", str(home))
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, proxy)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        yield home


@dataclass(frozen=True)
class S3Store:
    """A local S3-compatible server holding a shard folder (see :func:`s3_shards`)."""

    url: str  # s3://BUCKET/PREFIX of the uploaded shard folder
    bucket: str
    endpoint: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # the AWS_* variables that point a client (and Ray's workers) at it

    def query_url(self, location: str) -> str:
        """``location`` with the endpoint in its query (Ray's ``storage_path`` form) instead of the environment."""
        return f"{location}?endpoint_override={self.endpoint.split('://', 1)[1]}&scheme=http"


@pytest.fixture(scope="module")
def s3_shards(tiny_shards: Path):
    """``tiny_shards`` uploaded whole (s3fs ``put``) to a real S3-compatible server: moto's, in a
    thread of this process on 127.0.0.1, for one test module. While the module runs, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and AWS_ENDPOINT_URL point at it (moto takes any key);
    fsspec's cached S3 clients are dropped afterwards, as they hold the endpoint. Yields :class:`S3Store`."""
    import logging
    import urllib.request

    import fsspec
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto keeps its buckets in this process, shared by every server it starts: begin empty.
    urllib.request.urlopen(urllib.request.Request(f"http://{host}:{port}/moto-api/reset", method="POST"), timeout=30)
    env = {"AWS_ACCESS_KEY_ID": "dfdam-test", "AWS_SECRET_ACCESS_KEY": "dfdam-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                patch.delenv(name, raising=False)
            s3fs.S3FileSystem.clear_instance_cache()
            fs = fsspec.filesystem("s3")
            bucket = "dfdam-test"
            fs.mkdir(bucket)
            fs.put(f"{tiny_shards}/", f"{bucket}/datasets/tiny-shards/", recursive=True)
            yield S3Store(f"s3://{bucket}/datasets/tiny-shards", bucket, env["AWS_ENDPOINT_URL"], env)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@dataclass(frozen=True)
class ServedShards:
    """A shard folder copied whole into a web server's folder (see :func:`http_shards`)."""

    url: str  # http://127.0.0.1:PORT/datasets/tiny-shards
    folder: Path  # the served copy on this machine


@pytest.fixture(scope="session")
def http_shards(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """``tiny_shards`` copied whole to ``<site>/datasets/tiny-shards``, served by a real
    ``http.server`` (a thread of this process, on 127.0.0.1): yields :class:`ServedShards`. The
    server answers 403 for anything under ``/private/`` (a copy is there too)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = tmp_path_factory.mktemp("site")
    for folder in ("datasets", "private"):
        shutil.copytree(tiny_shards, site / folder / "tiny-shards")

    class Handler(SimpleHTTPRequestHandler):
        def send_head(self):
            if self.path.startswith("/private/"):
                self.send_error(403, "Forbidden")
                return None
            return super().send_head()

        def log_message(self, format, *args):  # noqa: A002 - http.server's signature
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, name="http-shards", daemon=True)
    thread.start()
    try:
        yield ServedShards(f"http://127.0.0.1:{server.server_address[1]}/datasets/tiny-shards",
                           site / "datasets" / "tiny-shards")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, artifacts proxied into its folder) on a free port
    of 127.0.0.1, a process group of its own; :meth:`kill` takes it away at once (SIGKILL, the way
    a crashed host goes) and :meth:`start` brings it back on the same port and database."""

    def __init__(self, folder: Path) -> None:
        import socket

        self.folder = folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = folder / "mlflow.db"
        self.process = None

    def start(self, timeout_s: float = 300) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        mlflow_cli = Path(sys.executable).parent / "mlflow"
        argv = [str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{self.db}",
                "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1"]
        # Its job runner (huey consumers for MLflow's GenAI jobs) doubles the start-up time and the processes.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen(argv, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.kill()
        tail = (self.folder / "server.log").read_text(errors="replace")[-3000:]
        pytest.fail(f"mlflow server on {self.uri} did not answer /health within {timeout_s} s:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the server's process group (the server, its uvicorn worker), by the id this started."""
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.process = None

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` over HTTP for one test module (:class:`MlflowServer`: ``uri``,
    ``kill()``, ``start()`` again on the same port and database), stopped by its process id."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Fixtures whose tests are slow: they start a Ray cluster (tests/pipeline/conftest.py,
# tests/cluster/conftest.py) or a server. Add here any new fixture that starts Ray, a server or a pipeline run.
SLOW_FIXTURES = frozenset({"ray_cluster", "two_node_cluster", "s3_shards", "http_shards", "mlflow_server"})

# Tests slow for a reason no fixture shows, by node id (a file, or file::test), each with its
# cost on the 2-core machine: kept out of `make test-fast` so that it stays under a minute.
# tests/test_tiers.py checks that every entry still names a test.
SLOW_TESTS = {
    "tests/test_tiers.py::test_long_files_are_collected_first": "a pytest --collect-only of the long files (9 s)",
    "tests/pipeline/test_average_buffers.py": "a 2-process torch.distributed group, spawned (8 s)",
    "tests/pipeline/test_export.py::test_cli_onnx_export_prints_the_check_and_runs_in_onnxruntime":
        "torch.onnx's torch.export-based export of DF-DAM-R18, then onnxruntime (15 s; 30-47 s while other jobs load the 2 cores)",
    "tests/pipeline/test_registry.py": "MLflow stores, logged models and a registry (8 s)",
    "tests/pipeline/test_tracking_server.py::test_sync_sends_what_an_outbox_kept_once":
        "an MLflow SQLite store created, then sent to twice (8 s; 20 s while other jobs load the 2 cores)",
    "tests/pipeline/test_evaluate.py::test_the_result_is_logged_to_the_models_run_under_the_protocols_name":
        "an MLflow store and a logged model (10 s)",
    "tests/pipeline/test_resume.py": "DF-DAM trained for 8 epochs in the test process (11 s)",
    "tests/pipeline/test_serving.py::test_pyfunc_predict_returns_the_logits":
        "a DF-DAM-R18 logged and registered in a SQLite MLflow store (the module's fixture), then loaded "
        "through pyfunc (7 s; 25-30 s while other jobs load the 2 cores)",
    "tests/pipeline/test_serving.py::test_pytorch_flavour_returns_the_module":
        "the registered DF-DAM-R18 loaded twice through mlflow.pytorch (1 s, plus the fixture when run alone)",
    "tests/pipeline/test_serving.py::test_served_model_answers_json_with_the_logits":
        "`mlflow models serve` started in a subprocess, asked twice over HTTP and stopped (25 s; 50-70 s "
        "under load)",
    "tests/sharding/test_shard_cli.py::test_make_synthetic_shard_and_verify":
        "run.py make-synthetic, shard and shard verify in subprocesses (5 s)",
    "tests/sharding/test_shard_cli.py::test_voc_shard_reports_rejects": "run.py shard in subprocesses (3 s)",
}
CLUSTER_DIR = Path(__file__).resolve().parent / "cluster"


def _listed(nodeid: str) -> bool:
    return any(nodeid == key or nodeid.startswith((key + "::", key + "[")) for key in SLOW_TESTS)


# The files that take minutes, about longest first (seconds each took in a `make test` of
# 0ac2462 on the 2-core machine, 2 xdist workers; in this order the two workers ended 14 s
# apart, so it is kept although the figures have moved). `make test` hands whole files to its
# 2 workers in collection order (--dist loadfile --no-loadscope-reorder); these are collected
# first, so that the run ends with short files rather than with one long file started last.
# tests/test_tiers.py checks that each still exists.
LONGEST_FIRST = (
    "tests/cluster/test_faults.py",  # 489
    "tests/test_readme.py",  # 353
    "tests/pipeline/test_tracking_server.py",  # 238
    "tests/test_gpu_check.py",  # 188
    "tests/cluster/test_multinode.py",  # 142
    "tests/pipeline/test_ablation.py",  # 96
    "tests/pipeline/test_train.py",  # 121
    "tests/pipeline/test_tune.py",  # 226
    "tests/pipeline/test_remote_train.py",  # 77
)


def _file_rank(item: pytest.Item) -> int:
    """Position of the item's file in :data:`LONGEST_FIRST`; every other file after them."""
    path = item.nodeid.split("::", 1)[0]
    return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` on every test that uses a fixture of :data:`SLOW_FIXTURES` or is listed in
    :data:`SLOW_TESTS`; ``cluster`` on every test under tests/cluster; the files of
    :data:`LONGEST_FIRST` first (a stable sort: each file's tests keep their order)."""
    items.sort(key=_file_rank)
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or _listed(item.nodeid):
            item.add_marker(pytest.mark.slow)
        if CLUSTER_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.cluster)
