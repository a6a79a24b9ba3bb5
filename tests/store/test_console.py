"""The SQL console cannot be hurt: sealed against files, writes, ATTACH, INSTALL/LOAD, SET and
PRAGMA; a huge result is cut at the row cap without being materialised; a runaway query is
interrupted at its timeout. Checked in-process, through `workbench sql` in a subprocess (with
its own peak RSS, from `wait4`) and in the app (AppTest)."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workbench.errors import BadInput
from workbench.store import Store
from workbench.store.query import run_console_query

HUGE = "SELECT * FROM range(100000000)"  # 1e8 rows: 800 MB as one column of int64
RUNAWAY = "SELECT sum(a.range * b.range) FROM range(100000) a, range(100000) b"  # 1e10 pairs
# the CLI on HUGE with the default cap stays well under this; materialising it would not
PEAK_RSS_LIMIT = 1_500_000_000

SEALED = [
    "SELECT * FROM read_csv('/etc/hostname')",
    "COPY runs TO '/tmp/stolen.csv'",
    "ATTACH '/tmp/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET memory_limit = '100GB'",
    "PRAGMA memory_limit = '100GB'",
    "SELECT 1; DELETE FROM runs",
    "CREATE TABLE x AS SELECT 1",
]


@pytest.fixture()
def db(tmp_path: Path, heads_db: Path) -> Path:
    """A copy of a database the heads pipeline filled."""
    path = tmp_path / "w.duckdb"
    shutil.copy(heads_db, path)
    return path


def _counts(db: Path) -> dict[str, int]:
    with Store(db, read_only=True) as store:
        tables = store.query("SELECT table_name FROM duckdb_tables()")["table_name"].to_pylist()
        counts = {t: store.query(f"SELECT count(*) AS n FROM {t}")["n"][0].as_py() for t in tables}
    assert counts["runs"] > 0
    return counts


@pytest.mark.parametrize("sql", SEALED)
def test_sealed_statements_fail_with_a_sentence_and_change_nothing(db, sql):
    before = _counts(db)
    with pytest.raises(BadInput, match="SQL error"):
        run_console_query(sql, db=str(db), timeout=30)
    assert _counts(db) == before
    assert not Path("/tmp/stolen.csv").exists()


def test_a_huge_result_stops_at_the_row_cap(db):
    result = run_console_query(HUGE, db=str(db), timeout=60, max_rows=1000)
    assert result.truncated and result.table.num_rows == 1000
    assert result.table.column("range").to_pylist() == list(range(1000))
    whole = run_console_query("SELECT * FROM range(1000)", db=str(db), max_rows=1000)
    assert not whole.truncated and whole.table.num_rows == 1000  # exactly at the cap: all of it


def test_a_runaway_query_is_interrupted_at_its_timeout(db):
    with pytest.raises(BadInput, match=r"query stopped after 1 s \(the timeout\)"):
        run_console_query(RUNAWAY, db=str(db), timeout=1)
    # the connection was closed cleanly: the database answers the next query
    assert run_console_query("SELECT 42 AS x", db=str(db)).table.to_pylist() == [{"x": 42}]


def test_a_waiting_caller_that_stops_interrupts_the_query(db):
    """The app's page stops or reruns (its `on_wait` raises): the query is interrupted, not
    left running in its thread."""

    class PageRerun(Exception):
        pass

    def on_wait(elapsed: float) -> None:
        if elapsed > 0.5:
            raise PageRerun

    before = threading.active_count()
    with pytest.raises(PageRerun):
        run_console_query(RUNAWAY, db=str(db), timeout=300, on_wait=on_wait)
    time.sleep(0.2)
    assert threading.active_count() == before


# Starts a command and reports its peak RSS. A child's `ru_maxrss` counts the peak of the memory
# it was forked with until its `exec` (Linux keeps the larger), so a command started straight
# from the test process would report the test process's own peak; started from this small
# launcher, it reports its own.
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss * 1024))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _cli(db: Path, *args: str) -> tuple[int, str, str, int]:
    """`workbench sql` in a subprocess: (exit status, stdout, stderr, its peak RSS in bytes)."""
    peak_file = db.parent / f"peak-{threading.get_ident()}-{time.monotonic_ns()}"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(peak_file), sys.executable, "-m", "workbench",
         "sql", *args, "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WORKBENCH_LOG": "WARNING"},
        start_new_session=True,
    )  # fmt: skip
    # a hung query would fail the test, not hang it
    killer = threading.Timer(300, lambda: os.killpg(proc.pid, signal.SIGKILL))
    killer.start()
    out, err = proc.communicate()
    killer.cancel()
    return proc.returncode, out, err, int(peak_file.read_text())


def test_cli_row_cap_timeout_and_memory(db):
    code, out, err, peak = _cli(db, HUGE, "--format", "csv")
    assert code == 0
    assert len(out.splitlines()) == 1 + 100_000  # the header and the default cap
    assert "the first 100000 rows are shown; the query has more" in err
    assert peak < PEAK_RSS_LIMIT, peak
    code, out, err, peak = _cli(db, RUNAWAY, "--timeout", "2")
    assert code == 2 and out == ""
    assert "error: query stopped after 2 s (the timeout)" in err
    assert peak < PEAK_RSS_LIMIT, peak
    code, out, err, _ = _cli(db, "SELECT 1 AS x", "--timeout", "-1")
    assert code == 2 and "--timeout -1: must be positive" in err
    for sql in SEALED[:3]:
        code, _, err, _ = _cli(db, sql)
        assert code == 2 and err.startswith("error: SQL error"), err


def test_app_console_caps_rows_and_times_out(db, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from workbench.app import data
    from workbench.app.views import sql_console

    monkeypatch.setenv("WORKBENCH_DB", str(db))
    data.query.clear()
    at = AppTest.from_file(str(Path(sql_console.__file__).parents[1] / "main.py"))
    at.default_timeout = 120
    at.run()
    at.sidebar.radio(key="view").set_value("SQL").run()
    text = at.text_area(key="sql_text")
    text.set_value(HUGE).run()
    assert not at.exception and not at.error
    assert len(at.dataframe[0].value) == sql_console.DISPLAY_ROWS
    assert any("more than 1,000,000 rows" in w.value for w in at.warning)
    assert any("Showing the first 10,000 of 1,000,000 rows" in i.value for i in at.info)
    at.number_input(key="sql_timeout").set_value(1).run()
    text = at.text_area(key="sql_text")
    text.set_value(RUNAWAY).run()
    assert [e.value for e in at.error] == [
        "query stopped after 1 s (the timeout): narrow it, aggregate, or allow more time"
    ]
