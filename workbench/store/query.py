"""Read-only SQL for the CLI and the app: no writes, no file or network access.

A user's own query (`workbench sql`, the app's console) goes through `run_console_query`, which
also bounds what it costs: the rows are streamed from DuckDB in batches and fetching stops after
`max_rows` (so `SELECT * FROM range(1e9)` is never materialised), the query is interrupted
after `timeout` seconds (a runaway cross join), and DuckDB's own memory is capped
(`CONSOLE_MEMORY_LIMIT`; an operator that needs more fails with DuckDB's out-of-memory error).
"""

import io
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from workbench.errors import BadInput
from workbench.store.db import Store

CONSOLE_MEMORY_LIMIT = "2GB"  # DuckDB's memory for one console query
BATCH_ROWS = 65_536  # rows fetched at a time from a streaming result


def open_readonly(
    db: str | None = None, *, lock_wait: float | None = None, memory_limit: str | None = None
) -> Store:
    """A read-only, sandboxed connection. It never writes: a database of an older schema is
    reported (`workbench migrate` upgrades it), a newer one refused."""
    store = Store(db, read_only=True, lock_wait=lock_wait)
    store.con.execute("SET enable_external_access = false")
    if memory_limit is not None:
        store.con.execute(f"SET memory_limit = '{memory_limit}'")
    store.con.execute("SET lock_configuration = true")
    return store


@dataclass
class ConsoleResult:
    table: pa.Table  # at most max_rows rows
    truncated: bool  # the query had more rows than max_rows (not fetched)
    seconds: float


def run_console_query(
    sql: str,
    *,
    db: str | None = None,
    timeout: float | None = None,
    max_rows: int | None = None,
    on_wait: Callable[[float], None] | None = None,
    lock_wait: float | None = None,
) -> ConsoleResult:
    """A user's read-only query, bounded: its first `max_rows` rows (None: all), interrupted
    after `timeout` seconds (None: never). The query runs in a thread while this one waits,
    calling `on_wait(elapsed seconds)` every 0.1 s; if that raises (the app's page is rerun or
    stopped), the query is interrupted and the exception goes on."""
    if timeout is not None and timeout <= 0:
        raise BadInput(f"--timeout {timeout:g}: must be positive")
    if max_rows is not None and max_rows < 1:
        raise BadInput(f"--max-rows {max_rows}: must be at least 1")
    with open_readonly(db, lock_wait=lock_wait, memory_limit=CONSOLE_MEMORY_LIMIT) as store:
        con = store.con
        outcome: dict[str, Any] = {}
        finished = threading.Event()

        def fetch() -> None:
            try:
                relation = con.sql(sql)
                if relation is None:  # a statement without rows
                    outcome["table"], outcome["truncated"] = pa.table({}), False
                    return
                reader = relation.to_arrow_reader(BATCH_ROWS)
                batches, n, truncated = [], 0, False
                for batch in reader:
                    if max_rows is not None and n + batch.num_rows > max_rows:
                        batches.append(batch.slice(0, max_rows - n))
                        truncated = True
                        break
                    batches.append(batch)
                    n += batch.num_rows
                reader.close()
                outcome["table"] = pa.Table.from_batches(batches, reader.schema)
                outcome["truncated"] = truncated
            except BaseException as err:  # handed to the waiting thread
                outcome["error"] = err
            finally:
                finished.set()

        start = time.monotonic()
        worker = threading.Thread(target=fetch, name="workbench-sql", daemon=True)
        worker.start()
        try:
            while not finished.wait(0.1):
                elapsed = time.monotonic() - start
                if timeout is not None and elapsed > timeout:
                    con.interrupt()
                    finished.wait()
                    if "error" in outcome:  # interrupted, as asked
                        raise BadInput(
                            f"query stopped after {timeout:g} s (the timeout): narrow it, "
                            "aggregate, or allow more time"
                        )
                    break  # it finished just as the time ran out
                if on_wait is not None:
                    on_wait(elapsed)
        except BaseException:
            con.interrupt()
            finished.wait()
            raise
        error = outcome.get("error")
        if isinstance(error, duckdb.Error):
            first = str(error).strip().splitlines()[0]
            raise BadInput(f"SQL error: {first}") from error
        if error is not None:
            raise error
        return ConsoleResult(outcome["table"], outcome["truncated"], time.monotonic() - start)


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


def _cell(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return round(value, 6)
    return value


def format_table(table: pa.Table, fmt: str) -> str:
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps(rows, default=str, indent=1) + "\n"
    if fmt == "csv":
        import pyarrow.csv as pacsv

        buf = io.BytesIO()
        pacsv.write_csv(_stringify_lists(table), buf)
        return buf.getvalue().decode()
    columns = table.column_names
    cells = [[str(_cell(r[c])) if r[c] is not None else "NULL" for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out) + "\n"


def _stringify_lists(table: pa.Table) -> pa.Table:
    arrays = []
    for col in table.columns:
        if pa.types.is_list(col.type) or pa.types.is_struct(col.type):
            arrays.append(
                pa.array(
                    [json.dumps(v, default=str) if v is not None else None for v in col.to_pylist()]
                )
            )
        else:
            arrays.append(col)
    return pa.table(arrays, names=table.column_names)
