"""`workbench export circuit ID` and `workbench export subgraph ID`: a stored circuit or a
curated subgraph as GraphML or JSON.

The JSON keeps every stored string exactly; the GraphML is always well-formed XML 1.0, so the C0
control characters XML cannot carry are written as their Control Pictures symbols
(`workbench.subgraphs.graph_text`).
"""

import networkx as nx

from workbench.errors import BadInput
from workbench.store.query import run_readonly_query
from workbench.subgraphs import graph_text, subgraph_graph


def circuit_graph(circuit_id: str, *, db: str | None = None) -> nx.DiGraph:
    meta = run_readonly_query(
        """SELECT c.*, r.method, r.checkpoint_id, r.task_id, ck.model_id, ck.step
           FROM circuits c JOIN runs r USING (run_id) JOIN checkpoints ck USING (checkpoint_id)
           WHERE c.circuit_id = ?""",
        db=db,
        params=[circuit_id],
    ).to_pylist()
    if not meta:
        raise BadInput(f"no circuit {circuit_id!r} in the database")
    info = {k: v for k, v in meta[0].items() if v is not None}
    graph = nx.DiGraph(
        **{k: str(v) if not isinstance(v, int | float) else v for k, v in info.items()}
    )
    nodes = run_readonly_query(
        """SELECT DISTINCT n.node_id, n.kind, n.layer, n.head, n.label
           FROM nodes n WHERE n.model_id = ? AND n.node_id IN (
               SELECT src FROM circuit_edges WHERE circuit_id = ?
               UNION SELECT dst FROM circuit_edges WHERE circuit_id = ?)""",
        db=db,
        params=[info["model_id"], circuit_id, circuit_id],
    ).to_pylist()
    for node in nodes:
        graph.add_node(
            node["node_id"], **{k: v for k, v in node.items() if v is not None and k != "node_id"}
        )
    edges = run_readonly_query(
        "SELECT src, dst, score FROM circuit_edges WHERE circuit_id = ? ORDER BY abs(score) DESC",
        db=db,
        params=[circuit_id],
    ).to_pylist()
    for edge in edges:
        graph.add_edge(edge["src"], edge["dst"], score=edge["score"])
    return graph


def export_circuit(circuit_id: str, fmt: str, *, db: str | None = None) -> str:
    return graph_text(circuit_graph(circuit_id, db=db), fmt, "circuit")


def subgraph_of(subgraph_id: str, *, db: str | None = None) -> nx.DiGraph:
    meta = run_readonly_query(
        """SELECT s.*, ck.step FROM subgraphs s JOIN checkpoints ck USING (checkpoint_id)
           WHERE s.subgraph_id = ?""",
        db=db,
        params=[subgraph_id],
    ).to_pylist()
    if not meta:
        raise BadInput(f"no subgraph {subgraph_id!r} in the database")
    nodes = run_readonly_query(
        "SELECT * FROM subgraph_nodes WHERE subgraph_id = ? ORDER BY node_id",
        db=db,
        params=[subgraph_id],
    ).to_pylist()
    edges = run_readonly_query(
        "SELECT * FROM subgraph_edges WHERE subgraph_id = ? ORDER BY abs(score) DESC, src, dst",
        db=db,
        params=[subgraph_id],
    ).to_pylist()
    return subgraph_graph(meta[0], nodes, edges)


def export_subgraph(subgraph_id: str, fmt: str, *, db: str | None = None) -> str:
    return graph_text(subgraph_of(subgraph_id, db=db), fmt, "subgraph")
