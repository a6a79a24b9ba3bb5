"""Circuit: nodes by layer, edges weighted by score. Any edge run pruned in SQL (top-k or a
threshold) with its faithfulness curve, any stored circuit, or two circuits side by side (shared,
only-left and only-right edges); and every score a chosen node has across methods. Feature
circuits (`sae_attr`) draw each SAE's features in a column at its hook; a head links to the
features it writes most, a feature to its dashboard."""

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app import queries
from app.views import features
from app.views.common import select_model
from workbench.core import PORTS, Hook, Node
from workbench.graph import build_graph, layout, split_port

Edge = tuple[str, str, float]
COLOURS = {"shared": "#444444", "left": "#1f77b4", "right": "#ff7f0e"}


def render() -> None:
    st.header("Circuit")
    model_id = select_model("circuit_model")
    if model_id is None:
        return
    shape = queries.model_shape(model_id)
    n_layers, n_heads = int(shape["n_layers"][0]), int(shape["n_heads"][0])
    source = st.radio(
        "Show",
        ["Edge run", "Stored circuit", "Compare circuits"],
        horizontal=True,
        key="circuit_source",
    )
    if source == "Edge run":
        shown = _edge_run(model_id, n_layers, n_heads)
    elif source == "Stored circuit":
        shown = _stored_circuit(model_id, n_layers, n_heads)
    else:
        shown = _compare(model_id, n_layers, n_heads)
    if shown:
        heads = [Node.head_of(lyr, h).id for lyr in range(n_layers) for h in range(n_heads)]
        _node_inspector(model_id, *shown, extra=heads)


def _edge_run(model_id: str, n_layers: int, n_heads: int) -> tuple[list[Edge], str] | None:
    runs = queries.done_runs(model_id)
    with_edges = queries.runs_with_edges(model_id)
    runs = runs[runs["run_id"].isin(with_edges["run_id"])]
    if runs.empty:
        st.info("No runs with edges for this model yet (dla, attr_patch and the edges pipeline).")
        return None
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", sorted(runs["method"].unique()), key="circuit_method")
    runs = runs[runs["method"] == method]
    task = c2.selectbox("Task", sorted(runs["task_id"].unique()), key="circuit_task")
    runs = runs[runs["task_id"] == task]
    steps = sorted(runs["step"].unique().tolist())
    step = c3.selectbox("Checkpoint step", steps, index=len(steps) - 1, key="circuit_step")
    run = runs[runs["step"] == step].iloc[0]
    run_id = str(run["run_id"])
    mode = st.radio("Prune by", ["top-k", "threshold"], horizontal=True, key="circuit_mode")
    if mode == "top-k":
        k = st.slider("Edges (top k by |score|)", 1, 100, 12, key="circuit_k")
        edges = queries.edge_run_edges_top(run_id, k)
    else:
        bound = float(queries.edge_run_max_abs_score(run_id)["m"][0])
        threshold = st.slider("Minimum |score|", 0.0, bound, bound / 4, key="circuit_threshold")
        edges = queries.edge_run_edges_above(run_id, threshold)
    triples = _triples(edges)
    measured = queries.run_metrics(run_id)
    for row in measured.itertuples():
        label = {"roc_auc_known_circuit": "ROC AUC vs the known circuit"}.get(
            row.metric, row.metric
        )
        st.metric(label, f"{row.value:.3f}")
    _clickable(circuit_figure(triples, n_layers, n_heads), "circuit_graph")
    st.caption(f"{len(edges)} edges from run `{run_id}`")
    st.dataframe(edges, hide_index=True)
    curve = queries.faithfulness_curve(run_id)
    if not curve.empty:
        st.subheader("Faithfulness vs circuit size")
        fig = px.line(curve, x="n_edges", y="faithfulness", markers=True, log_x=True)
        fig.add_hline(y=0.8, line_dash="dot")
        st.plotly_chart(fig, key="circuit_curve")
    return triples, str(run["checkpoint_id"])


def _circuit_edges(circuit_id: str) -> list[Edge]:
    return _triples(queries.circuit_edges(circuit_id))


def _stored_circuit(model_id: str, n_layers: int, n_heads: int) -> tuple[list[Edge], str] | None:
    stored = queries.circuits(model_id)
    if stored.empty:
        st.info("No stored circuits for this model yet (`workbench run edges` stores them).")
        return None
    label = st.selectbox("Circuit", stored["label"].tolist(), key="circuit_pick")
    row = stored[stored["label"] == label].iloc[0]
    triples = _circuit_edges(row["circuit_id"])
    _clickable(circuit_figure(triples, n_layers, n_heads), "circuit_stored_graph")
    st.caption(f"circuit `{row['circuit_id']}`: {row['name']}")
    return triples, str(row["checkpoint_id"])


def _compare(model_id: str, n_layers: int, n_heads: int) -> tuple[list[Edge], str] | None:
    stored = queries.circuits(model_id)
    if len(stored) < 2:
        st.info("Comparing needs at least two stored circuits.")
        return None
    labels = stored["label"].tolist()
    c1, c2 = st.columns(2)
    left_label = c1.selectbox("Left", labels, index=0, key="circuit_left")
    right_label = c2.selectbox("Right", labels, index=1, key="circuit_right")
    left_row = stored[stored["label"] == left_label].iloc[0]
    right_row = stored[stored["label"] == right_label].iloc[0]
    left = {(s, d): v for s, d, v in _circuit_edges(left_row["circuit_id"])}
    right = {(s, d): v for s, d, v in _circuit_edges(right_row["circuit_id"])}
    membership = {e: "shared" for e in left.keys() & right.keys()}
    membership |= {e: "left" for e in left.keys() - right.keys()}
    membership |= {e: "right" for e in right.keys() - left.keys()}
    merged = [(s, d, left.get((s, d), right.get((s, d), 0.0))) for s, d in membership]
    colours = {e: COLOURS[m] for e, m in membership.items()}
    counts = pd.Series(list(membership.values())).value_counts()
    cols = st.columns(3)
    for col, key in zip(cols, ("shared", "left", "right"), strict=True):
        col.metric(f"{key} edges" if key == "shared" else f"only {key}", int(counts.get(key, 0)))
    st.plotly_chart(
        circuit_figure(merged, n_layers, n_heads, colours=colours), key="circuit_compare_graph"
    )
    st.caption("grey: in both · blue: only left · orange: only right")
    table = pd.DataFrame(
        [
            {"src": s, "dst": d, "in": m, "left": left.get((s, d)), "right": right.get((s, d))}
            for (s, d), m in membership.items()
        ]  # fmt: skip
    )
    st.dataframe(table.sort_values("in"), hide_index=True)
    return merged, str(left_row["checkpoint_id"])


def _node_inspector(
    model_id: str, edges: list[Edge], checkpoint_id: str, extra: list[str] | None = None
) -> None:
    """Scores of a node of the shown edges (or any head, in `extra`) across every method."""
    shown = [split_port(n)[0] for s, d, _ in edges for n in (s, d)]
    nodes = list(dict.fromkeys(sorted(set(shown)) + (extra or [])))
    if not nodes:
        return
    st.subheader("Node scores across methods")
    clicked = st.session_state.pop("circuit_clicked_node", None)
    if clicked in nodes:
        st.session_state["circuit_node"] = clicked
    node = st.selectbox("Node (or click one in the graph)", nodes, key="circuit_node")
    with_ports = _with_ports(node)
    scores = queries.node_scores_at_checkpoint(checkpoint_id, with_ports)
    incident = queries.incident_edges(checkpoint_id, node, with_ports)
    st.dataframe(scores, hide_index=True)
    st.caption(f"strongest edges at `{node}` in every edge run of `{checkpoint_id}`")
    st.dataframe(incident, hide_index=True)
    _feature_links(node, checkpoint_id)


def _clickable(fig: go.Figure, key: str) -> None:
    """Draw a circuit; a node clicked in it becomes the node the inspector below shows."""
    event = st.plotly_chart(fig, key=key, on_select="rerun", selection_mode="points")
    points = event.get("selection", {}).get("points", []) if event else []
    chosen = [p["customdata"] for p in points if p.get("customdata")]
    node = chosen[0] if chosen else None
    if isinstance(node, list):
        node = node[0]
    if node and node != st.session_state.get(f"{key}_last_click"):  # a new click, once
        st.session_state[f"{key}_last_click"] = node
        st.session_state["circuit_clicked_node"] = node


def _with_ports(node_id: str) -> list[str]:
    """A head and its q/k/v/pattern input nodes (where its incoming edges and port scores are
    stored); any other node alone."""
    node = Node.try_parse(node_id)
    if node is None or not node.is_head:
        return [node_id]
    return [node_id] + [Node.head_of(node.layer or 0, node.head or 0, p).id for p in PORTS]


def _short(node_id: str) -> str:
    """Feature nodes are labelled by their index (or `err`); the full id is in the hover."""
    node = Node.try_parse(node_id)
    if node is None or not node.is_sae_node:
        return node_id
    return "#err" if node.feature is None else f"#{node.feature}"


def _feature_links(node: str, checkpoint_id: str) -> None:
    """A head: the features its output writes most (sae_attr); a feature: its dashboard."""
    parsed = Node.try_parse(node)
    if parsed is not None and parsed.is_sae_node:
        if parsed.feature is not None:
            st.button(
                f"Open feature {parsed.feature} of {parsed.sae_id}",
                on_click=features.open_feature,
                args=(parsed.sae_id, parsed.feature),
                key="circuit_open_feature",
            )
        return
    writes = queries.features_written_by(checkpoint_id, node)
    if writes.empty:
        return
    st.caption(f"features `{node}` writes most (sae_attr: direct write × gradient)")
    for i, row in enumerate(writes.itertuples()):
        feature = Node.parse(str(row.feature))
        st.button(
            f"{row.feature}  ({row.score:+.4f})",
            on_click=features.open_feature,
            args=(feature.sae_id, feature.feature),
            key=f"circuit_head_feature_{i}",
        )


def _triples(edges: pd.DataFrame) -> list[Edge]:
    return [(str(r.src), str(r.dst), float(r.score)) for r in edges.itertuples()]


def sae_depths(n_layers: int) -> dict[str, float]:
    saes = queries.sae_hooks()
    return {str(r.sae_id): Hook.depth(str(r.hook), n_layers) for r in saes.itertuples()}


def circuit_figure(
    edges: list[Edge], n_layers: int, n_heads: int, *, colours: dict | None = None
) -> go.Figure:
    graph = build_graph(edges)
    where = layout(list(graph.nodes), n_layers, n_heads, sae_depths(n_layers))
    fig = go.Figure()
    biggest = max((abs(d["score"]) for *_, d in graph.edges(data=True)), default=1.0) or 1.0
    middles: list[tuple[float, float, str]] = []
    for src, dst, attrs in graph.edges(data=True):
        (x0, y0) = where[src]
        (x1, y1) = where[dst]
        ports = ",".join(p for p in attrs["ports"] if p)
        key = next(((s, d) for s, d, _ in edges if s == src and split_port(d)[0] == dst), None)
        colour = (colours or {}).get(key) or ("#1f77b4" if attrs["score"] >= 0 else "#d62728")
        fig.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                line={"width": 1 + 8 * abs(attrs["score"]) / biggest, "color": colour},
                hoverinfo="skip",  # lines end on the nodes: clicks there must reach the nodes
                showlegend=False,
            )
        )
        label = f"{src} → {dst}{f' <{ports}>' if ports else ''}: {attrs['score']:.3f}"
        middles.append(((x0 + x1) / 2, (y0 + y1) / 2, label))
    fig.add_trace(  # each edge's score, on hover over its midpoint
        go.Scatter(
            x=[m[0] for m in middles],
            y=[m[1] for m in middles],
            mode="markers",
            marker={"size": 7, "color": "#999", "opacity": 0.4},
            hovertext=[m[2] for m in middles],
            hoverinfo="text",
            showlegend=False,
        )
    )
    nodes = list(graph.nodes)
    xy = [where[n] for n in nodes]
    fig.add_trace(
        go.Scatter(
            x=[p[0] for p in xy],
            y=[p[1] for p in xy],
            mode="markers+text",
            text=[_short(n) for n in nodes],
            hovertext=nodes,
            customdata=nodes,
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
