"""Reading a test's DuckDB file directly (read-only, closed again), independent of the app."""

from pathlib import Path

import duckdb


def rows(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()
