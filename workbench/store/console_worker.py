"""The SQL console's worker: one user query, in a process of its own that its caller can kill.

`run_console_query` starts `python -m workbench.store.console_worker PRIVATE_DIR` and writes one
JSON line to its stdin: the query, the database, the private directory and the limits. The
worker

1. opens the database read-only and sandboxed, with DuckDB's temporary files in the private
   directory (at most `max_spill` bytes) and DuckDB's `memory_limit` set;
2. bounds its own data segment (`RLIMIT_DATA`: heap and anonymous mappings, where DuckDB's and
   Arrow's allocations live) at its size now plus `max_memory`, so an allocation DuckDB's
   memory_limit does not count fails inside the query instead of growing without end;
3. prints `ready` (the caller's timeout counts from here), runs the query and writes its first
   rows, in Arrow batches of `BATCH_ROWS`, to an Arrow IPC stream in the private directory until
   `max_rows` rows or `max_bytes` bytes;
4. prints its outcome as one JSON line and exits, after closing the result and the connection.

The address-space limit (`RLIMIT_AS`) is not used: DuckDB's threads and the allocator reserve
address space that is never touched (about 1 GB at start here, growing with the thread count),
so it would count reservations rather than memory. SIGINT is ignored (Ctrl-C in a terminal
reaches the whole process group; the caller decides), and the worker exits at once when its
stdin closes, i.e. when the caller is gone, removing the private directory the caller could
not.
"""

import json
import logging
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from workbench.errors import BadInput
from workbench.store.db import DatabaseBusy
from workbench.store.query import BATCH_ROWS, RESULT_FILE, SPILL_DIR, open_readonly

logger = logging.getLogger(__name__)

GONE_STATUS = 3  # the exit status when the caller went away
REMOVE_ATTEMPTS = 100


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    if not line:  # the caller went before sending its request: remove the directory it named
        if len(sys.argv) > 1:
            shutil.rmtree(sys.argv[1], ignore_errors=True)
        return GONE_STATUS
    request = json.loads(line)
    threading.Thread(
        target=_exit_when_caller_goes, args=(request["dir"],), name="caller-watch", daemon=True
    ).start()
    _say(serve(request))
    return 0


def _exit_when_caller_goes(private: str) -> None:
    """Read stdin until it closes: the caller exited or closed it; end now, whatever runs,
    removing the private directory (a caller killed outright could not). It reads the file
    descriptor itself: a daemon thread blocked inside `sys.stdin` would hold its lock, and the
    interpreter aborts when it cannot take that lock at exit."""
    while os.read(sys.stdin.fileno(), 1 << 12):
        pass
    _remove(private)
    os._exit(GONE_STATUS)


def _remove(private: str) -> None:
    """Remove the private directory while the main thread may still be creating files in it
    (the caller can be gone before the query has even opened the database): again until the
    directory itself is gone, after which nothing can be created in it (nothing in the worker
    creates it again)."""
    for _ in range(REMOVE_ATTEMPTS):
        shutil.rmtree(private, ignore_errors=True)
        if not os.path.lexists(private):
            return
        time.sleep(0.01)
    logger.warning("could not remove the SQL worker's directory %s", private)


def _say(message: str | dict[str, Any]) -> None:
    text = message if isinstance(message, str) else json.dumps(message)
    sys.stdout.buffer.write(text.encode() + b"\n")
    sys.stdout.buffer.flush()


def serve(request: dict[str, Any]) -> dict[str, Any]:
    """Open, bound, run: the outcome as the caller reads it."""
    private = Path(request["dir"])
    spill = private / SPILL_DIR
    spill.mkdir()
    try:
        store = open_readonly(
            request["db"],
            lock_wait=request["lock_wait"],
            memory_limit=request["memory_limit"],
            temp_directory=str(spill),
            max_spill=request["max_spill"],
        )
    except DatabaseBusy as err:
        return {"error": "busy", "detail": str(err)}
    except BadInput as err:
        return {"error": "bad_input", "detail": str(err)}
    with store:
        _bound_memory(request["max_memory"])
        _say("ready")
        start = time.monotonic()
        try:
            rows, size, cut = fetch(
                store.con,
                request["sql"],
                private / RESULT_FILE,
                max_rows=request["max_rows"],
                max_bytes=request["max_bytes"],
            )
        except duckdb.OutOfMemoryException as err:
            spilled = "max_temp_directory_size" in str(err)
            return {"error": "spill" if spilled else "memory", "detail": _first_line(err)}
        except duckdb.Error as err:
            return {"error": "sql", "detail": _first_line(err)}
        except MemoryError as err:  # Arrow's or Python's allocation past the bound
            return {"error": "memory", "detail": str(err)}
        seconds = time.monotonic() - start
    return {"rows": rows, "bytes": size, "cut": cut, "seconds": seconds}


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _data_bytes() -> int | None:
    """This process's data segment now (VmData), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _bound_memory(max_memory: int | None) -> None:
    if max_memory is None:
        return
    now = _data_bytes()
    if now is None:
        logger.warning("cannot read this process's memory use: the memory bound is not set")
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = now + max_memory
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def fetch(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    out: Path,
    *,
    max_rows: int | None,
    max_bytes: int | None,
) -> tuple[int, int, str | None]:
    """Run `sql` and write its first rows to an Arrow IPC stream at `out`, batch by batch, until
    `max_rows` rows or `max_bytes` bytes (the batch that passes either is cut to fit). Returns
    (rows, bytes, the limit that cut the result or None)."""
    relation = con.sql(sql)
    if relation is None:  # a statement without rows
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([])):
            return 0, 0, None
    reader = relation.to_arrow_reader(BATCH_ROWS)
    rows = size = 0
    cut = None
    try:
        with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as writer:
            for batch in reader:
                batch, cut = _within(batch, rows=rows, size=size, limits=(max_rows, max_bytes))
                if batch.num_rows:
                    writer.write_batch(batch)
                rows, size = rows + batch.num_rows, size + batch.nbytes
                if cut is not None:
                    break
    finally:
        reader.close()
    return rows, size, cut


def _within(
    batch: pa.RecordBatch, *, rows: int, size: int, limits: tuple[int | None, int | None]
) -> tuple[pa.RecordBatch, str | None]:
    """The part of `batch` that fits after `rows` rows and `size` bytes, and which limit cut it."""
    max_rows, max_bytes = limits
    cut = None
    if max_rows is not None and rows + batch.num_rows > max_rows:
        batch, cut = batch.slice(0, max_rows - rows), "rows"
    if max_bytes is not None and size + batch.nbytes > max_bytes:
        left = max_bytes - size
        lo, hi = 0, batch.num_rows  # the most rows whose bytes fit: lo fits, hi + 1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if batch.slice(0, mid).nbytes <= left:
                lo = mid
            else:
                hi = mid - 1
        batch, cut = batch.slice(0, lo), "bytes"
    return batch, cut


if __name__ == "__main__":
    sys.exit(main())
