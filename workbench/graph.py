"""Circuit graphs with networkx: layered layout of stored nodes and edges for drawing.

Edges into a head's query, key or value input (`a1.h0<k>`) are drawn into the head itself and
keep the port as an edge attribute.
"""

import re

import networkx as nx

HEAD = re.compile(r"^a(\d+)\.h(\d+)(?:<(\w+)>)?$")


def split_port(node_id: str) -> tuple[str, str | None]:
    match = HEAD.match(node_id)
    if match and match.group(3):
        return f"a{match.group(1)}.h{match.group(2)}", match.group(3)
    return node_id, None


def node_position(node_id: str, n_layers: int, n_heads: int = 1) -> tuple[float, float]:
    """x = layer (input at -1, logits at n_layers), y = head index; input and logits centred."""
    middle = (n_heads - 1) / 2
    match = HEAD.match(node_id)
    if match:
        return float(match.group(1)), float(match.group(2))
    if node_id == "input":
        return -1.0, middle
    if node_id == "logits":
        return float(n_layers), middle
    mlp = re.match(r"^m(\d+)$", node_id)
    if mlp:
        return float(mlp.group(1)) + 0.5, -1.0
    return float(n_layers) / 2, -2.0


def layout(
    nodes: list[str], n_layers: int, n_heads: int, sae_depth: dict[str, float] | None = None
) -> dict[str, tuple[float, float]]:
    """Positions for drawing: `node_position` for model nodes; an SAE's features and error
    (`f:{sae_id}:...`) in a column just before the depth of the SAE's hook (`sae_depth`, in
    layers), spread evenly around the middle."""
    middle = (n_heads - 1) / 2
    positions = {}
    columns: dict[str, list[str]] = {}
    for node in nodes:
        if node.startswith("f:"):
            columns.setdefault(node.split(":")[1], []).append(node)
        else:
            positions[node] = node_position(node, n_layers, n_heads)
    for sae_id, members in columns.items():
        x = (sae_depth or {}).get(sae_id, n_layers / 2) - 0.25
        spacing = max(n_heads, 1) / max(len(members), 1)
        for i, node in enumerate(sorted(members, key=_feature_order)):
            positions[node] = (x, middle + (i - (len(members) - 1) / 2) * spacing)
    return positions


def _feature_order(node: str) -> tuple[int, int]:
    tail = node.rsplit(":", 1)[1]
    return (1, 0) if not tail.isdigit() else (0, int(tail))


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
