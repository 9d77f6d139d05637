"""README.md's commands, as written: every fenced ``bash`` block is tagged, just above it, with

    <!-- readme-test: run -->                  run by this test, in order, in one fresh folder
    <!-- readme-test: skip: <why> -->          not run here (a Ray cluster, a GPU, ...), and why

so that a README edit that breaks a command, or adds a block nobody classified, fails a test.

The run blocks execute with ``bash -euo pipefail`` in a temporary folder holding links to the
repository's tracked top-level entries and ``.venv`` (so ``.venv/bin/python run.py ...`` and
``benchmarks/...`` resolve as they do in a checkout) and nothing else: ``data/``, ``runs/``,
``mlflow.db`` and ``mlartifacts/`` are the commands' own. Blocks share the folder and a shell
variable set in one block (``PY``) is not seen by the next: each block must stand alone.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TAG = re.compile(r"^<!-- readme-test: (?P<kind>run|skip)(?::\s*(?P<why>.*?))?\s*-->$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)")
SHELL_LANGS = {"bash", "sh", "shell", "console"}
BLOCK_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    kind: str | None  # "run", "skip", or None (untagged)
    why: str | None

    @property
    def name(self) -> str:
        first = next((line for line in self.body.splitlines() if line.strip() and not line.startswith("#")), "")
        return f"README.md:{self.line} {first[:60]}"


def readme_blocks(text: str | None = None) -> list[Block]:
    """Every fenced code block of README.md, with the tag on the last non-blank line above it."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence = opening["fence"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence)), len(lines))
        above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        tag = TAG.match(above)
        blocks.append(Block(i + 1, opening["lang"], "\n".join(lines[i + 1:end]),
                            tag["kind"] if tag else None, tag["why"] if tag else None))
        i = end + 1
    return blocks


def shell_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in SHELL_LANGS]


def test_every_shell_block_is_tagged_run_or_skip_with_a_reason() -> None:
    blocks = shell_blocks()
    untagged = [b.name for b in blocks if b.kind is None]
    assert not untagged, ("README blocks without a `<!-- readme-test: run -->` or `<!-- readme-test: skip: why -->` "
                          f"line above them: {untagged}")
    assert not [b.name for b in blocks if b.kind == "skip" and not b.why], "a skipped block must say why"
    assert sum(b.kind == "run" for b in blocks) >= 2  # the command-line walk-through and the profile
    # Tags sit only above shell blocks (a tag above prose or a non-shell block is a mistake).
    tags = [line for line in README.read_text().splitlines() if line.startswith("<!-- readme-test")]
    assert len(tags) == len([b for b in blocks if b.kind]), "a readme-test tag that is not above a bash block"


def test_tags_are_read_from_the_line_above_the_fence() -> None:
    text = "x\n<!-- readme-test: skip: needs a GPU -->\n\n```bash\nnvidia-smi\n```\n```bash\nls\n```\n```\nlayout\n```\n"
    blocks = readme_blocks(text)
    assert [(b.lang, b.kind, b.why, b.body) for b in blocks] == [
        ("bash", "skip", "needs a GPU", "nvidia-smi"), ("bash", None, None, "ls"), ("", None, None, "layout")]


def _workspace(tmp_path: Path) -> Path:
    """A folder that looks like a checkout: links to the tracked top-level entries and .venv."""
    work = tmp_path / "checkout"
    work.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in sorted({p.split("/", 1)[0] for p in tracked.split("\0") if p}) + [".venv"]:
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    return work


def _profile_table(text: str) -> list[str]:
    """The lines of the `run.py profile` table (header to the MACs note)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model ") and "MACs" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("MACs ="))
    return [line.rstrip() for line in lines[start:end + 1]]


@pytest.mark.slow  # the README's pipeline: Ray Train and Ray Tune runs in subprocesses (a few minutes)
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    work = _workspace(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PY")}
    env.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # a loaded 2-core machine
    env["PYTHONUNBUFFERED"] = "1"
    outputs = []
    for block in [b for b in shell_blocks() if b.kind == "run"]:
        # Each command is echoed to the log with the seconds elapsed (PS4), and a failure names it.
        script = ("set -euo pipefail\nPS4='+ [${SECONDS} s] '\nset -x\n"
                  "trap 'echo \"readme-test: failed: $BASH_COMMAND\" >&2' ERR\n" + block.body + "\n")
        proc = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: a timeout ends all it started
        try:
            stdout, stderr = proc.communicate(timeout=BLOCK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"{block.name} still running after {BLOCK_TIMEOUT_S} s:\n{(stdout + stderr)[-5000:]}")
        output = stdout + stderr
        (tmp_path / f"block-{block.line}.log").write_text(output)
        assert proc.returncode == 0, f"{block.name} failed (exit {proc.returncode}):\n{output[-5000:]}"
        outputs.append((block, stdout))

    everything = "\n".join(out for _, out in outputs)
    # The walk-through: shards verified, a run trained and evaluated, a search that registers a champion.
    assert "verified: ok" in everything and "registered dfdam-synthetic version 1" in everything, everything[-3000:]
    assert everything.count("mIoU") >= 2
    # The profile table in the README is what the command prints (counts on the meta device: exact).
    readme = README.read_text()
    profile = next(out for block, out in outputs if "run.py profile --backbone resnet18" in block.body)
    table = _profile_table(profile)
    assert "\n".join(table) in "\n".join(line.rstrip() for line in readme.splitlines()), \
        "README's profile table differs from what the command prints:\n" + "\n".join(table)
