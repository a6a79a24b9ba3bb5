"""Read-only data access for the app: short-lived connections, cached query results.

Every query opens the DuckDB file read-only and closes it again, so a pipeline can take the
write lock between queries; results are cached for a few seconds (`st.cache_data`). One retry
policy: opening waits with backoff while a writer holds the file, for at most
`READ_LOCK_WAIT_SECONDS` (the store's), then the page says the database is busy and stops,
instead of showing a lock error.
"""

import os

import pandas as pd
import streamlit as st

from workbench.app.access import plain
from workbench.store import DatabaseBusy, default_db_path
from workbench.store.query import run_readonly_query

CACHE_SECONDS = 10


def db_path() -> str:
    return str(default_db_path(os.environ.get("WORKBENCH_DB")))


def query(sql: str, params: tuple = (), db: str | None = None) -> pd.DataFrame:
    """Run a read-only query (cached); a database that stays busy stops the page with a
    message (the next rerun tries again)."""
    try:
        return _query(sql, params, db or db_path())
    except DatabaseBusy as err:
        st.warning(plain(f"{err}. This page will show the data once the writer lets go."))
        st.stop()
        raise AssertionError("unreachable") from err


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def _query(sql: str, params: tuple, db: str) -> pd.DataFrame:
    return run_readonly_query(sql, db=db, params=list(params)).to_pandas()


def database_ready() -> bool:
    return os.path.exists(db_path())


query.clear = _query.clear  # type: ignore[attr-defined]  # (tests reset the cache this way)
