"""benchmarks/gpu_check.sh, the GPU path's proof, in its CPU-sized form so that it cannot rot.

The same script runs on a GPU machine at the real size (see its header); here ``--cpu-smoke``
runs every check at tiny sizes: stage 1 (training step, throughput rows beside torchvision's
DeepLabV3, checkpoint restored through ``setup_training``) and stage 2 (``run.py train`` on a
private local Ray cluster, SIGKILL after epoch 1, ``--resume``, ``run.py evaluate``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two local Ray clusters, two pipeline runs in subprocesses

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = [
    (1, "environment"),
    (1, "synthetic Cityscapes -> shards"),
    (1, "train DF-DAM-R18"),
    (1, "train DF-DAM-R18, lz4 shards"),
    (1, "train DF-DAM-R18, VOC JPEG"),
    (1, "train DF-DAM-R101"),
    (1, "train DeepLabV3-R50 torchvision"),
    (1, "resume onto cpu (setup_training)"),
    (2, "run.py train --cpu (2 epochs), SIGKILL after epoch 1"),
    (2, "run.py train --resume --cpu"),
    (2, "run.py evaluate (run folder)"),
]


def test_gpu_check_cpu_smoke(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "OUT")}
    env |= {"PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
            "GPU_CHECK_SITE": str(tmp_path / "site")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]

    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert [(r["stage"], r["check"].split(" (")[0] if r["check"].startswith("train ") else r["check"])
            for r in rows] == EXPECTED, table
    assert all(r["result"] == "OK" for r in rows), table
    assert table in done.stdout  # the one table is what the script prints last
    by_check = {r["check"]: r["figures"] for r in rows}
    assert "momentum equal to the saved" in by_check["resume onto cpu (setup_training)"]
    assert "trained epoch 2 only" in by_check["run.py train --resume --cpu"]
    assert "mIoU" in by_check["run.py evaluate (run folder)"]
    assert "DF-DAM / DLv3" in next(f for c, f in by_check.items() if c.startswith("train DeepLabV3"))
    # Nothing was installed from carried wheels: this interpreter has every package already.
    assert "carried wheels" not in output and not (tmp_path / "site").exists()
