"""Overview: models, checkpoints and runs in the store."""

import streamlit as st

from app.data import query


def render() -> None:
    st.header("Overview")
    counts = query(
        """SELECT (SELECT count(*) FROM models) AS models,
                  (SELECT count(*) FROM checkpoints) AS checkpoints,
                  (SELECT count(*) FROM tasks) AS tasks,
                  (SELECT count(*) FROM runs WHERE status = 'done') AS runs_done,
                  (SELECT count(*) FROM runs WHERE status = 'failed') AS runs_failed"""
    ).iloc[0]
    cols = st.columns(5)
    for col, (label, value) in zip(cols, counts.items(), strict=True):
        col.metric(label.replace("_", " "), int(value))
    st.subheader("Models")
    st.dataframe(
        query(
            "SELECT model_id, architecture, n_layers, n_heads, d_model, d_vocab, source FROM models"
        ),
        hide_index=True,
    )
    st.subheader("Checkpoints")
    st.dataframe(
        query(
            "SELECT checkpoint_id, model_id, step, path, registered_at FROM checkpoints "
            "ORDER BY model_id, step"
        ),
        hide_index=True,
    )
    st.subheader("Runs")
    st.dataframe(
        query(
            """SELECT run_id, pipeline, method, checkpoint_id, task_id, status, error,
                      metric_clean, metric_corrupt, finished_at
               FROM runs ORDER BY finished_at DESC LIMIT 500"""
        ),
        hide_index=True,
    )
