"""The DuckDB store: schema, transactions, run keys, failures and crashes."""

import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from workbench.errors import BadInput
from workbench.jobs import RunOptions
from workbench.rows import RunRow
from workbench.runner import run
from workbench.store import SCHEMA_VERSION, Store

TABLES = [
    "models",
    "checkpoints",
    "tasks",
    "prompts",
    "runs",
    "nodes",
    "node_scores",
    "edges",
    "circuits",
    "circuit_edges",
    "saes",
    "features",
    "feature_examples",
    "faithfulness_curves",
    "run_metrics",
]


def counts(db) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    finally:
        con.close()


def test_new_database_has_schema_v1(tmp_path):
    db = tmp_path / "w.duckdb"
    Store(db).close()
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    tables = {
        r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
    }
    con.close()
    assert set(TABLES) <= tables
    Store(db).close()  # opening again migrates nothing and keeps one version row
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
    con.close()


def test_version_1_database_migrates_forward_keeping_its_rows(tmp_path):
    db = tmp_path / "old.duckdb"
    con = _version_1_database(db)
    con.execute("INSERT INTO edges VALUES ('r1', 'a0.h0', 'logits', 0.5)")
    con.close()
    with Store(db) as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.query("SELECT count(*) AS n FROM edges")["n"][0].as_py() == 1
        assert store.query("SELECT count(*) AS n FROM faithfulness_curves")["n"][0].as_py() == 0
        assert store.query("SELECT count(*) AS n FROM run_metrics")["n"][0].as_py() == 0


def _version_1_database(path) -> duckdb.DuckDBPyConnection:
    """An open connection to a new database at schema v1, as the first release wrote it."""
    from workbench.store.schema import SCHEMA_V1

    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    for statement in SCHEMA_V1:
        con.execute(statement)
    con.execute("INSERT INTO schema_version VALUES (1, current_timestamp)")
    return con


def test_readers_never_migrate_an_old_database_they_report_it(tmp_path, capsys):
    """A reader (the app, `workbench sql`) finding an older schema says so and writes nothing;
    `workbench migrate` upgrades it, and then it reads."""
    from workbench.cli import cli
    from workbench.store.query import run_readonly_query

    db = tmp_path / "old.duckdb"
    con = _version_1_database(db)
    con.close()
    before = db.read_bytes()
    with pytest.raises(BadInput, match="schema v1 is older than this workbench's"):
        run_readonly_query("SELECT count(*) AS n FROM runs", db=str(db))
    assert cli(["sql", "SELECT 1", "--db", str(db)]) == 2
    assert "workbench migrate" in capsys.readouterr().err
    assert db.read_bytes() == before  # not a byte written
    assert cli(["migrate", "--db", str(db)]) == 0
    assert f"migrated from v1 to schema v{SCHEMA_VERSION}" in capsys.readouterr().out
    table = run_readonly_query("SELECT count(*) AS n FROM run_metrics", db=str(db))
    assert table["n"][0].as_py() == 0
    assert cli(["migrate", "--db", str(db)]) == 0
    assert "already at" in capsys.readouterr().out


def test_newer_database_is_refused(tmp_path):
    db = tmp_path / "w.duckdb"
    Store(db).close()
    con = duckdb.connect(str(db))
    con.execute("INSERT INTO schema_version VALUES (99, current_timestamp)")
    con.close()
    with pytest.raises(BadInput, match="schema v99 is newer"):
        Store(db)


def test_read_only_store_needs_an_existing_file(tmp_path):
    with pytest.raises(BadInput, match="no database here yet"):
        Store(tmp_path / "absent.duckdb", read_only=True)


def _record(key: str = "k1") -> RunRow:
    return RunRow(key, "heads", "dla", "m@0", "t-1", {}, started_at=datetime(2026, 1, 1))


def _rows(n: int) -> dict[str, pa.Table]:
    return {"edges": pa.table({"src": ["a"] * n, "dst": ["b"] * n, "score": [1.0] * n})}


def test_a_failing_write_leaves_nothing(tmp_path):
    db = tmp_path / "w.duckdb"
    with Store(db) as store:
        bad = {"edges": pa.table({"src": ["a"], "dst": ["b"], "no_such_column": [1.0]})}
        with pytest.raises(duckdb.Error):
            store.write_run(_record(), registry={}, rows=bad)
        assert store.query("SELECT count(*) AS n FROM runs")["n"][0].as_py() == 0
        store.write_run(_record(), registry={}, rows=_rows(3))
    assert counts(db)["runs"] == 1 and counts(db)["edges"] == 3


def test_replace_swaps_the_old_run_for_the_new(tmp_path):
    db = tmp_path / "w.duckdb"
    with Store(db) as store:
        first = store.write_run(_record(), registry={}, rows=_rows(3))
        assert store.done_run("k1") == first
        second = store.write_run(_record(), registry={}, rows=_rows(2), replace=True)
        assert store.done_run("k1") == second
    assert counts(db)["runs"] == 1 and counts(db)["edges"] == 2


def test_pipeline_skips_identical_runs_and_force_reruns(tmp_path, induction_dir):
    db = str(tmp_path / "w.duckdb")
    cfg = RunOptions(model=str(induction_dir), task="induction", db=db)
    methods = ["dla", "attr_patch"]
    assert [o.status for o in run("heads", cfg, methods)] == ["done", "done"]
    before = counts(db)
    assert [o.status for o in run("heads", cfg, methods)] == ["skipped", "skipped"]
    assert counts(db) == before
    cfg.force = True
    assert [o.status for o in run("heads", cfg, methods)] == ["done", "done"]
    assert counts(db) == before


def test_failed_run_is_recorded_with_its_error(tmp_path, induction_dir, monkeypatch):
    from workbench.attribution import heads as head_methods

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in a test")

    monkeypatch.setattr(head_methods, "direct_logit_attribution", broken)
    db = str(tmp_path / "w.duckdb")
    cfg = RunOptions(model=str(induction_dir), task="induction", db=db)
    outcomes = run("heads", cfg, ["dla", "attr_patch"])
    assert [o.status for o in outcomes] == ["failed", "done"]
    with Store(db, read_only=True) as store:
        runs = store.query("SELECT method, status, error FROM runs ORDER BY method").to_pylist()
        failed_scores = store.query(
            "SELECT count(*) AS n FROM node_scores JOIN runs USING (run_id) WHERE status = 'failed'"
        )["n"][0].as_py()
    assert runs[1]["status"] == "failed" and "out of memory in a test" in runs[1]["error"]
    assert failed_scores == 0
    monkeypatch.undo()
    # the failure is retried
    assert [o.status for o in run("heads", cfg, ["dla", "attr_patch"])] == ["done", "skipped"]
    assert counts(db)["runs"] == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from workbench.store import db as store_db
    from workbench.jobs import RunOptions
    from workbench.runner import run

    original = store_db.Store._insert
    calls = {"n": 0}

    def insert_then_die(con, table, data, ignore_existing=False):
        original(con, table, data, ignore_existing)
        if table == "node_scores":
            calls["n"] += 1
            if calls["n"] == int(sys.argv[3]):
                os.kill(os.getpid(), signal.SIGKILL)  # killed mid-transaction

    store_db.Store._insert = staticmethod(insert_then_die)
    run("heads", RunOptions(model=sys.argv[1], task="induction", checkpoint="all", db=sys.argv[2]))
    """
)


def test_killed_run_leaves_no_partial_rows_and_rerun_completes(tmp_path, induction_dir):
    db = tmp_path / "w.duckdb"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(induction_dir), str(db), "3"],
        capture_output=True,
        env={**os.environ, "WORKBENCH_LOG": "WARNING"},
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL
    after_kill = counts(db)
    assert after_kill["runs"] == 2  # two whole runs, the third vanished with its rows
    con = duckdb.connect(str(db), read_only=True)
    orphans = con.execute(
        "SELECT count(*) FROM node_scores WHERE run_id NOT IN (SELECT run_id FROM runs)"
    ).fetchone()[0]
    per_run = con.execute("SELECT count(DISTINCT run_id) FROM node_scores").fetchone()[0]
    con.close()
    assert orphans == 0 and per_run == 2
    outcomes = run(
        "heads",
        RunOptions(model=str(induction_dir), task="induction", checkpoint="all", db=str(db)),
    )
    statuses = [o.status for o in outcomes]
    assert statuses.count("skipped") == 2 and statuses.count("done") == len(outcomes) - 2
    assert counts(db)["runs"] == len(outcomes)


def test_files_of_a_run_that_does_not_commit_are_removed(tmp_path, induction_dir, monkeypatch):
    """A trained SAE is written to a staging directory and moved into place only as its run
    commits: a write that fails leaves neither the SAE directory nor its staging copy, and the
    run that does commit has its SAE at the stored path."""
    from workbench.core import Hook
    from workbench.store import db as store_db

    db = tmp_path / "w.duckdb"
    sae_dir = tmp_path / "saes"
    options = RunOptions(str(induction_dir), "induction", db=str(db))
    params = {"hooks": [Hook.resid_post(0)], "training_tokens": 4096, "corpus_tokens": 4096}
    params["sae_dir"] = str(sae_dir)
    original = store_db.Store._insert

    def fail_on_saes(con, table, data, ignore_existing=False):
        if table == "saes":
            raise OSError("disk full while writing saes")
        original(con, table, data, ignore_existing)

    monkeypatch.setattr(store_db.Store, "_insert", staticmethod(fail_on_saes))
    with pytest.raises(OSError, match="disk full"):
        run("sae", options, ["sae_features"], **params)
    assert not sae_dir.exists() or not any(sae_dir.iterdir())
    assert counts(db)["runs"] == 0
    monkeypatch.undo()
    (outcome,) = run("sae", options, ["sae_features"], **params)
    assert outcome.status == "done"
    with Store(db, read_only=True) as store:
        (path,) = store.query("SELECT path FROM saes")["path"].to_pylist()
    assert Path(path).parent == sae_dir and (Path(path) / "cfg.json").is_file()
    assert [p.name for p in sae_dir.iterdir()] == [Path(path).name]  # no staging left


def test_a_reader_waits_a_bounded_time_for_a_writer_then_says_the_database_is_busy(tmp_path):
    """DuckDB lets one process write or several read: while another process holds the write
    lock, a reader retries with backoff for its bounded wait, then fails with one sentence."""
    import time

    from workbench.store import DatabaseBusy

    db = tmp_path / "w.duckdb"
    Store(db).close()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); "
         "time.sleep(60)", str(db)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(DatabaseBusy, match="the database is busy"):
            Store(db, read_only=True, lock_wait=1.0)
        assert time.monotonic() - started < 30  # bounded: it gave up, it did not hang
    finally:
        holder.kill()
        holder.wait()
    with Store(db, read_only=True, lock_wait=1.0) as store:  # free again: it opens
        assert store.schema_version() == SCHEMA_VERSION
