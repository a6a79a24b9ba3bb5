"""The Graph page (Streamlit's AppTest) on a stored attribution graph of the IOI zoo model: what
it draws against the stored rows and the full adjacency read independently with DuckDB, pruning
again, a node's inputs and outputs, pinning, grouping and saving a subgraph and reopening it,
an intervention run from the page against `workbench intervene`, and its deep link."""

import base64
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from workbench.cli import cli

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture()
def graph_db(graph_store, tmp_path) -> Path:
    """A copy of the graph store (the database and its graphs/ folder), for a test to write."""
    db = tmp_path / "w.duckdb"
    shutil.copy(graph_store.db, db)
    shutil.copytree(graph_store.db.parent / "graphs", tmp_path / "graphs")
    return db


def _open(db: Path, monkeypatch, params: dict | None = None) -> AppTest:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update(params or {"view": "graph"})
    at.run()
    return _ok(at)


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _rows(db: Path, sql: str, params: list | None = None) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def _figure(at: AppTest) -> dict:
    (chart,) = [c for c in at.get("plotly_chart") if "graph_view" in c.proto.id]
    return json.loads(chart.proto.spec)


def _drawn(at: AppTest) -> tuple[set[str], dict[str, int]]:
    """The node ids of the node trace, and the number of edge segments of each colour."""
    figure = _figure(at)
    nodes = set(figure["data"][-1]["customdata"])
    segments: dict[str, int] = {}
    for trace in figure["data"][:-1]:
        colour = trace["line"]["color"]
        xs = trace["x"]
        if isinstance(xs, dict):  # (a typed array, sent as base64)
            xs = np.frombuffer(base64.b64decode(xs["bdata"]), dtype=xs["dtype"])
        segments[colour] = segments.get(colour, 0) + len(xs) // 3  # x0, x1, a gap
    return nodes, segments


def _node_ids(at: AppTest) -> list[str]:
    """The Node box's choices (shown as `id  ·  label`)."""
    return [o.split("  ·  ")[0] for o in at.selectbox(key="graph_node").options]


def test_the_page_draws_the_stored_graph(graph_db, graph_store, monkeypatch):
    at = _open(graph_db, monkeypatch)
    gid = graph_store.graph_id
    assert at.session_state["graph_pick"] == gid
    (replacement, completeness), *_ = _rows(
        graph_db, "SELECT replacement_score, completeness_score FROM graphs WHERE graph_id = ?",
        [gid],
    )  # fmt: skip
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["replacement score"] == f"{replacement:.3f}"
    assert metrics["completeness score"] == f"{completeness:.3f}"
    kept = {r[0] for r in _rows(graph_db, "SELECT node_id FROM graph_nodes WHERE graph_id = ? "
                                "AND kept", [gid])}  # fmt: skip
    signs = dict(_rows(graph_db, "SELECT weight >= 0, count(*) FROM graph_edges WHERE "
                       "graph_id = ? GROUP BY ALL", [gid]))  # fmt: skip
    nodes, segments = _drawn(at)
    assert nodes == kept
    assert segments.get("#1f77b4", 0) == signs.get(True, 0)  # blue: positive
    assert segments.get("#d62728", 0) == signs.get(False, 0)  # red: negative
    assert any("as stored" in c.value for c in at.caption)


def test_a_lower_node_threshold_prunes_the_full_adjacency_again(graph_db, graph_store,
                                                                 monkeypatch):  # fmt: skip
    """Kept at node threshold t: features and errors whose cumulative influence share is at
    most the first share that reaches t (stored per node); tokens and logits always."""
    at = _open(graph_db, monkeypatch)
    at = _ok(at.slider(key="graph_nthr").set_value(0.5).run())
    assert any("pruned again from the full adjacency" in c.value for c in at.caption)
    nodes, _ = _drawn(at)
    rows = _rows(graph_db, "SELECT node_id, kind, cumulative_influence FROM graph_nodes "
                 "WHERE graph_id = ?", [graph_store.graph_id])  # fmt: skip
    cutoff = min(c for _, k, c in rows if c is not None and c >= 0.5)
    allowed = {n for n, k, c in rows if k in ("token", "logit") or c <= cutoff}
    assert nodes <= allowed
    assert {n for n, k, _ in rows if k in ("token", "logit")} <= nodes
    assert len(nodes - {n for n, k, _ in rows if k in ("token", "logit")}) > 0
    assert at.query_params["nthr"] == "0.5"


def test_a_node_shows_its_strongest_inputs_and_outputs(graph_db, graph_store, monkeypatch):
    at = _open(graph_db, monkeypatch)
    node = at.session_state["graph_node"]
    gid = graph_store.graph_id
    (index, kind), *_ = _rows(graph_db, "SELECT node, kind FROM graph_nodes WHERE graph_id = ? "
                              "AND node_id = ?", [gid, node])  # fmt: skip
    assert kind == "feature"  # the default: the most influential feature
    inputs, outputs = (d.value for d in at.dataframe if {"node", "weight", "shown"} <= set(d.value))
    parquet = str(graph_db.parent / "graphs" / f"{gid}.parquet")
    ids = dict(_rows(graph_db, "SELECT node, node_id FROM graph_nodes WHERE graph_id = ?", [gid]))
    for table, mine, theirs in ((inputs, "dst", "src"), (outputs, "src", "dst")):
        expected = _rows(
            graph_db,
            f"SELECT {theirs}, weight FROM read_parquet(?) WHERE {mine} = ? "
            f"ORDER BY abs(weight) DESC, {theirs} LIMIT 10",
            [parquet, index],
        )
        assert table["node"].tolist() == [ids[n] for n, _ in expected]
        assert table["weight"].tolist() == pytest.approx([w for _, w in expected], abs=0)
    assert at.button(key="graph_open_feature")  # the feature's dashboard is a click away


def test_pin_group_save_and_reopen_a_subgraph(graph_db, graph_store, monkeypatch):
    at = _open(graph_db, monkeypatch)
    first = at.session_state["graph_node"]
    at = _ok(at.button(key="graph_pin").click().run())
    features = [n for n in _node_ids(at) if n.count("_") == 2 and not n.startswith("E_")
                and n.split("_")[1] != "-1"]  # fmt: skip
    second = next(n for n in features if n != first)
    at = _ok(at.selectbox(key="graph_node").set_value(second).run())
    at = _ok(at.button(key="graph_pin").click().run())
    assert at.multiselect(key="curate_pins").value == [first, second]
    at.text_input(key="curate_group_label").set_value("pair")
    at.multiselect(key="curate_group_members").set_value([first, second])
    at = _ok(at.button(key="curate_group").click().run())
    nodes, _ = _drawn(at)
    assert "group:pair" in nodes and not {first, second} & nodes  # collapsed into a supernode
    at.text_input(key="curate_name").set_value("two features")
    at = _ok(at.button(key="curate_save").click().run())
    (sid, source), *_ = _rows(graph_db, "SELECT subgraph_id, source FROM subgraphs")
    assert source == f"graph:{graph_store.graph_id}"
    groups = dict(_rows(graph_db, "SELECT node_id, group_label FROM subgraph_nodes"))
    assert groups == {first: "pair", second: "pair"}

    again = _open(graph_db, monkeypatch)
    assert again.multiselect(key="curate_pins").value == []
    again = _ok(again.button(key="graph_open_saved").click().run())
    assert sorted(again.multiselect(key="curate_pins").value) == sorted([first, second])
    assert "group:pair" in _drawn(again)[0]

    # and from the Circuit page's saved subgraphs, it opens here
    circuit = _open(graph_db, monkeypatch, {"view": "circuit", "subgraph": sid})
    circuit = _ok(circuit.button(key="curate_to_graph").click().run())
    assert circuit.session_state["view"] == "Graph"
    assert sorted(circuit.multiselect(key="curate_pins").value) == sorted([first, second])


def test_an_intervention_from_the_page_is_the_cli_intervention(graph_db, graph_store,
                                                               monkeypatch, capsys):  # fmt: skip
    at = _open(graph_db, monkeypatch)
    node = at.session_state["graph_node"]
    layer, feature, position = (int(x) for x in node.split("_"))
    at.multiselect(key="graph_iv_features").set_value([node])
    at = _ok(at.button(key="graph_iv_run").click().run())
    (table,) = [d.value for d in at.dataframe if "after" in d.value]
    capsys.readouterr()
    argv = ["intervene", "--graph", graph_store.graph_id, "--db", str(graph_db),
            "--set", f"{layer}:{position}:{feature}=0.0", "--format", "json"]  # fmt: skip
    assert cli(argv) == 0
    expected = json.loads(capsys.readouterr().out)
    assert table["token"].tolist() == [r["token"] for r in expected]
    assert table["after"].tolist() == pytest.approx([r["after"] for r in expected], abs=1e-12)
    assert table["before"].tolist() == pytest.approx([r["before"] for r in expected], abs=1e-12)


def test_read_only_starts_no_intervention(graph_db, monkeypatch):
    monkeypatch.setenv("WORKBENCH_APP_READ_ONLY", "1")
    at = _open(graph_db, monkeypatch)
    keys = {b.key for b in at.button}
    assert "graph_iv_run" not in keys and "curate_save" not in keys


def test_the_link_reopens_the_same_view(graph_db, graph_store, monkeypatch):
    at = _open(graph_db, monkeypatch)
    at = _ok(at.selectbox(key="graph_node").set_value(_node_ids(at)[-1]).run())
    at = _ok(at.slider(key="graph_ethr").set_value(0.9).run())
    link = dict(at.query_params)
    assert link["graph"] == graph_store.graph_id and link["ethr"] == "0.9"
    again = _open(graph_db, monkeypatch, link)
    assert dict(again.query_params) == link
    assert again.session_state["graph_node"] == at.session_state["graph_node"]
    assert _drawn(again) == _drawn(at)
