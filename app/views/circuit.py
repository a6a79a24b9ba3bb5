"""Circuit: nodes by layer, edges weighted by score, pruned in SQL (threshold or top-k)."""

import plotly.graph_objects as go
import streamlit as st

from app.data import query
from app.views.common import done_runs, select_model
from workbench.graph import build_graph, node_position


def render() -> None:
    st.header("Circuit")
    model_id = select_model("circuit_model")
    if model_id is None:
        return
    runs = done_runs(model_id)
    with_edges = query(
        """SELECT DISTINCT e.run_id FROM edges e JOIN runs r USING (run_id)
           JOIN checkpoints c USING (checkpoint_id) WHERE c.model_id = ?""",
        (model_id,),
    )
    runs = runs[runs["run_id"].isin(with_edges["run_id"])]
    if runs.empty:
        st.info("No runs with edges for this model yet (dla and attr_patch store edges).")
        return
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", sorted(runs["method"].unique()), key="circuit_method")
    runs = runs[runs["method"] == method]
    task = c2.selectbox("Task", sorted(runs["task_id"].unique()), key="circuit_task")
    runs = runs[runs["task_id"] == task]
    steps = sorted(runs["step"].unique().tolist())
    step = c3.selectbox("Checkpoint step", steps, index=len(steps) - 1, key="circuit_step")
    run_id = runs[runs["step"] == step].iloc[0]["run_id"]
    mode = st.radio("Prune by", ["top-k", "threshold"], horizontal=True, key="circuit_mode")
    if mode == "top-k":
        k = st.slider("Edges (top k by |score|)", 1, 100, 12, key="circuit_k")
        edges = query(
            "SELECT src, dst, score FROM edges WHERE run_id = ? ORDER BY abs(score) DESC LIMIT ?",
            (run_id, k),
        )
    else:
        bound = float(
            query("SELECT max(abs(score)) AS m FROM edges WHERE run_id = ?", (run_id,))["m"][0]
        )
        threshold = st.slider("Minimum |score|", 0.0, bound, bound / 4, key="circuit_threshold")
        edges = query(
            "SELECT src, dst, score FROM edges WHERE run_id = ? AND abs(score) >= ? "
            "ORDER BY abs(score) DESC",
            (run_id, threshold),
        )
    shape = query("SELECT n_layers, n_heads FROM models WHERE model_id = ?", (model_id,))
    n_layers, n_heads = int(shape["n_layers"][0]), int(shape["n_heads"][0])
    triples = [(str(r.src), str(r.dst), float(r.score)) for r in edges.itertuples()]
    st.plotly_chart(circuit_figure(triples, n_layers, n_heads), key="circuit_graph")
    st.caption(f"{len(edges)} edges from run `{run_id}`")
    st.dataframe(edges, hide_index=True)


def circuit_figure(edges: list[tuple[str, str, float]], n_layers: int, n_heads: int) -> go.Figure:
    graph = build_graph(edges)
    fig = go.Figure()
    biggest = max((abs(d["score"]) for *_, d in graph.edges(data=True)), default=1.0) or 1.0
    for src, dst, attrs in graph.edges(data=True):
        (x0, y0) = node_position(src, n_layers, n_heads)
        (x1, y1) = node_position(dst, n_layers, n_heads)
        ports = ",".join(p for p in attrs["ports"] if p)
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={
                    "width": 1 + 8 * abs(attrs["score"]) / biggest,
                    "color": "#1f77b4" if attrs["score"] >= 0 else "#d62728",
                },
                hovertext=f"{src} → {dst}{f' <{ports}>' if ports else ''}: {attrs['score']:.3f}",
                hoverinfo="text",
                showlegend=False,
            )
        )
    nodes = list(graph.nodes)
    xy = [node_position(n, n_layers, n_heads) for n in nodes]
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in xy],
            y=[p[1] for p in xy],
            mode="markers+text",
            text=nodes,
            textposition="top center",
            marker={"size": 16, "color": "#444"},
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        xaxis={"title": "layer", "dtick": 1},
        yaxis={"title": "head", "dtick": 1},
        height=520,
        margin={"l": 40, "r": 20, "t": 20, "b": 40},
    )
    return fig
