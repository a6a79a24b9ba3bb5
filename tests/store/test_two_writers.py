"""Two writers, and writers that cannot get the lock: nothing lost, nothing doubled.

Real `workbench run` processes on the zoo's induction model. What happens when is decided by
files, never by timing: a method registered through an entry point (written into the test's
directory) announces that it computes by creating a file, then waits until the test creates a
`go` file before computing its edges with EAP. A reader process holds the database until the
test removes a file. Each wait is for a state (a file, a line of output, a row), with a
generous bound.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from workbench.rows import RunRow
from workbench.store import SCHEMA_VERSION, Store
from workbench.store.schema import MIGRATIONS, V9_RUN_TABLES
from workbench.store.session import StoreSession

ROOT = Path(__file__).resolve().parents[2]
BOUND = 180.0  # seconds: "it got there rather than hung", never a timing assertion

GATE_PLUGIN = '''
"""A method that waits at a gate: it creates `computing-<pid>` in --gate, waits until the
test creates `go` there, then computes the edges of EAP."""

import os
import time
from dataclasses import dataclass
from pathlib import Path

from workbench import registry
from workbench.registry import Method, option


@dataclass(frozen=True)
class GateParams:
    gate: str = option("", "Directory of the gate files.")


def gated(inputs, params):
    gate = Path(params.gate)
    (gate / f"computing-{os.getpid()}").touch()
    deadline = time.monotonic() + 600
    while not (gate / "go").exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the gate never opened")
        time.sleep(0.05)
    eap = registry.method("edges", "eap")
    return eap.compute(inputs, eap.make_params({}))


METHODS = [
    Method("gated", "gate", GateParams, gated, key=lambda p: {}, demo=None),
    Method("gated_too", "gate", GateParams, gated, key=lambda p: {}, demo=None, default=False),
]
'''

HOLDER = textwrap.dedent(
    """
    import pathlib, sys, time
    import duckdb

    release = pathlib.Path(sys.argv[2])
    deadline = time.monotonic() + 600
    while True:  # the runner has the file open for a moment now and then
        try:
            con = duckdb.connect(sys.argv[1], read_only=True)
            break
        except duckdb.IOException:
            if time.monotonic() > deadline:
                sys.exit("never got the database")
            time.sleep(0.05)
    con.execute("SELECT count(*) FROM runs").fetchall()
    print("held", flush=True)
    while release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    con.close()
    """
)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("gate_site")
    (site / "workbench_gate_plugin").mkdir()
    (site / "workbench_gate_plugin" / "__init__.py").write_text(GATE_PLUGIN)
    info = site / "workbench_gate_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: workbench-gate-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[workbench.methods]\ngate = workbench_gate_plugin:METHODS\n"
    )
    return site


class Runner:
    """A `workbench run gate` process, its output going to files."""

    def __init__(self, site: Path, model: Path, db: Path, gate: Path, log: Path, *args: str):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
            "WORKBENCH_LOG": "INFO",
        }
        env.pop("WORKBENCH_LOCK_WAIT", None)
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        argv = [sys.executable, "-m", "workbench", "run", "gate", "--model", str(model)]
        argv += ["--task", "induction", "--db", str(db), "--gate", str(gate), *args]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)

    def wait(self) -> int:
        return self.proc.wait(timeout=BOUND)

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def outcomes(self) -> list[tuple[str, str]]:
        """(status, run id) of each line the run printed."""
        return [(ln.split()[0], ln.split()[3]) for ln in self.stdout().splitlines() if ln.strip()]


def wait_for(
    state: Callable[[], bool], *watched: Runner | subprocess.Popen[str], what: str = ""
) -> None:
    """Until `state()` holds (failing at once if a watched process ends first)."""
    deadline = time.monotonic() + BOUND
    while not state():
        for w in watched:
            proc = w.proc if isinstance(w, Runner) else w
            if proc.poll() is not None and not state():
                detail = w.stderr()[-3000:] if isinstance(w, Runner) else ""
                pytest.fail(f"a process ended ({proc.returncode}) before {what}\n{detail}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {BOUND:.0f} s")
        time.sleep(0.05)


def rows(db: Path, sql: str) -> list[tuple]:
    with Store(db, read_only=True, lock_wait=BOUND) as store:
        return store.con.execute(sql).fetchall()


def pending_dir(db: Path) -> Path:
    """Where runs the database had no room for are kept: beside it."""
    return db.with_name(db.name + ".pending")


def computing(gate: Path) -> int:
    return len(list(gate.glob("computing-*")))


@pytest.fixture
def setup(tmp_path: Path, plugin_site: Path, induction_dir: Path):
    db = tmp_path / "w.duckdb"
    Store(db).close()
    gate = tmp_path / "gate"
    gate.mkdir()

    def runner(name: str, *args: str) -> Runner:
        return Runner(plugin_site, induction_dir, db, gate, tmp_path / name, *args)

    return db, gate, runner


def test_two_runners_of_the_same_run_store_it_once(setup):
    """Both runners start the run (neither finds it stored), both compute it; the store keeps
    the first one written and the second reports it skipped, with the stored run's id."""
    db, gate, runner = setup
    first, second = runner("a"), runner("b")
    wait_for(lambda: computing(gate) == 2, first, second, what="both runs computing")
    (gate / "go").touch()
    assert first.wait() == 0, first.stderr()[-3000:]
    assert second.wait() == 0, second.stderr()[-3000:]
    outcomes = sorted(first.outcomes() + second.outcomes())
    assert [status for status, _ in outcomes] == ["done", "skipped"]
    stored = outcomes[0][1]
    assert outcomes[1][1] == stored  # the skipped one names the stored run
    assert rows(db, "SELECT run_id, status FROM runs") == [(stored, "done")]
    assert rows(db, "SELECT run_id FROM done_runs") == [(stored,)]
    n_edges, n_distinct, ids = rows(
        db, "SELECT count(*), count(DISTINCT (src, dst)), list(DISTINCT run_id) FROM edges"
    )[0]
    assert n_edges == n_distinct > 0 and ids == [stored]  # no edge stored twice
    assert rows(db, "SELECT run_id FROM circuits") == [(stored,)]
    assert rows(db, "SELECT count(*) = count(DISTINCT (src, dst)) FROM circuit_edges") == [(True,)]
    assert rows(db, "SELECT count(*) FROM run_queue") == [(0,)]


def _hold(db: Path, release: Path) -> subprocess.Popen[str]:
    release.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db), str(release)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_waits_for_a_reader_then_stores_its_result(setup, tmp_path):
    """A reader holds the database while a run computes and past the moment it has its
    result: the run waits (saying so), and stores its result once the reader lets go."""
    db, gate, runner = setup
    run = runner("run")
    wait_for(lambda: computing(gate) == 1, run, what="the run computing")
    release = tmp_path / "hold"
    holder = _hold(db, release)
    try:
        (gate / "go").touch()
        wait_for(
            lambda: "waiting for the database lock to store run" in run.stderr(),
            run,
            what="the run waiting for the lock",
        )
        assert run.proc.poll() is None  # it waits; it has not given up
    finally:
        release.unlink()
        holder.wait(timeout=BOUND)
    assert run.wait() == 0, run.stderr()[-3000:]
    [(status, run_id)] = run.outcomes()
    assert status == "done"
    assert rows(db, "SELECT run_id, status FROM runs") == [(run_id, "done")]
    assert rows(db, "SELECT count(DISTINCT run_id), count(*) > 0 FROM edges") == [(1, True)]
    assert rows(db, "SELECT count(*) FROM run_queue") == [(0,)]
    assert not pending_dir(db).exists()


def test_a_run_that_waits_too_long_keeps_its_result_for_the_next_run(setup, tmp_path):
    """With a lock wait that runs out (--lock-wait 1), the computed run is kept beside the
    database and the failure says where; the next run on the database stores it first (and
    then finds its own run stored: skipped)."""
    db, gate, runner = setup
    run = runner("run", "--lock-wait", "1")
    wait_for(lambda: computing(gate) == 1, run, what="the run computing")
    release = tmp_path / "hold"
    holder = _hold(db, release)
    try:
        (gate / "go").touch()
        assert run.wait() == 2
    finally:
        release.unlink()
        holder.wait(timeout=BOUND)
    err = run.stderr()
    kept = list(pending_dir(db).iterdir())
    assert len(kept) == 1 and (kept[0] / "run.json").is_file()
    assert f"its computed result is kept in {kept[0]}" in err, err[-3000:]
    assert rows(db, "SELECT count(*) FROM runs") == [(0,)]
    again = runner("again")
    assert again.wait() == 0, again.stderr()[-3000:]
    assert again.outcomes() == [("skipped", kept[0].name)]  # the kept run, stored
    assert rows(db, "SELECT run_id, status FROM runs") == [(kept[0].name, "done")]
    assert rows(db, "SELECT count(DISTINCT run_id), count(*) > 0 FROM edges") == [(1, True)]
    assert not pending_dir(db).exists()
    assert rows(db, "SELECT count(*) FROM run_queue") == [(0,)]  # the dead runner's swept


def test_sigterm_stops_a_run_and_takes_its_rows_off_the_queue(setup):
    db, gate, runner = setup
    run = runner("run", "--method", "gated", "--method", "gated_too")
    wait_for(lambda: computing(gate) == 1, run, what="the run computing")
    assert sorted(rows(db, "SELECT status FROM run_queue")) == [("queued",), ("running",)]
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 130  # as for Ctrl-C
    assert "signal 15: stopping" in run.stderr() and "Traceback" not in run.stderr()
    assert rows(db, "SELECT count(*) FROM run_queue") == [(0,)]
    assert rows(db, "SELECT count(*) FROM runs") == [(0,)]


def test_a_killed_runner_drops_out_of_the_live_queue_and_is_swept(setup):
    """While a runner lives, a thread refreshes the heartbeat of all its rows (queued ones
    too); killed (-9), it leaves rows that the next session sweeps."""
    db, gate, runner = setup
    run = runner("run", "--method", "gated", "--method", "gated_too")
    wait_for(lambda: computing(gate) == 1, run, what="the run computing")
    queued_beat = (
        "SELECT count(*) FROM run_queue WHERE status = 'queued' AND heartbeat_at IS NOT NULL"
    )
    wait_for(lambda: rows(db, queued_beat) == [(1,)], run, what="a heartbeat of the queued job")
    assert rows(db, "SELECT count(*) FROM run_queue_live") == [(2,)]
    run.proc.kill()
    run.proc.wait(timeout=BOUND)
    assert rows(db, "SELECT count(*) FROM run_queue") == [(2,)]  # nothing ran on the way out
    StoreSession(str(db)).close()  # the next runner starts
    assert rows(db, "SELECT count(*) FROM run_queue") == [(0,)]


def test_the_live_queue_leaves_out_rows_without_a_recent_sign_of_life(tmp_path):
    db = tmp_path / "w.duckdb"
    now = datetime.now(UTC).replace(tzinfo=None)  # queue times are UTC
    old = now - timedelta(hours=1)
    with Store(db) as store:
        store.insert(
            "run_queue",
            pa.Table.from_pylist(
                [
                    {"job_id": "live", "status": "running", "pid": 1, "host": "h",
                     "queued_at": old, "heartbeat_at": now},
                    {"job_id": "waiting", "status": "queued", "pid": 1, "host": "h",
                     "queued_at": now, "heartbeat_at": None},
                    {"job_id": "dead", "status": "running", "pid": 2, "host": "h",
                     "queued_at": old, "heartbeat_at": old},
                ]
            ),
        )  # fmt: skip
    live = "SELECT job_id FROM run_queue_live ORDER BY job_id"
    assert rows(db, live) == [("live",), ("waiting",)]
    with Store(db, read_only=True) as store:  # the bound is a variable (600 s by default)
        store.con.execute("SET VARIABLE run_queue_stale_seconds = 7200")
        assert store.con.execute(live).fetchall() == [("dead",), ("live",), ("waiting",)]


# --- schema v9: one done run per run key ---------------------------------------------------


def _record(key: str, status: str = "done") -> RunRow:
    return RunRow(
        key, "heads", "dla", "m@0", "t-1", {}, started_at=datetime(2026, 1, 1), status=status
    )


def _edges(n: int) -> dict[str, pa.Table]:
    return {"edges": pa.table({"src": ["a"] * n, "dst": ["b"] * n, "score": [1.0] * n})}


def test_a_done_run_of_a_stored_key_is_not_written_and_force_replaces_it(tmp_path):
    db = tmp_path / "w.duckdb"
    with Store(db) as store:
        failed = store.write_run(_record("k", "failed"), registry={}, rows={})
        first = store.write_run(_record("k"), registry={}, rows=_edges(3))
        assert failed != first and store.done_run("k") == first
        again = store.write_run(_record("k"), registry={}, rows=_edges(5))
        assert again == first  # the stored run's id: nothing written
        assert store.query("SELECT count(*) AS n FROM edges")["n"][0].as_py() == 3
        forced = store.write_run(_record("k"), registry={}, rows=_edges(2), replace=True)
        assert forced != first and store.done_run("k") == forced
        runs = store.con.execute("SELECT run_id, status FROM runs").fetchall()
        assert runs == [(forced, "done")]
        assert store.con.execute("SELECT run_id FROM done_runs").fetchall() == [(forced,)]
        assert store.query("SELECT count(*) AS n FROM edges")["n"][0].as_py() == 2


def test_a_skipped_write_leaves_no_staged_files(tmp_path):
    db = tmp_path / "w.duckdb"
    staged, final = tmp_path / ".sae.partial", tmp_path / "sae"
    with Store(db) as store:
        store.write_run(_record("k"), registry={}, rows={})
        staged.mkdir()
        (staged / "cfg.json").write_text("{}")
        store.write_run(_record("k"), registry={}, rows={}, files={str(staged): str(final)})
    assert not staged.exists() and not final.exists()


def _v8_database(path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER, applied_at TIMESTAMP)")
    for version in range(1, 9):
        for statement in MIGRATIONS[version]:
            con.execute(statement)
        con.execute("INSERT INTO schema_version VALUES (?, current_timestamp)", [version])
    return con


def _insert_run(con: duckdb.DuckDBPyConnection, run_id: str, key: str, status: str, hour: int):
    at = datetime(2026, 1, 1, hour)
    con.execute(
        "INSERT INTO runs (run_id, run_key, pipeline, method, checkpoint_id, status, started_at, "
        "finished_at) VALUES (?, ?, 'edges', 'eap', 'm@0', ?, ?, ?)",
        [run_id, key, status, at - timedelta(minutes=5), at],
    )
    sae = f"sae-{run_id}"
    con.execute(
        "INSERT INTO node_scores VALUES (?, 'a0.h0', NULL, 1.0), (?, 'a0.h1', NULL, 2.0)",
        [run_id, run_id],
    )
    con.execute(
        "INSERT INTO edges VALUES (?, 'a0.h0', 'logits', 0.5), (?, 'input', 'a0.h0', 0.1)",
        [run_id, run_id],
    )
    con.execute("INSERT INTO faithfulness_curves VALUES (?, 1, 1, 0.5)", [run_id])
    con.execute("INSERT INTO run_metrics VALUES (?, 'roc_auc_known_circuit', 0.9)", [run_id])
    con.execute(
        "INSERT INTO circuits (circuit_id, run_id, rule) VALUES (?, ?, 'top:1')",
        [f"{run_id}-top1", run_id],
    )
    con.execute("INSERT INTO circuit_edges VALUES (?, 'a0.h0', 'logits', 0.5)", [f"{run_id}-top1"])
    con.execute("INSERT INTO saes (sae_id, run_id) VALUES (?, ?)", [sae, run_id])
    con.execute(
        "INSERT INTO features (sae_id, feature, run_id) VALUES (?, 0, ?), (?, 1, ?)",
        [sae, run_id, sae, run_id],
    )
    con.execute(
        "INSERT INTO feature_examples (sae_id, feature, rank, run_id) VALUES (?, 0, 0, ?)",
        [sae, run_id],
    )


def _owned(db: Path) -> dict[str, dict[str, int]]:
    """Rows per table, per run id that owns them."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {
            table: dict(con.execute(f"SELECT run_id, count(*) FROM {table} GROUP BY 1").fetchall())
            for table in (*V9_RUN_TABLES, "circuits")
        }
        out["circuit_edges"] = dict(
            con.execute(
                "SELECT c.run_id, count(*) FROM circuit_edges JOIN circuits c USING (circuit_id) "
                "GROUP BY 1"
            ).fetchall()
        )
    finally:
        con.close()
    return out


def test_migration_to_v9_keeps_the_earliest_done_run_of_each_key(tmp_path):
    """A v8 database holding duplicate done runs (two writers raced before v9): the earliest
    stored of each key stays; the later ones go with every row they own, unless a curated
    subgraph names the run or its circuit (then it stays, marked `duplicate`). Failed runs and
    other keys' runs are untouched."""
    db = tmp_path / "v8.duckdb"
    con = _v8_database(db)
    con.execute("INSERT INTO checkpoints (checkpoint_id, model_id, step) VALUES ('m@0', 'm', 0)")
    _insert_run(con, "r_a", "K", "done", 10)
    _insert_run(con, "r_b", "K", "done", 9)  # the earliest of K (inserted second)
    _insert_run(con, "r_c", "K", "done", 11)
    _insert_run(con, "r_f", "K", "failed", 8)
    _insert_run(con, "r_l", "L", "done", 12)
    _insert_run(con, "r_m1", "M", "done", 9)
    _insert_run(con, "r_m2", "M", "done", 10)  # a subgraph was saved from this run
    _insert_run(con, "r_n1", "N", "done", 9)
    _insert_run(con, "r_n2", "N", "done", 10)  # ... and from this run's circuit
    con.execute("INSERT INTO subgraphs (subgraph_id, source) VALUES ('sg1', 'run:r_m2')")
    con.execute("INSERT INTO subgraphs (subgraph_id, source) VALUES ('sg2', 'circuit:r_n2-top1')")
    con.close()
    before = _owned(db)
    with Store(db) as store:
        assert store.migrated_from == 8 and store.schema_version() == SCHEMA_VERSION
        done = dict(store.con.execute("SELECT run_key, run_id FROM done_runs").fetchall())
        statuses = dict(store.con.execute("SELECT run_id, status FROM runs").fetchall())
    assert done == {"K": "r_b", "L": "r_l", "M": "r_m1", "N": "r_n1"}
    assert statuses == {
        "r_b": "done", "r_f": "failed", "r_l": "done", "r_m1": "done", "r_m2": "duplicate",
        "r_n1": "done", "r_n2": "duplicate",
    }  # fmt: skip
    after = _owned(db)
    gone = {"r_a", "r_c"}
    for table, by_run in before.items():
        assert set(by_run) >= gone | {"r_b"}, table  # every table held rows of every run
        assert after[table] == {r: n for r, n in by_run.items() if r not in gone}, table
    # the duplicates are out of the views of done runs
    assert rows(db, "SELECT DISTINCT run_id FROM edge_timeline ORDER BY 1") == [
        ("r_b",),
        ("r_l",),
        ("r_m1",),
        ("r_n1",),
    ]
