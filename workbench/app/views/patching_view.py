"""Patching: scores of any node-level patching run as a heatmap, by position where the run
patched positions one at a time (e.g. the residual stream by layer and position)."""

import streamlit as st

from workbench.app import links, queries
from workbench.app.views.common import diverging_heatmap, select_model


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
    component = links.selectbox(
        "Component",
        sorted(runs["component"].unique()),
        key="patch_comp",
        param="component",
        where=c1,
    )
    runs = runs[runs["component"] == component]
    method = links.selectbox(
        "Method", sorted(runs["method"].unique()), key="patch_method", param="method", where=c2
    )
    runs = runs[runs["method"] == method]
    variant = links.selectbox(
        "Positions / ablation",
        sorted((runs["positions"] + " / " + runs["ablation"]).unique()),
        key="patch_variant",
        param="variant",
        where=c3,
    )
    runs = runs[(runs["positions"] + " / " + runs["ablation"]) == variant]
    task = links.selectbox("Task", sorted(runs["task_id"].unique()), key="patch_task", param="task")
    runs = runs[runs["task_id"] == task]
    steps = sorted(runs["step"].unique().tolist())
    step = links.select_slider(
        "Checkpoint (training step)", steps, value=steps[-1], key="patch_step", param="step"
    )
    run_id = runs[runs["step"] == step].iloc[0]["run_id"]
    links.show("run", run_id)
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
