"""Graph: the attribution graph of one prompt (`workbench run graph`), as circuit-tracer and
Neuronpedia draw them: the prompt's positions along x, layers along y (embeddings below, the
logits on top), node size by influence, edges blue when positive and red when negative.

The pruning thresholds prune the stored graph again (`app.graph_data`); a click on a node (or
the Node box) shows what it is, its strongest inputs and outputs and, for a feature, its
dashboard; nodes are pinned and grouped into supernodes and saved with the other curated
subgraphs (`app.views.curate`, source `graph:<graph_id>`); an intervention sets features in
the real model with its transcoders spliced in and shows how the next-token distribution moves
(`workbench intervene --graph` in a process of its own, through `app.access.launch`: not in
read-only mode). Everything is linked (`?view=graph&graph=<id>&node=<node_id>&nthr=0.6`)."""

import json
import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from workbench.app import access, data, graph_data, links, queries
from workbench.app.figures import attribution_figure
from workbench.app.views import curate, features
from workbench.app.views.common import clickable_chart, clicked_node, pick_row, select_model
from workbench.subgraphs import collapse

JOB = "graph_job"  # session state: the intervention this session started and has not shown
RESULT = "graph_intervention"  # session state: the last intervention's settings and rows
INTERVENING = "The intervention"
NEIGHBOURS = 10  # strongest inputs and outputs listed for a node
MAX_DRAWN = 10_000  # edges drawn at most (the strongest), as on the Circuit page


def render() -> None:
    st.header("Attribution graph")
    model_id = select_model("graph_model")
    if model_id is None:
        return
    stored = queries.graphs(model_id)
    if stored.empty:
        st.info(
            "No attribution graph for this model yet: train transcoders "
            "(`workbench run transcoders --model ...`), then run "
            "`workbench run graph --model ... --transcoders SET --text ...`."
        )
        return
    graph = pick_row(stored, "graph_id", "Graph", key="graph_pick", param="graph")
    gid = str(graph["graph_id"])
    tokens = [str(t) for t in graph["tokens"]]
    _scores(graph)
    nodes = _labelled(queries.graph_nodes(gid), tokens)
    stored_node, stored_edge = graph_data.stored_thresholds(graph)
    c1, c2, c3 = st.columns([2, 2, 1])
    node_threshold = links.number("Node threshold (cumulative influence kept)", 0.05, 1.0,
                                  stored_node, key="graph_nthr", param="nthr", step=0.01,
                                  where=c1)  # fmt: skip
    edge_threshold = links.number("Edge threshold (cumulative edge influence kept)", 0.05, 1.0,
                                  stored_edge, key="graph_ethr", param="ethr", step=0.01,
                                  where=c2)  # fmt: skip
    folded = links.checkbox("Collapse groups into supernodes", key="graph_collapse",
                            param="collapse", default=True, where=c3)  # fmt: skip
    shown = graph_data.pruned(graph, nodes, float(node_threshold), float(edge_threshold))
    edges = [(str(r.src), str(r.dst), float(r.weight)) for r in shown.edges.itertuples()]
    if len(edges) > MAX_DRAWN:  # (strongest first)
        st.caption(f":orange[the {MAX_DRAWN:,} strongest of {len(edges):,} edges are drawn]")
        edges = edges[:MAX_DRAWN]
    ids = shown.nodes["node_id"].tolist()
    clicked = clicked_node("graph_view")
    if clicked in ids:
        st.session_state["graph_node"] = clicked
    node = links.selectbox(
        "Node (or click one in the graph)",
        ids,
        index=_most_influential(shown.nodes),
        format_func=_label_of(shown.nodes),
        key="graph_node",
        param="node",
    )
    groups = {k: [m for m in v if m in ids] for k, v in curate.groups().items()}
    groups = {k: v for k, v in groups.items() if v} if folded else {}
    fig = attribution_figure(
        shown.nodes,
        collapse(edges, groups) if groups else edges,
        [f"{i}:{t}" for i, t in enumerate(tokens)],
        highlight=node,
        pinned=curate.pinned(),
        groups=groups,
    )
    clickable_chart(fig, "graph_view")
    st.caption(_caption(shown, len(nodes)))
    if node:
        _inspect(graph, nodes, shown.nodes, node)
    _saved_here(model_id, gid)
    curate.panel(edges, ids, model_id, str(graph["checkpoint_id"]), f"{curate.GRAPH_SOURCE}{gid}")
    _intervene(gid, shown.nodes)


def _scores(graph: pd.Series) -> None:
    cols = st.columns(5)
    for col, (label, column) in zip(
        cols[:2],
        (("replacement score", "replacement_score"), ("completeness score", "completeness_score")),
        strict=True,
    ):
        value = graph[column]
        col.metric(label, "n/a" if pd.isna(value) else f"{value:.3f}")
    cols[2].metric("nodes kept", f"{int(graph['n_nodes_kept']):,} of {int(graph['n_nodes']):,}")
    cols[3].metric("edges kept", f"{int(graph['n_edges_kept']):,}")
    seconds = graph["seconds"]
    cols[4].metric("computed in", "n/a" if pd.isna(seconds) else f"{seconds:.1f} s")
    made_of = graph["set_id"] if pd.notna(graph["set_id"]) else graph["set_path"]
    st.caption(
        f"graph `{graph['graph_id']}` · step {graph['step']} · transcoders "
        f"{access.literal(made_of)} · prompt {access.literal(graph['text'])}"
    )


def _labelled(nodes: pd.DataFrame, tokens: list[str]) -> pd.DataFrame:
    """The nodes with a `label` for hovers and pickers."""
    out = nodes.copy()
    labels = []
    for r in out.itertuples():
        at = f"@{r.position} {tokens[int(r.position)]!r}" if 0 <= r.position < len(tokens) else ""
        if r.kind == "feature":
            labels.append(f"L{int(r.layer)} #{int(r.feature)} {at} · act {r.activation:.3g}")
        elif r.kind == "error":
            labels.append(f"L{int(r.layer)} error {at}")
        elif r.kind == "token":
            labels.append(f"embedding {at}")
        else:
            labels.append(f"logit {str(r.token)!r} · p {r.probability:.3f}")
    out["label"] = [  # (a logit is where influence is measured from: none of its own)
        f"{label} · influence {inf:.3g}" if pd.notna(inf) and kind != "logit" else label
        for label, inf, kind in zip(labels, out["influence"], out["kind"], strict=True)
    ]
    return out


def _label_of(nodes: pd.DataFrame):  # type: ignore[no-untyped-def]
    labels = dict(zip(nodes["node_id"], nodes["label"], strict=True))
    return lambda n: f"{n}  ·  {labels.get(n, '')}"


def _most_influential(nodes: pd.DataFrame) -> int:
    """The default node: the most influential feature (else the first node)."""
    features_only = nodes[nodes["kind"] == "feature"]
    if features_only.empty:
        return 0
    best = features_only["influence"].fillna(0.0).idxmax()
    return int(nodes.index.get_loc(best))


def _caption(shown: graph_data.Pruning, n_nodes: int) -> str:
    how = {
        "stored": "as stored",
        "pruned again": "pruned again from the full adjacency",
        "filtered": "filtered from the imported nodes and edges (no full adjacency)",
    }[shown.how]
    return (
        f"{len(shown.nodes):,} of {n_nodes:,} nodes and {len(shown.edges):,} edges, {how} · "
        "circle: feature · square: error · triangle: embedding · hexagon: logit · star: "
        "supernode · outlined: pinned · blue: positive edge · red: negative edge"
    )


def _inspect(graph: pd.Series, nodes: pd.DataFrame, drawn: pd.DataFrame, node: str) -> None:
    """One node: what it is, its strongest inputs and outputs, its feature's dashboard."""
    row = nodes[nodes["node_id"] == node].iloc[0]
    st.subheader(f"Node {node}")
    c1, c2 = st.columns([3, 1])
    c1.caption(access.literal(row["label"]))
    if node not in curate.pinned():
        c2.button("Pin", on_click=_pin, args=(node,), key="graph_pin")
    inputs, outputs = _neighbours(graph, nodes, drawn, int(row["node"]))
    left, right = st.columns(2)
    left.markdown("**Strongest inputs** (direct effect on this node)")
    left.dataframe(inputs, hide_index=True, key="graph_inputs")
    right.markdown("**Strongest outputs** (its direct effect on them)")
    right.dataframe(outputs, hide_index=True, key="graph_outputs")
    if row["kind"] == "feature" and pd.notna(row["sae_id"]):
        sae_id, feature = str(row["sae_id"]), int(row["feature"])
        st.button(
            f"Open the dashboard of feature {feature} of {sae_id}",
            on_click=features.open_feature,
            args=(sae_id, feature),
            key="graph_open_feature",
        )
        features.card(sae_id, feature)


def _pin(node: str) -> None:
    st.session_state[curate.PINS] = [*st.session_state.get(curate.PINS, []), node]


def _neighbours(
    graph: pd.Series, nodes: pd.DataFrame, drawn: pd.DataFrame, index: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The node's strongest incoming and outgoing edges: in the full graph where its adjacency
    is at hand, else among the stored edges."""
    a = graph_data.dense_adjacency(graph, len(nodes))
    ids = nodes["node_id"].to_numpy()
    labels = nodes["label"].to_numpy()
    if a is not None:
        tables = []
        for weights in (a[index], a[:, index]):
            order = np.argsort(-np.abs(weights), kind="stable")[:NEIGHBOURS]
            order = order[weights[order] != 0]
            tables.append(
                pd.DataFrame(
                    {
                        "node": ids[order],
                        "weight": weights[order],
                        "shown": np.isin(ids[order], drawn["node_id"]),
                        "what": labels[order],
                    }
                )
            )
        return tables[0], tables[1]
    rows = queries.graph_edges(str(graph["graph_id"]))
    into = rows[rows["dst"] == index].head(NEIGHBOURS)
    out_of = rows[rows["src"] == index].head(NEIGHBOURS)
    return (
        pd.DataFrame({"node": ids[into["src"]], "weight": into["weight"],
                      "what": labels[into["src"]]}),
        pd.DataFrame({"node": ids[out_of["dst"]], "weight": out_of["weight"],
                      "what": labels[out_of["dst"]]}),
    )  # fmt: skip


def _saved_here(model_id: str, gid: str) -> None:
    """Reopen a subgraph saved from this graph: its nodes pinned and grouped again."""
    saved = queries.subgraphs(model_id)
    saved = saved[saved["source"] == f"{curate.GRAPH_SOURCE}{gid}"]
    if saved.empty:
        return
    c1, c2 = st.columns([3, 1])
    sid = c1.selectbox(
        "Subgraphs saved from this graph",
        saved["subgraph_id"].tolist(),
        format_func=dict(zip(saved["subgraph_id"], saved["label"], strict=True)).get,
        key="graph_saved",
    )
    if c2.button("Open", key="graph_open_saved"):
        name = str(saved[saved["subgraph_id"] == sid]["name"].iloc[0])
        curate.restore(sid, name, queries.subgraph_nodes(sid), queries.subgraph_edges(sid))
        st.rerun()


# -- interventions -------------------------------------------------------------------------


def _intervene(gid: str, drawn: pd.DataFrame) -> None:
    st.subheader("Intervene: set features and watch the next token")
    job = st.session_state.get(JOB)
    if job is not None:
        _follow(job)
    if access.require_writable("Running an intervention"):
        _intervene_form(gid, drawn)
    result = st.session_state.get(RESULT)
    if result is not None and result["graph"] == gid:
        _show_result(result)


def _intervene_form(gid: str, drawn: pd.DataFrame) -> None:
    feats = drawn[drawn["kind"] == "feature"]
    if feats.empty:
        st.caption("No feature node is drawn at these thresholds.")
        return
    options = feats["node_id"].tolist()
    pinned = [n for n in st.session_state.get(curate.PINS, []) if n in options]
    chosen = st.multiselect(
        "Features to set (pinned ones first)",
        options,
        default=pinned,
        format_func=_label_of(feats),
        key="graph_iv_features",
    )
    c1, c2 = st.columns([2, 1])
    mode = c1.radio(
        "Set each to",
        ["0 (remove it)", "its activation times", "the value"],
        horizontal=True,
        key="graph_iv_mode",
    )
    number = c2.number_input(
        "times / value", value=-1.0 if mode == "its activation times" else 0.0,
        key="graph_iv_number", disabled=mode == "0 (remove it)",
    )  # fmt: skip
    if not st.button("Run the intervention", key="graph_iv_run"):
        return
    if not chosen:
        st.warning("Choose at least one feature to set.")
        return
    sets = []
    for r in feats[feats["node_id"].isin(chosen)].itertuples():
        if mode == "0 (remove it)":
            value = 0.0
        elif mode == "its activation times":
            value = float(number) * float(r.activation)
        else:
            value = float(number)
        sets.append(f"{int(r.layer)}:{int(r.position)}:{int(r.feature)}={value!r}")
    cmd = [sys.executable, "-m", "workbench", "intervene", f"--graph={gid}",
           f"--db={data.db_path()}", "--format=json"]  # fmt: skip
    cmd += [f"--set={s}" for s in sets]
    job = access.launch(cmd, what=INTERVENING)
    if job is not None:
        st.session_state[JOB] = job
        st.session_state[RESULT] = {"graph": gid, "sets": sets, "rows": None}
        _follow(job)


def _follow(job: access.Job) -> None:
    """Show the intervention's progress until it ends (a rerun meanwhile comes back here),
    then keep its result for the page."""
    succeeded = access.wait(job, label="Running the intervention")
    del st.session_state[JOB]
    result = st.session_state.get(RESULT)
    if not succeeded or result is None:
        st.session_state.pop(RESULT, None)
        return
    try:
        result["rows"] = json.loads(job.stdout().strip().splitlines()[-1])
    except (ValueError, IndexError):
        st.error(access.plain(f"{INTERVENING} printed no result: {job.stdout()[-300:]}"))
        st.session_state.pop(RESULT, None)


def _show_result(result: dict) -> None:
    if result["rows"] is None:
        return
    table = pd.DataFrame(result["rows"])
    table["change"] = table["after"] - table["before"]
    st.caption(
        "next-token probabilities with the transcoders spliced in, before and after "
        + ", ".join(access.literal(s) for s in result["sets"])
        + " (LAYER:POSITION:FEATURE=VALUE)"
    )
    fig = go.Figure(
        [
            go.Bar(name="before", x=table["token"].map(repr), y=table["before"]),
            go.Bar(name="after", x=table["token"].map(repr), y=table["after"]),
        ]
    )
    fig.update_layout(barmode="group", height=320, yaxis={"title": "probability"},
                      margin={"l": 40, "r": 10, "t": 10, "b": 60})  # fmt: skip
    st.plotly_chart(fig, key="graph_iv_chart")
    st.dataframe(table, hide_index=True, key="graph_iv_table")
