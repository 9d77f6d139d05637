"""One model applied to many items (shards, batches of files) on Ray workers: the distributed
form of ``run.py evaluate`` and ``run.py predict``.

The driver puts the model in Ray's object store once; each item is one Ray task that runs a
Ray-free function ``fn(model, item, device)`` (``pipeline/evaluate.py``,
``pipeline/predict.py``) on a worker with one CPU, or one GPU with ``gpu=True``. At most
``workers`` tasks run at once, so ``--workers N`` means N processes whatever the cluster's
size. A task lost with its worker or node is run again (``max_retries``): an item's result
reaches the driver exactly once, and the driver combines the results once (a sum of
confusion matrices, say).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pipeline.cluster import check_resources, connect_ray

Item = TypeVar("Item")
Result = TypeVar("Result")

# A worker or node lost while it held a task: run the task again, up to this many times.
TASK_RETRIES = 3


def task_resources(gpu: bool, cpus: float = 1) -> dict[str, float]:
    """What one task holds: ``cpus`` CPUs, and one GPU when asked."""
    return {"CPU": cpus} | ({"GPU": 1} if gpu else {})


def _run(fn: Callable[[nn.Module, Any, torch.device], Any], model: nn.Module, item: Any, gpu: bool) -> Any:
    device = torch.device("cuda") if gpu else torch.device("cpu")
    return fn(model.to(device).eval(), item, device)


def map_with_model(fn: Callable[[nn.Module, Item, torch.device], Result], model: nn.Module, items: Sequence[Item],
                   *, workers: int, gpu: bool = False, address: str | None = None,
                   cpus_per_worker: float = 1,
                   passthrough: tuple[type[BaseException], ...] = ()) -> Iterator[tuple[int, Result]]:
    """``(index, fn(model, items[index], device))`` for every item, in the order they finish.

    Joins ``address`` (or ``$RAY_ADDRESS``) or starts a local cluster; refuses, before any
    task starts, ``workers`` the cluster cannot hold. A task that raises one of ``passthrough``
    (errors that name bad input, e.g. a damaged sample) raises that error itself here, its
    message whole, instead of Ray's ``RayTaskError`` with the worker's traceback.
    """
    import ray

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    connect_ray(address)
    resources = task_resources(gpu, cpus_per_worker)
    check_resources(workers, resources)
    remote = ray.remote(_run).options(num_cpus=resources["CPU"], num_gpus=resources.get("GPU", 0),
                                      max_retries=TASK_RETRIES, retry_exceptions=False)
    model_ref = ray.put(model.cpu().eval())
    pending: dict[Any, int] = {}
    next_item = 0
    while next_item < len(items) or pending:
        while next_item < len(items) and len(pending) < workers:
            pending[remote.remote(fn, model_ref, items[next_item], gpu)] = next_item
            next_item += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:
            if passthrough and isinstance(exc.cause, passthrough):
                raise exc.cause from None
            raise
        yield index, result
