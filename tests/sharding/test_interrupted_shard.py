"""`run.py shard` killed mid-shard, and two runs on one --out: a re-run finishes with the very
bytes of an uninterrupted run and leaves no temporary file; a second run is refused while the
first holds the folder's lock (sharding/write.py output_lock)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run
from sharding.samples import DatasetError
from sharding.synthetic import make_cityscapes
from sharding.write import LOCK_FILE, OutputLockedError, output_lock, shard_split

REPO = Path(__file__).resolve().parents[2]
SHARD_SIZE = 2  # 6 train images: 3 shards


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _shard_argv(root: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "run.py", "shard", "--dataset", "cityscapes", "--root", str(root), "--out", str(out),
            "--split", "train", "--shard-size", str(SHARD_SIZE), "--workers", str(workers), "--no-progress"]


def _children(pid: int) -> list[int]:
    """The pack workers ``pid`` spawned (multiprocessing's spawn_main), by /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _temporaries(out: Path, shard: str) -> list[Path]:
    return list(out.glob(f".{shard}.*.tmp"))


def _partial(out: Path, shard: str) -> list[Path]:
    """Temporary files of ``shard`` that already hold bytes (atomic.py names them .<name>.<pid>.tmp)."""
    found = []
    for path in _temporaries(out, shard):
        try:
            if path.stat().st_size > 0:
                found.append(path)
        except FileNotFoundError:
            pass
    return found


def _waiting_on_fifo(pid: int) -> bool:
    """Whether ``pid`` is blocked opening a FIFO that has no writer."""
    try:
        return Path(f"/proc/{pid}/wchan").read_text().strip() == "wait_for_partner"
    except OSError:
        return False


@pytest.mark.slow  # `run.py shard` in subprocesses, one of them killed
def test_a_run_killed_mid_shard_resumes_to_the_bytes_of_an_uninterrupted_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run is caught mid-shard without a timing guess: once packing has begun (after the
    samples were listed), the image of the last sample of the last shard is swapped for a FIFO,
    so the worker packing that shard blocks opening it, its shard half-written, until killed."""
    root, reference, out = tmp_path / "cityscapes", tmp_path / "reference", tmp_path / "out"
    make_cityscapes(root, seed=3, train=6, val=1, test=1, height=128, width=256)
    shard_split("cityscapes", root, "train", reference, shard_size=SHARD_SIZE, workers=1, show_progress=False)
    last = sorted((root / "leftImg8bit" / "train").glob("*/*.png"))[-1]  # the second sample of train-000002.tar
    aside, fifo = tmp_path / "last-image.png", tmp_path / "fifo"
    os.link(last, aside)  # the same file (inode, size, mtime) to put back
    os.mkfifo(fifo)

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(["nice", "-n", "10", *_shard_argv(root, out, workers=2)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while not (out.is_dir() and list(out.glob(".train-*.tar.*.tmp"))):  # packing has begun
            assert proc.poll() is None, f"run.py shard ended before packing:\n{(tmp_path / 'killed.log').read_text()}"
            assert time.monotonic() < deadline, "packing did not begin within 600 s"
            time.sleep(0.001)
        os.replace(fifo, last)
        workers = _children(proc.pid)
        assert len(workers) == 2, f"expected 2 pack worker processes, found {workers}"
        while not (_partial(out, "train-000002.tar") and any(_waiting_on_fifo(pid) for pid in workers)
                   and (out / "train-000000.index.json").exists() and (out / "train-000001.index.json").exists()):
            assert proc.poll() is None, f"run.py shard ended, the FIFO unread:\n{(tmp_path / 'killed.log').read_text()}"
            assert time.monotonic() < deadline, "no worker blocked on the last shard within 600 s"
            time.sleep(0.01)
        half_written = _partial(out, "train-000002.tar")
        before = _digests(out)

        # A second run on the same folder (here, in the test's process) while the first holds it:
        # refused at once, in one line naming the holder, nothing touched.
        capsys.readouterr()
        assert run.main(_shard_argv(root, out, workers=1)[2:]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is being written by another `run.py shard` (pid {proc.pid} on " in err[0], err
        assert _digests(out) == before

        os.kill(proc.pid, signal.SIGKILL)  # run.py shard itself; its workers die with it (PR_SET_PDEATHSIG)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers), "a pack worker outlived the killed run"
        with pytest.raises(OSError, match="No such device"):  # nobody is left reading the FIFO
            os.close(os.open(last, os.O_WRONLY | os.O_NONBLOCK))
    finally:
        log.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        os.replace(aside, last)

    assert all(p.exists() for p in half_written)  # what the kill left: a half-written shard, no manifest
    assert not (out / "train.manifest.parquet").exists() and (out / LOCK_FILE).exists()

    assert run.main(_shard_argv(root, out, workers=1)[2:]) == 0  # the re-run
    printed = capsys.readouterr().out
    train_row = next(line.split() for line in printed.splitlines() if line.startswith("train "))
    assert train_row[:4] == ["train", "6", "3", "2"]  # the two finished shards re-used, the third written
    assert _digests(out) == _digests(reference)  # every shard, index and the manifest, byte for byte
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file, no lock

    assert run.main(["shard", "verify", "--out", str(out), "--no-progress"]) == 0
    assert "train: 6 samples in 3 shards verified: ok" in capsys.readouterr().out


def test_a_folder_another_run_holds_is_refused_naming_the_holder(cityscapes_root: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with output_lock(out) as lock:
        assert lock == out / LOCK_FILE and f"pid {os.getpid()} on " in lock.read_text()
        with pytest.raises(OutputLockedError, match=f"^{out} is being written by another `run.py shard` "
                                                    f"\\(pid {os.getpid()} on .*\\); wait for it to finish"):
            shard_split("cityscapes", cityscapes_root, "train", out, show_progress=False)
        argv = ["shard", "--dataset", "cityscapes", "--root", str(cityscapes_root), "--out", str(out), "--no-progress"]
        assert run.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"run.py shard: error: {out} is being written by another"), err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written meanwhile
    assert not out.exists()  # made for the lock, empty, and removed with it


def test_a_lock_file_left_by_a_killed_run_does_not_block_a_rerun(cityscapes_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("pid 4194303 on elsewhere, started long ago\n")  # a file, no holder
    report = shard_split("cityscapes", cityscapes_root, "train", out, shard_size=4, show_progress=False)
    assert report.samples == 6 and not (out / LOCK_FILE).exists()


def test_a_refused_dataset_leaves_no_output_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="is not a folder"):
        shard_split("cityscapes", tmp_path / "missing", "train", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()
