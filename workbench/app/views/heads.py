"""Heads: a layer x head heatmap of any run's scores, with a checkpoint selector, and each
head's score across checkpoints (the formation of the induction head over training)."""

import numpy as np
import plotly.express as px
import streamlit as st

from workbench.app import queries
from workbench.app.views.common import diverging_heatmap, pick_run, select_model


def render() -> None:
    st.header("Attention heads")
    model_id = select_model("heads_model")
    if model_id is None:
        return
    runs = queries.done_runs(model_id)
    runs = runs[runs["pipeline"] == "heads"]
    if runs.empty:
        st.info("No head attribution runs for this model yet.")
        return
    run = pick_run(runs, "heads", slider=True)
    scores = queries.head_scores(str(run["run_id"]))
    if scores.empty:
        st.info("This run stored no head scores.")
        return
    n_layers, n_heads = int(scores["layer"].max()) + 1, int(scores["head"].max()) + 1
    grid = np.full((n_layers, n_heads), np.nan)
    grid[scores["layer"], scores["head"]] = scores["score"]
    labels = {"x": "head", "y": "layer", "color": "score"}
    fig = diverging_heatmap(grid, float(np.nanmax(np.abs(grid))), labels, text_auto=".2f")
    fig.update_xaxes(dtick=1)
    fig.update_yaxes(dtick=1)
    st.caption(
        f"run `{run['run_id']}` · metric clean {run['metric_clean']:.3f}, "
        f"corrupt {run['metric_corrupt']:.3f}"
    )
    st.plotly_chart(fig, key="heads_heatmap")
    st.dataframe(scores.sort_values("score", ascending=False).head(10), hide_index=True)

    st.subheader("Across checkpoints")
    history = queries.head_score_history(model_id, str(run["method"]), str(run["task_id"]))
    st.plotly_chart(
        px.line(history, x="step", y="score", color="node_id", markers=True), key="heads_history"
    )
