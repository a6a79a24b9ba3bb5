"""Does `workbench sql` always exit cleanly? Run it many times beside busy CPUs and count how
each run ended.

A process that exits while one of its threads is still inside DuckDB can die in C++ teardown
("terminate called without an active exception", SIGABRT, exit status 134) instead of exiting
with its own status. Load makes that race likelier, so this starts two busy loops (`yes` into
/dev/null) for the length of the test and stops them at the end. Each run is `workbench sql` in
a fresh process, in table and csv formats in turn, on small queries against a small real
database (a migrated, empty store made in a temporary directory unless --db names one).

    python -m benchmarks.stress_sql_exit [RUNS] [--db PATH] [--busy N]

It prints the count of runs per exit status and the count of aborts (134 or SIGABRT, or
"terminate called" on stderr), also for the runs done so far when it is interrupted (SIGINT,
SIGTERM), with a progress line every 25 runs; its own exit status is 1 when any run aborted.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

QUERIES = [
    "SELECT 42 AS answer",
    "SELECT * FROM range(2000)",
    "SELECT table_name FROM duckdb_tables() ORDER BY 1",
    "SELECT count(*) AS n FROM runs",
]
FORMATS = ["table", "csv"]
RUN_TIMEOUT = 300.0  # seconds one run may take before it is counted as hung
PROGRESS_EVERY = 25


class Stopped(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def small_database(root: Path) -> Path:
    from workbench.store import Store

    path = root / "stress.duckdb"
    with Store(path):
        pass
    return path


def start_busy(n: int) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(n)
    ]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def one_run(db: Path, i: int) -> tuple[int | str, bool]:
    """(exit status, or "hung"; whether it aborted)."""
    query = QUERIES[i % len(QUERIES)]
    fmt = FORMATS[(i // len(QUERIES)) % len(FORMATS)]
    cmd = [sys.executable, "-m", "workbench", "sql", query, "--format", fmt, "--db", str(db)]
    env = {**os.environ, "WORKBENCH_LOG": "WARNING"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return "hung", False
    aborted = done.returncode in (134, -6) or "terminate called" in done.stderr
    return done.returncode, aborted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", type=int, default=300, help="runs (default 300)")
    parser.add_argument("--db", type=Path, help="database to query (default: a fresh one)")
    parser.add_argument("--busy", type=int, default=2, help="busy loops beside (default 2)")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop)
    statuses: Counter = Counter()
    aborts = 0
    stopped = None
    with tempfile.TemporaryDirectory(prefix="stress-sql-") as tmp:
        db = args.db or small_database(Path(tmp))
        busy = start_busy(args.busy)
        start = time.monotonic()
        try:
            for i in range(args.runs):
                status, aborted = one_run(db, i)
                statuses[status] += 1
                aborts += aborted
                if (i + 1) % PROGRESS_EVERY == 0:
                    print(f"{i + 1} runs, {aborts} aborts", file=sys.stderr, flush=True)
        except Stopped as err:
            stopped = str(err)
        finally:
            stop_busy(busy)
        seconds = time.monotonic() - start
    done = sum(statuses.values())
    print(
        f"{done} runs of `workbench sql` beside {args.busy} busy loops in {seconds:.0f} s"
        + (f" (stopped by {stopped} after {done} of {args.runs})" if stopped else "")
    )
    for status, count in sorted(statuses.items(), key=lambda kv: str(kv[0])):
        print(f"  exit status {status}: {count}")
    print(f"  aborts (134 / SIGABRT / 'terminate called'): {aborts}")
    return 1 if aborts else 0


if __name__ == "__main__":
    sys.exit(main())
