"""Overview: what runners are doing now (the run queue), models, checkpoints and runs."""

import streamlit as st

from workbench.app import queries


def render() -> None:
    st.header("Overview")
    counts = queries.store_counts().iloc[0]
    cols = st.columns(5)
    for col, (label, value) in zip(cols, counts.items(), strict=True):
        col.metric(label.replace("_", " "), int(value))
    queue = queries.run_queue()
    if not queue.empty:
        running = int((queue["status"] == "running").sum())
        st.subheader(f"In progress: {running} running, {len(queue) - running} queued")
        st.dataframe(queue, hide_index=True, key="overview_queue")
    st.subheader("Models")
    st.dataframe(queries.model_table(), hide_index=True)
    st.subheader("Checkpoints")
    st.dataframe(queries.checkpoints(), hide_index=True)
    st.subheader("Runs")
    st.dataframe(queries.recent_runs(500), hide_index=True)
