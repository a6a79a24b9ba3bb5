"""Deep links: every page writes its state into the URL's query parameters, and a new session
opened on that URL shows the page exactly as it was (Streamlit's AppTest, on databases the
pipelines filled)."""

import math
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

from tests.app.test_access import markdown_links

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


def _open(db: Path, monkeypatch, params: dict | None = None) -> AppTest:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update(params or {})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _notes(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if "link parameter" in c.value]


def _reopened_the_same(at: AppTest, db: Path, monkeypatch) -> AppTest:
    """A fresh session on the URL `at` published: the same page, the same widget values."""
    link = dict(at.query_params)
    again = _open(db, monkeypatch, link)
    assert dict(again.query_params) == link
    assert again.session_state["view"] == at.session_state["view"]
    assert not _notes(again)
    return again


def _one(db: Path, sql: str) -> tuple:
    con = duckdb.connect(str(db), read_only=True)
    try:
        row = con.execute(sql).fetchone()
    finally:
        con.close()
    assert row is not None
    return row


# page -> the widgets changed before the link is taken: (key, kind, value)
CHANGES = {
    "Heads": [("heads_method", "selectbox", "dla"), ("heads_step", "select_slider", 500)],
    "Patching": [("patch_comp", "selectbox", "resid"), ("patch_step", "select_slider", 300)],
    "Circuit": [
        ("circuit_method", "selectbox", "eap"),
        ("circuit_step", "selectbox", 500),
        ("circuit_mode", "radio", "cumulative share"),
        ("circuit_share", "slider", 0.8),
        ("circuit_hide", "multiselect", [0]),
        ("circuit_paths", "checkbox", False),
        ("circuit_node", "selectbox", "a1.h2"),
    ],
    "Timeline": [("timeline_node", "selectbox", "a1.h0"), ("timeline_from", "select_slider", 500)],
    "SQL": [("sql_text", "text_area", "SELECT 42 AS answer"), ("sql_timeout", "number_input", 7)],
    "Overview": [],
    "Prompt": [],
}


@pytest.mark.parametrize("page", sorted(CHANGES))
def test_every_page_reopens_from_its_link(page, heads_db, monkeypatch):
    at = _open(heads_db, monkeypatch)
    at = _ok(at.sidebar.radio(key="view").set_value(page).run())
    for key, kind, value in CHANGES[page]:
        widget = getattr(at, kind)(key=key)
        at = _ok(widget.set_value(value).run())
    assert at.query_params["view"] == page.lower()
    again = _reopened_the_same(at, heads_db, monkeypatch)
    for key, _, value in CHANGES[page]:
        assert again.session_state[key] == value, key
    if page == "SQL":  # the linked query waits for Run
        assert not again.dataframe
        again = _ok(again.button(key="sql_run").click().run())
        assert again.dataframe[0].value["answer"].tolist() == [42]


def test_a_run_id_opens_its_method_task_and_step_with_the_view_state(heads_db, monkeypatch):
    run_id, task = _one(
        heads_db,
        """SELECT r.run_id, r.task_id FROM runs r JOIN checkpoints c USING (checkpoint_id)
           WHERE r.method = 'exact_edge' AND c.step = 500""",
    )
    params = {"view": "circuit", "run": run_id, "k": "20", "node": "a1.h0", "paths": "0"}
    at = _ok(_open(heads_db, monkeypatch, params))
    state = at.session_state
    assert (state["circuit_method"], state["circuit_task"], state["circuit_step"]) == (
        "exact_edge",
        task,
        500,
    )
    assert (state["circuit_k"], state["circuit_node"], state["circuit_paths"]) == (
        20,
        "a1.h0",
        False,
    )
    assert len(at.dataframe[0].value) == 20  # the run's 20 strongest edges
    assert at.query_params["run"] == run_id and at.query_params["k"] == "20"


def test_a_link_the_page_cannot_take_is_named_and_dropped(heads_db, monkeypatch):
    params = {"view": "circuit", "k": "many", "step": "77777", "node": "a9.h9", "hide": "0,x"}
    at = _ok(_open(heads_db, monkeypatch, params))
    notes = " ".join(_notes(at))
    for bad in ("k='many'", "step='77777'", "node='a9.h9'", "hide='0,x'"):
        assert bad in notes
    assert at.query_params["k"] != "many"  # the page's own value replaced it in the URL
    at = _ok(_open(heads_db, monkeypatch, {"view": "nowhere"}))
    assert "view='nowhere'" in " ".join(_notes(at))
    assert at.session_state["view"] == "Overview"
    at = _ok(_open(heads_db, monkeypatch, {"view": "circuit", "run": "no-such-run"}))
    assert any("run='no-such-run'" in c.value for c in at.caption)


def test_a_feature_link_opens_its_sae_and_feature(sae_run, monkeypatch):
    sae_id, d_sae = _one(sae_run.db, "SELECT sae_id, d_sae FROM saes ORDER BY sae_id DESC")
    feature = min(12, d_sae - 1)
    params = {"view": "features", "sae": sae_id, "feature": str(feature)}
    at = _ok(_open(sae_run.db, monkeypatch, params))
    assert at.session_state["features_sae"] == sae_id
    assert at.session_state["features_index"] == feature
    assert at.subheader[0].value.startswith(f"Feature {feature}")
    _reopened_the_same(at, sae_run.db, monkeypatch)


@pytest.mark.parametrize(
    ("param", "mode", "key", "value"),
    [
        ("min", "threshold", "circuit_threshold", "nan"),
        ("min", "threshold", "circuit_threshold", "inf"),
        ("min", "threshold", "circuit_threshold", "-inf"),
        ("share", "cumulative share", "circuit_share", "NaN"),
        ("share", "cumulative share", "circuit_share", "1e999"),
    ],
)
def test_a_number_that_is_not_finite_is_named_and_dropped(
    heads_db, monkeypatch, param, mode, key, value
):
    params = {"view": "circuit", "method": "eap", "prune": mode}
    default = _ok(_open(heads_db, monkeypatch, params)).session_state[key]
    at = _ok(_open(heads_db, monkeypatch, {**params, param: value}))
    assert f"{param}={value!r}" in " ".join(_notes(at))
    assert math.isfinite(at.session_state[key]) and at.session_state[key] == default
    assert at.query_params[param] == str(default)


def test_a_link_value_in_a_note_is_shown_as_text_not_markdown(heads_db, monkeypatch):
    params = {
        "view": "circuit",
        "method": "eap",
        "k": "[click](http://x.example/k)",
        "hide": "![i](http://x.example/i.png)",
        "run": "[r](http://x.example/r)",
    }
    at = _ok(_open(heads_db, monkeypatch, params))
    notes = " ".join(_notes(at))
    for value in params.values():
        if value not in ("circuit", "eap"):
            assert value in notes
    assert not markdown_links(at)
