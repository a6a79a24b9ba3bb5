"""Patching: scores of any node-level patching run as a heatmap, by position where the run
patched positions one at a time (e.g. the residual stream by layer and position)."""

import streamlit as st

from workbench.app import queries
from workbench.app.views.common import diverging_heatmap, narrow, pick_step, select_model


def render() -> None:
    st.header("Activation patching")
    model_id = select_model("patch_model")
    if model_id is None:
        return
    runs = queries.patching_runs(model_id)
    if runs.empty:
        st.info("No patching runs for this model yet (`workbench run patching`).")
        return
    c1, c2, c3 = st.columns(3)
    runs = narrow(runs, "Component", "component", key="patch_comp", param="component", where=c1)
    runs = narrow(runs, "Method", "method", key="patch_method", param="method", where=c2)
    variant = runs["positions"] + " / " + runs["ablation"]
    runs = narrow(
        runs, "Positions / ablation", variant, key="patch_variant", param="variant", where=c3
    )
    runs = narrow(runs, "Task", "task_id", key="patch_task", param="task")
    run_id = pick_step(runs, "patch_step", slider=True)["run_id"]
    scores = queries.patching_scores(str(run_id))
    grid = scores.pivot_table(index="node_id", columns="position", values="score", sort=False)
    grid.columns = ["all" if c == -1 else str(c) for c in grid.columns]
    fig = diverging_heatmap(
        grid,
        float(scores["score"].abs().max()),
        {"x": "position", "y": "node", "color": "score"},
        text_auto=".2f" if grid.size <= 400 else False,
    )
    st.plotly_chart(fig, key="patch_heatmap")
    st.caption(f"run `{run_id}`; 1 = the whole clean-vs-corrupt gap")
    top = scores.reindex(scores["score"].abs().sort_values(ascending=False).index).head(10)
    st.dataframe(top[["node_id", "position", "score"]], hide_index=True)
