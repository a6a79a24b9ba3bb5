"""The app's Features page and feature circuits, driven with AppTest on the session's SAE run."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.sae.conftest import HOOKS, query

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture()
def app(sae_run, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DB", str(sae_run.db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_feature_dashboard_shows_quality_examples_and_logits(app, sae_run):
    at = _ok(app.sidebar.radio(key="view").set_value("Features").run())
    sae = sae_run.saes[HOOKS[1]]
    at = _ok(at.selectbox(key="features_sae").set_value(sae["sae_id"]).run())
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["L0"] == f"{sae['l0']:.2f}"
    assert metrics["explained variance"] == f"{sae['explained_variance']:.3f}"
    top = query(
        sae_run.db,
        "SELECT feature FROM node_scores s JOIN runs r USING (run_id) JOIN nodes n USING (node_id)"
        " WHERE r.method = 'sae_attr' AND n.sae_id = ? AND n.kind = 'feature'"
        " ORDER BY abs(score) DESC LIMIT 1",
        [sae["sae_id"]],
    )[0]["feature"]
    at = _ok(at.number_input(key="features_index").set_value(top).run())
    assert f"Feature {top}" in at.subheader[0].value
    examples = [m.value for m in at.markdown if "<mark>" in m.value]
    assert examples  # top contexts with the activating token highlighted
    stored = query(
        sae_run.db,
        "SELECT tokens, position FROM feature_examples"
        " WHERE sae_id = ? AND feature = ? AND rank = 0",
        [sae["sae_id"], top],
    )[0]
    assert f"<mark><b>{stored['tokens'][stored['position']]}</b></mark>" in examples[0]
    tables = [df.value for df in at.dataframe]
    promoted, suppressed = (t for t in tables if list(t.columns) == ["token", "value"])
    assert len(promoted) == len(suppressed) == 10
    assert promoted["value"].is_monotonic_decreasing
    scores = next(t for t in tables if "task_id" in t.columns)
    assert len(scores) == 1  # its score in the one sae_attr run
    at.text_input(key="features_search").set_value(str(promoted["token"][0]))
    at = _ok(at.run())
    found = next(t for t in (df.value for df in at.dataframe) if "promotes" in t.columns)
    assert top in found["feature"].tolist() or len(found) == 200


def test_feature_circuit_in_the_circuit_view_links_heads_to_features(app, sae_run):
    at = _ok(app.sidebar.radio(key="view").set_value("Circuit").run())
    at = _ok(at.selectbox(key="circuit_method").set_value("sae_attr").run())
    at = _ok(at.slider(key="circuit_k").set_value(40).run())
    edges = at.dataframe[0].value
    assert edges["src"].str.startswith("f:").any() or edges["dst"].str.startswith("f:").any()
    head = query(
        sae_run.db,
        "SELECT src FROM edges WHERE src LIKE 'a%' ORDER BY abs(score) DESC LIMIT 1",
    )[0]["src"]
    nodes = at.selectbox(key="circuit_node").options
    if head not in nodes:  # heads enter the top edges only when their writes are strong
        at = _ok(at.slider(key="circuit_k").set_value(100).run())
        nodes = at.selectbox(key="circuit_node").options
    assert head in nodes
    at = _ok(at.selectbox(key="circuit_node").set_value(head).run())
    link = at.button(key="circuit_head_feature_0")
    at = _ok(link.click().run())
    assert at.session_state["view"] == "Features"
    assert at.subheader[0].value.startswith("Feature ")
