"""A real multi-node Ray cluster on this machine: a head and a worker node, each its own
``ray start --block`` process, with token authentication on.

The pytest process never calls ``ray.init`` here (``tests/pipeline``'s ``ray_cluster`` does,
and both can run in one session): tests drive this cluster through subprocesses
(``python run.py ...``, ``ray job submit ...``) given :attr:`RayCluster.env`, and look at it
through the dashboard's HTTP API. Nothing is written to the pytest process's environment,
to ``~/.ray`` or to Ray's default temp folder:

- the token is a fresh random one, passed to every node and client as ``RAY_AUTH_TOKEN``
  (Ray reads it before ``~/.ray/auth_token``, and ``ray start`` never writes that file);
- every port is one the OS just handed out (worker ports: random), so two test runs, or this
  cluster and a local one, do not collide;
- ``--temp-dir`` is a fresh short folder under /tmp (Unix socket paths must stay under 108
  bytes), so the ``ray_current_cluster`` file ``ray start`` leaves there is seen by nobody else;
  each worker node has a subfolder of its own (see :meth:`RayCluster.add_worker_node`).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
RAY_CLI = str(Path(sys.executable).with_name("ray"))
TRAIN_WORKER_CLASS = "RayTrainWorker"  # ray.train.v2._internal.execution.worker_group.worker
START_TIMEOUT_S = 180.0  # a node start takes ~10 s on an idle 2-core machine, far more under load


# ---------------------------------------------------------------- processes, from /proc (Linux)
# A process is (pid, start time): a pid reused by someone else's process is never signalled.

Proc = tuple[int, int]


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, start time, process group) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[19]), int(fields[2])


def _group_alive(pgid: int) -> bool:
    """Whether a live process is in group ``pgid`` (then no new process can take that id)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            if st[3] == pgid and st[0] not in ("Z", "X"):
                return True
    return False


def _proc(pid: int) -> Proc | None:
    st = _stat(pid)
    return (pid, st[2]) if st else None


def _alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[2] == proc[1] and st[0] not in ("Z", "X")


def _tree(pid: int) -> list[Proc]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents.setdefault(st[1], []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        if (proc := _proc(current)) is not None:
            out.append(proc)
        todo += parents.get(current, [])
    return out


def _kill(procs: list[Proc]) -> None:
    for proc in procs:
        if _alive(proc):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc[0], signal.SIGKILL)


def _wait_gone(procs: list[Proc], timeout_s: float) -> list[Proc]:
    """Those of ``procs`` still alive after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def free_port(taken: set[int]) -> int:
    """A TCP port nothing listens on now, not in ``taken`` (which it joins)."""
    while True:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


@dataclass
class RayCluster:
    """A running cluster: ``address`` (GCS, for ``--address``), ``dashboard`` (for ``ray job``
    and the state API), ``env`` (what every client process needs), the node processes."""

    python: ClassVar[str] = PYTHON
    ray_cli: ClassVar[str] = RAY_CLI
    repo: ClassVar[Path] = REPO

    address: str
    dashboard: str
    env: dict[str, str]
    token: str
    temp_dir: Path
    head: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)
    drain_timeout_s: float = 5.0  # how long a SIGTERM'd node drains (Ray's default: 30 s)
    _ports: set[int] = field(default_factory=set)

    @property
    def worker(self) -> subprocess.Popen:
        """The first live worker node."""
        return next(p for p in self.workers if p.poll() is None)

    # ---------------------------------------------------------------- nodes

    def _node_args(self) -> list[str]:
        ports = {flag: str(free_port(self._ports)) for flag in (
            "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")}
        return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
                "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", "--block",
                *[x for kv in ports.items() for x in kv]]

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.temp_dir / log_name, "ab")  # noqa: SIM115 - closed with the process
        # RAY_ADDRESS for the nodes (and so every Ray worker process they start): Ray Train V2's
        # PlacementGroupCleaner and state actor find "their" cluster's state API by auto-detection
        # (RAY_ADDRESS, else /tmp/ray/ray_current_cluster, else the one GCS process `ps` shows),
        # which fails ("Found multiple active Ray instances") or picks the wrong cluster when
        # several run on one machine, as in a test session.
        node_env = self.env | {"RAY_ADDRESS": self.address,
                               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(self.drain_timeout_s)}
        proc = subprocess.Popen([RAY_CLI, "start", *args, *self._node_args()], env=node_env, cwd=self.temp_dir,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: killpg reaches only it
        proc.log_path = self.temp_dir / log_name  # type: ignore[attr-defined]
        log.close()
        return proc

    def add_worker_node(self, wait: bool = True) -> subprocess.Popen:
        """Start one more worker node (1 CPU); by default wait until it is alive."""
        before = len(self.alive_nodes())
        n = len(self.workers) + 1
        # Its own temp folder, as on a machine of its own: nodes sharing one would share a session
        # folder, so one node's runtime-env agent could delete the unpacked working_dir (a job's
        # cwd) the other's processes run in, and their logs would mix.
        proc = self._start(["--address", self.address, "--temp-dir", str(self.temp_dir / f"w{n}")], f"worker-{n}.log")
        self.workers.append(proc)
        if wait:
            self.wait_for_nodes(before + 1, procs=[proc])
        return proc

    def node_processes(self, node: subprocess.Popen) -> list[Proc]:
        """``node``'s ``ray start`` and every process below it, as (pid, start time) (Ray's
        worker processes have their own process groups: a group kill alone misses them)."""
        return _tree(node.pid) if node.poll() is None else []

    def raylet_pid(self, node: subprocess.Popen) -> int:
        """The pid of ``node``'s raylet (its node manager)."""
        for pid, _ in self.node_processes(node)[1:]:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    return pid
        raise LookupError(f"node process {node.pid} has no raylet")

    def node_id(self, node: subprocess.Popen) -> str:
        """``node``'s Ray node id (hex), read from its raylet's command line."""
        pid = self.raylet_pid(node)
        for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0"):
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
        raise LookupError(f"raylet {pid} has no --node_id")

    def kill_node(self, node: subprocess.Popen) -> None:
        """Lose a node the hard way: SIGKILL its process group and every process below it."""
        procs = self.node_processes(node)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.pid, signal.SIGKILL)
        _kill(procs)
        node.wait(timeout=30)
        _wait_gone(procs, 30)

    def stop_node(self, node: subprocess.Popen, timeout_s: float | None = None) -> None:
        """SIGTERM ``ray start --block`` (the node drains, then stops its processes); after
        ``timeout_s`` (default: the drain time + 10 s), SIGKILL what is left of that node only."""
        timeout_s = self.drain_timeout_s + 10 if timeout_s is None else timeout_s
        if node.poll() is None:
            procs = self.node_processes(node)
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
            alive = _wait_gone(procs[1:], 5)
            if node.poll() is None or alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(node.pid, signal.SIGKILL)  # its own group (start_new_session)
                _kill(alive)  # below it, in groups of their own (Ray's workers)
                node.wait(timeout=10)
        if _group_alive(node.pid):  # stray members of its group (none normally)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, signal.SIGKILL)

    # ---------------------------------------------------------------- state (HTTP, no ray.init)

    def _get(self, path: str, params: list[tuple[str, str]] | None = None, timeout_s: float = 10.0):
        url = f"{self.dashboard}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        request = urllib.request.Request(url, headers={"authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)

    def _list(self, resource: str, filters: list[tuple[str, str, str]]) -> list[dict]:
        params = [("limit", "10000"), ("detail", "true")]
        for key, predicate, value in filters:
            params += [("filter_keys", key), ("filter_predicates", predicate), ("filter_values", value)]
        body = self._get(f"/api/v0/{resource}", params)
        if not body.get("result", False):
            raise RuntimeError(f"state API /api/v0/{resource}: {body.get('msg')}")
        return body["data"]["result"]["result"]

    def job_status(self, job_id: str) -> str:
        """A Ray job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), from the Jobs API."""
        return self._get(f"/api/jobs/{urllib.parse.quote(job_id)}")["status"]

    def alive_nodes(self) -> list[dict]:
        """Alive nodes as the state API lists them (``node_id``, ``node_ip``, ``is_head_node``...)."""
        return self._list("nodes", [("state", "=", "ALIVE")])

    def list_train_workers(self) -> list[dict]:
        """Alive Ray Train worker actors: dicts with ``pid``, ``node_id``, ``actor_id``..."""
        return self._list("actors", [("class_name", "=", TRAIN_WORKER_CLASS), ("state", "=", "ALIVE")])

    def wait_for_nodes(self, count: int, timeout_s: float = START_TIMEOUT_S,
                       procs: list[subprocess.Popen] | None = None) -> list[dict]:
        """Wait until exactly ``count`` nodes are alive; fail early if a node process exits."""
        deadline, nodes, error = time.monotonic() + timeout_s, [], None
        while time.monotonic() < deadline:
            for proc in procs or [self.head]:
                if proc.poll() is not None:
                    raise RuntimeError(f"`ray start` exited with {proc.returncode}:\n{_tail(proc.log_path)}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) == count:
                    return nodes
            except (OSError, ValueError, RuntimeError, KeyError) as exc:  # dashboard not up yet
                error = exc
            time.sleep(0.5)
        raise TimeoutError(f"{len(nodes)} alive node(s) after {timeout_s:.0f} s, expected {count} "
                           f"(last error: {error})\n{_tail(self.head.log_path)}")

    def stop(self) -> dict[int, float]:
        """Stop every node, worker nodes first; returns the seconds each took, by pid."""
        took = {}
        for node in [*reversed(self.workers), self.head]:
            started = time.monotonic()
            self.stop_node(node)
            took[node.pid] = time.monotonic() - started
        return took

    @staticmethod
    def tail(path: Path, lines: int = 30) -> str:
        """The last ``lines`` lines of a log file (for assertion messages)."""
        return _tail(path, lines)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def client_env(token: str) -> dict[str, str]:
    """The environment of every node and client: this one minus all RAY_* variables (no
    inherited RAY_ADDRESS, token or temp folder), plus token auth on with ``token``, and the
    virtual environment first on PATH (so a job's ``python`` is this one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train gives a worker group 60 s to start; a loaded 2-core machine can need more.
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
        # The GCS declares a node dead after health_check_failure_threshold (5) failed checks,
        # health_check_period_ms apart (Ray's default 3 s: 15 s after the loss; the fault tests
        # lose a node twice and wait for that each time). 1 s apart: ~5 s. Each check still
        # waits health_check_timeout_ms (10 s) for an answer, so a live node slowed by a loaded
        # machine is no likelier to be declared dead; a killed one refuses at once.
        "RAY_health_check_period_ms": "1000",
        "PATH": os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
    })
    return env


@contextlib.contextmanager
def start_cluster(worker_nodes: int = 1, drain_timeout_s: float = 5.0):
    """A head node (1 CPU, the trial-driver resource, the dashboard) and ``worker_nodes`` worker
    nodes (1 CPU each), each its own ``ray start --block``; stopped on exit.

    ``drain_timeout_s``: how long a node given SIGTERM drains before it stops its processes
    (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, Ray's default 30 s). The head never finishes
    draining after a training run (detached actors live on it), so teardown would wait the
    whole drain time; pass 30 or more to test graceful drains."""
    from pipeline.tune import TRIAL_DRIVER_RESOURCE

    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix="dfdam-ray-", dir="/tmp"))
    taken: set[int] = set()
    gcs, dashboard, client = free_port(taken), free_port(taken), free_port(taken)
    env = client_env(token)
    cluster = RayCluster(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dashboard}", env=env,
                         token=token, temp_dir=temp_dir, head=None,  # type: ignore[arg-type]
                         drain_timeout_s=drain_timeout_s, _ports=taken)
    try:
        cluster.head = cluster._start([
            "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--ray-client-server-port", str(client), "--temp-dir", str(temp_dir),
            "--resources", json.dumps({TRIAL_DRIVER_RESOURCE: 1000}),
        ], "head.log")
        cluster.wait_for_nodes(1, procs=[cluster.head])
        for _ in range(worker_nodes):
            cluster.add_worker_node(wait=False)
        cluster.wait_for_nodes(1 + worker_nodes, procs=[cluster.head, *cluster.workers])
        yield cluster
    finally:
        if cluster.head is not None:
            took = cluster.stop()
            print("\nnodes stopped in " + ", ".join(f"{t:.1f} s" for t in took.values()))
        if os.environ.get("DFDAM_KEEP_RAY_LOGS"):
            print(f"Ray logs kept in {temp_dir}")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="package")
def two_node_cluster():
    """Head + one worker node, 1 CPU each, token auth; one for the tests of this folder (~25 s
    to start on an idle 2-core machine), stopped when they end so it does not load the machine
    during the rest of the session. Tests that lose a node bring one back before they end."""
    before = {k: v for k, v in os.environ.items() if k.startswith("RAY_")}
    started = time.monotonic()
    with start_cluster(worker_nodes=1) as cluster:
        cluster.start_s = time.monotonic() - started  # type: ignore[attr-defined]
        print(f"\ntwo_node_cluster: {cluster.address}, dashboard {cluster.dashboard}, "
              f"started in {cluster.start_s:.1f} s")  # type: ignore[attr-defined]
        yield cluster
    # Nothing leaked into this process (a RAY_ADDRESS here would send tests/pipeline's ray.init
    # and connect_ray to this stopped cluster).
    assert {k: v for k, v in os.environ.items() if k.startswith("RAY_")} == before
