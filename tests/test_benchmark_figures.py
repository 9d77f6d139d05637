"""The arithmetic behind benchmarks/train_scaling.py and benchmarks/search_efficiency.py: which
epochs count, how they combine, the speed-up verdict, and how two searches' trials are paired.
(The benchmarks themselves run real training and searches for minutes; they are not tests.)"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


scaling = _load("train_scaling")
search = _load("search_efficiency")


def _run(setting: str, workers: int, speeds: list[float], logged_s: list[int] | None = None,
         cpu: list[float] | None = None):
    logged_s = logged_s or [10 * (i + 1) for i in range(len(speeds))]
    cpu = cpu or [1.0] * len(speeds)
    epochs = [scaling.Epoch(i + 1, v, t * 1000, cpu_share=c) for i, (v, t, c) in enumerate(zip(speeds, logged_s, cpu))]
    return scaling.Run(setting, workers, global_batch=4 * workers, images_per_epoch=48, epochs=epochs)


def test_steady_images_per_s_skips_start_up_and_weighs_epochs_by_their_time():
    # 48 images at 4/s and at 6/s: 12 s + 8 s for 96 images = 4.8/s (not the mean of the rates, 5);
    # the first epoch (2/s, start-up) is left out. Every quotient here is exact in binary floating point.
    epochs = _run("local", 1, [2.0, 4.0, 6.0]).epochs
    assert scaling.training_images_per_s(epochs, 48, skip=1) == 4.8
    assert scaling.training_images_per_s(list(reversed(epochs)), 48, skip=1) == 4.8  # by epoch, not list order
    assert scaling.training_images_per_s(epochs, 48, skip=0) == 144 / 44
    with pytest.raises(ValueError, match="nothing left to measure"):
        scaling.training_images_per_s(epochs, 48, skip=3)


def test_epoch_wall_images_per_s_spans_from_the_last_skipped_epochs_record():
    epochs = _run("local", 1, [2.0, 4.0, 6.0], logged_s=[30, 40, 46]).epochs
    assert scaling.epoch_wall_images_per_s(epochs, 48, skip=1) == 96 / 16
    assert math.isnan(scaling.epoch_wall_images_per_s(epochs, 48, skip=0))


def test_speedup_is_against_the_one_worker_run_of_the_same_setting():
    runs = [_run("local", 1, [1.0, 4.0]), _run("local", 2, [1.0, 7.0]),
            _run("cluster", 1, [1.0, 4.0], cpu=[1.0, 1.0]), _run("cluster", 2, [1.0, 6.0], cpu=[1.0, 0.5])]
    rows = {(r["setting"], r["workers"]): r for r in scaling.speedups(runs, skip=1, target=1.7)}
    assert rows["local", 1]["speedup"] == 1.0 and rows["local", 1]["verdict"] == "-"
    assert rows["local", 2]["speedup"] == 7.0 / 4.0 and rows["local", 2]["verdict"] == "pass"
    assert rows["cluster", 2]["speedup"] == 1.5 and rows["cluster", 2]["verdict"] == "FAIL"
    # Workers that got half a core each: 48 images in 8 s of loop but 4 CPU-s per worker -> 12/s on
    # whole cores, 3x the 1-worker run's 4/s; the verdict stays on the measured 1.5x.
    assert rows["cluster", 2]["full_core_images_per_s"] == 12.0 and rows["cluster", 2]["full_core_speedup"] == 3.0
    table = scaling.scaling_table(list(rows.values()))
    assert [line.split()[:6] for line in table.splitlines()[2:]] == [
        ["local", "1", "4.00", "1.00x", "-", "-"], ["local", "2", "7.00", "1.75x", "1.7x", "pass"],
        ["cluster", "1", "4.00", "1.00x", "-", "-"], ["cluster", "2", "6.00", "1.50x", "1.7x", "FAIL"]]


def test_searches_are_paired_by_their_sampled_values_not_their_order():
    def trial(index, lambda_c, epochs, best):
        return search.Trial(index, f"id{index}{lambda_c}", {"lambda_c": lambda_c, "lr": "0.01"}, epochs, best)

    asha = search.Search("asha", [trial(1, "0.4", 4, 0.30), trial(2, "0.5488", 1, 0.10), trial(3, "0.7", 2, 0.2)])
    fifo = search.Search("fifo", [trial(2, "0.4", 4, 0.30), trial(1, "0.5488", 4, 0.35), trial(3, "0.9", 4, 0.1)])
    rows = search.paired([asha, fifo])
    assert [{s: t.params["lambda_c"] for s, t in row.items()} for row in rows] == [
        {"asha": "0.4", "fifo": "0.4"}, {"asha": "0.5488", "fifo": "0.5488"}, {"asha": "0.7"}, {"fifo": "0.9"}]
    assert [search.same_point(row, [asha, fifo]) for row in rows] == [True, True, False, False]
    assert fifo.best_trial.params["lambda_c"] == "0.5488"
    assert search.trial_index("run_trial_29f3a5f7_12_lambda_c=0.4000_2026-11-28", "29f3a5f7") == 12
    assert search.trial_index("run_trial_31650ea6_2_lambda_c=0.5", "29f3a5f7") is None
