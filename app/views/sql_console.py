"""SQL: read-only queries over the store, with examples."""

import streamlit as st

from app.data import query
from workbench.errors import BadInput

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


def render() -> None:
    st.header("SQL console")
    st.caption("Read-only: the database cannot be changed and no files or network can be reached.")
    example = st.selectbox("Example queries", list(EXAMPLES), key="sql_example")
    sql = st.text_area("Query", value=EXAMPLES[example], height=180, key=f"sql_text_{example}")
    if st.button("Run", key="sql_run") or sql:
        try:
            st.dataframe(query(sql), hide_index=True)
        except BadInput as err:
            st.error(str(err))
