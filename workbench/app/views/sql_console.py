"""SQL: read-only queries over the store, with examples.

A query runs when asked: on a click of Run, on a committed edit of the query box, or on
choosing an example (the page also opens on its first example, run). A deep link's query
(`?view=sql&q=...&timeout=...`) fills the box and the limits and waits for Run, so opening a
link never starts a query of the link's making. Each query runs in a worker process
of its own (`run_console_query`) bounded by the page's limits: its timeout, a row cap and a byte
budget on what it returns, a memory bound and a cap on DuckDB's temporary files; leaving or
rerunning the page while it runs kills the worker.
"""

import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import streamlit as st

from workbench.app import links
from workbench.app.data import db_path
from workbench.errors import BadInput
from workbench.store import DatabaseBusy
from workbench.store.query import (
    MAX_BYTES,
    MAX_MEMORY,
    MAX_SPILL,
    ConsoleResult,
    format_size,
    format_table,
    run_console_query,
)

EXAMPLES = {
    "Top 5 heads of the latest activation-patching run": """SELECT s.node_id,
       round(s.score, 3) AS score
FROM node_scores s
WHERE s.run_id = (SELECT run_id FROM runs WHERE method = 'act_patch_denoise' AND status = 'done'
                  ORDER BY finished_at DESC LIMIT 1)
ORDER BY s.score DESC
LIMIT 5""",
    "A head's score across checkpoints": """SELECT c.step, r.method, round(s.score, 3) AS score
FROM node_scores s JOIN runs r USING (run_id) JOIN checkpoints c USING (checkpoint_id)
WHERE s.node_id = 'a1.h0' AND r.method = 'act_patch_denoise'
ORDER BY c.step""",
    "Runs by method": """SELECT method, status, count(*) AS runs
FROM runs GROUP BY ALL ORDER BY method""",
    "Strongest edges of an attribution-patching run": """SELECT src, dst, round(score, 3) AS score
FROM edges
WHERE run_id = (SELECT run_id FROM runs WHERE method = 'attr_patch' AND status = 'done'
                ORDER BY finished_at DESC LIMIT 1)
ORDER BY abs(score) DESC
LIMIT 10""",
}


DISPLAY_ROWS = 10_000  # rows drawn in the page
DISPLAY_BYTES = 32_000_000  # and at most this many bytes of them
DEFAULT_TIMEOUT = 30
MB = 1_000_000
# the page's limits: (label, key, URL parameter, lowest, highest, default)
LIMITS = [
    ("Timeout (seconds)", "sql_timeout", "timeout", 1, 600, DEFAULT_TIMEOUT),
    ("Row cap", "sql_max_rows", "rows", 1, 10_000_000, 1_000_000),
    ("Result budget (MB)", "sql_max_mb", "mb", 1, 4_000, MAX_BYTES // MB),
    ("Memory bound (MB)", "sql_memory_mb", "memory", 100, 64_000, MAX_MEMORY // MB),
    ("Spill cap (MB)", "sql_spill_mb", "spill", 1, 100_000, MAX_SPILL // MB),
]


@dataclass(frozen=True)
class Limits:
    timeout: int
    max_rows: int
    max_bytes: int
    max_memory: int
    max_spill: int


def render() -> None:
    st.header("SQL console")
    st.caption(
        "Read-only: the database cannot be changed and no files or network can be reached. "
        "A query runs in a process of its own when you press Run (or edit the query; a linked "
        "query waits for Run) and is ended at its timeout; its result is cut at the row cap or "
        f"the byte budget, whichever comes first; the page shows its first {DISPLAY_ROWS:,} "
        "rows and offers all it fetched as CSV or Parquet."
    )
    st.selectbox("Example queries", list(EXAMPLES), key="sql_example", on_change=_example)
    if "sql_text" not in st.session_state and not links.has("q"):
        _example()  # the page opens on its own first example, run
    sql = links.text("Query", key="sql_text", param="q", area=True, height=180, on_change=_arm)
    limits = _limits()
    clicked = st.button("Run", key="sql_run", type="primary")
    if clicked or st.session_state.pop("sql_armed", False):
        st.session_state.pop("sql_result", None)
        result = _run(sql, limits)
        if result is None:
            return
        st.session_state["sql_result"] = (sql, limits, result)
    kept = st.session_state.get("sql_result")
    if kept is None or kept[0] != sql:
        st.caption("Press Run to run the query.")
        return
    show(kept[2], kept[1])


def _limits() -> Limits:
    values = []
    for column, (label, key, param, lo, hi, default) in zip(
        st.columns(len(LIMITS)), LIMITS, strict=True
    ):
        values.append(
            int(
                links.number(
                    label, lo, hi, default, key=key, param=param, slider=False, where=column
                )
            )
        )
    timeout, rows, mb, memory_mb, spill_mb = values
    return Limits(timeout, rows, mb * MB, memory_mb * MB, spill_mb * MB)


def _run(sql: str, limits: Limits) -> ConsoleResult | None:
    """Run the query, showing its elapsed time; a message (and None) when it fails."""
    progress = st.empty()
    try:
        result = run_console_query(
            sql,
            db=db_path(),
            timeout=float(limits.timeout),
            max_rows=limits.max_rows,
            max_bytes=limits.max_bytes,
            max_memory=limits.max_memory,
            max_spill=limits.max_spill,
            on_wait=lambda s: progress.caption(f"Running… {s:.1f} s"),
        )
    except DatabaseBusy as err:
        progress.empty()
        st.warning(f"{err}. Run the query again once the writer lets go.")
        return None
    except BadInput as err:
        progress.empty()
        st.error(str(err))
        return None
    progress.empty()
    return result


def _arm() -> None:
    """An edit of the query (or a chosen example) runs it on this rerun."""
    st.session_state["sql_armed"] = True


def _example() -> None:
    """Choosing an example puts its text in the query box and runs it."""
    st.session_state["sql_text"] = EXAMPLES[
        st.session_state.get("sql_example", next(iter(EXAMPLES)))
    ]
    _arm()


def show(result: ConsoleResult, limits: Limits) -> None:
    table, n = result.table, result.table.num_rows
    if result.cut == "rows":
        st.warning(
            f"The query has more than {limits.max_rows:,} rows: the first {limits.max_rows:,} "
            "are fetched (and downloadable); aggregate or add a LIMIT to see the rest."
        )
    elif result.cut == "bytes":
        st.warning(
            f"The result passed the {format_size(limits.max_bytes)} budget after {n:,} rows: "
            "those are fetched (and downloadable); aggregate, add a LIMIT, or raise the budget "
            "to see the rest."
        )
    shown = _displayed(table)
    if shown < n:
        st.info(f"Showing the first {shown:,} of {n:,} rows; download them all below.")
    st.caption(f"{n:,} rows in {result.seconds:.2f} s")
    st.dataframe(table.slice(0, shown).to_pandas(), hide_index=True)
    if n:
        left, right = st.columns(2)
        left.download_button(
            "Download CSV",
            data=lambda: format_table(table, "csv", escape=False).encode(),
            file_name="query.csv",
            mime="text/csv",
            key="sql_csv",
            on_click="ignore",
        )
        right.download_button(
            "Download Parquet",
            data=lambda: _parquet(table),
            file_name="query.parquet",
            mime="application/vnd.apache.parquet",
            key="sql_parquet",
            on_click="ignore",
        )


def _displayed(table: pa.Table) -> int:
    """How many of the first rows the page draws: at most DISPLAY_ROWS and DISPLAY_BYTES."""
    n = min(table.num_rows, DISPLAY_ROWS)
    if table.slice(0, n).nbytes <= DISPLAY_BYTES:
        return n
    lo, hi = 0, n  # the most rows that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if table.slice(0, mid).nbytes <= DISPLAY_BYTES:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, 1)


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
