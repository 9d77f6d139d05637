"""One model per evaluation: after average_buffers every rank holds the same BatchNorm buffers."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from pipeline.loop import average_buffers

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same weights on every rank, as DDP keeps them
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    torch.manual_seed(100 + rank)  # ...but each rank's own batch, so its own running statistics
    model.train()(torch.randn(2, 3, 8, 8) * (rank + 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average_buffers(model, world)
    torch.save({"before": before, "after": model.state_dict()}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_ends_with_the_mean_of_the_running_statistics(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_rank, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    before = [s["before"] for s in states]
    after = [s["after"] for s in states]
    assert not torch.equal(before[0]["1.running_mean"], before[1]["1.running_mean"])  # the fault to fix
    for key in after[0]:
        assert torch.equal(after[0][key], after[1][key]), key  # bit-identical, not merely close
        if key.endswith(("running_mean", "running_var")):
            mean = (before[0][key] + before[1][key]) / 2
            assert torch.allclose(after[0][key], mean, rtol=0, atol=1e-6), key
    assert torch.equal(after[0]["1.num_batches_tracked"], before[0]["1.num_batches_tracked"])
