"""The registered model through every door a registry user opens: ``mlflow.pyfunc``,
``mlflow.pytorch`` and ``mlflow models serve`` (images in, logits out; see
:func:`pipeline.tracking.model_signature`).

One tiny DF-DAM-R18 (random weights, 5 classes) is logged with :func:`pipeline.tracking.log_model`
into a real SQLite MLflow store, registered and given the alias ``champion``, as ``run.py tune``
does; each test loads it back from ``models:/<name>@champion``.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException

import models
from models import LogitsOnly, build_dfdam
from pipeline import tracking

NAME = "dfdam-serving-test"
NUM_CLASSES = 5
SERVER_START_TIMEOUT_S = 300  # a deadline for a hung server, not a speed requirement


@dataclass(frozen=True)
class Registered:
    uri: str
    model_uri: str  # models:/<name>@champion
    images: np.ndarray  # float32 (2, 3, 64, 96)
    logits: np.ndarray  # the logged module's own output for ``images``, float32 (2, K, 64, 96)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    store = tmp_path_factory.mktemp("serving-store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    torch.manual_seed(0)
    model = LogitsOnly(build_dfdam(NUM_CLASSES, backbone="resnet18")).eval()
    run_id = tracking.start_run(uri, "dfdam-test", "serving", {"num_classes": NUM_CLASSES})
    tracking.log_model(uri, run_id, model, NUM_CLASSES, code_path=Path(models.__file__).parent)
    tracking.end_run(uri, run_id)
    tracking.set_alias(uri, NAME, "champion", tracking.register_model(uri, run_id, NAME))
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(images).numpy()
    assert logits.shape == (2, NUM_CLASSES, 64, 96) and logits.dtype == np.float32
    return Registered(uri, f"models:/{NAME}@champion", images.numpy(), logits)


def test_signature_takes_one_unnamed_image_tensor() -> None:
    signature = tracking.model_signature(NUM_CLASSES)
    assert not signature.inputs.has_input_names()  # a name makes pyfunc pass a dict, which torch refuses
    (spec,) = signature.inputs.inputs
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 3, -1, -1)
    assert signature.outputs.inputs[0].shape == (-1, NUM_CLASSES, -1, -1)


def test_pyfunc_predict_returns_the_logits(registered: Registered) -> None:
    mlflow.set_tracking_uri(registered.uri)
    loaded = mlflow.pyfunc.load_model(registered.model_uri)
    assert not loaded.metadata.signature.inputs.has_input_names()
    predicted = loaded.predict(registered.images)
    assert isinstance(predicted, np.ndarray) and predicted.dtype == np.float32
    assert predicted.shape == (2, NUM_CLASSES, 64, 96)
    # Equal by construction: the pickled weights come back bit for bit and run through the same
    # CPU kernels in this process, with the same thread count.
    np.testing.assert_array_equal(predicted, registered.logits)

    # The signature is enforced: the wrong number of channels, or float64, is refused by name.
    with pytest.raises(MlflowException, match=r"Shape of input \(2, 1, 64, 96\)"):
        loaded.predict(registered.images[:, :1])
    with pytest.raises(MlflowException, match="dtype of input float64"):
        loaded.predict(registered.images.astype(np.float64))


def test_pytorch_flavour_returns_the_module(registered: Registered) -> None:
    mlflow.set_tracking_uri(registered.uri)
    for module in (mlflow.pytorch.load_model(registered.model_uri, map_location="cpu"),
                   tracking.load_model(registered.uri, registered.model_uri)):  # what run.py evaluate uses
        assert isinstance(module, LogitsOnly) and not module.training
        with torch.no_grad():
            logits = module(torch.from_numpy(registered.images)).numpy()
        np.testing.assert_array_equal(logits, registered.logits)  # same weights, same kernels: equal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post_json(url: str, payload: dict, timeout_s: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def _wait_for_ping(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url} within {SERVER_START_TIMEOUT_S} s:\n"
                f"{log.read_text()[-3000:]}")


@pytest.mark.slow  # starts `mlflow models serve` (and its uvicorn) in a subprocess
def test_served_model_answers_json_with_the_logits(registered: Registered, tmp_path: Path) -> None:
    port = _free_port()
    venv_bin = Path(sys.executable).parent
    # mlflow execs `uvicorn` by name: the environment's bin folder must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.uri,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(venv_bin / "mlflow"), "models", "serve", "-m", registered.model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own group: the server and the uvicorn it starts stop together
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}/ping", proc, log)
        image = registered.images[:1]
        answer = _post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": image.tolist()})
        assert list(answer) == ["predictions"]
        served = np.asarray(answer["predictions"], dtype=np.float32)
        assert served.shape == (1, NUM_CLASSES, 64, 96)
        # JSON carries float32 values exactly (float32 -> Python float -> repr -> float32), but the
        # server is another process that may pick other CPU kernels or thread counts and sum in
        # another order: allow float32 accumulation error, far below the O(1) gap that other
        # weights, an unnormalised or a transposed input would make.
        np.testing.assert_allclose(served, registered.logits[:1], rtol=1e-4, atol=1e-4)

        # A request that does not fit the signature gets HTTP 400 with MLflow's reason.
        with pytest.raises(urllib.error.HTTPError) as refused:
            _post_json(f"http://127.0.0.1:{port}/invocations", {"inputs": image[:, :2].tolist()})
        assert refused.value.code == 400
        assert "does not match expected shape" in refused.value.read().decode()
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever of it is left after ``grace_s``."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(timeout=grace_s)
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)  # raises once no process of the group is left
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
