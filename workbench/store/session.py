"""`StoreSession`: how a runner talks to the store while it computes.

DuckDB lets one process write or several read, not both. Held for a whole pipeline, the write
connection would lock the app and `workbench sql` out for as long as the pipeline runs (minutes
to hours on a real model). A session therefore opens the file only for each short operation:
registering the job queue, starting a run (is it stored already? mark it running), its
heartbeat, and its one write transaction. Readers get in between. `hold=True` keeps one
connection for the whole session instead (the demo's choice: hundreds of sub-second runs, no
reader until it ends).

The queue (`run_queue`) shows what a runner has yet to do: a job is `queued`, then `running`
(with its run id, process, host and a heartbeat), and its row goes when its last run is
stored. Rows of a process that died are swept when the next session starts.
"""

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from workbench.results import RunResult
from workbench.store.db import RunRecord, Store

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
# a queue row whose heartbeat is older than this, from another host, is abandoned
STALE_AFTER = timedelta(minutes=30)


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreSession:
    def __init__(self, db: str | os.PathLike[str] | None, *, hold: bool = False):
        self.db = db
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._held: Store | None = Store(db)  # creates and migrates the file once
        if not hold:
            self._held.close()
            self._held = None
        self.sweep()

    def close(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> "StoreSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def store(self) -> Iterator[Store]:
        if self._held is not None:
            yield self._held
            return
        with Store(self.db, migrate=False) as store:
            yield store

    # --- reads for planners ---------------------------------------------------------------
    def latest_saes(self, checkpoint_id: str) -> list[tuple[str, str]]:
        with self.store() as store:
            return store.latest_saes(checkpoint_id)

    def done_run(self, run_key: str) -> str | None:
        with self.store() as store:
            return store.done_run(run_key)

    # --- the queue ------------------------------------------------------------------------
    def sweep(self) -> int:
        """Remove queue rows of processes that are gone: on this host, a pid not alive; on
        another, a heartbeat older than `STALE_AFTER`."""
        with self.store() as store:
            rows = store.query(
                "SELECT job_id, pid, host, coalesce(heartbeat_at, queued_at) AS seen FROM run_queue"
            ).to_pylist()
            stale = [
                r["job_id"]
                for r in rows
                if (r["host"] == self.host and not _alive(int(r["pid"])))
                or (r["host"] != self.host and r["seen"] < _now() - STALE_AFTER)
            ]
            if stale:
                store.con.execute("DELETE FROM run_queue WHERE list_contains(?, job_id)", [stale])
                logger.info("swept %d queue rows of runners that are gone", len(stale))
        return len(stale)

    def enqueue(self, jobs: list[dict[str, Any]]) -> None:
        """Queue rows for jobs (job_id, pipeline, method, checkpoint_id, task)."""
        if not jobs:
            return
        now = _now()
        unique = {j["job_id"]: j for j in jobs}
        rows = [
            j | {"status": "queued", "pid": self.pid, "host": self.host, "queued_at": now}
            for j in unique.values()
        ]
        with self.store() as store:
            ids = [r["job_id"] for r in rows]
            store.con.execute("DELETE FROM run_queue WHERE list_contains(?, job_id)", [ids])
            store.insert("run_queue", pa.Table.from_pylist(rows))

    def start(self, job_id: str, run_id: str, run_key: str, force: bool) -> str | None:
        """The stored run with this key (unless `force`); otherwise mark the job running."""
        with self.store() as store:
            existing = None if force else store.done_run(run_key)
            if existing is None:
                store.con.execute(
                    """UPDATE run_queue SET status = 'running', run_id = ?, pid = ?, host = ?,
                       started_at = coalesce(started_at, ?), heartbeat_at = ?
                       WHERE job_id = ?""",
                    [run_id, self.pid, self.host, _now(), _now(), job_id],
                )
            return existing

    def running(self, job_id: str) -> None:
        """Mark a job running (sent to a worker; its runs' ids come when they are stored)."""
        with self.store() as store:
            store.con.execute(
                """UPDATE run_queue SET status = 'running', pid = ?, host = ?,
                   started_at = coalesce(started_at, ?), heartbeat_at = ? WHERE job_id = ?""",
                [self.pid, self.host, _now(), _now(), job_id],
            )

    def beat(self, job_ids: list[str]) -> None:
        """Refresh the heartbeat of running jobs (a missed beat is not an error)."""
        if not job_ids:
            return
        try:
            with self.store() as store:
                store.con.execute(
                    "UPDATE run_queue SET heartbeat_at = ? WHERE list_contains(?, job_id)",
                    [_now(), job_ids],
                )
        except Exception:
            logger.debug("heartbeat of %d jobs missed", len(job_ids), exc_info=True)

    def finish(self, job_id: str) -> None:
        with self.store() as store:
            store.con.execute("DELETE FROM run_queue WHERE job_id = ?", [job_id])

    def clear(self, job_ids: list[str]) -> None:
        """Remove this session's queue rows (it stops, or a bad input ended it)."""
        if job_ids:
            with self.store() as store:
                store.con.execute("DELETE FROM run_queue WHERE list_contains(?, job_id)", [job_ids])

    @contextmanager
    def heartbeat(self, job_id: str) -> Iterator[None]:
        """While the block computes, refresh the job's heartbeat every `HEARTBEAT_SECONDS`."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                self.beat([job_id])

        thread = threading.Thread(target=beat, name="workbench-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # --- writes ---------------------------------------------------------------------------
    def write_result(
        self, run: RunRecord, *, registry: dict[str, pa.Table], result: RunResult, replace: bool
    ) -> str:
        with self.store() as store:
            return store.write_result(run, registry=registry, result=result, replace=replace)

    def record_failed_run(self, run: RunRecord, *, registry: dict[str, pa.Table]) -> str:
        with self.store() as store:
            return store.record_failed_run(run, registry=registry)
