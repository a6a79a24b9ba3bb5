"""Timeline: circuits across training. Every head's score at every checkpoint (heatmap), when
each head formed (`formation_steps`) beside the training loss, one head's curves for every
method, what changed in a method's circuit between two checkpoints (`circuit_diff`), drawn
in the circuit view's colours, and each checkpoint's circuit evaluated at every checkpoint
(`cross_recovery`)."""

import pandas as pd
import plotly.express as px
import streamlit as st

from workbench.app import links, queries
from workbench.app.figures import COLOURS, circuit_figure
from workbench.app.views.common import diverging_heatmap, select_model

# circuit_diff's statuses in the circuit view's comparison colours
DIFF_COLOURS = {"kept": COLOURS["shared"], "removed": COLOURS["left"], "added": COLOURS["right"]}


def render() -> None:
    st.header("Timeline")
    model_id = select_model("timeline_model")
    if model_id is None:
        return
    options = queries.timeline_methods(model_id)
    if options.empty:
        st.info(
            "No method has scored this model's heads at two or more checkpoints yet "
            "(`workbench run heads --checkpoint all`, or `workbench watch`)."
        )
        _cross_recovery(model_id)
        return
    labels = (options["pipeline"] + " / " + options["method"] + " · " + options["task_id"]).tolist()
    chosen = links.selectbox("Scores", labels, key="timeline_scores", param="scores")
    choice = options.iloc[labels.index(chosen)]
    args = (model_id, choice["pipeline"], choice["method"], choice["task_id"])
    timeline = queries.head_timeline(*args)
    formed = queries.head_formation_steps(*args)
    _heatmap(timeline)
    _formation(model_id, formed)
    node = links.selectbox(
        "Head", sorted(timeline["node_id"].unique()), key="timeline_node", param="node"
    )
    curves = queries.node_curves(model_id, node)
    spread = curves["stderr"].notna().any()
    fig = px.line(
        curves, x="step", y="score", color="series", markers=True,
        error_y="stderr" if spread else None,
    )  # fmt: skip
    st.plotly_chart(fig, key="timeline_curves")
    if spread:
        st.caption("error bars: each score's standard error over prompts")
    _circuit_diff(model_id)
    _cross_recovery(model_id)


def _cross_recovery(model_id: str, target: float = 0.8) -> None:
    options = queries.cross_recovery_options(model_id)
    if options.empty:
        return
    st.subheader("Cross-recovery: each checkpoint's circuit at every checkpoint")
    labels = (options["method"] + " · " + options["task_id"]).tolist()
    label = links.selectbox("Circuits", labels, key="timeline_recovery", param="recovery")
    method, task = label.split(" · ", 1)
    matrix = queries.cross_recovery(model_id, method, task)
    grid = matrix.pivot_table(index="circuit_step", columns="at_step", values="faithfulness")
    fig = diverging_heatmap(
        grid.to_numpy(),
        max(1.0, float(matrix["faithfulness"].abs().max())),
        {"x": "evaluated at step", "y": "circuit of step", "color": "faithfulness"},
        x=[str(s) for s in grid.columns],
        y=[str(s) for s in grid.index],
        text_auto=".2f",
    )
    st.plotly_chart(fig, key="timeline_recovery_matrix")
    last = matrix[matrix["circuit_step"] == matrix["circuit_step"].max()]
    holding = last["faithfulness"] >= target
    failing = last[~holding]
    since = last[last["at_step"] > failing["at_step"].max()] if len(failing) else last
    st.caption(
        f"the circuit of the last checkpoint (step {int(last['circuit_step'].iloc[0])}) "
        + (
            f"holds (faithfulness >= {target}) from step {int(since['at_step'].min())} on"
            if len(since)
            else f"does not hold (faithfulness >= {target}) at its last step"
        )
    )


def _heatmap(timeline: pd.DataFrame) -> None:
    grid = timeline.pivot_table(index="node_id", columns="step", values="score", sort=False)
    fig = diverging_heatmap(
        grid,
        float(timeline["score"].abs().max()),
        {"x": "training step", "y": "head", "color": "score"},
    )
    st.plotly_chart(fig, key="timeline_heatmap")


def _formation(model_id: str, formed: pd.DataFrame) -> None:
    st.subheader("Formation steps")
    st.caption(
        "the first step from which a head's |score| stays at or above half its peak "
        "(`formation_steps`)"
    )
    st.dataframe(formed, hide_index=True, key="timeline_formed")
    loss = queries.loss_curve(model_id)
    if loss.empty:
        return
    fig = px.line(loss, x="step", y="train_loss", markers=True)
    for row in formed.dropna(subset=["formation_step"]).head(3).itertuples():
        fig.add_vline(x=row.formation_step, line_dash="dot", annotation_text=str(row.node_id))
    st.plotly_chart(fig, key="timeline_loss")


def _circuit_diff(model_id: str) -> None:
    circuits = queries.circuits_by_step(model_id)
    series = circuits.groupby(["method", "task_id"]).filter(lambda g: g["step"].nunique() >= 2)
    if series.empty:
        return
    st.subheader("Circuit diff between two checkpoints")
    labels = sorted((series["method"] + " · " + series["task_id"]).unique())
    label = links.selectbox("Circuits of", labels, key="timeline_circuits", param="circuits")
    method, task = label.split(" · ", 1)
    mine = series[(series["method"] == method) & (series["task_id"] == task)]
    steps = sorted(mine["step"].unique().tolist())
    c1, c2 = st.columns(2)
    a = links.select_slider(
        "From step", steps, value=steps[-2], key="timeline_from", param="a", where=c1
    )
    b = links.select_slider(
        "To step", steps, value=steps[-1], key="timeline_to", param="b", where=c2
    )
    rows = mine[mine["step"] == a].iloc[0], mine[mine["step"] == b].iloc[0]
    diff = queries.circuit_diff(rows[0]["circuit_id"], rows[1]["circuit_id"])
    counts = diff["status"].value_counts()
    kept = int(counts.get("kept", 0))
    cols = st.columns(6)
    for col, status in zip(cols, ("kept", "removed", "added"), strict=False):
        col.metric(status, int(counts.get(status, 0)))
    cols[3].metric("Jaccard", f"{kept / len(diff):.2f}" if len(diff) else "-")
    for col, step, row in zip(cols[4:], (a, b), rows, strict=True):
        col.metric(f"faithfulness at {step}", _with_interval(row))
    shape = queries.model_shape(model_id)
    edges = [
        (str(r.src), str(r.dst), float(r.score_b if pd.notna(r.score_b) else r.score_a))
        for r in diff.itertuples()
    ]
    colours = {(str(r.src), str(r.dst)): DIFF_COLOURS[str(r.status)] for r in diff.itertuples()}
    fig = circuit_figure(
        edges, int(shape["n_layers"][0]), int(shape["n_heads"][0]), colours=colours
    )
    st.plotly_chart(fig, key="timeline_diff_graph")
    st.caption(f"grey: kept · blue: only at step {a} · orange: only at step {b}")


def _with_interval(circuit: pd.Series) -> str:
    """A circuit's faithfulness, with its bootstrap interval over prompts where stored."""
    value = circuit["faithfulness"]
    if pd.isna(value):
        return "-"
    lo, hi = circuit["faithfulness_lo"], circuit["faithfulness_hi"]
    return f"{value:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and pd.notna(hi) else "")
