"""Read-only data access for the app: short-lived connections, cached query results.

Every query opens the DuckDB file read-only and closes it again, so a pipeline can take the
write lock between queries; results are cached for a few seconds (`st.cache_data`).
"""

import os
import time

import pandas as pd
import streamlit as st

from workbench.errors import BadInput
from workbench.store import default_db_path
from workbench.store.query import run_readonly_query

CACHE_SECONDS = 10
RETRIES = 20


def db_path() -> str:
    return str(default_db_path(os.environ.get("WORKBENCH_DB")))


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def query(sql: str, params: tuple = (), db: str | None = None) -> pd.DataFrame:
    """Run a read-only query; retries while a pipeline holds the write lock."""
    for attempt in range(RETRIES):
        try:
            return run_readonly_query(sql, db=db or db_path(), params=list(params)).to_pandas()
        except BadInput as err:
            if "lock" not in str(err).lower() or attempt == RETRIES - 1:
                raise
            time.sleep(0.25)
    raise AssertionError("unreachable")


def database_ready() -> bool:
    return os.path.exists(db_path())
