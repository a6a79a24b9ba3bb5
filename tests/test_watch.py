"""`workbench watch`: a trainer writes checkpoints while the watcher runs and readers query; half
written and corrupt checkpoints, SIGTERM, kill -9 and a second watcher."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from workbench.cli import cli
from workbench.watch import discover, weights_incomplete

CONFIG = """
db = "{db}"
settle_seconds = {settle}

[[job]]
pipeline = "heads"
task = "induction"
methods = ["dla", "act_patch_denoise"]
n_prompts = 8

[[job]]
pipeline = "edges"
task = "induction"
methods = ["eap"]
n_prompts = 8
"""
METHODS_PER_CHECKPOINT = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WORKBENCH_LOG": "INFO", "TQDM_DISABLE": "1"}


def _config(tmp_path: Path, db: Path, settle: float = 0.5) -> Path:
    path = tmp_path / "watch.toml"
    path.write_text(CONFIG.format(db=db, settle=settle))
    return path


def _watch(root: Path, config: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "workbench", "watch", str(root), "--config", str(config)]
    return subprocess.Popen(
        [*cmd, *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _rows(db: Path, sql: str) -> list[tuple]:
    for _ in range(100):  # the watcher may hold the write lock for a moment
        try:
            con = duckdb.connect(str(db), read_only=True)
        except duckdb.IOException:
            time.sleep(0.1)
            continue
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    raise AssertionError("the database stayed locked")


def _settled(path: Path) -> None:
    """Make every file of a directory look written a minute ago."""
    old = time.time() - 60
    for f in path.iterdir():
        os.utime(f, (old, old))


def _copy_checkpoint(src: Path, dst: Path, step: int) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps(meta | {"step": step}))
    return dst


def test_config_errors_name_the_file_and_the_job(tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    cases = {
        "db = 'x.duckdb'": "no [[job]] tables",
        "pipeline = 'heads'": "unknown field 'pipeline'",
        "[[job]]\npipeline = 'nope'\ntask = 'induction'": "job[0]: unknown pipeline 'nope'",
        "[[job]]\npipeline = 'heads'": "job[0]: field 'task' is missing",
        "[[job]]\npipeline = 'edges'\ntask = 'induction'\nmethods = ['eap']\nig_steps = 3": (
            "job[0]: --ig-steps applies to eap_ig, not to eap"
        ),
        "[[job]]\npipeline = 'heads'\ntask = 'induction'\nmethods = ['nope']": (
            "job[0]: --method nope: not a heads method"
        ),
        "[[job]\n": "not valid TOML",
    }
    for text, message in cases.items():
        config = tmp_path / "bad.toml"
        config.write_text(text)
        capsys.readouterr()
        assert cli(["watch", str(root), "--config", str(config), "--once"]) == 2
        err = capsys.readouterr().err
        assert message in err and str(config) in err, (text, err)


def test_discovery_and_completeness(tmp_path, induction_dir):
    """Zoo step dirs, Trainer checkpoint dirs and plain directories at any depth; a truncated
    safetensors is not complete, a whole one is."""
    final = sorted(induction_dir.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    runs = tmp_path / "runs"
    _copy_checkpoint(final, runs / "a" / "step_10", 10)
    _copy_checkpoint(final, runs / "deep" / "er" / "b" / "checkpoint-20", 20)
    _copy_checkpoint(final, runs / "plain", 0)
    (runs / ".hidden" / "step_1").mkdir(parents=True)
    found = {(c.path.relative_to(runs).as_posix(), c.step) for c in discover(runs)}
    assert found == {("a/step_10", 10), ("deep/er/b/checkpoint-20", 20), ("plain", None)}
    weights = runs / "plain" / "model.safetensors"
    assert weights_incomplete(runs / "plain") is None
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "bytes of" in (weights_incomplete(runs / "plain") or "")
    weights.write_bytes(data[:4])
    assert weights_incomplete(runs / "plain") == "model.safetensors has no header yet"


def test_watcher_follows_a_trainer_while_readers_query(tmp_path, induction_dir):
    """A trainer writes checkpoints while the watcher runs and `workbench sql` queries in a
    loop: every query answers, every checkpoint's runs are stored, a half-written checkpoint is
    skipped until whole, a corrupt one is one failed run per method and is not retried, a second
    watcher is refused, and SIGTERM stops the watcher cleanly."""
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    config = _config(tmp_path, db)
    final = sorted(induction_dir.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    # a half-written checkpoint (settled, but its weights shorter than their header says)
    half = _copy_checkpoint(final, runs / "half" / "step_7", 7)
    whole = (half / "model.safetensors").read_bytes()
    (half / "model.safetensors").write_bytes(whole[: len(whole) // 3])
    _settled(half)
    # a corrupt one: whole weights, a config.json that is not JSON
    corrupt = _copy_checkpoint(final, runs / "corrupt" / "step_3", 3)
    (corrupt / "config.json").write_text("{oops")
    _settled(corrupt)

    watcher = _watch(runs, config, "--every", "0.5")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "workbench", "zoo", "train", "induction", "--out",
         str(runs / "train"), "--steps", "60", "--save-every", "20", "--seed", "3"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        second = subprocess.run(
            [sys.executable, "-m", "workbench", "watch", str(runs), "--config", str(config)],
            env=ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2
        assert "another watcher is running on this database (pid" in second.stderr

        queries = failures = 0
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-m", "workbench", "sql",
                 "SELECT count(*) AS n FROM watched_checkpoints", "--db", str(db), "--format",
                 "json"],
                env=ENV, capture_output=True, text=True,
            )  # fmt: skip
            queries += 1
            if out.returncode != 0:
                failures += 1
                print(out.stderr)
                continue
            seen = json.loads(out.stdout)[0]["n"]
            if trainer.poll() is not None and seen >= 5:  # 4 trained + the corrupt one
                break
            time.sleep(0.2)
        assert trainer.wait(timeout=60) == 0
        assert failures == 0 and queries > 3  # readers were never locked out

        # the half-written checkpoint becomes whole: picked up by the next scan
        (half / "model.safetensors").write_bytes(whole)
        _settled(half)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if _rows(db, "SELECT count(*) FROM watched_checkpoints")[0][0] >= 6:
                break
            time.sleep(0.5)
        failed_before = _rows(db, "SELECT count(*) FROM runs WHERE status = 'failed'")[0][0]
        time.sleep(2.0)  # more scans: the corrupt checkpoint is not retried
        assert _rows(db, "SELECT count(*) FROM runs WHERE status = 'failed'")[0][0] == failed_before
    finally:
        trainer.kill()
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=120)
    assert watcher.returncode == 0, err[-2000:]

    trained = sorted((runs / "train" / "induction").glob("step_*"))
    assert len(trained) == 4  # steps 0, 20, 40, 60
    done = _rows(
        db,
        "SELECT c.path, count(*) FROM runs r JOIN checkpoints c USING (checkpoint_id) "
        "WHERE r.status = 'done' GROUP BY 1",
    )
    stored = {Path(p).name for p, n in done if n == METHODS_PER_CHECKPOINT}
    assert stored >= {p.name for p in trained} | {"step_7"}
    failed = _rows(db, "SELECT method, error FROM runs WHERE status = 'failed'")
    assert len(failed) == METHODS_PER_CHECKPOINT
    assert all("config.json" in error for _, error in failed)
    assert _rows(db, "SELECT status FROM watched_checkpoints WHERE path LIKE '%corrupt%'") == [
        ("failed",)
    ]
    assert _rows(db, "SELECT count(*) FROM run_queue")[0][0] == 0
    # the corrupt checkpoint is retried only when asked
    again = subprocess.run(
        [sys.executable, "-m", "workbench", "watch", str(runs), "--config", str(config),
         "--once", "--retry-failed"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 1  # it fails again
    assert _rows(db, "SELECT count(*) FROM runs WHERE status = 'failed'")[0][0] == failed_before


def test_rescan_of_processed_checkpoints_loads_nothing(tmp_path, induction_dir, monkeypatch):
    """Idempotent: a second `--once` stats files and reads one table; it loads no model."""
    from workbench.models import sources

    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    for step_dir in sorted(induction_dir.glob("step_*"))[:2]:
        shutil.copytree(step_dir, runs / "r" / step_dir.name)
    config = _config(tmp_path, db, settle=0)
    assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 0
    before = _rows(db, "SELECT count(*) FROM runs")[0][0]
    assert before == 2 * METHODS_PER_CHECKPOINT

    def no_loading(*args, **kwargs):
        raise AssertionError("a processed checkpoint was loaded again")

    monkeypatch.setattr(sources, "load_checkpoint", no_loading)
    assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 0
    assert _rows(db, "SELECT count(*) FROM runs")[0][0] == before


def test_killed_watcher_leaves_nothing_half_written_and_a_restart_completes(
    tmp_path, induction_dir
):
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    for step_dir in sorted(induction_dir.glob("step_*"))[:4]:
        shutil.copytree(step_dir, runs / "r" / step_dir.name)
    config = _config(tmp_path, db, settle=0)
    watcher = _watch(runs, config, "--every", "60")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if db.exists() and _rows(db, "SELECT count(*) FROM runs")[0][0] >= 2:
            break
        time.sleep(0.1)
    watcher.kill()  # -9: no handler runs
    watcher.wait()
    orphans = _rows(
        db,
        "SELECT (SELECT count(*) FROM node_scores WHERE run_id NOT IN (SELECT run_id FROM runs))"
        " + (SELECT count(*) FROM edges WHERE run_id NOT IN (SELECT run_id FROM runs))",
    )[0][0]
    assert orphans == 0
    assert _rows(db, "SELECT count(*) FROM runs WHERE status <> 'done'")[0][0] == 0
    # the dead watcher's queue rows are swept, its lock is free, and the restart completes
    assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 0
    assert _rows(db, "SELECT count(*) FROM runs")[0][0] == 4 * METHODS_PER_CHECKPOINT
    assert _rows(db, "SELECT count(*) FROM run_queue")[0][0] == 0
