"""The SQL console's limits hold: a byte budget cuts wide rows, the timeout ends operators
DuckDB's interrupt does not stop (the worker process is killed), a memory bound and a spill cap
end a query in one sentence and leave no temporary files, no worker outlives its caller,
control characters print escaped, and a deep link to the app's console waits for Run.

Each query runs for real: `run_console_query` in this process or in a caller subprocess (to
measure that caller's own peak memory), `workbench sql` in a subprocess, the app in AppTest."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from workbench.errors import BadInput
from workbench.store import Store
from workbench.store.query import escape_controls, format_table, parse_size, run_console_query

# 100,000 rows of 10 KB: 1 GB if it were fetched whole
WIDE = "SELECT repeat('x', 10000) AS s FROM range(100000)"
# one regular expression over one 200 MB string: about 85 s on an idle 2-core machine, and
# DuckDB's interrupt only takes effect when it has finished
SLOW = "SELECT length(regexp_replace(repeat('ab', 100000000), '(a)(b)', '\\2\\1', 'g')) AS n"
# a sort inside one list value: DuckDB's memory_limit does not count it (3.5 GB unbounded)
HUNGRY = "SELECT len(list_sort(range(20000000))) AS n"
# distinct strings that do not fit in 100 MB: DuckDB spills them
SPILLER = "SELECT count(*) AS n FROM (SELECT DISTINCT md5(x::VARCHAR) FROM range(20000000) t(x))"
ENDED_NOT_HUNG = 90.0  # seconds: generous, for a loaded machine; SLOW alone takes far longer
CALLER_PEAK_LIMIT = 400_000_000  # the caller's own peak RSS with a 1 MB budget (about 150 MB)
WAIT = 120.0  # seconds any wait for another process's state may take


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    """A small real database: the store's schema, migrated, no runs."""
    path = tmp_path / "w.duckdb"
    Store(path).close()
    return path


def _cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workbench", "sql", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WORKBENCH_LOG": "WARNING"},
    )


def test_sizes_are_read_as_the_user_writes_them():
    assert parse_size("256MB", option="--max-bytes") == 256_000_000
    assert parse_size("1.5GiB", option="--max-bytes") == 3 * 2**29
    assert parse_size("4096", option="--max-bytes") == 4096
    assert parse_size("0", option="--max-bytes") is None
    with pytest.raises(BadInput, match=r"--max-spill 'lots': not a size"):
        parse_size("lots", option="--max-spill")


def test_a_byte_budget_cuts_wide_rows_and_the_caller_stays_small(db):
    caller = f"""
import json
from workbench.store.query import run_console_query
r = run_console_query({WIDE!r}, db={str(db)!r}, timeout=120, max_bytes=1_000_000)
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")]
print(json.dumps([r.table.num_rows, r.table.nbytes, r.truncated, r.cut, peak[0]]))
"""
    done = subprocess.run(
        [sys.executable, "-c", caller], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows, nbytes, truncated, cut, peak = json.loads(done.stdout)
    assert truncated and cut == "bytes"
    assert 0 < rows < 100 and nbytes <= 1_000_000
    assert peak < CALLER_PEAK_LIMIT, peak
    done = _cli(db, WIDE, "--max-bytes", "1MB", "--format", "csv")
    assert done.returncode == 0, done.stderr
    assert 0 < len(done.stdout.splitlines()) - 1 < 100
    assert "rows are shown (the --max-bytes budget of 1 MB); the query has more" in done.stderr
    done = _cli(db, "SELECT 1 AS x", "--max-bytes", "much")
    assert done.returncode == 2 and "error: --max-bytes 'much': not a size" in done.stderr


def test_the_timeout_ends_an_operator_the_interrupt_does_not_stop(db):
    start = time.monotonic()
    with pytest.raises(BadInput, match=r"query stopped after 1 s \(the timeout\)"):
        run_console_query(SLOW, db=str(db), timeout=1)
    assert time.monotonic() - start < ENDED_NOT_HUNG
    start = time.monotonic()
    done = _cli(db, SLOW, "--timeout", "1")
    assert done.returncode == 2, done.stderr
    assert "error: query stopped after 1 s (the timeout)" in done.stderr
    assert time.monotonic() - start < ENDED_NOT_HUNG


def test_a_memory_bound_ends_the_query_in_one_sentence(db):
    with pytest.raises(BadInput) as caught:
        run_console_query(HUNGRY, db=str(db), timeout=300, max_memory=300_000_000)
    assert str(caught.value) == (
        "the query needed more than 300 MB of memory (the memory bound): narrow it, aggregate, "
        "or allow more (--max-memory)"
    )
    done = _cli(db, HUNGRY, "--max-memory", "300MB")
    assert done.returncode == 2
    assert done.stderr.startswith("error: the query needed more than 300 MB of memory")


def test_a_spill_cap_ends_the_query_and_leaves_no_temporary_files(db, tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    beside = sorted(db.parent.iterdir())
    with pytest.raises(BadInput) as caught:
        run_console_query(
            SPILLER, db=str(db), timeout=300, max_memory=200_000_000, max_spill=5_000_000
        )
    assert str(caught.value) == (
        "the query needed more than 5 MB of temporary disk space (the spill cap): narrow it, "
        "aggregate, or allow more (--max-spill)"
    )
    assert list(temp.iterdir()) == []
    assert sorted(db.parent.iterdir()) == beside  # and no `w.duckdb.tmp` beside the database


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(t) for t in text)
    return found


def _gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


def _wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {WAIT:.0f} s: {what}"
        time.sleep(0.1)


def test_a_caller_that_stops_waiting_kills_its_worker(db):
    """The app's page is rerun or left (`on_wait` raises): the worker process is gone."""
    seen: set[int] = set()

    class PageRerun(Exception):
        pass

    def on_wait(elapsed: float) -> None:
        seen.update(_children(os.getpid()))
        if seen and elapsed > 0.5:
            raise PageRerun

    with pytest.raises(PageRerun):
        run_console_query(SLOW, db=str(db), on_wait=on_wait)
    assert seen and all(_gone(pid) for pid in seen)


def test_a_worker_does_not_outlive_its_caller(db, tmp_path):
    """A caller killed outright (SIGKILL: no cleanup of its own) still takes its worker along:
    the worker ends when its stdin closes, and removes the query's private directory."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from workbench.store.query import run_console_query\n"
            f"run_console_query({SLOW!r}, db={str(db)!r})",
        ],
        env={**os.environ, "TMPDIR": str(temp)},
    )
    try:
        workers: set[int] = set()

        def started() -> bool:
            workers.update(_children(caller.pid))
            return bool(workers)

        _wait_until(started, "the caller's worker process to start")
    finally:
        caller.kill()
        caller.wait()
    _wait_until(lambda: all(_gone(pid) for pid in workers), "the worker to end")
    assert list(temp.iterdir()) == []


def test_a_caller_gone_before_its_request_leaves_no_directory(tmp_path):
    """The caller killed between starting the worker and writing its request (a window a
    loaded machine opens): the worker finds stdin closed and removes the directory it was
    started with."""
    private = tmp_path / "workbench-sql-x"
    private.mkdir()
    (private / "stderr.txt").write_bytes(b"")
    worker = subprocess.run(
        [sys.executable, "-m", "workbench.store.console_worker", str(private)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    assert worker.returncode == 3, worker.stderr  # GONE_STATUS
    assert not private.exists()


def test_the_worker_exits_cleanly_and_promptly_after_its_query(db, tmp_path):
    """Its outcome, then exit status 0 with nothing on stderr: no abort at interpreter exit
    (a daemon thread must not hold a lock the exit needs)."""
    request = {
        "sql": "SELECT 42 AS x",
        "db": str(db),
        "dir": str(tmp_path),
        "lock_wait": None,
        "max_rows": None,
        "max_bytes": 1_000_000,
        "max_memory": 300_000_000,
        "max_spill": 5_000_000,
        "memory_limit": "150000000B",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "workbench.store.console_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    killer = threading.Timer(WAIT, worker.kill)  # a hung worker fails the test, not hangs it
    killer.start()
    try:  # stdin stays open until it has exited: a closed stdin tells it to end at once
        assert worker.stdin and worker.stdout and worker.stderr
        worker.stdin.write(json.dumps(request).encode() + b"\n")
        worker.stdin.flush()
        out, err = worker.stdout.read(), worker.stderr.read()
        worker.wait()
    finally:
        killer.cancel()
        worker.kill()
        worker.wait()
    assert (worker.returncode, err.decode()) == (0, "")
    lines = out.decode().splitlines()
    assert lines[0] == "ready" and json.loads(lines[1])["rows"] == 1
    run_console_query("SELECT 42 AS x", db=str(db), timeout=1)  # well inside a 1 s timeout


def test_control_characters_print_escaped():
    table = pa.table({"s": ["\x1b[31mred", "a\nb\tc", "plain", None], "n": [1, 2, 3, 4]})
    assert escape_controls("\x1b[31mred\x9b\x7f\r") == "\\x1b[31mred\\x9b\\x7f\\r"
    text = format_table(table, "table")
    assert "\x1b" not in text and "\\x1b[31mred" in text and "a\\nb\\tc" in text
    csv = format_table(table, "csv")
    assert "\x1b" not in csv and '"\\x1b[31mred"' in csv and '"a\\nb\\tc"' in csv
    assert format_table(table, "csv", escape=False).count("\x1b") == 1


def test_the_cli_prints_control_characters_escaped(db):
    sql = "SELECT chr(27) || '[31mred' AS s, 'x'::BLOB || chr(27)::BLOB AS b"
    table = _cli(db, sql)
    assert table.returncode == 0 and "\x1b" not in table.stdout
    assert "\\x1b[31mred" in table.stdout
    csv = _cli(db, sql, "--format", "csv")
    assert csv.returncode == 0 and "\x1b" not in csv.stdout
    assert csv.stdout.splitlines()[1] == '"\\x1b[31mred","x\\x1b"'
    js = _cli(db, "SELECT chr(27) || '[31mred' AS s", "--format", "json")
    assert js.returncode == 0 and "\x1b" not in js.stdout
    assert json.loads(js.stdout) == [{"s": "\x1b[31mred"}]


def _app(db: Path, monkeypatch, params: dict | None = None):  # type: ignore[no-untyped-def]
    from streamlit.testing.v1 import AppTest

    from workbench.app import data
    from workbench.app.views import sql_console

    monkeypatch.setenv("WORKBENCH_DB", str(db))
    data.query.clear()
    at = AppTest.from_file(str(Path(sql_console.__file__).parents[1] / "main.py"))
    at.default_timeout = 300
    at.query_params.update(params or {})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_a_deep_link_fills_the_console_and_waits_for_run(db, monkeypatch):
    params = {"view": "sql", "q": "SELECT 42 AS answer", "timeout": "600", "mb": "5"}
    at = _app(db, monkeypatch, params)
    assert at.text_area(key="sql_text").value == "SELECT 42 AS answer"
    assert at.number_input(key="sql_timeout").value == 600
    assert at.number_input(key="sql_max_mb").value == 5
    assert not at.dataframe and not at.error  # nothing ran
    assert any("Press Run" in c.value for c in at.caption)
    assert at.query_params["q"] == "SELECT 42 AS answer"  # the link still round-trips
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error
    assert at.dataframe[0].value["answer"].tolist() == [42]


def test_the_app_console_has_a_byte_budget_and_its_timeout_kills(db, monkeypatch):
    at = _app(db, monkeypatch, {"view": "sql"})
    at.number_input(key="sql_max_mb").set_value(1).run()
    at.text_area(key="sql_text").set_value(WIDE).run()
    assert not at.exception and not at.error
    assert any("passed the 1 MB budget" in w.value for w in at.warning)
    assert 0 < len(at.dataframe[0].value) < 100
    at.number_input(key="sql_timeout").set_value(1).run()
    start = time.monotonic()
    at.text_area(key="sql_text").set_value(SLOW).run()
    assert [e.value for e in at.error] == [
        "query stopped after 1 s (the timeout): narrow it, aggregate, or allow more time"
    ]
    assert time.monotonic() - start < ENDED_NOT_HUNG
