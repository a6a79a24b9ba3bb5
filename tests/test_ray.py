"""The Ray executor against the local one, on a local Ray instance (`ray.init(num_cpus=2)`).

Stored numbers are compared at tolerance 0: a Ray worker computes with one thread (Ray sets
`OMP_NUM_THREADS` to the CPUs a task asks for), so the local runs compared with it use one
thread too; with the same kernels and thread count the float order is the same.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from tests.conftest import query
from tools.regression import compare
from workbench.jobs import Job, RunOptions, demo_jobs, plan_jobs
from workbench.models import resolve_checkpoints
from workbench.runner import run_jobs

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SITE = ROOT / "tests" / "plugin_site"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _local(jobs: list[Job], db: Path) -> list:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_jobs(jobs, db=str(db))
    finally:
        torch.set_num_threads(threads)


def test_ray_stores_exactly_what_the_local_executor_stores(tmp_path, local_ray, induction_dir):
    """Every method of the demo on the zoo's last two checkpoints (SAE training and feature
    circuits included): the same run keys, every stored number equal, the trained SAEs'
    weights byte for byte."""
    refs = resolve_checkpoints(str(induction_dir))[-2:]
    jobs = [
        j for j in demo_jobs(RunOptions(str(induction_dir), "induction")) if j.checkpoint in refs
    ]
    assert {j.method for j in jobs} >= {"eap", "acdc", "sae_features", "sae_attr"}
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    here = _local(jobs, tmp_path / "local" / "w.duckdb")
    there = run_jobs(jobs, db=str(tmp_path / "ray" / "w.duckdb"), executor="ray")
    assert sorted(o.status for o in there) == sorted(o.status for o in here)
    assert {o.status for o in there} == {"done"}
    assert compare(tmp_path / "local" / "w.duckdb", tmp_path / "ray" / "w.duckdb", 0.0) == []
    saes = sorted(p.name for p in (tmp_path / "local" / "saes").iterdir())
    assert saes and saes == sorted(p.name for p in (tmp_path / "ray" / "saes").iterdir())
    for name in saes:
        for f in (tmp_path / "local" / "saes" / name).iterdir():
            other = tmp_path / "ray" / "saes" / name / f.name
            if f.suffix == ".json":  # the same config (but where each was trained)
                mine, theirs = json.loads(f.read_text()), json.loads(other.read_text())
                mine.pop("output_path", None), theirs.pop("output_path", None)
                assert mine == theirs
            else:
                assert f.read_bytes() == other.read_bytes()
    assert query(tmp_path / "ray" / "w.duckdb", "SELECT * FROM run_queue") == []
    # a second time everything is stored already: skipped, nothing new
    again = run_jobs(jobs, db=str(tmp_path / "ray" / "w.duckdb"), executor="ray")
    assert {o.status for o in again} == {"skipped"}
    assert len(again) == len(there)


def _worker_computing(title: bytes) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "cmdline").read_bytes().startswith(title):
                return int(proc.name)
        except OSError:
            continue
    return None


def test_a_worker_killed_mid_job_is_retried(tmp_path, local_ray, induction_dir):
    """kill -9 of the worker process while it computes: Ray runs the job again on another
    worker, and the run is stored once, with the numbers an undisturbed run stores."""
    options = RunOptions(str(induction_dir), "induction", db=str(tmp_path / "ray.duckdb"))
    jobs = plan_jobs("edges", options, ["acdc"])
    title = f"ray::workbench acdc {jobs[0].checkpoint.checkpoint_id}".encode()
    outcomes: list = []
    runner = threading.Thread(
        target=lambda: outcomes.extend(run_jobs(jobs, db=options.db, executor="ray"))
    )
    runner.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and runner.is_alive() and time.monotonic() < deadline:
        killed = _worker_computing(title)
        time.sleep(0.05)
    assert killed is not None, "the job's worker was never seen computing"
    os.kill(killed, signal.SIGKILL)
    runner.join(timeout=300)
    assert not runner.is_alive()
    assert [o.status for o in outcomes] == ["done"]
    runs = query(tmp_path / "ray.duckdb", "SELECT run_key, status FROM runs")
    assert [r["status"] for r in runs] == ["done"]  # stored once
    _local(jobs, tmp_path / "local.duckdb")
    assert compare(tmp_path / "local.duckdb", tmp_path / "ray.duckdb", 0.0) == []


def test_cli_ray_executor_records_a_failing_job_and_the_others_go_on(tmp_path, induction_dir):
    """`workbench run toy --executor ray` (a new local Ray instance) with a method that raises:
    exit 1, the failed run stored with its error; then `workbench watch --once --executor ray`
    on the same database stores the config's jobs for every checkpoint; bad executor options
    are one sentence and exit 2."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PLUGIN_SITE), str(ROOT)]),
        "WORKBENCH_LOG": "WARNING",
        "TQDM_DISABLE": "1",
    }
    db = tmp_path / "w.duckdb"
    base = [sys.executable, "-m", "workbench"]
    model = ["--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    toy = [*base, "run", "toy", *model, "--executor", "ray"]
    failed = subprocess.run([*toy, "--scale", "-1"], capture_output=True, text=True, env=env)
    assert failed.returncode == 1, failed.stderr
    rows = query(db, "SELECT method, status, error FROM runs")
    assert [(r["method"], r["status"]) for r in rows] == [("resid_gap", "failed")]
    assert "ValueError: scale -1.0 is negative" in rows[0]["error"]

    config = tmp_path / "watch.toml"
    config.write_text('[[job]]\npipeline = "heads"\ntask = "induction"\nmethods = ["dla"]\n')
    watch = [*base, "watch", str(induction_dir), "--config", str(config), "--db", str(db)]
    done = subprocess.run(
        [*watch, "--once", "--executor", "ray"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    n_checkpoints = len(resolve_checkpoints(str(induction_dir)))
    stored = query(db, "SELECT count(*) AS n FROM runs WHERE method = 'dla' AND status = 'done'")
    assert stored[0]["n"] == n_checkpoints

    for argv, sentence in [
        ([*toy, "--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers"),
        ([*base, "run", "toy", *model, "--executor", "dask"], "--executor dask: choose"),
        ([*base, "run", "toy", *model, "--address", "h:1"], "--address applies to --executor"),
    ]:
        bad = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == 2 and sentence in bad.stderr, bad.stderr
    con = duckdb.connect(str(db), read_only=True)  # nothing stored was lost
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == n_checkpoints + 1
    params = json.loads(con.execute("SELECT params FROM runs WHERE method='dla'").fetchone()[0])
    con.close()
    assert "executor" not in params  # where a run computed is not part of what it is
