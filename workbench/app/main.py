"""Circuit Workbench app: `streamlit run app/main.py` (or `workbench app`).

It reads the DuckDB store that the pipelines write. It writes in one place only: the Curate
panel of the Circuit and Graph pages saves a curated subgraph (`Store.save_subgraph`). It starts
processes in two: the Prompt page's Analyse runs `workbench run prompt`, which stores a prompt's
views, and the Graph page's intervention runs `workbench intervene`, which stores nothing. A
read-only server does none of these. Nothing renders before app/auth.py lets the session in (this
machine only, unless a token or an identity provider guards the server).
"""

import streamlit as st

from workbench.app import access, auth, data, links
from workbench.app.views import (
    circuit,
    features,
    graph,
    heads,
    overview,
    patching,
    prompt,
    sql_console,
    timeline,
)

VIEWS = {
    "Overview": overview.render,
    "Heads": heads.render,
    "Patching": patching.render,
    "Circuit": circuit.render,
    "Timeline": timeline.render,
    "Prompt": prompt.render,
    "Graph": graph.render,
    "Features": features.render,
    "SQL": sql_console.render,
}


st.set_page_config(page_title="Circuit Workbench", layout="wide")
auth.gate()
links.restore(list(VIEWS))
st.sidebar.title("Circuit Workbench")
view = st.sidebar.radio("View", list(VIEWS), key="view")
st.sidebar.caption(f"Database: `{data.db_path()}`")
if access.read_only():  # $WORKBENCH_APP_READ_ONLY, `workbench app --read-only`
    st.sidebar.caption("Read-only: this server saves nothing and starts no model processes.")
for problem in access.problems():  # a setting of the server that cannot be read
    st.sidebar.warning(access.plain(problem))
links.begin(view)

if not data.database_ready():
    st.info(
        f"No database at `{data.db_path()}` yet. Run `workbench demo --no-app` or "
        "`workbench run heads --model ... --task ...` to fill it."
    )
else:
    VIEWS[view]()
    for note in links.notes():
        st.caption(f":orange[{note}]")
    links.publish(view)
