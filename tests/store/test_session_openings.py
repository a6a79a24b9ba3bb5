"""A runner's session opens the database file once for its set-up and lets it go afterwards:
each opening makes a DuckDB instance (about 15 ms), and a reader must get in between."""

import subprocess
import sys

from workbench.store import db as store_db
from workbench.store.session import StoreSession
from workbench.token_text import decode_pending_of

JOB = {"job_id": "j1", "pipeline": "edges", "method": "eap", "checkpoint_id": "c", "task": "t"}


def _openings(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = store_db._connect

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_db, "_connect", counting)
    return opened


def _a_reader_counts_queue_rows(db) -> int:
    """Another process opens the file (it cannot while this one holds it) and counts."""
    code = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(con.execute('SELECT count(*) FROM run_queue').fetchone()[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(db)], check=True, capture_output=True, text=True
    )
    return int(out.stdout)


def test_set_up_takes_two_openings_and_lets_the_file_go(tmp_path, monkeypatch):
    db = tmp_path / "w.duckdb"
    opened = _openings(monkeypatch)
    with StoreSession(str(db)) as session:
        assert len(opened) == 1  # created, migrated, swept, kept runs stored: one opening
        with session.held():
            decode_pending_of(session)
            session.enqueue([JOB])
        assert len(opened) == 2  # the rewrite and the queue: one more
        assert _a_reader_counts_queue_rows(db) == 1  # let go: a reader gets in
        session.start("j1", "r1", "key", force=False)
        assert len(opened) == 3  # an operation outside `held` opens on its own
    assert _a_reader_counts_queue_rows(db) == 1  # closed; its rows go with a runner's `clear`


def test_a_held_session_keeps_its_one_opening(tmp_path, monkeypatch):
    db = tmp_path / "w.duckdb"
    opened = _openings(monkeypatch)
    with StoreSession(str(db), hold=True) as session:
        with session.held():
            session.enqueue([JOB])
        session.clear(["j1"])
    assert len(opened) == 1
    assert _a_reader_counts_queue_rows(db) == 0
