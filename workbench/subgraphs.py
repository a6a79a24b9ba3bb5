"""Curated subgraphs: what a researcher keeps of a circuit.

A subgraph is a named set of nodes of one checkpoint's graph (the nodes pinned in the app),
the edges among them (with the scores of the run or circuit they were taken from), node groups
(a supernode: several nodes under one label) and notes on nodes and edges. It is stored in the
tables `subgraphs`, `subgraph_nodes` and `subgraph_edges` (schema v7) through
`Store.save_subgraph`, the app's only write, and exported like a circuit
(`workbench export subgraph ID`).

Its id is `sg-` + the first 10 hex digits of sha256(checkpoint id, name): saving again under the
same name at the same checkpoint replaces the earlier one.

Names, group labels and notes are stored exactly as typed, control characters included, and the
JSON export keeps them exactly (as JSON escapes). XML 1.0 cannot carry most C0 controls, so the
GraphML export writes each of U+0000-U+0008, U+000B, U+000C and U+000E-U+001F as its Control
Pictures symbol (U+2400 + its code: NUL as U+2400, ESC as U+241B), a lone surrogate, U+FFFE or
U+FFFF as U+FFFD, and a carriage return as the reference `&#13;` (so a parser reads it back
rather than a newline). Tab, newline, DEL (U+007F) and every other character are written as they
are and read back unchanged.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from workbench.errors import BadInput

MAX_NAME = 200
GROUP_PREFIX = "group:"  # how a supernode is drawn and exported: `group:<label>`


@dataclass(frozen=True)
class SubgraphNode:
    node_id: str
    group: str | None = None  # the supernode label it belongs to
    note: str | None = None


@dataclass(frozen=True)
class SubgraphEdge:
    src: str
    dst: str
    score: float
    note: str | None = None


@dataclass
class Subgraph:
    name: str
    model_id: str
    checkpoint_id: str
    source: str  # where its edges come from: `run:<run_id>`, `circuit:<circuit_id>`, ...
    nodes: list[SubgraphNode] = field(default_factory=list)
    edges: list[SubgraphEdge] = field(default_factory=list)
    description: str = ""

    @property
    def subgraph_id(self) -> str:
        digest = hashlib.sha256(f"{self.checkpoint_id}\n{self.name}".encode()).hexdigest()
        return f"sg-{digest[:10]}"

    def check(self) -> None:
        """One sentence naming what is wrong, as BadInput."""
        name = self.name.strip()
        if not name:
            raise BadInput("subgraph name: empty; give it a name")
        if len(name) > MAX_NAME:
            raise BadInput(f"subgraph name: {len(name)} characters, at most {MAX_NAME}")
        ids = [n.node_id for n in self.nodes]
        if not ids:
            raise BadInput(f"subgraph {name!r}: no nodes; pin at least one")
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise BadInput(f"subgraph {name!r}: node {twice[0]!r} is listed twice")
        known = set(ids)
        for edge in self.edges:
            for end in (edge.src, _base(edge.dst)):
                if end not in known:
                    raise BadInput(
                        f"subgraph {name!r}: edge {edge.src} -> {edge.dst} ends at {end!r}, "
                        "which is not one of its nodes"
                    )
        for node in self.nodes:
            if node.group is not None and not node.group.strip():
                raise BadInput(f"subgraph {name!r}: node {node.node_id!r} has an empty group")

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for node in self.nodes:
            if node.group:
                out.setdefault(node.group, []).append(node.node_id)
        return out


def _base(node_id: str) -> str:
    from workbench.graph import split_port

    return split_port(node_id)[0]


def collapse(
    edges: list[tuple[str, str, float]], groups: dict[str, list[str]]
) -> list[tuple[str, str, float]]:
    """Edges with each group's members replaced by its supernode (`group:<label>`): parallel
    edges summed, edges inside a group dropped. Ports stay on edges into a lone head."""
    owner = {
        member: GROUP_PREFIX + label for label, members in groups.items() for member in members
    }
    summed: dict[tuple[str, str], float] = {}
    for src, dst, score in edges:
        a = owner.get(src, src)
        b = owner.get(_base(dst), dst)
        if a == b:
            continue
        summed[(a, b)] = summed.get((a, b), 0.0) + score
    return [(a, b, s) for (a, b), s in summed.items()]


def subgraph_graph(meta: dict[str, Any], nodes: list[dict], edges: list[dict]) -> nx.DiGraph:
    """A stored subgraph (its `subgraphs` row, `subgraph_nodes` and `subgraph_edges` rows) as a
    networkx graph: node attributes group_label and note, edge attributes score and note. An
    edge into a head's query, key or value input ends at that input's node (`a1.h0<k>`, as in
    a circuit's export), which carries `port_of` (the head) and `port`."""
    from workbench.graph import split_port

    graph = nx.DiGraph(**{k: _plain(v) for k, v in meta.items() if v is not None})
    for node in nodes:
        attrs = {k: node[k] for k in ("group_label", "note") if node.get(k) is not None}
        graph.add_node(node["node_id"], **attrs)
    for edge in edges:
        base, port = split_port(edge["dst"])
        if port is not None and edge["dst"] not in graph:
            graph.add_node(edge["dst"], port_of=base, port=port)
        attrs = {"score": edge["score"]}
        if edge.get("note") is not None:
            attrs["note"] = edge["note"]
        graph.add_edge(edge["src"], edge["dst"], **attrs)
    return graph


def _plain(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool) else str(value)


def graph_text(graph: nx.DiGraph, fmt: str, what: str) -> str:
    """GraphML (always well-formed XML: see the module's docstring for the characters XML
    cannot carry), or JSON with `what` (circuit, subgraph) naming the graph's attributes."""
    if fmt == "graphml":
        writer = nx.readwrite.graphml.GraphMLWriter(graph=xml_safe_graph(graph))
        return str(writer).replace(_CR_WRITTEN, "&#13;").replace(_CR, "&#13;") + "\n"
    data: dict[str, Any] = {
        what: dict(graph.graph),
        "nodes": [{"id": n, **attrs} for n, attrs in graph.nodes(data=True)],
        "edges": [{"src": s, "dst": d, **attrs} for s, d, attrs in graph.edges(data=True)],
    }
    return json.dumps(data, indent=1, default=str) + "\n"


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_CR = "\ufffe"  # stands for a carriage return until the GraphML is written (never left in it)
_CR_WRITTEN = "&#65534;"  # how the writer (ASCII output) writes `_CR`


def xml_text(text: str) -> str:
    """`text` with what XML 1.0 cannot carry replaced (module docstring) and each carriage
    return as `_CR`, which `graph_text` writes as `&#13;`."""
    return _NOT_XML.sub(_stand_in, text).replace("\r", _CR)


def _stand_in(match: re.Match[str]) -> str:
    char = match.group()
    return chr(0x2400 + ord(char)) if char < " " else "\ufffd"


def _xml_value(value: Any) -> Any:
    return xml_text(value) if isinstance(value, str) else value


def _xml_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {xml_text(k): _xml_value(v) for k, v in attrs.items()}


def xml_safe_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy of `graph` whose ids, attribute names and string values XML can carry."""
    safe = nx.DiGraph()
    safe.graph.update(_xml_attrs(graph.graph))
    for node, attrs in graph.nodes(data=True):
        safe.add_node(_xml_value(node))
        safe.nodes[_xml_value(node)].update(_xml_attrs(attrs))
    for src, dst, attrs in graph.edges(data=True):
        safe.add_edge(_xml_value(src), _xml_value(dst))
        safe.edges[_xml_value(src), _xml_value(dst)].update(_xml_attrs(attrs))
    return safe
