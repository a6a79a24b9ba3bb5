"""Curated subgraphs: saved through the store's API (the app's one write), queryable in SQL,
exported as GraphML and JSON, replaced by name, refused whole when bad; and the graph pruning
the explorer uses (input -> logits paths, hidden layers, supernodes)."""

import json
import shutil
from pathlib import Path

import networkx as nx
import pytest

from tests.db import rows
from workbench.cli import cli
from workbench.errors import BadInput
from workbench.graph import input_to_logits, without_layers
from workbench.store import Store
from workbench.subgraphs import Subgraph, SubgraphEdge, SubgraphNode, collapse


@pytest.fixture()
def db(heads_db, tmp_path) -> Path:
    copy = tmp_path / "w.duckdb"
    shutil.copy(heads_db, copy)
    return copy


def _eap_subgraph(db: Path, name: str = "induction core") -> Subgraph:
    """The top 12 edges of the final EAP run, their nodes pinned, the layer-0 heads grouped,
    a note on a node and on an edge."""
    ((model_id, checkpoint_id, run_id),) = rows(
        db,
        """SELECT c.model_id, r.checkpoint_id, r.run_id FROM runs r JOIN checkpoints c
           USING (checkpoint_id) WHERE r.method = 'eap' ORDER BY c.step DESC LIMIT 1""",
    )
    top = rows(
        db,
        "SELECT src, dst, score FROM edges WHERE run_id = ? ORDER BY abs(score) DESC LIMIT 12",
        [run_id],
    )
    from workbench.graph import split_port

    nodes = sorted({n for s, d, _ in top for n in (s, split_port(d)[0])})
    first = top[0]
    return Subgraph(
        name=name,
        model_id=model_id,
        checkpoint_id=checkpoint_id,
        source=f"run:{run_id}",
        nodes=[
            SubgraphNode(
                n,
                group="layer 0" if n.startswith("a0.") else None,
                note="the induction head" if n == "a1.h0" else None,
            )
            for n in nodes
        ],
        edges=[
            SubgraphEdge(s, d, v, note="strongest" if (s, d, v) == first else None)
            for s, d, v in top
        ],
    )


def test_a_subgraph_round_trips_through_sql_and_both_exports(db):
    subgraph = _eap_subgraph(db)
    with Store(db) as store:
        sid = store.save_subgraph(subgraph)
    assert sid == subgraph.subgraph_id and sid.startswith("sg-")
    ((name, n_nodes, n_edges, source),) = rows(
        db, "SELECT name, n_nodes, n_edges, source FROM subgraphs WHERE subgraph_id = ?", [sid]
    )
    assert (name, n_nodes, n_edges) == ("induction core", len(subgraph.nodes), 12)
    assert source == subgraph.source
    stored = rows(
        db, "SELECT src, dst, score, note FROM subgraph_edges WHERE subgraph_id = ?", [sid]
    )
    assert sorted(stored, key=str) == sorted(
        [(e.src, e.dst, e.score, e.note) for e in subgraph.edges], key=str
    )
    grouped = rows(
        db,
        "SELECT node_id FROM subgraph_nodes WHERE subgraph_id = ? AND group_label = 'layer 0'",
        [sid],
    )
    assert {n for (n,) in grouped} == {n.node_id for n in subgraph.nodes if n.group}

    out = Path(db).parent
    assert cli(["export", "subgraph", sid, "--format", "json", "--db", str(db)]) == 0
    # (the JSON and GraphML exports are read back below through the library function)
    from workbench.export import export_subgraph

    exported = json.loads(export_subgraph(sid, "json", db=str(db)))
    assert exported["subgraph"]["name"] == "induction core"
    assert {(e["src"], e["dst"]) for e in exported["edges"]} == {
        (e.src, e.dst) for e in subgraph.edges
    }
    notes = {n["id"]: n.get("note") for n in exported["nodes"]}
    if "a1.h0" in notes:
        assert notes["a1.h0"] == "the induction head"
    (out / "s.graphml").write_text(export_subgraph(sid, "graphml", db=str(db)))
    graph = nx.read_graphml(out / "s.graphml")
    pinned = {n.node_id for n in subgraph.nodes}
    assert graph.number_of_edges() == 12 and pinned <= set(graph.nodes)
    for extra in set(graph.nodes) - pinned:  # a head's q/k/v input that an edge ends at
        assert graph.nodes[extra]["port_of"] in pinned and graph.nodes[extra]["port"] in "qkv"
    strongest = subgraph.edges[0]
    assert graph[strongest.src][strongest.dst]["note"] == "strongest"
    assert graph[strongest.src][strongest.dst]["score"] == pytest.approx(strongest.score)


def test_saving_again_under_the_same_name_replaces_it(db):
    subgraph, smaller, another = _eap_subgraph(db), _eap_subgraph(db), _eap_subgraph(db, "another")
    smaller.edges = smaller.edges[:3]
    with Store(db) as store:
        sid = store.save_subgraph(subgraph)
        assert store.save_subgraph(smaller) == sid
        other = store.save_subgraph(another)
    assert other != sid
    counts = dict(rows(db, "SELECT subgraph_id, count(*) FROM subgraph_edges GROUP BY ALL"))
    assert counts == {sid: 3, other: 12}
    assert rows(db, "SELECT count(*) FROM subgraphs") == [(2,)]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda s: setattr(s, "name", "  "), "subgraph name: empty"),
        (lambda s: s.nodes.pop(0), "which is not one of its nodes"),
        (lambda s: s.nodes.append(s.nodes[0]), "is listed twice"),
        (lambda s: setattr(s, "checkpoint_id", "nowhere@0"), "no checkpoint 'nowhere@0'"),
        (lambda s: setattr(s, "model_id", "another-model"), "belongs to"),
    ],
)
def test_a_bad_subgraph_is_one_sentence_and_stores_nothing(db, spoil, message):
    kept = _eap_subgraph(db, name="kept")
    with Store(db) as store:
        store.save_subgraph(kept)
    before = rows(db, "SELECT * FROM subgraph_edges ORDER BY ALL")
    subgraph = _eap_subgraph(db, name="kept")
    spoil(subgraph)
    with Store(db) as store, pytest.raises(BadInput, match=message):
        store.save_subgraph(subgraph)
    assert rows(db, "SELECT * FROM subgraph_edges ORDER BY ALL") == before


def test_export_of_an_unknown_subgraph_exits_2(db, capsys):
    assert cli(["export", "subgraph", "sg-nothing", "--db", str(db)]) == 2
    assert "no subgraph 'sg-nothing'" in capsys.readouterr().err


def test_supernodes_sum_parallel_edges_and_drop_their_inner_ones():
    edges = [
        ("input", "a0.h0<q>", 1.0),
        ("input", "a0.h1<k>", 2.0),
        ("a0.h0", "a0.h1<v>", 5.0),  # inside the group
        ("a0.h0", "a1.h0<k>", 0.5),
        ("a0.h1", "a1.h0<k>", 0.25),
        ("a1.h0", "logits", 3.0),
    ]
    folded = collapse(edges, {"prev": ["a0.h0", "a0.h1"]})
    assert sorted(folded) == sorted(
        [("input", "group:prev", 3.0), ("group:prev", "a1.h0<k>", 0.75), ("a1.h0", "logits", 3.0)]
    )


def test_path_pruning_keeps_exactly_the_edges_between_input_and_logits():
    edges = [
        ("input", "a0.h0<q>", 1.0),
        ("a0.h0", "a1.h0<k>", 1.0),
        ("a1.h0", "logits", 1.0),
        ("a0.h1", "a1.h0<v>", 1.0),  # a0.h1 is not reached from the input
        ("input", "a0.h2<q>", 1.0),  # a0.h2 does not reach the logits
    ]
    assert input_to_logits(edges) == edges[:3]
    dla = [("a0.h0", "logits", 1.0), ("a1.h3", "logits", 2.0), ("a1.h3", "m1", 1.0)]
    assert input_to_logits(dla) == dla[:2]  # no input node: what reaches the logits
    assert without_layers(edges, {0}) == [("a1.h0", "logits", 1.0)]
    assert without_layers(edges, set()) == edges
