"""Read-only SQL for the CLI and the app: no writes, no file or network access.

A user's own query (`workbench sql`, the app's console) goes through `run_console_query`, which
runs it in a worker process of its own (`python -m workbench.store.console_worker`) and bounds
what it costs:

* rows and bytes: the worker streams the result from DuckDB in small Arrow batches and stops
  fetching after `max_rows` rows or once the batches pass `max_bytes` (so `SELECT * FROM
  range(1e9)` or a column of 10 KB strings is never materialised); the result is marked as cut
  by the limit that cut it;
* time: the worker is killed `timeout` seconds after its query started, which ends operators
  that DuckDB's own interrupt would only stop when they finish (a sort of one huge list, a
  regular expression over one huge string);
* memory: the worker bounds its own data segment (`RLIMIT_DATA`) at `max_memory` beyond its
  start-up footprint and sets DuckDB's `memory_limit` to half of that, so an allocation past the
  bound fails inside the query (one sentence) instead of swapping the machine;
* disk: DuckDB spills to a private temporary directory of the query's own (under `$TMPDIR`,
  deleted after the query) of at most `max_spill` bytes.

The result travels back as an Arrow IPC stream in that directory. The caller holds no DuckDB
connection while it waits, so no thread of the caller is inside DuckDB when it exits.
"""

import contextlib
import io
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa

import workbench
from workbench.errors import BadInput
from workbench.store.db import DatabaseBusy, Store

logger = logging.getLogger(__name__)

MAX_BYTES = 256_000_000  # result bytes fetched at most (--max-bytes)
MAX_MEMORY = 4_000_000_000  # memory the worker may take beyond its start-up (--max-memory)
MAX_SPILL = 1_000_000_000  # DuckDB's temporary files for one query (--max-spill)
BATCH_ROWS = 2048  # rows per Arrow batch: one DuckDB vector, so one batch cannot go far past
POLL_SECONDS = 0.1  # how often the caller checks the worker, its deadline and `on_wait`
EXIT_GRACE = 10.0  # seconds a worker that has answered may take to exit before it is killed
WORKER = "workbench.store.console_worker"
RESULT_FILE = "result.arrows"
SPILL_DIR = "spill"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int, *, option: str) -> int | None:
    """A size as the user wrote it ("256MB", "1.5GiB", "4096" bytes) in bytes; 0 is None (no
    limit). `option` names it in the error."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        unit = _UNITS.get(match.group(2).lower()) if match else None
        if match is None or unit is None:
            raise BadInput(
                f"{option} {text!r}: not a size (write e.g. 256MB, 4GB, 512MiB or a number of "
                "bytes; 0 for no limit)"
            )
        value = int(float(match.group(1)) * unit)
    if value < 0:
        raise BadInput(f"{option} {text}: must be 0 (no limit) or a positive size")
    return value or None


def format_size(n: int) -> str:
    """Bytes as a short decimal size: 256 MB, 1.5 GB, 900 bytes."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def open_readonly(
    db: str | None = None,
    *,
    lock_wait: float | None = None,
    memory_limit: str | None = None,
    temp_directory: str | None = None,
    max_spill: int | None = None,
) -> Store:
    """A read-only, sandboxed connection. It never writes: a database of an older schema is
    reported (`workbench migrate` upgrades it), a newer one refused. DuckDB spills to
    `temp_directory` (at most `max_spill` bytes there) when given; these are set before
    external access is disabled and the configuration locked, which forbid changing them."""
    store = Store(db, read_only=True, lock_wait=lock_wait)
    try:
        if temp_directory is not None:
            store.con.execute(f"SET temp_directory = {_sql_text(temp_directory)}")
        if max_spill is not None:
            store.con.execute(f"SET max_temp_directory_size = '{max_spill}B'")
        store.con.execute("SET enable_external_access = false")
        if memory_limit is not None:
            store.con.execute(f"SET memory_limit = {_sql_text(memory_limit)}")
        store.con.execute("SET lock_configuration = true")
    except BaseException:
        store.close()
        raise
    return store


@dataclass
class ConsoleResult:
    table: pa.Table  # at most max_rows rows and max_bytes bytes
    truncated: bool  # the query had more rows than were fetched
    seconds: float
    cut: str | None = None  # the limit that cut it: "rows" or "bytes"


@dataclass
class ConsoleLimits:
    """What one console query may cost (None: no limit)."""

    timeout: float | None = None  # seconds from the query's start
    max_rows: int | None = None
    max_bytes: int | None = MAX_BYTES
    max_memory: int | None = MAX_MEMORY
    max_spill: int | None = MAX_SPILL

    def check(self) -> None:
        if self.timeout is not None and not self.timeout > 0:
            raise BadInput(f"--timeout {self.timeout:g}: must be positive")
        if self.max_rows is not None and self.max_rows < 1:
            raise BadInput(f"--max-rows {self.max_rows}: must be at least 1")
        for option, value in (
            ("--max-bytes", self.max_bytes),
            ("--max-memory", self.max_memory),
            ("--max-spill", self.max_spill),
        ):
            if value is not None and value < 1:
                raise BadInput(f"{option} {value}: must be a positive number of bytes")

    def duckdb_memory_limit(self) -> str | None:
        """DuckDB's own memory_limit: half the worker's bound, leaving the rest for what DuckDB
        does not count (Arrow batches, some operators' own allocations, Python)."""
        return None if self.max_memory is None else f"{max(self.max_memory // 2, 1)}B"


def run_console_query(
    sql: str,
    *,
    db: str | None = None,
    timeout: float | None = None,
    max_rows: int | None = None,
    max_bytes: int | None = MAX_BYTES,
    max_memory: int | None = MAX_MEMORY,
    max_spill: int | None = MAX_SPILL,
    on_wait: Callable[[float], None] | None = None,
    lock_wait: float | None = None,
) -> ConsoleResult:
    """A user's read-only query, bounded (None: no limit): its first `max_rows` rows and at most
    `max_bytes` bytes of them, killed `timeout` seconds after it starts, `max_memory` bytes of
    memory and `max_spill` bytes of DuckDB's temporary files. While it runs this thread calls
    `on_wait(elapsed seconds)` every 0.1 s; if that raises (the app's page is rerun or stopped),
    the worker is killed and the exception goes on."""
    limits = ConsoleLimits(timeout, max_rows, max_bytes, max_memory, max_spill)
    limits.check()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="workbench-sql-") as private:
        request = {
            "sql": sql,
            "db": db,
            "dir": private,
            "lock_wait": lock_wait,
            "max_rows": limits.max_rows,
            "max_bytes": limits.max_bytes,
            "max_memory": limits.max_memory,
            "max_spill": limits.max_spill,
            "memory_limit": limits.duckdb_memory_limit(),
        }
        proc = _spawn(Path(private), request)
        try:
            lines = _wait(proc, timeout=limits.timeout, on_wait=on_wait, start=start)
        except _TimedOut:
            raise BadInput(
                f"query stopped after {limits.timeout:g} s (the timeout): narrow it, aggregate, "
                "or allow more time"
            ) from None
        finally:
            _end(proc)
        status = _status(proc, lines, Path(private))
        _raise_for(status, limits)
        table = _read_result(Path(private) / RESULT_FILE)
    cut = status.get("cut")
    return ConsoleResult(table, cut is not None, time.monotonic() - start, cut)


def _spawn(private: Path, request: dict[str, Any]) -> subprocess.Popen[bytes]:
    """The worker, started with the same interpreter and the same `workbench` as this process;
    the request goes to its stdin, which stays open: the worker exits when it closes."""
    root = str(Path(workbench.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
    with open(private / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", WORKER, str(private)],  # removed if the request never comes
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: its status says why
        proc.stdin.write(json.dumps(request).encode() + b"\n")
        proc.stdin.flush()
    return proc


class _TimedOut(Exception):
    pass


def _wait(
    proc: subprocess.Popen[bytes],
    *,
    timeout: float | None,
    on_wait: Callable[[float], None] | None,
    start: float,
) -> list[str]:
    """The worker's stdout lines, once it has closed it (exited) or, at most `EXIT_GRACE`
    seconds after its outcome line; raises `_TimedOut` when its query has run for longer than
    `timeout` (counted from its "ready" line to its outcome line)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    started: float | None = None
    finished: float | None = None
    while True:
        readable, _, _ = select.select([fd], [], [], POLL_SECONDS)
        if readable:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                proc.wait()
                return out.decode(errors="replace").splitlines()
            out += chunk
            if started is None and b"ready\n" in out:
                started = time.monotonic()
            if finished is None and out.endswith(b"\n") and (b"\n{" in out or out[:1] == b"{"):
                finished = time.monotonic()
        now = time.monotonic()
        if finished is not None:
            if now - finished > EXIT_GRACE:  # it answered but does not exit: _end kills it
                logger.warning("the SQL worker did not exit %.0f s after its query", EXIT_GRACE)
                return out.decode(errors="replace").splitlines()
        elif timeout is not None and started is not None and now - started > timeout:
            raise _TimedOut
        if on_wait is not None:
            on_wait(now - start)


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill the worker if it still runs, reap it and close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()


def _status(proc: subprocess.Popen[bytes], lines: list[str], private: Path) -> dict[str, Any]:
    """The worker's last line (its outcome as JSON), or a description of how it died."""
    for line in reversed(lines):
        if line.startswith("{"):
            status: dict[str, Any] = json.loads(line)
            if proc.returncode:
                logger.warning(
                    "the SQL worker exited with status %d after its query", proc.returncode
                )
            return status
    code = proc.returncode
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    said = (private / "stderr.txt").read_text(errors="replace").strip().splitlines()
    return {"error": "died", "detail": how + (f": {said[-1]}" if said else "")}


def _raise_for(status: dict[str, Any], limits: ConsoleLimits) -> None:
    error, detail = status.get("error"), status.get("detail", "")
    if error is None:
        return
    if error == "busy":
        raise DatabaseBusy(detail)
    if error == "bad_input":
        raise BadInput(detail)
    if error == "sql":
        raise BadInput(f"SQL error: {detail}")
    if error == "memory":
        if limits.max_memory is None:
            raise BadInput(f"the query ran out of memory ({detail}): narrow it or aggregate")
        raise BadInput(
            f"the query needed more than {format_size(limits.max_memory)} of memory (the memory "
            "bound): narrow it, aggregate, or allow more (--max-memory)"
        )
    if error == "spill":
        if limits.max_spill is None:
            raise BadInput(f"the query ran out of temporary disk space ({detail})")
        raise BadInput(
            f"the query needed more than {format_size(limits.max_spill)} of temporary disk "
            "space (the spill cap): narrow it, aggregate, or allow more (--max-spill)"
        )
    raise BadInput(f"the query's worker process ended unexpectedly ({detail})")


def _read_result(path: Path) -> pa.Table:
    with pa.OSFile(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def run_readonly_query(
    sql: str,
    *,
    db: str | None = None,
    params: list[Any] | None = None,
    lock_wait: float | None = None,
) -> pa.Table:
    with open_readonly(db, lock_wait=lock_wait) as store:
        try:
            return store.query(sql, params)
        except duckdb.Error as err:
            first = str(err).strip().splitlines()[0]
            raise BadInput(f"SQL error: {first}") from err


# --- printing ---------------------------------------------------------------------------------

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_CONTROL_RE2 = r"[\x00-\x1f\x7f-\x{9f}]"  # the same class in Arrow's regular expressions
PRINT_CHUNK_ROWS = 1_000  # rows turned into text at a time while printing


def escape_controls(text: str) -> str:
    """Control characters (C0, DEL, C1: ESC, newline, ...) as visible escapes such as `\\x1b`
    and `\\n`, so a value cannot drive the terminal it is printed on."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 6)
    return value


def format_table(table: pa.Table, fmt: str, *, escape: bool = True) -> str:
    """The table as text: an aligned table, csv or json. With `escape`, control characters in
    table and csv output are shown as escapes (json escapes them itself)."""
    out = io.StringIO()
    write_table(table, fmt, out, escape=escape)
    return out.getvalue()


def write_table(table: pa.Table, fmt: str, out: IO[str], *, escape: bool = True) -> None:
    """`format_table`, written to `out` a chunk of rows at a time (so printing a large result
    does not hold several whole copies of it as text)."""
    if fmt == "json":
        chunks = _json_chunks(table)
    elif fmt == "csv":
        chunks = _csv_chunks(table, escape=escape)
    else:
        chunks = (line + "\n" for line in _table_lines(table, escape=escape))
    for chunk in chunks:
        out.write(chunk)


def _json_chunks(table: pa.Table) -> Iterator[str]:
    """The rows as one JSON list (`json.dumps(rows, indent=1)`), a row at a time."""
    first = True
    for batch in table.to_batches(max_chunksize=PRINT_CHUNK_ROWS):
        for row in batch.to_pylist():
            text = json.dumps(row, default=str, indent=1).replace("\n", "\n ")
            yield ("[\n " if first else ",\n ") + text
            first = False
    yield "[]\n" if first else "\n]\n"


def _csv_chunks(table: pa.Table, *, escape: bool) -> Iterator[str]:
    import pyarrow.csv as pacsv

    def text(part: pa.Table, header: bool) -> str:
        buf = io.BytesIO()
        options = pacsv.WriteOptions(include_header=header)
        pacsv.write_csv(_csv_ready(part, escape=escape), buf, write_options=options)
        return buf.getvalue().decode()

    first = True
    for batch in table.to_batches(max_chunksize=PRINT_CHUNK_ROWS):
        yield text(pa.Table.from_batches([batch], table.schema), first)
        first = False
    if first:  # no rows: the header alone
        yield text(table, True)


def _rows_of_cells(table: pa.Table, *, escape: bool) -> Iterator[list[str]]:
    for batch in table.to_batches(max_chunksize=PRINT_CHUNK_ROWS):
        for row in batch.to_pylist():
            cells = [str(_cell(v)) if v is not None else "NULL" for v in row.values()]
            yield [escape_controls(c) for c in cells] if escape else cells


def _table_lines(table: pa.Table, *, escape: bool) -> Iterator[str]:
    columns = [escape_controls(c) if escape else c for c in table.column_names]
    widths = [len(c) for c in columns]
    for cells in _rows_of_cells(table, escape=escape):
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    yield line(columns)
    yield line(["-" * w for w in widths])
    for cells in _rows_of_cells(table, escape=escape):
        yield line(cells)
    n = table.num_rows
    yield f"({n} row{'s' if n != 1 else ''})"


def _csv_ready(table: pa.Table, *, escape: bool) -> pa.Table:
    """Lists and structs as JSON text; with `escape`, binary as escaped text and control
    characters in strings (and names) escaped."""
    arrays = [_csv_column(col, escape=escape) for col in table.columns]
    names = [escape_controls(n) if escape else n for n in table.column_names]
    return pa.table(arrays, names=names)


def _csv_column(col: pa.ChunkedArray, *, escape: bool) -> pa.ChunkedArray | pa.Array:
    kind = col.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_struct(kind):
        return pa.array(
            [json.dumps(v, default=str) if v is not None else None for v in col.to_pylist()],
            pa.string(),
        )
    if not escape:
        return col
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pa.array([_bytes_text(v) for v in col.to_pylist()], pa.string())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        import pyarrow.compute as pc

        if pc.any(pc.match_substring_regex(col, _CONTROL_RE2)).as_py():
            return pa.array(
                [escape_controls(v) if v is not None else None for v in col.to_pylist()],
                pa.string(),
            )
    return col


def _bytes_text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in value)
