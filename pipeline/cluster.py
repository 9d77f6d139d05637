"""Join a Ray cluster or start a local one; refuse what the cluster cannot hold.

Ray calls live here, in ``pipeline/train.py``, ``worker.py``, ``tune.py`` and ``ray_map.py`` only.

Every failure to join or start a cluster is raised as :class:`ConnectionError` (``run.py``
prints it as one line), and the checks below fail in about a second where ``ray.init``
itself would retry for half a minute or more:

- no address: always a fresh local cluster (``address="local"``), never the address that
  the last ``ray start`` left in Ray's temp folder (``ray_current_cluster``), which outlives
  a stopped node and made ``ray.init()`` hang for minutes on a dead GCS;
- an explicit address: a TCP connect, then one unauthenticated-or-not GCS call that tells
  a cluster asking for a token (Ray 2.60's default) from one that is simply down.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
_START_ONE = ("Start one with `ray start --head` or leave --address and RAY_ADDRESS unset to run a "
              "local cluster")


class ResourceError(RuntimeError):
    """The Ray cluster cannot hold what was asked for."""


def _hostport(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r}: expected host:port (or ray://host:port, or auto)")
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to ``host:port`` (Ray's own client retries for minutes before failing)."""
    host, port = _hostport(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r} ({exc}). {_START_ONE}") from None


def auth_token() -> tuple[str, str] | None:
    """The token this process would send, and where it comes from, in Ray's own order.

    ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token`` (what ``ray.init()`` of a local cluster writes). ``None`` if none.
    """
    token = os.environ.get(AUTH_TOKEN_ENV, "").strip()
    if token:
        return token, f"${AUTH_TOKEN_ENV}"
    path_env = os.environ.get(AUTH_TOKEN_PATH_ENV)
    path = Path(path_env).expanduser() if path_env else DEFAULT_TOKEN_PATH.expanduser()
    try:
        token = path.read_text().strip()
    except OSError:
        return None
    return (token, str(path)) if token else None


def _auth_help(address: str) -> str:
    return (f"Ray 2.60 clusters use token authentication by default (`ray start --head` turns it on "
            f"whenever a token exists, and every local ray.init() writes one to ~/.ray/auth_token). "
            f"Give this process the token of the cluster at {address}: `export {AUTH_MODE_ENV}=token` and "
            f"either `export {AUTH_TOKEN_ENV}=<token>` or put the token in ~/.ray/auth_token (or a file named "
            f"by {AUTH_TOKEN_PATH_ENV}), copied from the head node, where `ray get-auth-token` prints it")


def check_auth(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, in milliseconds, to join a cluster that will not accept this process's token.

    One ``GetClusterId`` call to the GCS with the metadata ``ray.init`` would send: the token
    only when ``RAY_AUTH_MODE=token``. ``UNAUTHENTICATED`` means the token is missing or wrong
    (``ray.init`` would retry for about 30 s, then report a plain connection failure); any
    other outcome (a TLS cluster, an old GCS, grpc missing) is left to ``ray.init``.
    """
    host, port = _hostport(address)
    opted_in = os.environ.get(AUTH_MODE_ENV, "").lower() == "token"
    found = auth_token()
    if opted_in and found is None:
        raise ConnectionError(f"{AUTH_MODE_ENV}=token but no token found (${AUTH_TOKEN_ENV}, "
                              f"${AUTH_TOKEN_PATH_ENV} or ~/.ray/auth_token). " + _auth_help(address))
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:
        return
    metadata = (("authorization", f"Bearer {found[0]}"),) if opted_in and found else None
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            return
        if opted_in:
            raise ConnectionError(
                f"the Ray cluster at {address!r} refused the authentication token from {found[1]}: it is not "
                f"this cluster's token. " + _auth_help(address)) from None
        # Not opted in. Setting RAY_AUTH_MODE=token for the user would make this "just work"
        # when ~/.ray/auth_token happens to hold the right token, but Ray 2.60 deliberately
        # never enables token auth for an explicit address (only for a cluster it finds
        # locally): the token is a credential that runs code on the cluster it belongs to,
        # and sending it to whatever host --address or RAY_ADDRESS names would hand it to that
        # host. A token found here may also be a local cluster's, not this one's. So the user
        # opts in, and we say exactly how, rather than guess.
        mode = os.environ.get(AUTH_MODE_ENV)
        state = f"{AUTH_MODE_ENV} is {'unset' if mode is None else repr(mode)}"
        hint = (f"; a token is available from {found[1]}: if it is this cluster's, `export {AUTH_MODE_ENV}=token` "
                "is enough" if found else "")
        raise ConnectionError(
            f"the Ray cluster at {address!r} requires an authentication token and this process sent none "
            f"({state}{hint}). " + _auth_help(address)) from None


def connect_ray(address: str | None, resources: dict[str, float] | None = None, *,
                node_ip_address: str | None = None) -> str:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a fresh local cluster; returns where
    Ray's own output goes (:func:`log_folder`).

    Workers' output stays in Ray's log files (``log_to_driver=False``) and Ray's driver-side
    INFO lines are not printed: the console shows the pipeline's own lines
    (``pipeline/console.py``), and says where the rest is.

    ``resources``: custom resources for a local cluster (Tune's trial drivers hold a sliver of
    one instead of a CPU); ignored when joining. ``node_ip_address``: the IP of this driver's
    node (``ray.init(_node_ip_address=...)``, the driver's counterpart of ``ray start
    --node-ip-address``; Ray 2.60 reads no environment variable for it). Note that Ray itself
    replaces a loopback address (127.0.0.1, localhost, ::1), here and in ``--node-ip-address``
    and ``--address``, by the address its host routes outwards on. Raises
    :class:`ConnectionError` for anything that stops the connection.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        address = None
    explicit = address is not None and address != "auto"
    if explicit:
        probe_address(address)
        if "://" not in address:  # ray:// is the Ray Client server, not the GCS
            check_auth(address)
    if ray.is_initialized():  # already connected (a notebook, a test session)
        return log_folder()
    # Ray 2.60 warns at every ray.init that token authentication is on; that is the default
    # this module's messages explain where it matters, not news for every run.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # (Ray Client, ray://, takes no node IP: the driver's node is the server's.)
    kwargs = {"_node_ip_address": node_ip_address} if node_ip_address and "://" not in (address or "") else {}
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
        else:
            start_local_cluster(resources=resources, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # noqa: BLE001 - Ray raises many types; all mean "no cluster"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not address:
            raise ConnectionError(f"could not start a local Ray cluster: {message}") from None
        if "auth" in message.lower() or "token" in message.lower():
            raise ConnectionError(f"cannot join the Ray cluster at {address!r}: {message}. "
                                  + _auth_help(address)) from None
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {message}. {_START_ONE}") from None
    return log_folder()


def log_folder() -> str:
    """The Ray log folder of this driver's node (each node keeps its workers' output in its own)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public API names the session folder
    try:
        return str(node.get_logs_dir_path())
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Environment variables set for the block, and put back as they were after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_local_cluster(**init_kwargs) -> None:
    """``ray.init`` of a new single-machine cluster that listens on 127.0.0.1 only.

    - ``address="local"``: a new cluster even when Ray's temp folder names one
      (``ray_current_cluster`` is left behind by every stopped ``ray start``, and a plain
      ``ray.init()`` would follow it to a dead GCS).
    - Loopback only: Ray replaces 127.0.0.1 by the host's outward address and binds its GCS to
      every interface, unless it believes it runs where multi-node clusters are off
      (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by every process it starts; in this
      process, the constant it was read into). A cluster nobody else is meant to join then
      listens on 127.0.0.1 alone.
    - ``RAY_ADDRESS`` of its own for every process it starts: Ray Train's placement-group
      cleaner finds "its" cluster by auto-detection, which fails ("Found multiple active Ray
      instances") when another cluster runs on the machine, and a trial stopped early would
      then keep its CPUs forever. The GCS port is chosen here so the address is known before
      the processes start. This process's own environment is left as it was.
    """
    import ray
    from ray._private import ray_constants

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loopback_only = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GCS_SERVER_PORT": str(port),
                     "RAY_ADDRESS": f"127.0.0.1:{port}"}
    multi_node = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    with environment(loopback_only):
        if multi_node is not None:
            ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(address="local", **init_kwargs)
        finally:
            if multi_node is not None:
                ray_constants.ENABLE_RAY_CLUSTER = multi_node


def check_resources(workers: int, per_worker: dict[str, float], concurrent: int = 1) -> None:
    """Refuse, before anything starts, a request the connected cluster can never hold."""
    import ray

    total = ray.cluster_resources()
    for resource, amount in per_worker.items():
        need = amount * workers * concurrent
        have = total.get(resource, 0.0)
        if need > have:
            raise ResourceError(
                f"{workers} worker(s) x {amount:g} {resource}"
                + (f" x {concurrent} concurrent trials" if concurrent > 1 else "")
                + f" = {need:g} {resource}, but the Ray cluster has {have:g}: use fewer workers"
                + (" or drop --gpu" if resource == "GPU" else "")
            )
