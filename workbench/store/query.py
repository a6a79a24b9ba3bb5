"""Read-only SQL for the CLI and the app: no writes, no file or network access."""

import io
import json
import math
from typing import Any

import duckdb
import pyarrow as pa

from workbench.errors import BadInput
from workbench.store.db import Store


def open_readonly(db: str | None = None, *, lock_wait: float | None = None) -> Store:
    """A read-only, sandboxed connection. It never writes: a database of an older schema is
    reported (`workbench migrate` upgrades it), a newer one refused."""
    store = Store(db, read_only=True, lock_wait=lock_wait)
    store.con.execute("SET enable_external_access = false")
    store.con.execute("SET lock_configuration = true")
    return store


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
