"""Figures of circuits, drawn with Plotly: nodes by layer and head (SAE features in a column at
their hook's depth), edges coloured by sign or by comparison and as wide as their |score|,
supernodes at their members' mean position. The Circuit and Timeline pages draw with them."""

from math import nan
from typing import Any

import numpy as np
import plotly.graph_objects as go

from workbench.app import queries
from workbench.core import Hook, Node
from workbench.graph import build_graph, layout, split_port
from workbench.subgraphs import GROUP_PREFIX

Edge = tuple[str, str, float]  # (src, dst, score)
COLOURS = {"shared": "#444444", "left": "#1f77b4", "right": "#ff7f0e"}  # comparing two circuits
LABELLED = 150  # nodes drawn with their labels (beyond it: hover only)
HOVERED = 2_000  # edges whose score shows on hovering over their midpoint (beyond: the table)


def circuit_figure(
    edges: list[Edge],
    n_layers: int,
    n_heads: int,
    *,
    colours: dict | None = None,
    highlight: str | None = None,
    webgl: bool = False,
    pinned: set[str] | None = None,
    groups: dict[str, list[str]] | None = None,
) -> go.Figure:
    """Nodes by layer (x) and head (y); edges coloured by sign (or `colours`, keyed by the
    stored (src, dst)) and as wide as their |score|. Edges are batched into one trace per colour
    and width, drawn as SVG paths (one per trace: the fastest to draw without a GPU, and vector
    for export) or with WebGL (`Scattergl`, `webgl`);
    the nodes stay one SVG trace, clickable and labelled while there are few. `highlight`: a
    node whose edges are drawn in full colour while the rest fade; `pinned` nodes are drawn as
    diamonds; `groups`: supernodes (`group:<label>`) placed at their members' mean position."""
    graph = build_graph(edges)
    members = [m for ms in (groups or {}).values() for m in ms]
    where = layout(list(graph.nodes) + members, n_layers, n_heads, sae_depths(n_layers))
    where |= supernode_positions(where, groups or {})
    lines = go.Scattergl if webgl else go.Scatter
    biggest = max((abs(d["score"]) for *_, d in graph.edges(data=True)), default=1.0) or 1.0
    stored_key = {(s, split_port(d)[0]): (s, d) for s, d, _ in edges}
    batches: dict[tuple[bool, str, float], tuple[list, list]] = {}
    middles: tuple[list, list, list] = ([], [], [])
    near: set[str] = set()
    if highlight is not None and highlight in graph:
        near = {highlight, *graph.pred[highlight], *graph.succ[highlight]}
    for src, dst, attrs in graph.edges(data=True):
        (x0, y0), (x1, y1) = where[src], where[dst]
        colour = (colours or {}).get(stored_key.get((src, dst))) or (
            "#1f77b4" if attrs["score"] >= 0 else "#d62728"
        )
        lit = not near or highlight in (src, dst)
        xs, ys = batches.setdefault((lit, colour, _width(attrs["score"], biggest)), ([], []))
        xs += [x0, x1, nan]  # (a gap between segments; float arrays travel as binary)
        ys += [y0, y1, nan]
        ports = ",".join(p for p in attrs["ports"] if p)
        middles[0].append((x0 + x1) / 2)
        middles[1].append((y0 + y1) / 2)
        middles[2].append(f"{src} → {dst}{f' <{ports}>' if ports else ''}: {attrs['score']:.3f}")
    fig = go.Figure()
    _add_lines(fig, batches, lines)
    if len(middles[0]) <= HOVERED:  # each edge's score, on hover over its midpoint
        fig.add_trace(
            lines(
                x=np.array(middles[0]),
                y=np.array(middles[1]),
                mode="markers",
                marker={"size": 6, "color": "#999", "opacity": 0.4},
                hovertext=middles[2],
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
            mode="markers+text" if len(nodes) <= LABELLED else "markers",
            text=[_short(n) for n in nodes],
            hovertext=nodes,
            customdata=nodes,
            textposition="top center",
            marker={
                "size": [
                    22 if n == highlight else 16 if n in near or not near else 10 for n in nodes
                ],
                "color": ["#ff7f0e" if n == highlight else "#444" for n in nodes],
                "symbol": ["diamond" if n in (pinned or ()) else "circle" for n in nodes],
            },
            hoverinfo="text",
            showlegend=False,
        )
    )
    fig.update_layout(
        xaxis={"title": "layer", "dtick": 1 if n_layers <= 32 else None},
        yaxis={"title": "head", "dtick": 1 if n_heads <= 32 else None},
        height=max(520, 26 * n_heads),
        margin={"l": 40, "r": 20, "t": 20, "b": 40},
    )
    return fig


def _add_lines(fig: go.Figure, batches: dict, lines: type = go.Scatter) -> None:
    """One trace of line segments per (lit, colour, width): the segments' x and y with a gap
    (NaN) after each."""
    for (lit, colour, width), (xs, ys) in sorted(batches.items(), key=lambda b: b[0]):
        fig.add_trace(
            lines(
                x=np.array(xs),
                y=np.array(ys),
                mode="lines",
                line={"width": width, "color": colour},
                opacity=1.0 if lit else 0.15,
                hoverinfo="skip",  # lines end on the nodes: clicks there must reach the nodes
                showlegend=False,
            )
        )


def sae_depths(n_layers: int) -> dict[str, float]:
    """Each stored SAE's depth in a model of `n_layers` (its hook's): where its features go."""
    saes = queries.sae_hooks()
    return {str(r.sae_id): Hook.depth(str(r.hook), n_layers) for r in saes.itertuples()}


def supernode_positions(
    where: dict[str, tuple[float, float]], members: dict[str, list[str]]
) -> dict[str, tuple[float, float]]:
    """A supernode sits at the mean position of its members."""
    out = {}
    for label, nodes in members.items():
        points = [where[n] for n in nodes if n in where]
        if points:
            out[GROUP_PREFIX + label] = (
                sum(p[0] for p in points) / len(points),
                sum(p[1] for p in points) / len(points),
            )
    return out


def _width(score: float, biggest: float) -> float:
    """Line width in four steps of |score| / the largest |score| (one WebGL trace per step)."""
    return 1.0 + 2.0 * min(int(4 * abs(score) / biggest), 3)


def _short(node_id: str) -> str:
    """Feature nodes are labelled by their index (or `err`); the full id is in the hover."""
    node = Node.try_parse(node_id)
    if node is None or not node.is_sae_node:
        return node_id
    return "#err" if node.feature is None else f"#{node.feature}"


# -- attribution graphs (the Graph page) ---------------------------------------------------------

SIGN_COLOURS = ("#1f77b4", "#d62728")  # positive, negative edges
KIND_MARKERS = {
    "feature": ("circle", "#444444"),
    "error": ("square", "#aaaaaa"),
    "token": ("triangle-up", "#2ca02c"),
    "logit": ("hexagon", "#9467bd"),
    "supernode": ("star", "#ff7f0e"),
}


def attribution_figure(
    nodes: Any,
    edges: list[Edge],
    tokens: list[str],
    *,
    highlight: str | None = None,
    pinned: set[str] | None = None,
    groups: dict[str, list[str]] | None = None,
) -> go.Figure:
    """An attribution graph: `nodes` (rows with node_id, kind, x, y, influence and a `label`)
    at their places, positions along x (ticks: the prompt's `tokens`), layers along y
    (embeddings below, logits on top); node size by influence; `edges` (src, dst, weight)
    blue when positive and red when negative, as wide as their |weight|. `highlight`: a node
    whose edges stay in full colour while the rest fade; `pinned` nodes are outlined; `groups`:
    supernodes (`group:<label>`) drawn at their members' mean place, the members' edges
    summed into them (`edges` already collapsed)."""
    where = {str(r.node_id): (float(r.x), float(r.y)) for r in nodes.itertuples()}
    where |= supernode_positions(where, groups or {})
    biggest = max((abs(w) for *_, w in edges), default=1.0) or 1.0
    near: set[str] = set()
    if highlight is not None:
        near = {highlight} | {s for s, d, _ in edges if d == highlight}
        near |= {d for s, d, _ in edges if s == highlight}
    batches: dict[tuple[bool, str, float], tuple[list, list]] = {}
    for src, dst, weight in edges:
        if src not in where or dst not in where:
            continue
        (x0, y0), (x1, y1) = where[src], where[dst]
        lit = not near or highlight in (src, dst)
        colour = SIGN_COLOURS[0] if weight >= 0 else SIGN_COLOURS[1]
        xs, ys = batches.setdefault((lit, colour, _width(weight, biggest)), ([], []))
        xs += [x0, x1, nan]
        ys += [y0, y1, nan]
    fig = go.Figure()
    _add_lines(fig, batches)
    grouped = {m for ms in (groups or {}).values() for m in ms}
    rows = [r for r in nodes.itertuples() if str(r.node_id) not in grouped]
    largest = max((float(r.influence) for r in rows if r.influence == r.influence), default=1.0)
    ids = [str(r.node_id) for r in rows] + [GROUP_PREFIX + g for g in (groups or {})]
    kinds = [str(r.kind) for r in rows] + ["supernode"] * len(groups or {})
    sizes = [8 + 22 * (max(float(r.influence), 0.0) / (largest or 1.0)) ** 0.5
             if r.influence == r.influence else 10.0 for r in rows]  # fmt: skip
    sizes += [26.0] * len(groups or {})
    labels = [str(r.label) for r in rows] + [f"{g} ({len(m)})" for g, m in (groups or {}).items()]
    fig.add_trace(
        go.Scatter(
            x=[where[n][0] if n in where else nan for n in ids],
            y=[where[n][1] if n in where else nan for n in ids],
            mode="markers",
            hovertext=labels,
            customdata=ids,
            hoverinfo="text",
            marker={
                "size": [s * 1.3 if n == highlight else s for s, n in zip(sizes, ids, strict=True)],
                "symbol": [KIND_MARKERS[k][0] for k in kinds],
                "color": [
                    "#ff7f0e" if n == highlight else KIND_MARKERS[k][1]
                    for n, k in zip(ids, kinds, strict=True)
                ],
                "opacity": [1.0 if not near or n in near else 0.35 for n in ids],
                "line": {
                    "width": [3 if n in (pinned or ()) else 0 for n in ids],
                    "color": "#ff7f0e",
                },
            },
            showlegend=False,
        )
    )
    top = int(nodes["y"].max()) if len(nodes) else 1
    fig.update_layout(
        xaxis={"title": "position", "tickvals": list(range(len(tokens))), "ticktext": tokens},
        yaxis={
            "title": "layer",
            "tickvals": list(range(-1, top + 1)),
            "ticktext": ["emb", *map(str, range(top)), "logit"],
        },
        height=max(520, 40 * (top + 2)),
        margin={"l": 40, "r": 20, "t": 20, "b": 60},
    )
    return fig
