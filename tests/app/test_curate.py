"""Curating in the app (AppTest): pin nodes of an EAP run, group two into a supernode, annotate
a node, save the subgraph (the app's one write), reopen it (from the page and from its link)
with its groups collapsed, compare it with a stored circuit, and find it in SQL."""

import json
import shutil
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture()
def db(heads_db, tmp_path) -> Path:
    copy = tmp_path / "w.duckdb"
    shutil.copy(heads_db, copy)
    return copy


def _open(db: Path, monkeypatch, params: dict | None = None) -> AppTest:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(params or {})
    return _ok(at.run())


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_pin_group_annotate_save_reopen_and_compare(db, monkeypatch):
    at = _open(db, monkeypatch, {"view": "circuit", "method": "eap", "k": "20"})
    options = at.multiselect(key="curate_pins").options
    heads = [n for n in options if n.startswith("a")]
    assert len(heads) >= 3, options
    pins = [n for n in options if n in ("input", "logits")] + heads
    at = _ok(at.multiselect(key="curate_pins").set_value(pins).run())
    at = _ok(at.text_input(key="curate_group_label").set_value("pair").run())
    at = _ok(at.multiselect(key="curate_group_members").set_value(heads[:2]).run())
    at = _ok(at.button(key="curate_group").click().run())
    assert at.session_state["curate_groups"] == {"pair": heads[:2]}
    at = _ok(at.selectbox(key="curate_note_target").set_value(heads[2]).run())
    at = _ok(at.text_input(key="curate_note_text").set_value("worth a look").run())
    at = _ok(at.button(key="curate_note_add").click().run())
    at = _ok(at.text_input(key="curate_name").set_value("my circuit").run())
    at = _ok(at.button(key="curate_save").click().run())
    (saved,) = [s.value for s in at.success]
    sid = saved.split("`")[1]

    con = duckdb.connect(str(db), read_only=True)
    try:
        nodes = dict(
            con.execute(
                "SELECT node_id, coalesce(group_label, '') FROM subgraph_nodes "
                "WHERE subgraph_id = ?",
                [sid],
            ).fetchall()
        )
        notes = con.execute(
            "SELECT node_id, note FROM subgraph_nodes WHERE subgraph_id = ? AND note IS NOT NULL",
            [sid],
        ).fetchall()
        (n_edges,) = con.execute(
            "SELECT count(*) FROM subgraph_edges WHERE subgraph_id = ?", [sid]
        ).fetchone()
    finally:
        con.close()
    assert set(nodes) == set(pins) and {n for n, g in nodes.items() if g == "pair"} == set(
        heads[:2]
    )
    assert notes == [(heads[2], "worth a look")]
    assert n_edges >= 1

    # reopened from the page: groups collapsed into one supernode
    at = _ok(at.radio(key="circuit_source").set_value("Saved subgraph").run())
    assert at.session_state["curate_open"] == sid
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    drawn = set(figure["data"][-1]["customdata"])  # the node trace
    assert "group:pair" in drawn and not set(heads[:2]) & drawn
    assert drawn <= set(pins) | {"group:pair"}
    assert at.get("download_button")  # GraphML and JSON exports
    link = dict(at.query_params)
    assert link["subgraph"] == sid

    # compared with a stored circuit of its checkpoint
    versus = at.selectbox(key="curate_versus").options[1]
    at = _ok(at.selectbox(key="curate_versus").set_value(versus).run())
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["in both"]) + int(metrics["only in the subgraph"]) == n_edges

    # and from its link, in a new session: the same subgraph, its pins and groups loaded
    again = _open(db, monkeypatch, link)
    assert again.session_state["curate_open"] == sid
    assert set(again.session_state["curate_pins"]) == set(pins)
    assert again.session_state["curate_groups"] == {"pair": heads[:2]}


def test_saving_without_a_name_says_so_and_stores_nothing(db, monkeypatch):
    at = _open(db, monkeypatch, {"view": "circuit", "method": "eap", "k": "5"})
    first = at.multiselect(key="curate_pins").options[:2]
    at = _ok(at.multiselect(key="curate_pins").set_value(first).run())
    at = at.button(key="curate_save").click().run()
    assert [e.value for e in at.error] == ["subgraph name: empty; give it a name"]
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM subgraphs").fetchone() == (0,)
    finally:
        con.close()
