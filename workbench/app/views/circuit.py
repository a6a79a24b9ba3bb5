"""Circuit: nodes by layer, edges weighted by score. Any edge run pruned in SQL (top-k or a
threshold) with its faithfulness curve, any stored circuit, or two circuits side by side (shared,
only-left and only-right edges); and every score a chosen node has across methods. Feature
circuits (`sae_attr`) draw each SAE's features in a column at its hook; a head links to the
features it writes most, a feature to its dashboard."""

import pandas as pd
import plotly.express as px
import streamlit as st

from workbench.app import access, links, queries
from workbench.app.circuit_data import Shown, triples
from workbench.app.figures import COLOURS, Edge, circuit_figure
from workbench.app.views import curate, features, seeds
from workbench.app.views.common import (
    RELIABILITY_METRICS,
    clickable_chart,
    clicked_node,
    pick_row,
    pick_run,
    reliability,
    select_model,
)
from workbench.core import PORTS, Node
from workbench.graph import input_to_logits, split_port, without_layers

MAX_DRAWN = 10_000  # edges the explorer draws at most


def render() -> None:
    st.header("Circuit")
    linked_run = links.take("run")
    if linked_run is not None:
        _open_run(linked_run)
    if links.has("subgraph") and not links.has("show"):  # a subgraph's link opens it
        links.prefill(show="Saved subgraph")
    model_id = select_model("circuit_model")
    if model_id is None:
        return
    shape = queries.model_shape(model_id)
    n_layers, n_heads = int(shape["n_layers"][0]), int(shape["n_heads"][0])
    source = links.radio(
        "Show",
        ["Edge run", "Stored circuit", "Compare circuits", "Across seeds", "Saved subgraph"],
        horizontal=True,
        key="circuit_source",
        param="show",
    )
    if source == "Edge run":
        shown = _edge_run(model_id)
    elif source == "Stored circuit":
        shown = _stored_circuit(model_id)
    elif source == "Compare circuits":
        shown = _compare(model_id)
    elif source == "Across seeds":
        shown = seeds.across_seeds(model_id)
    else:
        shown = curate.saved(model_id)
    if shown is None:
        return
    _explore(shown, model_id, n_layers, n_heads)


def _open_run(run_id: str) -> None:
    """A link naming a run (`?view=circuit&run=...`) opens its model, method, task and step."""
    found = queries.run_info(run_id)
    if found.empty:
        bad = access.literal(f"run={run_id!r}")
        st.caption(f":orange[link parameter {bad} is not a stored run; ignored]")
        return
    row = found.iloc[0]
    links.prefill(
        model=row["model_id"],
        show="Edge run",
        method=row["method"],
        task=row["task_id"],
        step=int(row["step"]),
    )


def _explore(shown: Shown, model_id: str, n_layers: int, n_heads: int) -> None:
    """Path pruning, hidden layers, the node picked (its neighbourhood highlighted), the graph
    drawn with WebGL, and the picked node's scores across methods."""
    c1, c2, c3 = st.columns([2, 2, 1])
    on_paths = links.checkbox(
        "Only edges on input → logits paths",
        key="circuit_paths",
        param="paths",
        default=True,
        where=c1,
    )
    hidden = links.multiselect(
        "Hide layers", list(range(n_layers)), key="circuit_hide", param="hide", where=c2
    )
    renderer = links.radio(
        "Draw with",
        ["SVG", "WebGL"],
        key="circuit_draw",
        param="draw",
        where=c3,
        help="SVG: edges batched into one path per colour and width, the fastest to draw in "
        "the explorer benchmark (Chromium without a GPU) and vector for export; WebGL: for "
        "a browser with a GPU",
    )
    edges = shown.edges
    if on_paths:
        edges = input_to_logits(edges)
    if hidden:
        edges = without_layers(edges, set(hidden))
    nodes = sorted({split_port(n)[0] for s, d, _ in edges for n in (s, d)})
    heads = [Node.head_of(lyr, h).id for lyr in range(n_layers) for h in range(n_heads)]
    clicked = clicked_node("circuit_graph")
    choices = list(dict.fromkeys(nodes + heads))
    if clicked in choices:
        st.session_state["circuit_node"] = clicked
    node = links.selectbox(
        "Node (or click one in the graph)", choices, key="circuit_node", param="node"
    )
    if not edges:
        st.info(
            "No edge is left to draw: widen the pruning, or show paths that do not end in "
            "the logits."
        )
    else:
        fig = circuit_figure(
            edges,
            n_layers,
            n_heads,
            colours=shown.colours,
            highlight=node,
            webgl=renderer == "WebGL",
            pinned=curate.pinned(),
            groups=shown.groups,
        )
        clickable_chart(fig, "circuit_graph")
        dropped = len(shown.edges) - len(edges)
        st.caption(
            f"{len(edges):,} edges drawn"
            + (f" ({dropped:,} off input → logits paths or in hidden layers)" if dropped else "")
        )
    if shown.after is not None:
        shown.after()
    curate.panel(
        edges if shown.own_edges is None else shown.own_edges,
        nodes,
        model_id,
        shown.checkpoint_id,
        shown.source,
    )
    if node:
        _node_inspector(node, shown.checkpoint_id)


def _edge_run(model_id: str) -> Shown | None:
    runs = queries.done_runs(model_id)
    with_edges = queries.runs_with_edges(model_id)
    runs = runs[runs["run_id"].isin(with_edges["run_id"])]
    if runs.empty:
        st.info("No runs with edges for this model yet (dla, attr_patch and the edges pipeline).")
        return None
    run = pick_run(runs, "circuit", slider=False)
    run_id = str(run["run_id"])
    size = queries.edge_run_size(run_id).iloc[0]
    n_stored, bound = int(size["n"]), float(size["m"] or 0.0)
    mode = links.radio(
        "Prune by",
        ["top-k", "threshold", "cumulative share"],
        horizontal=True,
        key="circuit_mode",
        param="prune",
    )
    most = min(n_stored, MAX_DRAWN)
    if mode == "top-k":
        k = links.number(
            "Edges (top k by |score|)", 1, max(most, 2), min(12, most), key="circuit_k", param="k"
        )
        edges = queries.edge_run_edges_top(run_id, int(k))
    elif mode == "threshold":
        threshold = links.number(
            "Minimum |score|", 0.0, bound, bound / 4, key="circuit_threshold", param="min"
        )
        edges = queries.edge_run_edges_above(run_id, float(threshold), MAX_DRAWN)
    else:
        share = links.number(
            "Share of the total |score| kept (strongest edges first)",
            0.01,
            1.0,
            0.5,
            key="circuit_share",
            param="share",
            step=0.01,
        )
        edges = queries.edge_run_edges_share(run_id, float(share), MAX_DRAWN)
    if len(edges) >= MAX_DRAWN and mode != "top-k":
        st.caption(f":orange[the {MAX_DRAWN:,} strongest of the edges asked for are drawn]")
    for row in queries.run_metrics(run_id).itertuples():
        if row.metric in RELIABILITY_METRICS:
            continue
        label = {"roc_auc_known_circuit": "ROC AUC vs the known circuit"}.get(
            row.metric, row.metric
        )
        st.metric(label, f"{row.value:.3f}")
    rule = run.get("ig_rule")
    st.caption(
        f"{len(edges):,} of {n_stored:,} edges from run `{run_id}`"
        + (f" · integrated gradients, {rule} rule" if isinstance(rule, str) else "")
        + (
            " · stderr: each score's standard error over prompts"
            if edges["stderr"].notna().any()
            else ""
        )
    )

    def after() -> None:
        reliability(run_id, "circuit")
        st.dataframe(edges, hide_index=True)
        curve = queries.faithfulness_curve(run_id)
        if not curve.empty:
            st.subheader("Faithfulness vs circuit size")
            fig = px.line(curve, x="n_edges", y="faithfulness", markers=True, log_x=True)
            fig.add_hline(y=0.8, line_dash="dot")
            st.plotly_chart(fig, key="circuit_curve")

    return Shown(triples(edges), str(run["checkpoint_id"]), after=after, source=f"run:{run_id}")


def _circuit_edges(circuit_id: str) -> list[Edge]:
    return triples(queries.circuit_edges(circuit_id))


def _stored_circuit(model_id: str) -> Shown | None:
    stored = queries.circuits(model_id)
    if stored.empty:
        st.info("No stored circuits for this model yet (`workbench run edges` stores them).")
        return None
    row = pick_row(stored, "circuit_id", "Circuit", key="circuit_pick", param="circuit")
    st.caption(f"circuit `{row['circuit_id']}`: {access.literal(row['name'])}")
    return Shown(
        _circuit_edges(row["circuit_id"]),
        str(row["checkpoint_id"]),
        source=f"circuit:{row['circuit_id']}",
    )


def _compare(model_id: str) -> Shown | None:
    stored = queries.circuits(model_id)
    if len(stored) < 2:
        st.info("Comparing needs at least two stored circuits.")
        return None
    labels = stored["label"].tolist()
    c1, c2 = st.columns(2)
    left_label = links.selectbox(
        "Left", labels, index=0, key="circuit_left", param="left", where=c1
    )
    right_label = links.selectbox(
        "Right", labels, index=1, key="circuit_right", param="right", where=c2
    )
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

    def after() -> None:
        st.caption("grey: in both · blue: only left · orange: only right")
        table = pd.DataFrame(
            [
                {"src": s, "dst": d, "in": m, "left": left.get((s, d)), "right": right.get((s, d))}
                for (s, d), m in membership.items()
            ]  # fmt: skip
        )
        st.dataframe(table.sort_values("in"), hide_index=True)

    return Shown(
        merged,
        str(left_row["checkpoint_id"]),
        colours=colours,
        after=after,
        source=f"circuits:{left_row['circuit_id']},{right_row['circuit_id']}",
    )


def _node_inspector(node: str, checkpoint_id: str) -> None:
    """Scores of a node (a head with its q/k/v/pattern inputs) across every method, and its
    strongest edges in every edge run of the checkpoint."""
    st.subheader("Node scores across methods")
    with_ports = _with_ports(node)
    scores = queries.node_scores_at_checkpoint(checkpoint_id, with_ports)
    incident = queries.incident_edges(checkpoint_id, node, with_ports)
    st.dataframe(scores, hide_index=True)
    st.caption(
        f"strongest edges at {access.literal(node)} in every edge run of "
        f"{access.literal(checkpoint_id)}"
    )
    st.dataframe(incident, hide_index=True)
    _feature_links(node, checkpoint_id)


def _with_ports(node_id: str) -> list[str]:
    """A head and its q/k/v/pattern input nodes (where its incoming edges and port scores are
    stored); any other node alone."""
    node = Node.try_parse(node_id)
    if node is None or not node.is_head:
        return [node_id]
    return [node_id] + [Node.head_of(node.layer or 0, node.head or 0, p).id for p in PORTS]


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
    st.caption(f"features {access.literal(node)} writes most (sae_attr: direct write × gradient)")
    for i, row in enumerate(writes.itertuples()):
        feature = Node.parse(str(row.feature))
        st.button(
            f"{row.feature}  ({row.score:+.4f})",
            on_click=features.open_feature,
            args=(feature.sae_id, feature.feature),
            key=f"circuit_head_feature_{i}",
        )
