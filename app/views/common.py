"""Selectors shared by the views."""

import pandas as pd
import streamlit as st

from app.data import query


def select_model(key: str) -> str | None:
    models = query("SELECT model_id, architecture, n_layers, n_heads FROM models ORDER BY model_id")
    if models.empty:
        st.info("No models stored yet.")
        return None
    return st.selectbox("Model", models["model_id"].tolist(), key=key)


def done_runs(model_id: str) -> pd.DataFrame:
    return query(
        """SELECT r.run_id, r.pipeline, r.method, r.task_id, c.step, r.checkpoint_id,
                  r.metric_clean, r.metric_corrupt
           FROM runs r JOIN checkpoints c USING (checkpoint_id)
           WHERE c.model_id = ? AND r.status = 'done'
           ORDER BY r.method, c.step""",
        (model_id,),
    )
