"""SQL: read-only queries over the store, with examples."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import streamlit as st

from app import links
from app.data import db_path
from workbench.errors import BadInput
from workbench.store import DatabaseBusy
from workbench.store.query import ConsoleResult, format_table, run_console_query

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
DOWNLOAD_ROWS = 1_000_000  # rows fetched at most (and offered as CSV / Parquet)
DEFAULT_TIMEOUT = 30


def render() -> None:
    st.header("SQL console")
    st.caption(
        "Read-only: the database cannot be changed and no files or network can be reached. "
        f"A query is stopped after its timeout; the page shows its first {DISPLAY_ROWS:,} rows "
        f"and offers up to {DOWNLOAD_ROWS:,} as CSV or Parquet."
    )
    st.selectbox("Example queries", list(EXAMPLES), key="sql_example", on_change=_example)
    if "sql_text" not in st.session_state:
        _example()
    sql = links.text("Query", key="sql_text", param="q", area=True, height=180)
    timeout = links.number(
        "Timeout (seconds)",
        1,
        600,
        DEFAULT_TIMEOUT,
        key="sql_timeout",
        param="timeout",
        slider=False,
    )
    clicked = st.button("Run", key="sql_run")
    asked = (sql, int(timeout))
    kept = st.session_state.get("sql_result")
    if clicked or kept is None or kept[0] != asked:
        st.session_state.pop("sql_result", None)
        progress = st.empty()
        try:
            result = run_console_query(
                sql,
                db=db_path(),
                timeout=float(timeout),
                max_rows=DOWNLOAD_ROWS,
                on_wait=lambda s: progress.caption(f"Running… {s:.1f} s"),
            )
        except DatabaseBusy as err:
            progress.empty()
            st.warning(f"{err}. Run the query again once the writer lets go.")
            return
        except BadInput as err:
            progress.empty()
            st.error(str(err))
            return
        progress.empty()
        st.session_state["sql_result"] = (asked, result)
    else:
        result = kept[1]
    show(result)


def _example() -> None:
    """Choosing an example puts its text in the query box."""
    st.session_state["sql_text"] = EXAMPLES[
        st.session_state.get("sql_example", next(iter(EXAMPLES)))
    ]


def show(result: ConsoleResult) -> None:
    table, n = result.table, result.table.num_rows
    if result.truncated:
        st.warning(
            f"The query has more than {DOWNLOAD_ROWS:,} rows: the first {DOWNLOAD_ROWS:,} are "
            "fetched (and downloadable); aggregate or add a LIMIT to see the rest."
        )
    if n > DISPLAY_ROWS:
        st.info(f"Showing the first {DISPLAY_ROWS:,} of {n:,} rows; download them all below.")
    st.caption(f"{n:,} rows in {result.seconds:.2f} s")
    st.dataframe(table.slice(0, DISPLAY_ROWS).to_pandas(), hide_index=True)
    if n:
        left, right = st.columns(2)
        left.download_button(
            "Download CSV",
            data=lambda: format_table(table, "csv").encode(),
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


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
