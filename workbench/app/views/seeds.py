"""Circuit page, "Across seeds": the circuits of one method and task found on training runs that
differ only in their seed (a seed group, `workbench run seeds`), at one step. The union of the
circuits is drawn, each edge coloured by how many seeds hold it; beside it what each pair shares
(view `seed_stability`), each circuit's faithfulness on every seed's model, and, over several
steps, the shares along training."""

import pandas as pd
import plotly.express as px
import streamlit as st

from workbench.app import links, queries
from workbench.app.circuit_data import Shown
from workbench.app.views.common import diverging_heatmap, narrow

# how many seeds hold an edge: (the colour's name, the colour)
SEED_COLOURS = {
    "every seed": ("grey", "#444444"),
    "several seeds": ("green", "#2ca02c"),
    "one seed": ("orange", "#ff7f0e"),
}
SHARES = {
    "edge_jaccard": "edges (Jaccard)",
    "node_jaccard": "nodes (Jaccard)",
    "layer_jaccard": "layer profile",
    "spearman": "edge scores (Spearman)",
}


def across_seeds(model_id: str) -> Shown | None:
    groups = queries.seed_groups(model_id)
    if groups.empty:
        st.info(
            "This model is in no seed group yet: `workbench run seeds --model A --model B ...` "
            "runs the same circuit on training runs of several seeds."
        )
        return None
    group = links.selectbox(
        "Seed group", groups["group_id"].tolist(), key="seeds_group", param="seeds"
    )
    rows = queries.seed_stability(group)
    if rows.empty:
        st.info(f"Seed group {group} has no two members with a circuit at the same step yet.")
        return None
    cols = st.columns(3)
    rows = narrow(rows, "Method", "method", key="seeds_method", param="method", where=cols[0])
    rows = narrow(rows, "Task", "task_id", key="seeds_task", param="task", where=cols[1])
    steps = sorted(rows["step"].unique().tolist())
    step = links.selectbox(
        "Step", steps, index=len(steps) - 1, key="seeds_step", param="step", where=cols[2]
    )
    along = rows
    rows = rows[rows["step"] == step]
    metrics = st.columns(len(SHARES))
    for col, (column, label) in zip(metrics, SHARES.items(), strict=True):
        col.metric(f"mean share: {label}", f"{rows[column].mean():.2f}")
    circuits = _circuits(rows)
    edges = queries.seed_circuit_edges(list(circuits["circuit_id"]))
    n = len(circuits)
    own = circuits[circuits["model_id"] == model_id]
    held = {
        (str(e.src), str(e.dst)): (
            "every seed" if e.seeds == n else "several seeds" if e.seeds > 1 else "one seed"
        )
        for e in edges.itertuples()
    }

    def after() -> None:
        st.caption(
            " · ".join(f"{name}: {held}" for held, (name, _) in SEED_COLOURS.items())
            + f" ({n} seeds' circuits at step {step})"
        )
        _recovery_matrix(rows, circuits)
        st.dataframe(
            rows[["model_a", "model_b", "edges_a", "edges_b", "edges_shared", *SHARES]],
            hide_index=True,
        )
        st.dataframe(edges, hide_index=True)
        if along["step"].nunique() > 1:
            trend = along.groupby("step")[list(SHARES)].mean().reset_index()
            long = trend.melt(id_vars="step", var_name="share", value_name="value")
            long["share"] = long["share"].map(SHARES)
            fig = px.line(long, x="step", y="value", color="share", markers=True)
            st.plotly_chart(fig, key="seeds_trend")

    return Shown(
        [(str(e.src), str(e.dst), float(e.score)) for e in edges.itertuples()],
        str(own["checkpoint_id"].iloc[0] if len(own) else circuits["checkpoint_id"].iloc[0]),
        colours={edge: SEED_COLOURS[how][1] for edge, how in held.items()},
        after=after,
        source=f"seeds:{group}",
    )


def _circuits(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per member at the step: model_id, circuit_id, its checkpoint, faithfulness."""
    sides = [
        rows[[f"model_{s}", f"circuit_{s}", f"checkpoint_{s}", f"faithfulness_{s}"]].set_axis(
            ["model_id", "circuit_id", "checkpoint_id", "faithfulness"], axis=1
        )
        for s in ("a", "b")
    ]
    return pd.concat(sides).drop_duplicates("model_id").sort_values("model_id")


def _recovery_matrix(rows: pd.DataFrame, circuits: pd.DataFrame) -> None:
    """Each seed's circuit (rows) evaluated on each seed's model (columns); the diagonal is the
    circuit's own faithfulness."""
    models = circuits["model_id"].tolist()
    grid = pd.DataFrame(index=models, columns=models, dtype=float)
    for c in circuits.itertuples():
        grid.loc[c.model_id, c.model_id] = c.faithfulness
    for r in rows.itertuples():
        grid.loc[r.model_a, r.model_b] = r.a_on_b
        grid.loc[r.model_b, r.model_a] = r.b_on_a
    bound = max(1.0, float(grid.abs().max().max()))
    fig = diverging_heatmap(
        grid.to_numpy(),
        bound,
        {"x": "evaluated on the model of", "y": "circuit of", "color": "faithfulness"},
        x=models,
        y=models,
        text_auto=".2f",
    )
    st.subheader("Each seed's circuit on each seed's model")
    st.plotly_chart(fig, key="seeds_matrix")
