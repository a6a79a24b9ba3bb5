"""Exports of text XML cannot carry: a subgraph's name, group label and notes are stored exactly
as typed, control characters included; the JSON export keeps them exactly; the GraphML export
always parses (networkx and plain XML parsers) and reads back every character but the C0
controls XML 1.0 forbids, which it writes as their Control Pictures symbols (U+2400 + code)."""

import io
import json
import shutil
import xml.dom.minidom
import xml.etree.ElementTree as ET
from pathlib import Path

import duckdb
import networkx as nx
import pytest

from tests.db import rows
from workbench.cli import cli
from workbench.export import export_circuit, export_subgraph
from workbench.store import Store
from workbench.subgraphs import Subgraph, SubgraphEdge, SubgraphNode

CONTROLS = "".join(chr(c) for c in range(0x20)) + "\x7f"
# what else a note may hold: markup, quotes, line and paragraph separators, NEL, CRLF, astral
OTHERS = ' <a href="x">&amp;</a> \' \u2028\u2029\x85 \r\n é ∑ 😀 \ufeff end\r'
TEXT = "note " + CONTROLS + OTHERS


def _xml_form(text: str) -> str:
    """What the GraphML export reads back as: a forbidden control as its picture."""
    allowed = {"\t", "\n", "\r"}
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 0x20 and c not in allowed else c for c in text)


@pytest.fixture()
def db(heads_db, tmp_path) -> Path:
    copy = tmp_path / "w.duckdb"
    shutil.copy(heads_db, copy)
    return copy


def _subgraph(db: Path) -> Subgraph:
    ((model_id, checkpoint_id, run_id),) = rows(
        db,
        """SELECT c.model_id, r.checkpoint_id, r.run_id FROM runs r JOIN checkpoints c
           USING (checkpoint_id) WHERE r.method = 'eap' ORDER BY c.step DESC LIMIT 1""",
    )
    ((src, dst, score),) = rows(
        db,
        """SELECT src, dst, score FROM edges WHERE run_id = ? AND dst NOT LIKE '%<%'
           ORDER BY abs(score) DESC LIMIT 1""",
        [run_id],
    )
    return Subgraph(
        name="core " + CONTROLS,
        model_id=model_id,
        checkpoint_id=checkpoint_id,
        source=f"run:{run_id}",
        nodes=[SubgraphNode(src, group="grp " + CONTROLS, note=TEXT), SubgraphNode(dst)],
        edges=[SubgraphEdge(src, dst, score, note=TEXT)],
        description=TEXT,
    )


def _parse_everywhere(text: str) -> nx.DiGraph:
    ET.fromstring(text)
    xml.dom.minidom.parseString(text)
    return nx.read_graphml(io.BytesIO(text.encode()))


def test_control_characters_are_kept_in_the_store_and_json_and_graphml_stays_valid(db, capsys):
    subgraph = _subgraph(db)
    with Store(db) as store:
        sid = store.save_subgraph(subgraph)
    ((name, description),) = rows(
        db, "SELECT name, description FROM subgraphs WHERE subgraph_id = ?", [sid]
    )
    assert (name, description) == (subgraph.name, TEXT)
    node = subgraph.nodes[0]
    assert rows(
        db,
        "SELECT group_label, note FROM subgraph_nodes WHERE subgraph_id = ? AND node_id = ?",
        [sid, node.node_id],
    ) == [("grp " + CONTROLS, TEXT)]

    exported = json.loads(export_subgraph(sid, "json", db=str(db)))
    assert exported["subgraph"]["name"] == subgraph.name
    notes = {n["id"]: n for n in exported["nodes"]}
    assert notes[node.node_id]["note"] == TEXT
    assert notes[node.node_id]["group_label"] == "grp " + CONTROLS
    assert exported["edges"][0]["note"] == TEXT

    capsys.readouterr()
    assert cli(["export", "subgraph", sid, "--format", "graphml", "--db", str(db)]) == 0
    graph = _parse_everywhere(capsys.readouterr().out)
    assert graph.graph["name"] == _xml_form(subgraph.name)
    assert graph.graph["description"] == _xml_form(TEXT)
    assert graph.nodes[node.node_id]["note"] == _xml_form(TEXT)
    assert graph.nodes[node.node_id]["group_label"] == _xml_form("grp " + CONTROLS)
    edge = subgraph.edges[0]
    assert graph[edge.src][edge.dst]["note"] == _xml_form(TEXT)
    assert graph[edge.src][edge.dst]["score"] == pytest.approx(edge.score)
    assert _xml_form(TEXT).endswith(OTHERS)  # every other character read back as it was


def test_a_circuit_named_with_control_characters_exports_valid_graphml(db):
    """Circuit names come from the method that found the circuit (a plugin's method names
    its own): stored as given, exported valid."""
    ((circuit_id,),) = rows(db, "SELECT circuit_id FROM circuits ORDER BY circuit_id LIMIT 1")
    con = duckdb.connect(str(db))
    con.execute("UPDATE circuits SET name = ? WHERE circuit_id = ?", [TEXT, circuit_id])
    con.close()
    graph = _parse_everywhere(export_circuit(circuit_id, "graphml", db=str(db)))
    assert graph.graph["name"] == _xml_form(TEXT)
    assert graph.number_of_edges() > 0
    assert json.loads(export_circuit(circuit_id, "json", db=str(db)))["circuit"]["name"] == TEXT
