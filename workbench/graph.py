"""Circuit graphs with networkx: layered layout of stored nodes and edges for drawing.

Edges into a head's query, key or value input (`a1.h0<k>`) are drawn into the head itself and
keep the port as an edge attribute.
"""

import networkx as nx

from workbench.core import Node


def split_port(node_id: str) -> tuple[str, str | None]:
    """`a1.h0<k>` -> (`a1.h0`, `k`); any other id -> (id, None)."""
    node = Node.try_parse(node_id)
    if node is None or node.port is None:
        return node_id, None
    return node.base.id, node.port


def node_position(node_id: str, n_layers: int, n_heads: int = 1) -> tuple[float, float]:
    """x = layer (input at -1, logits at n_layers), y = head index; input and logits centred."""
    middle = (n_heads - 1) / 2
    node = Node.try_parse(node_id)
    kind = node.kind if node else None
    if node and kind == "attn_head":
        return float(node.layer or 0), float(node.head or 0)
    if kind == "input":
        return -1.0, middle
    if kind == "logits":
        return float(n_layers), middle
    if node and kind == "mlp":
        return float(node.layer or 0) + 0.5, -1.0
    return float(n_layers) / 2, -2.0


def layout(
    nodes: list[str], n_layers: int, n_heads: int, sae_depth: dict[str, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Positions for drawing: `node_position` for model nodes; an SAE's features and error
    (`f:{sae_id}:...`) in a column just before the depth of the SAE's hook (`sae_depth`, in
    layers), spread evenly around the middle."""
    middle = (n_heads - 1) / 2
    positions = {}
    columns: dict[str, list[Node]] = {}
    for node_id in nodes:
        node = Node.try_parse(node_id)
        if node is not None and node.sae_id is not None:
            columns.setdefault(node.sae_id, []).append(node)
        else:
            positions[node_id] = node_position(node_id, n_layers, n_heads)
    for sae_id, members in columns.items():
        x = (sae_depth or {}).get(sae_id, n_layers / 2) - 0.25
        spacing = max(n_heads, 1) / max(len(members), 1)
        for i, node in enumerate(sorted(members, key=_feature_order)):
            positions[node.id] = (x, middle + (i - (len(members) - 1) / 2) * spacing)
    return positions


def _feature_order(node: Node) -> tuple[int, int]:
    return (1, 0) if node.feature is None else (0, node.feature)


def input_to_logits(
    edges: list[tuple[str, str, float]], source: str = "input", sink: str = "logits"
) -> list[tuple[str, str, float]]:
    """The edges on a path from the input to the logits: an edge stays when the input reaches
    its source and its destination reaches the logits. A graph without an input node (e.g.
    direct logit attribution's head -> logits edges) keeps every edge that reaches the logits;
    one without logits, every edge the input reaches."""
    graph = build_graph(edges)
    keep = set(graph.nodes)
    if source in graph:
        keep &= nx.descendants(graph, source) | {source}
    if sink in graph:
        keep &= nx.ancestors(graph, sink) | {sink}
    return [(s, d, v) for s, d, v in edges if s in keep and split_port(d)[0] in keep]


def without_layers(
    edges: list[tuple[str, str, float]], layers: set[int]
) -> list[tuple[str, str, float]]:
    """The edges none of whose ends is a node of one of `layers` (heads, MLPs, residual and
    attention nodes there; the input, logits and SAE features stay)."""

    def hidden(node_id: str) -> bool:
        node = Node.try_parse(node_id)
        return node is not None and node.sae_id is None and node.layer in layers

    return [(s, d, v) for s, d, v in edges if not hidden(s) and not hidden(d)]


def build_graph(edges: list[tuple[str, str, float]]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for src, dst, score in edges:
        head, port = split_port(dst)
        if graph.has_edge(src, head):
            graph[src][head]["score"] += score
            graph[src][head]["ports"].append(port)
        else:
            graph.add_edge(src, head, score=score, ports=[port])
    return graph
