"""The console a person reads: one line per epoch, a bar only on a terminal, messages as lines."""
from __future__ import annotations

import io

from pipeline.console import TrainingConsole, duration, epoch_line, trial_line


def _metrics(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "val_miou": 0.1 * epoch, "best_val_miou": 0.1 * epoch}


def test_one_line_per_epoch_and_no_bar_in_a_log_file() -> None:
    out = io.StringIO()  # not a terminal: no bar, whatever the step events say
    console = TrainingConsole(3, out)
    for epoch in (1, 2, 3):
        for step in (1, 2):
            console.handle({"kind": "step", "epoch": epoch, "step": step, "steps": 2, "loss": 1.0, "lr": 0.01,
                            "images_per_s": 4.0})
        console.handle({"kind": "epoch", "metrics": _metrics(epoch), "images_per_s": 8.0})
    console.handle({"kind": "message", "text": "resuming from the checkpoint of epoch 2"})
    console.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "epoch 1/3  loss 1.0000  val mIoU 0.1000 (best 0.1000)  8.0 img/s"  # no pace yet: no ETA
    assert lines[1].startswith("epoch 2/3  loss 0.5000  val mIoU 0.2000 (best 0.2000)  8.0 img/s  ETA ")
    assert "ETA" not in lines[2]  # nothing left
    assert lines[3] == "resuming from the checkpoint of epoch 2"
    assert len(lines) == 4


def test_a_terminal_gets_a_bar_that_leaves_only_the_epoch_lines() -> None:
    out = io.StringIO()
    console = TrainingConsole(1, out, bar=True)
    console.handle({"kind": "step", "epoch": 1, "step": 1, "steps": 2, "loss": 2.0, "lr": 0.01, "images_per_s": 3.0})
    assert console.bar is not None and console.bar.n == 1 and console.bar.total == 2
    console.handle({"kind": "step", "epoch": 1, "step": 2, "steps": 2, "loss": 2.0, "lr": 0.01, "images_per_s": 3.0})
    assert console.bar.n == 2
    console.handle({"kind": "epoch", "metrics": _metrics(1), "images_per_s": 6.0})
    assert console.bar is None  # closed by the epoch's line
    assert "epoch 1/1  loss 1.0000" in out.getvalue()


def test_durations_and_trial_lines_read_at_a_glance() -> None:
    assert [duration(s) for s in (5, 65, 7300, float("nan"))] == ["5s", "1m05s", "2h01m", "?"]
    assert epoch_line(_metrics(2), 4, images_per_s=12.25, eta_s=90) == \
        "epoch 2/4  loss 0.5000  val mIoU 0.2000 (best 0.2000)  12.2 img/s  ETA 1m30s"
    assert trial_line("ab12", {"lambda_c": 0.4, "lr": 0.01}, 1, 4, 0.25, 0.25) == \
        "trial ab12  epoch 1/4  lambda_c=0.4  lr=0.01  val mIoU 0.2500 (best 0.2500)"
