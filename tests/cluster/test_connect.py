"""pipeline.cluster.connect_ray without a cluster: which token it would send, and that no
address always means a fresh local cluster. (Joining a token-authenticated cluster, and
failing to: test_multinode.py.)

Ray runs in subprocesses only (the pytest process may hold tests/pipeline's local cluster).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.cluster import auth_token

CONNECT = ("import sys\nfrom pipeline.cluster import connect_ray\n"
           "try:\n    connect_ray(sys.argv[1] if len(sys.argv) > 1 else None)\n"
           "except ConnectionError as exc:\n    print('ConnectionError:', exc)\n    sys.exit(3)\n"
           "import ray\nprint('connected to', ray.get_runtime_context().gcs_address)\n")


def test_the_token_comes_from_ray_auth_token_then_its_path_then_home(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_token() == ("home-token", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "token").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_token() == ("path-token", str(tmp_path / "token"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", " env-token ")
    assert auth_token() == ("env-token", "$RAY_AUTH_TOKEN")


@pytest.mark.slow  # starts a local Ray cluster in a subprocess
def test_no_address_starts_a_fresh_local_cluster_despite_a_stale_cluster_file(tmp_path: Path) -> None:
    """Every stopped `ray start` leaves its address in <Ray temp>/ray_current_cluster; plain
    ray.init() followed it to the dead GCS and hung for minutes."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dfdam-stale-", dir="/tmp"))  # short: Unix socket paths
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # nothing listens on port 9
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # RAY_TMPDIR: Ray's temp folder; HOME: where a local ray.init() writes its token.
        env |= {"RAY_TMPDIR": str(ray_tmp), "HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", CONNECT], cwd=Path(__file__).resolve().parents[2], env=env,
                              capture_output=True, text=True, timeout=240)
        took = time.monotonic() - started
        print(f"connect_ray(None) beside a stale ray_current_cluster: {took:.1f} s")
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        assert "connected to" in done.stdout and "127.0.0.1:9" not in done.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
