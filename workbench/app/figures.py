"""Figures of circuits, drawn with Plotly: nodes by layer and head (SAE features in a column at
their hook's depth), edges coloured by sign or by comparison and as wide as their |score|,
supernodes at their members' mean position. The Circuit and Timeline pages draw with them."""

from math import nan

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
