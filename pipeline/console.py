"""What a person reads while training and searching: one line per epoch, a bar inside it.

Ray Train workers and Tune trials run with their output in Ray's log files
(``ray.init(log_to_driver=False)``, see ``pipeline/cluster.py``); rank 0 posts small events
(step progress, epoch metrics, messages) that the driver hands to :class:`TrainingConsole`,
and a search's driver formats each trial result with :func:`trial_line`. On a terminal an
epoch shows a progress bar; in a log file only the lines appear. Nothing here imports Ray.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

from tqdm import tqdm


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def epoch_line(metrics: Mapping[str, float], epochs: int, *, images_per_s: float, eta_s: float | None) -> str:
    """``epoch 3/24  loss 0.8123  val mIoU 0.4120 (best 0.4120)  38.2 img/s  ETA 1m20s``."""
    parts = [f"epoch {int(metrics['epoch'])}/{epochs}", f"loss {metrics['train_loss']:.4f}",
             f"val mIoU {metrics['val_miou']:.4f} (best {metrics['best_val_miou']:.4f})",
             f"{images_per_s:.1f} img/s"]
    if eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


def trial_line(trial_id: str, params: Mapping[str, Any], epoch: int, epochs: int, miou: float, best: float) -> str:
    """One line per trial result: ``trial 1a2b3c4d  epoch 2/4  lambda_c=0.4 ...  val mIoU 0.41 (best 0.43)``."""
    values = "  ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                       for name, value in params.items())
    return f"trial {trial_id}  epoch {epoch}/{epochs}  {values}  val mIoU {miou:.4f} (best {best:.4f})"


class ProgressBoard:
    """Holds the events rank 0 posts until the driver takes them.

    Run as a Ray actor on the driver's node (``pipeline/train.py: progress_board``); it lives
    here, in a module that imports no more than tqdm, so that its process stays small.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


class TrainingConsole:
    """Prints the events a training run's rank 0 posts (see ``pipeline/worker.py``).

    Events are dicts with a ``kind``: ``step`` (``epoch``, ``step``, ``steps``, ``loss``,
    ``images_per_s``: the bar), ``epoch`` (the reported metrics plus ``workers``: one
    line), and ``message`` (``text``: one line). The ETA counts the epochs left at the pace of
    the epochs seen since the first one ended (the first carries the cluster's start).
    """

    def __init__(self, epochs: int, stream: IO[str] | None = None, bar: bool | None = None) -> None:
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.bar_enabled = self.stream.isatty() if bar is None else bar
        self.bar: tqdm | None = None
        self.first_epoch_end: tuple[float, int] | None = None  # (time, epoch)

    def handle(self, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "step":
            self._step(event)
        elif kind == "epoch":
            self._close_bar()
            self._print(epoch_line(event["metrics"], self.epochs, images_per_s=event["images_per_s"],
                                   eta_s=self._eta(int(event["metrics"]["epoch"]))))
        elif kind == "message":
            self._print(str(event["text"]))

    def close(self) -> None:
        self._close_bar()

    def _step(self, event: Mapping[str, Any]) -> None:
        if not self.bar_enabled:
            return
        if self.bar is None or self.bar.desc != f"epoch {event['epoch']}/{self.epochs}":
            self._close_bar()
            self.bar = tqdm(total=int(event["steps"]), desc=f"epoch {event['epoch']}/{self.epochs}", unit="step",
                            file=self.stream, leave=False, dynamic_ncols=True)
        self.bar.update(int(event["step"]) - self.bar.n)
        self.bar.set_postfix_str(f"loss {event['loss']:.4f}  {event['images_per_s']:.1f} img/s/worker")

    def _eta(self, epoch: int) -> float | None:
        now = time.monotonic()
        if self.first_epoch_end is None:
            self.first_epoch_end = (now, epoch)
            return None
        since, first = self.first_epoch_end
        return (now - since) / max(1, epoch - first) * (self.epochs - epoch) if epoch < self.epochs else None

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(line, file=self.stream, flush=True)
        if self.bar is not None:
            self.bar.refresh()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
