"""`StoreSession`: how a runner talks to the store while it computes.

DuckDB lets one process write or several read, not both. Held for a whole pipeline, the write
connection would lock the app and `workbench sql` out for as long as the pipeline runs (minutes
to hours on a real model). A session therefore opens the file only for each short operation:
registering the job queue, starting a run (is it stored already? mark it running), its
heartbeat, and its one write transaction. Readers get in between. `hold=True` keeps one
connection for the whole session instead (the demo's choice: hundreds of sub-second runs, no
reader until it ends).

A reader may hold the file for a long time (a long console query), so a session waits for the
lock rather than fail the run: every operation but the heartbeat waits up to `lock_wait`
seconds (`run_lock_wait`: --lock-wait, $WORKBENCH_LOCK_WAIT, one hour by default, 0 for no
limit), logging at INFO every 30 s what it waits to do. A heartbeat that cannot get the lock at
once is skipped. A computed run whose write still cannot get the lock is not thrown away: it is
kept in `<db>.pending/<run_id>/` (Arrow files and a JSON record) and stored by the next session
on that database, before anything else; then the session stops with `DatabaseBusy` saying so.

The queue (`run_queue`) shows what a runner has yet to do: a job is `queued`, then `running`
(with its run id, process, host and a heartbeat), and its row goes when its last run is
stored. While jobs are queued a thread refreshes the heartbeat of every row of this process
every `HEARTBEAT_SECONDS`, so the view `run_queue_live` (rows seen in the last 10 minutes)
leaves out the rows of a runner that was killed. A session removes its rows on every way out
(`clear`); rows of a process that died (SIGKILL, a crash) are swept when the next session
starts.
"""

import json
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from workbench.core import utc_now
from workbench.errors import BadInput
from workbench.results import RunResult
from workbench.rows import RunRow
from workbench.store.db import (
    LOCK_WAIT_SECONDS,
    DatabaseBusy,
    RunWrite,
    Store,
    default_db_path,
    result_write,
    run_lock_wait,
)

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 10.0
BEAT_LOCK_WAIT = 1.0  # a heartbeat waits this long for the lock, then is skipped
# a queue row whose heartbeat is older than this, from another host, is abandoned
STALE_AFTER = timedelta(minutes=30)
PENDING_FORMAT = 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreSession:
    def __init__(
        self,
        db: str | os.PathLike[str] | None,
        *,
        hold: bool = False,
        lock_wait: float | None = None,
    ):
        self.db = db
        self.path = default_db_path(db)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.lock_wait = run_lock_wait(lock_wait)
        self._lock = threading.Lock()  # one database operation of this session at a time
        self._stop_beating = threading.Event()
        self._beating: threading.Thread | None = None
        # creates and migrates the file once, and sweeps the queue and stores kept runs in the
        # same opening
        self._hold = hold
        self._held: Store | None = Store(db, lock_wait=self.lock_wait, purpose="open it")
        try:
            self.sweep()
            self.store_pending()
        except BaseException:
            self.close()
            raise
        if not hold:
            self._held.close()
            self._held = None

    @contextmanager
    def held(self) -> Iterator["StoreSession"]:
        """The block's operations (a runner's set-up: rewriting token strings, queueing its
        jobs) in one opening of the file, let go at the end unless the session holds it
        throughout (`hold=True`): each opening makes a DuckDB instance, about 15 ms."""
        if self._held is None:
            with self._lock:
                self._held = Store(
                    self.db, migrate=False, lock_wait=self.lock_wait, purpose="open it"
                )
        try:
            yield self
        finally:
            if not self._hold:
                with self._lock:
                    held, self._held = self._held, None
                    if held is not None:
                        held.close()

    def close(self) -> None:
        self._stop_beating.set()
        if self._beating is not None:
            self._beating.join()
            self._beating = None
        if self._held is not None:
            self._held.close()
            self._held = None

    def __enter__(self) -> "StoreSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def store(self, *, purpose: str | None = None, wait: float | None = None) -> Iterator[Store]:
        """The store for one operation, opened for it (waiting up to `wait` seconds, default
        `lock_wait`, for the lock; `purpose` names the wait in the log) or the held one."""
        with self._lock, self._open(purpose=purpose, wait=wait) as store:
            yield store

    @contextmanager
    def _open(self, *, purpose: str | None = None, wait: float | None = None) -> Iterator[Store]:
        if self._held is not None:
            yield self._held
            return
        lock_wait = self.lock_wait if wait is None else wait
        with Store(self.db, migrate=False, lock_wait=lock_wait, purpose=purpose) as store:
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
        with self.store(purpose="sweep the run queue") as store:
            rows = store.query(
                "SELECT job_id, pid, host, coalesce(heartbeat_at, queued_at) AS seen FROM run_queue"
            ).to_pylist()
            stale = [
                r["job_id"]
                for r in rows
                if (r["host"] == self.host and not _alive(int(r["pid"])))
                or (r["host"] != self.host and r["seen"] < utc_now() - STALE_AFTER)
            ]
            if stale:
                store.con.execute("DELETE FROM run_queue WHERE list_contains(?, job_id)", [stale])
                logger.info("swept %d queue rows of runners that are gone", len(stale))
        return len(stale)

    def enqueue(self, jobs: list[dict[str, Any]]) -> None:
        """Queue rows for jobs (job_id, pipeline, method, checkpoint_id, task); from now until
        the session closes, a thread keeps this process's rows' heartbeat fresh."""
        if not jobs:
            return
        now = utc_now()
        unique = {j["job_id"]: j for j in jobs}
        rows = [
            j | {"status": "queued", "pid": self.pid, "host": self.host, "queued_at": now}
            for j in unique.values()
        ]
        with self.store(purpose="queue its jobs") as store:
            ids = [r["job_id"] for r in rows]
            store.con.execute("DELETE FROM run_queue WHERE list_contains(?, job_id)", [ids])
            store.insert("run_queue", pa.Table.from_pylist(rows))
        self._start_beating()

    def start(self, job_id: str, run_id: str, run_key: str, force: bool) -> str | None:
        """The stored run with this key (unless `force`); otherwise mark the job running."""
        with self.store(purpose=f"start run {run_id}") as store:
            existing = None if force else store.done_run(run_key)
            if existing is None:
                store.con.execute(
                    """UPDATE run_queue SET status = 'running', run_id = ?, pid = ?, host = ?,
                       started_at = coalesce(started_at, ?), heartbeat_at = ?
                       WHERE job_id = ?""",
                    [run_id, self.pid, self.host, utc_now(), utc_now(), job_id],
                )
            return existing

    def running(self, job_id: str) -> None:
        """Mark a job running (sent to a worker; its runs' ids come when they are stored)."""
        with self.store(purpose="mark a job running") as store:
            store.con.execute(
                """UPDATE run_queue SET status = 'running', pid = ?, host = ?,
                   started_at = coalesce(started_at, ?), heartbeat_at = ? WHERE job_id = ?""",
                [self.pid, self.host, utc_now(), utc_now(), job_id],
            )

    def beat(self, job_ids: list[str]) -> None:
        """Refresh the heartbeat of running jobs (a missed beat is not an error)."""
        if job_ids:
            self._beat("list_contains(?, job_id)", [job_ids])

    def _beat(self, where: str, params: list[Any]) -> None:
        """One heartbeat: skipped when this session is busy with the database or another
        process holds the lock for longer than `BEAT_LOCK_WAIT`."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            with self._open(wait=BEAT_LOCK_WAIT) as store:
                store.con.execute(
                    f"UPDATE run_queue SET heartbeat_at = ? WHERE {where}", [utc_now(), *params]
                )
        except Exception:
            logger.debug("a heartbeat was skipped", exc_info=True)
        finally:
            self._lock.release()

    def _start_beating(self) -> None:
        if self._beating is not None:
            return

        def beat_mine() -> None:
            while not self._stop_beating.wait(HEARTBEAT_SECONDS):
                self._beat("pid = ? AND host = ?", [self.pid, self.host])

        self._beating = threading.Thread(target=beat_mine, name="workbench-heartbeat", daemon=True)
        self._beating.start()

    def finish(self, job_id: str) -> None:
        """A job's runs are stored: its row goes (if the database stays busy, the row goes
        with the session's `clear`, or is swept)."""
        try:
            with self.store(purpose="take a finished job off the queue") as store:
                store.con.execute("DELETE FROM run_queue WHERE job_id = ?", [job_id])
        except DatabaseBusy as err:
            logger.warning("%s (the finished job stays on the queue for now)", err)

    def clear(self, job_ids: list[str]) -> None:
        """Remove this session's queue rows (it stops, or a bad input ended it). Never raises:
        on the way out of a failure it must not hide it; a row it cannot remove drops out of
        `run_queue_live` and is swept by the next session."""
        if not job_ids:
            return
        try:
            with self.store(
                purpose="clear its queue rows", wait=min(self.lock_wait, LOCK_WAIT_SECONDS)
            ) as store:
                store.con.execute("DELETE FROM run_queue WHERE list_contains(?, job_id)", [job_ids])
        except Exception as err:
            logger.warning("could not clear %d queue rows: %s", len(job_ids), err)

    # --- writes ---------------------------------------------------------------------------
    def write_result(
        self, run: RunRow, *, registry: dict[str, pa.Table], result: RunResult, replace: bool
    ) -> str:
        """Store a computed run (see `Store.write_run` for what it returns)."""
        return self.write(result_write(run, registry=registry, result=result), replace=replace)

    def record_failed_run(self, run: RunRow, *, registry: dict[str, pa.Table]) -> str:
        run.status = "failed"
        return self.write(RunWrite(run, registry, {}), replace=False)

    def write(self, w: RunWrite, *, replace: bool) -> str:
        """Write a run, waiting up to `lock_wait` for the lock; if it stays busy, the run is
        kept in the pending directory and `DatabaseBusy` says where."""
        w.run.finished_at = w.run.finished_at or utc_now()  # computed now, whenever it is stored
        try:
            with self.store(purpose=f"store run {w.run.run_id}") as store:
                return store.write(w, replace=replace)
        except DatabaseBusy as err:
            raise self._keep(w, replace) from err

    def _keep(self, w: RunWrite, replace: bool) -> BadInput:
        """Keep a run the database had no room for; the error that says where it is."""
        run = w.run
        what = f"run {run.run_id} ({run.pipeline} {run.method} on {run.checkpoint_id})"
        busy = f"{self.path}: the database stayed busy for {self.lock_wait:.0f} s"
        try:
            kept = keep_pending(self.path, w, replace=replace)
        except OSError as lost:
            return BadInput(
                f"{busy}, and keeping {what} in {pending_dir(self.path)} failed ({lost}): its "
                "computed result is lost"
            )
        return DatabaseBusy(
            f"{busy}, so {what} is not stored yet: its computed result is kept in {kept}, and "
            "the next `workbench run`, `watch` or `demo` on this database stores it"
        )

    def store_pending(self) -> int:
        """Store the runs kept in the pending directory (oldest first); returns how many."""
        root = pending_dir(self.path)
        if not root.is_dir():
            return 0
        kept = []
        for directory in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
            try:
                kept.append((*read_pending(directory), directory))
            except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
                logger.error("%s: cannot read this kept run (%s); it is left there", directory, err)
        kept.sort(key=lambda k: k[0].run.finished_at or datetime.min)
        stored = 0
        for w, replace, directory in kept:
            try:
                with self.store(purpose=f"store the kept run {w.run.run_id}") as store:
                    run_id = store.write(w, replace=replace)
            except DatabaseBusy:
                raise
            except Exception as err:  # (its staged files are gone, say): it stays for a look
                logger.error("%s: cannot store this kept run (%s); left there", directory, err)
                continue
            shutil.rmtree(directory, ignore_errors=True)
            logger.info("stored the kept run %s from %s", run_id, directory)
            stored += 1
        if not any(root.iterdir()):
            root.rmdir()
        return stored


# --- runs kept for later -------------------------------------------------------------------


def pending_dir(db_path: Path) -> Path:
    """Where runs that could not be stored wait: `<db>.pending/` beside the database."""
    return db_path.with_name(db_path.name + ".pending")


def keep_pending(db_path: Path, w: RunWrite, *, replace: bool) -> Path:
    """Write a run's record and rows to `<db>.pending/<run_id>/` (a JSON record and one Arrow
    IPC file per table), complete or not at all; returns the directory."""
    root = pending_dir(db_path)
    final = root / w.run.run_id
    partial = root / f".{w.run.run_id}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    record = {k: _jsonable(v) for k, v in asdict(w.run).items()}
    meta = {"format": PENDING_FORMAT, "replace": replace, "files": w.files, "run": record}
    (partial / "run.json").write_text(json.dumps(meta, sort_keys=True))
    for section in ("registry", "rows", "linked"):
        for table, data in getattr(w, section).items():
            path = str(partial / f"{section}.{table}.arrow")
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, data.schema) as writer:
                writer.write_table(data)
    partial.rename(final)
    logger.warning("kept run %s in %s until the database is free", w.run.run_id, final)
    return final


def read_pending(directory: Path) -> tuple[RunWrite, bool]:
    """A kept run (`keep_pending`): what to write, and whether it replaces its key's run."""
    meta = json.loads((directory / "run.json").read_text())
    if meta.get("format") != PENDING_FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, not {PENDING_FORMAT}")
    record = dict(meta["run"])
    for name in ("started_at", "finished_at"):
        if record[name] is not None:
            record[name] = datetime.fromisoformat(record[name])
    tables: dict[str, dict[str, pa.Table]] = {"registry": {}, "rows": {}, "linked": {}}
    for path in sorted(directory.glob("*.arrow")):
        section, table, _ = path.name.split(".")
        with pa.memory_map(str(path)) as source:
            tables[section][table] = pa.ipc.open_file(source).read_all()
    w = RunWrite(RunRow(**record), **tables, files=dict(meta["files"]))
    return w, bool(meta["replace"])


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
