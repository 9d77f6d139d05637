"""Every subcommand of run.py explains itself."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import run

ROOT = Path(__file__).resolve().parents[1]


def test_every_subcommand_has_help() -> None:
    parser = run.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "profile" in sub.choices
    for name, subparser in sub.choices.items():
        text = subparser.format_help()
        assert subparser.description, f"{name} has no description"
        assert "usage:" in text


def test_top_level_help_lists_subcommands() -> None:
    result = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "profile" in result.stdout


def test_cpus_per_worker_sizes_the_loader_processes() -> None:
    from pipeline.config import loader_workers

    for command in ("train", "tune"):
        args = run.build_parser().parse_args([command, "--preset", "cityscapes", "--data", "shards",
                                              "--cpus-per-worker", "8"])
        cfg = run._config_from_args(args)
        assert cfg.train.cpus_per_worker == 8 and cfg.data.loader_workers == -1
        assert loader_workers(cfg).data.loader_workers == 7
