"""The plain PyTorch training step and epoch, without Ray."""
from __future__ import annotations

import pytest
import torch

from models import build_dfdam
from pipeline.config import build_config
from pipeline.optim import PolySchedule, build_optimizer, set_lr
from pipeline.loop import train_one_epoch, train_step


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised float batch (B, 3, H, W) and int64 labels, as the model and loss take them."""
    torch.manual_seed(0)
    labels = torch.zeros(2, 64, 64, dtype=torch.int64)
    labels[:, :, 32:] = 1
    images = torch.randn(2, 3, 64, 64) * 0.1
    images[:, 0] += labels * 2.0  # class 1 is redder
    return images, labels


def _loader_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same kind of batch as ``train_loader`` yields it: uint8 (B, H, W, 3) pixels, uint8 labels."""
    torch.manual_seed(0)
    labels = torch.zeros(2, 64, 64, dtype=torch.uint8)
    labels[:, :, 32:] = 1
    images = torch.randint(100, 140, (2, 64, 64, 3), dtype=torch.uint8)
    images[..., 0] += labels * 80  # class 1 is redder
    return images, labels


def test_repeated_steps_fit_a_batch() -> None:
    cfg = build_config("synthetic")
    torch.manual_seed(0)
    model = build_dfdam(2).train()
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels = _batch()
    losses = [train_step(model, images, labels, optimizer, scaler, cfg.loss)[0].item() for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]


def test_epoch_runs_every_step_and_reports() -> None:
    cfg = build_config("synthetic", ["train.epochs=1", "train.log_every=2"])
    model = build_dfdam(2)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen: list[dict[str, float]] = []
    stats = train_one_epoch(model, [_loader_batch()] * 3, optimizer, cfg, epoch=0, steps=3, schedule=PolySchedule(cfg.optim.lr, 3),
                            device=torch.device("cpu"), scaler=scaler, progress=seen.append)
    assert set(stats) == {"loss", "loss_p", "loss_c", "loss_s", "lr", "images_per_s", "data_wait_share", "cpu_share",
                          "data_skipped"}
    assert stats["data_skipped"] == 0.0  # a plain list of batches skips nothing
    assert 0.0 <= stats["data_wait_share"] < 1.0
    assert stats["cpu_share"] > 0.0  # the steps ran on this process's CPU
    assert stats["lr"] == pytest.approx(cfg.optim.lr * (1 - 2 / 3) ** 0.9)  # the poly rate of the last step
    assert [(p["epoch"], p["step"], p["steps"]) for p in seen] == [(1, 2, 3), (1, 3, 3)]  # every log_every, and the last
    assert seen[-1]["loss"] == pytest.approx(stats["loss"]) and seen[-1]["lr"] == stats["lr"]


def test_a_diverging_loss_stops_with_advice() -> None:
    cfg = build_config("synthetic")
    model = build_dfdam(2)
    optimizer = build_optimizer(model, cfg.optim)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")  # what a diverged step leaves behind
    with pytest.raises(FloatingPointError, match="epoch 1 step 1: lower optim.lr"):
        train_one_epoch(model, [_loader_batch()], optimizer, cfg, epoch=0, steps=1, schedule=PolySchedule(cfg.optim.lr, 1),
                        device=torch.device("cpu"), scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_an_epoch_normalises_the_loaders_uint8_batch_on_its_device() -> None:
    """train_one_epoch gets uint8 pixels and trains on exactly normalize_batch's floats: one step from
    the uint8 batch equals one train_step on the normalised batch (same model, same seed)."""
    from pipeline.transforms import normalize_batch

    cfg = build_config("synthetic", ["train.log_every=1"])
    images, labels = _loader_batch()
    runs = []
    for through_loop in (True, False):
        torch.manual_seed(0)
        model = build_dfdam(2)
        optimizer = build_optimizer(model, cfg.optim)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        if through_loop:
            stats = train_one_epoch(model, [(images, labels)], optimizer, cfg, epoch=0, steps=1,
                                    schedule=PolySchedule(cfg.optim.lr, 1), device=torch.device("cpu"), scaler=scaler)
            runs.append((stats["loss"], model.state_dict()))
        else:
            set_lr(optimizer, PolySchedule(cfg.optim.lr, 1), 0)  # what the epoch sets before its first step
            loss, _ = train_step(model, normalize_batch(images, cfg.data.mean, cfg.data.std), labels.long(),
                                 optimizer, scaler, cfg.loss)
            runs.append((loss.item(), model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
