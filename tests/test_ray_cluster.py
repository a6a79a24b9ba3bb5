"""The cluster recipe of docs/scheduling.md: `ray start --head`, then `workbench run ...
--executor ray --address HOST:PORT` joins that cluster (its token authentication included) and
stores the same numbers as the local executor. In its own module: `ray stop` ends every Ray
process of this machine, so no other Ray instance may be running (test_ray's is shut down by
then)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools.regression import compare

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_joins_a_cluster_started_with_ray_start(tmp_path, induction_dir):
    port = _free_port()
    env = {**os.environ, "WORKBENCH_LOG": "WARNING", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_AUTH_MODE", None)
    head = [RAY, "start", "--head", "--port", str(port), "--num-cpus", "2"]
    head += ["--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    try:
        base = [sys.executable, "-m", "workbench", "run", "heads", "--model", str(induction_dir)]
        base += ["--task", "induction", "--method", "dla", "--method", "act_patch_denoise"]
        there = subprocess.run(
            [*base, "--db", str(tmp_path / "ray.duckdb"), "--executor", "ray", "--address",
             f"127.0.0.1:{port}"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert there.returncode == 0, there.stderr[-2000:]
    here = subprocess.run(
        [*base, "--db", str(tmp_path / "local.duckdb")], env=env, capture_output=True, timeout=600
    )
    assert here.returncode == 0
    assert compare(tmp_path / "local.duckdb", tmp_path / "ray.duckdb", 0.0) == []
