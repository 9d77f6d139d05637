"""Join a Ray cluster or start a local one; refuse what the cluster cannot hold.

Ray calls live here, in ``pipeline/train.py`` and in ``pipeline/tune.py`` only.
"""
from __future__ import annotations

import os
import socket


class ResourceError(RuntimeError):
    """The Ray cluster cannot hold what was asked for."""


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to ``host:port`` (Ray's own client retries for minutes before failing)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ConnectionError(f"Ray address {address!r}: expected host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({exc}). Start one with `ray start --head` "
            "or leave --address and RAY_ADDRESS unset to run a local cluster"
        ) from None


def connect_ray(address: str | None, resources: dict[str, float] | None = None) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), or start a local cluster; clear error if unreachable.

    ``resources``: custom resources for a local cluster (Tune's trial drivers hold a sliver of
    one instead of a CPU).
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        probe_address(address)
    if ray.is_initialized():  # already connected (a notebook, a test session)
        return
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(resources=resources, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConnectionError(
            f"cannot reach the Ray cluster at {address!r}: {exc}. Start one with `ray start --head` "
            "or leave --address and RAY_ADDRESS unset to run a local cluster"
        ) from None


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
