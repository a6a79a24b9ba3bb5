"""`workbench watch`: a trainer writes checkpoints while the watcher runs and readers query; half
written and corrupt checkpoints, SIGTERM, kill -9 and a second watcher.

No test here assumes that something happened after a fixed time: each waits (with a generous
bound) for a state it can see: the lock file naming the watcher's pid, a row, or a number of
scans, which the watcher logs one line each at DEBUG (`Watching` reads its log as it comes)."""

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from workbench.cli import cli
from workbench.watch import Watcher, discover, read_config, weights_incomplete

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


STARTED = 300  # seconds: bound on a process starting up (imports) on a loaded machine
WORKED = 900  # seconds: bound on waits that include loading models and computing runs


def wait_for(
    what: str,
    condition: Callable[[], object],
    *,
    timeout: float = STARTED,
    proc: subprocess.Popen | None = None,
    log: Callable[[], str] = str,
) -> object:
    """`condition()` once it is true; fails after `timeout` seconds, or as soon as `proc`
    (the process expected to bring the state about) has exited, showing the end of `log()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"waiting for {what}: the process exited ({proc.returncode})\n{log()[-3000:]}"
            )
        time.sleep(0.1)
    raise AssertionError(f"waiting for {what}: not within {timeout} s\n{log()[-3000:]}")


class Watching:
    """`workbench watch` in a process of its own, logging at DEBUG (one line per scan), its
    log read line by line as it comes so that a test can wait for scans."""

    def __init__(self, root: Path, config: Path, *extra: str):
        cmd = [sys.executable, "-m", "workbench", "watch", str(root), "--config", str(config)]
        self.proc = subprocess.Popen(
            [*cmd, *extra],
            env={**ENV, "WORKBENCH_LOG": "DEBUG"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(list(self.lines))

    def scans(self) -> int:
        return sum("workbench.watch: scan of " in line for line in list(self.lines))

    def wait_for(self, what: str, condition: Callable[[], object], timeout: float) -> object:
        """`wait_for` while this watcher runs; a failure shows the end of its log."""
        return wait_for(what, condition, timeout=timeout, proc=self.proc, log=self.log)

    def wait_for_scans(self, n: int, timeout: float = WORKED) -> None:
        self.wait_for(f"{n} scans", lambda: self.scans() >= n, timeout)

    def stop(self) -> str:
        """SIGTERM; the exit status is checked by the caller; returns the whole log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=WORKED)  # the run in progress finishes first
        self._reader.join(timeout=STARTED)
        return self.log()


def lock_holder(db: Path) -> int | None:
    """The pid the watcher lock file beside `db` names (None: no holder written yet)."""
    try:
        return json.loads(Path(f"{db}.watch.lock").read_text() or "{}").get("pid")
    except (OSError, ValueError):  # not there yet, or being written
        return None


def _rows(db: Path, sql: str) -> list[tuple]:
    deadline = time.monotonic() + STARTED
    while time.monotonic() < deadline:  # the watcher may hold the write lock for a moment
        try:
            con = duckdb.connect(str(db), read_only=True)
        except duckdb.IOException:
            time.sleep(0.1)
            continue
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    raise AssertionError(f"{db} stayed locked (or absent) for {STARTED} s")


def _count(db: Path, sql: str) -> int:
    """A count from the database, 0 while it does not exist yet."""
    return int(_rows(db, sql)[0][0]) if db.exists() else 0


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
        "[catalogue]\nsequences = 0": "[catalogue]: field 'sequences' must be 1 or more",
        "[catalogue]\nlenght = 4": "[catalogue]: unknown field 'lenght'",
        "[catalogue]\nseed = 'x'": "[catalogue]: field 'seed' must be an integer",
        "[catalogue]\nseed = -1": "[catalogue]: field 'seed' must be between 0 and 2**63 - 1",
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

    watcher = Watching(runs, config, "--every", "0.5")
    trainer = subprocess.Popen(
        [sys.executable, "-m", "workbench", "zoo", "train", "induction", "--out",
         str(runs / "train"), "--steps", "60", "--save-every", "20", "--seed", "3"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        pid = watcher.proc.pid
        watcher.wait_for(
            "the lock file naming the watcher", lambda: lock_holder(db) == pid, STARTED
        )
        second = subprocess.run(
            [sys.executable, "-m", "workbench", "watch", str(runs), "--config", str(config)],
            env=ENV, capture_output=True, text=True, timeout=STARTED,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another watcher is running on this database (pid {pid} on" in second.stderr

        queries = failures = 0
        deadline = time.monotonic() + WORKED
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
        else:
            raise AssertionError(f"5 checkpoints not seen in {WORKED} s\n{watcher.log()[-3000:]}")
        assert trainer.wait(timeout=STARTED) == 0
        assert failures == 0 and queries > 3  # readers were never locked out

        # the half-written checkpoint becomes whole: picked up by the next scan
        (half / "model.safetensors").write_bytes(whole)
        _settled(half)
        watcher.wait_for(
            "the whole checkpoint's row",
            lambda: _count(db, "SELECT count(*) FROM watched_checkpoints") >= 6,
            WORKED,
        )
        failed_sql = "SELECT count(*), max(started_at) FROM runs WHERE status = 'failed'"
        seen_sql = "SELECT seen_at FROM watched_checkpoints WHERE path LIKE '%corrupt%'"
        failed_before, seen_before = _rows(db, failed_sql)[0], _rows(db, seen_sql)
        watcher.wait_for_scans(watcher.scans() + 3)  # more scans: the corrupt one is not retried
        assert _rows(db, failed_sql)[0] == failed_before and _rows(db, seen_sql) == seen_before
    finally:
        trainer.kill()
        log = watcher.stop()
    assert watcher.proc.returncode == 0, log[-2000:]

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
        env=ENV, capture_output=True, text=True, timeout=WORKED,
    )  # fmt: skip
    assert again.returncode == 1  # it fails again
    assert _rows(db, "SELECT count(*) FROM runs WHERE status = 'failed'")[0][0] == failed_before[0]


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


def test_watch_stores_each_checkpoints_catalogue_once(tmp_path, induction_dir, capsys):
    """A `[catalogue]` table makes the watcher store each new checkpoint's head catalogue, as
    `workbench run catalogue` does (the same ids); one stored already is not computed again. A
    catalogue the checkpoint cannot take fails that checkpoint with the reason, exit 1."""
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    for step_dir in sorted(induction_dir.glob("step_*"))[:2]:
        shutil.copytree(step_dir, runs / "r" / step_dir.name)
    first = sorted((runs / "r").iterdir())[0]
    argv = ["run", "catalogue", "--model", str(first), "--sequences", "4", "--db", str(db)]
    assert cli(argv) == 0
    stored = _rows(db, "SELECT catalogue_id, created_at FROM catalogues")
    config = tmp_path / "watch.toml"
    config.write_text(f'db = "{db}"\nsettle_seconds = 0\n[catalogue]\nsequences = 4\n')
    assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 0
    assert _count(db, "SELECT count(*) FROM catalogues") == 2
    assert set(stored) <= set(_rows(db, "SELECT catalogue_id, created_at FROM catalogues"))
    assert _count(db, "SELECT count(*) FROM watched_checkpoints WHERE status = 'done'") == 2
    assert _count(db, "SELECT count(*) FROM runs") == 0  # a catalogue is not a run

    other = tmp_path / "other.duckdb"
    config.write_text(f'db = "{other}"\nsettle_seconds = 0\n[catalogue]\nlength = 1000\n')
    assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 1
    errors = _rows(other, "SELECT DISTINCT status, error FROM watched_checkpoints")
    assert len(errors) == 1 and errors[0][0] == "failed"
    assert errors[0][1].startswith("catalogue: --length 1000: ") and "n_ctx" in errors[0][1]
    assert _count(other, "SELECT count(*) FROM catalogues") == 0


def test_an_unexpected_catalogue_error_fails_the_checkpoint_but_keeps_its_runs(
    tmp_path, induction_dir, monkeypatch
):
    """Beside jobs, a catalogue that raises what nobody anticipated is that checkpoint's
    failure, with the reason; the jobs' runs are stored as done."""
    from workbench.catalogue import run as catalogue_run

    def broken(*args, **kwargs):
        raise RuntimeError("out of luck")

    monkeypatch.setattr(catalogue_run, "store_catalogue", broken)
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    step_dir = sorted(induction_dir.glob("step_*"))[-1]
    shutil.copytree(step_dir, runs / "r" / step_dir.name)
    config = tmp_path / "watch.toml"
    config.write_text(
        f'db = "{db}"\nsettle_seconds = 0\n[catalogue]\nsequences = 2\n'
        '[[job]]\npipeline = "heads"\ntask = "induction"\nmethods = ["dla"]\n'
    )
    assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 1
    assert _rows(db, "SELECT method, status FROM runs") == [("dla", "done")]
    ((status, error),) = _rows(db, "SELECT status, error FROM watched_checkpoints")
    assert status == "failed"
    assert error == "catalogue: RuntimeError while computing it (out of luck)"


def test_killed_watcher_leaves_nothing_half_written_and_a_restart_completes(
    tmp_path, induction_dir
):
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    for step_dir in sorted(induction_dir.glob("step_*"))[:4]:
        shutil.copytree(step_dir, runs / "r" / step_dir.name)
    config = _config(tmp_path, db, settle=0)
    watcher = Watching(runs, config, "--every", "60")
    watcher.wait_for(
        "two stored runs", lambda: _count(db, "SELECT count(*) FROM runs") >= 2, WORKED
    )
    watcher.proc.kill()  # -9: no handler runs
    watcher.stop()
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


def _header(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _with_header(header: object, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _string_offsets(data: bytes) -> bytes:
    header, body = _header(data)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [str(o) for o in header[name]["data_offsets"]]
    return _with_header(header, body)


BROKEN: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    # name: (the file broken, its new bytes from the good weights)
    "header-list": ("model.safetensors", lambda w: _with_header([], _header(w)[1])),
    "header-numbers": ("model.safetensors", lambda w: _with_header({"x": 1}, _header(w)[1])),
    "offsets-strings": ("model.safetensors", _string_offsets),
    "header-length-huge": ("model.safetensors", lambda w: b"\xff" * 8 + w[8:]),
    "trailing-bytes": ("model.safetensors", lambda w: w + b"\0" * 64),
    "meta-binary": ("meta.json", lambda w: b"\xff\xfe{}"),
    "config-binary": ("config.json", lambda w: b'{"n_layers": \xff}'),
}


def test_broken_checkpoints_fail_alone_and_are_not_retried(tmp_path, induction_dir):
    """Broken weights headers, and config/meta files that are not text, beside a good
    checkpoint (scanned last): `--once` exits 1, the good one's runs are stored, each broken
    one is one failed run per method and a failed record naming its file; a second `--once`
    retries none of them and exits 0."""
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    final = sorted(induction_dir.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    weights = (final / "model.safetensors").read_bytes()
    broken = {}
    for name, (file, breaks) in BROKEN.items():
        checkpoint = _copy_checkpoint(final, runs / name / "step_5", 5)
        (checkpoint / file).write_bytes(breaks(weights))
        broken[name] = checkpoint / file
    good = _copy_checkpoint(final, runs / "zz-good" / "step_5", 5)
    config = _config(tmp_path, db, settle=0)
    watch = [sys.executable, "-m", "workbench", "watch", str(runs), "--config", str(config)]

    first = subprocess.run(
        [*watch, "--once"], env=ENV, capture_output=True, text=True, timeout=WORKED
    )
    assert first.returncode == 1, first.stderr[-3000:]  # runs failed; the watcher did not crash
    assert "error:" not in first.stderr and "Traceback" not in first.stderr, first.stderr[-3000:]
    done = _rows(
        db,
        "SELECT c.path FROM runs r JOIN checkpoints c USING (checkpoint_id) "
        "WHERE r.status = 'done'",
    )
    assert done == [(str(good.resolve()),)] * METHODS_PER_CHECKPOINT
    records = {
        Path(path).parent.name: (status, error)
        for path, status, error in _rows(db, "SELECT path, status, error FROM watched_checkpoints")
    }
    assert records.pop("zz-good") == ("done", None)
    assert records.keys() == broken.keys()
    for name, path in broken.items():
        status, error = records[name]
        assert status == "failed" and error.startswith(f"{path}: "), (name, error)
        assert "\n" not in error
    failed = _rows(db, "SELECT error FROM runs WHERE status = 'failed' ORDER BY error")
    assert len(failed) == len(BROKEN) * METHODS_PER_CHECKPOINT
    assert {e for (e,) in failed} == {e for _, e in records.values()}

    everything = "SELECT * FROM runs ORDER BY run_id"
    before = _rows(db, everything), _rows(db, "SELECT * FROM watched_checkpoints ORDER BY path")
    again = subprocess.run(
        [*watch, "--once"], env=ENV, capture_output=True, text=True, timeout=WORKED
    )
    assert again.returncode == 0, again.stderr[-3000:]
    after = _rows(db, everything), _rows(db, "SELECT * FROM watched_checkpoints ORDER BY path")
    assert after == before


def test_an_unexpected_error_fails_that_checkpoint_alone(
    tmp_path, induction_dir, monkeypatch, caplog
):
    """Errors nobody anticipated (here injected: one while checking a checkpoint's weights, one
    while loading its task) fail that checkpoint alone, with its traceback in the debug log; the
    next checkpoint is processed. An interrupt still stops the watcher, recording nothing."""
    from workbench import tasks
    from workbench.models import zoo_format

    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    final = sorted(induction_dir.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    for name in ("a-check", "b-task", "c-good"):
        _copy_checkpoint(final, runs / name / "step_5", 5)
    check, load_task = zoo_format.check_safetensors, tasks.load_task

    def faulty_check(file: Path):
        if "a-check" in str(file):
            raise ZeroDivisionError("injected while checking")
        return check(file)

    def faulty_task(name, model, **kwargs):
        if "b-task" in model.checkpoint.path:
            raise RuntimeError("injected while loading the task")
        return load_task(name, model, **kwargs)

    monkeypatch.setattr(zoo_format, "check_safetensors", faulty_check)
    monkeypatch.setattr(tasks, "load_task", faulty_task)
    config = _config(tmp_path, db, settle=0)
    with caplog.at_level(logging.DEBUG, logger="workbench.watch"):
        assert cli(["watch", str(runs), "--config", str(config), "--once"]) == 1
    errors = dict(
        (Path(p).parent.name, (s, e))
        for p, s, e in _rows(db, "SELECT path, status, error FROM watched_checkpoints")
    )
    assert errors["a-check"] == (
        "failed",
        f"{runs / 'a-check' / 'step_5'}: ZeroDivisionError while processing this checkpoint "
        "(injected while checking)",
    )
    assert errors["b-task"][0] == "failed"
    assert (
        "RuntimeError while processing this checkpoint (injected while loading the task)"
        in (errors["b-task"][1])
    )
    assert errors["c-good"] == ("done", None)
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno == logging.DEBUG]
    assert {type(r.exc_info[1]).__name__ for r in tracebacks} == {
        "ZeroDivisionError",
        "RuntimeError",
    }

    def interrupted(name, model, **kwargs):
        raise KeyboardInterrupt

    _copy_checkpoint(final, runs / "d-new" / "step_5", 5)
    monkeypatch.setattr(tasks, "load_task", interrupted)
    watcher = Watcher(runs, read_config(config))
    with pytest.raises(KeyboardInterrupt):
        watcher.scan()
    assert "d-new" not in str(_rows(db, "SELECT path FROM watched_checkpoints"))
    assert _rows(db, "SELECT count(*) FROM run_queue")[0][0] == 0


HOLD = """
import pathlib, sys, time
import duckdb

con = duckdb.connect(sys.argv[1], read_only=True)
print("held", flush=True)
release = pathlib.Path(sys.argv[2])
while release.exists():
    time.sleep(0.05)
"""


def test_a_busy_database_stops_the_scan_and_the_next_scan_records_it(
    tmp_path, induction_dir, monkeypatch, caplog
):
    """Another process holds the database (a long console query) while the watcher would write:
    it waits `lock_wait` seconds, records nothing, says so, and does not crash; the next scan,
    the database free again, records the checkpoint. Here the checkpoint is corrupt (its
    failure is recorded without loading a model) and the reader takes the database just after
    the watcher has read what it has seen before."""
    db = tmp_path / "w.duckdb"
    runs = tmp_path / "runs"
    final = sorted(induction_dir.glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    checkpoint = _copy_checkpoint(final, runs / "r" / "step_5", 5)
    (checkpoint / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    watcher = Watcher(runs, read_config(_config(tmp_path, db, settle=0)), lock_wait=0.5)
    release = tmp_path / "release"
    holders: list[subprocess.Popen[str]] = []
    known = Watcher.known

    def known_then_held(self: Watcher) -> dict:
        seen = known(self)
        if not holders:
            release.touch()
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD, str(db), str(release)],
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(holder)
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        return seen

    monkeypatch.setattr(Watcher, "known", known_then_held)
    try:
        with caplog.at_level(logging.WARNING, logger="workbench.watch"):
            report = watcher.scan()
        assert report.processed == 0
        assert any("trying again on the next scan" in r.getMessage() for r in caplog.records)
    finally:
        release.unlink(missing_ok=True)
        for holder in holders:
            holder.wait(timeout=STARTED)
    assert _rows(db, "SELECT count(*) FROM watched_checkpoints") == [(0,)]
    assert _rows(db, "SELECT count(*) FROM runs") == [(0,)]

    report = watcher.scan()
    assert report.processed == 1 and report.failed == 1
    assert _rows(db, "SELECT status FROM watched_checkpoints") == [("failed",)]
    assert _rows(db, "SELECT count(*) FROM runs WHERE status = 'failed'") == [
        (METHODS_PER_CHECKPOINT,)
    ]
