"""The Streamlit app, driven with Streamlit's AppTest on a database built by the pipeline."""

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from workbench.store import Store

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture()
def app(heads_db, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DB", str(heads_db))
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _show(at: AppTest, view: str) -> AppTest:
    at.sidebar.radio(key="view").set_value(view).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_overview_lists_models_checkpoints_and_runs(app, heads_db):
    at = _show(app, "Overview")
    metrics = {m.label: m.value for m in at.metric}
    with Store(heads_db, read_only=True) as store:
        n_runs = store.query("SELECT count(*) AS n FROM runs")["n"][0].as_py()
    assert metrics["checkpoints"] == "11" and metrics["runs done"] == str(n_runs)
    models, checkpoints, runs = (df.value for df in at.dataframe)
    assert len(models) == 1 and len(checkpoints) == 11 and len(runs) == n_runs


def test_heads_view_shows_induction_head_at_top_of_final_checkpoint(app, heads_db):
    from tests.conftest import query

    at = _show(app, "Heads")
    at.selectbox(key="heads_method").set_value("act_patch_denoise").run()
    assert at.select_slider(key="heads_step").value == 1000
    top = at.dataframe[0].value.iloc[0]
    assert int(top["layer"]) == 1  # an induction head leads the final checkpoint
    (agreement,) = [d.value for d in at.dataframe if "spearman_abs" in d.value.columns]
    run_id = at.session_state["_links_shown"]["run"]
    others = query(
        heads_db,
        """SELECT DISTINCT o.run_id FROM runs r JOIN runs o USING (checkpoint_id, task_id)
           JOIN node_scores s ON s.run_id = r.run_id JOIN node_scores t ON t.run_id = o.run_id
             AND t.node_id = s.node_id AND t.position IS NOT DISTINCT FROM s.position
           WHERE r.run_id = ? AND o.run_id <> r.run_id AND o.status = 'done'""",
        [run_id],
    )
    assert set(agreement["run_id"]) == {o["run_id"] for o in others}
    assert agreement["spearman_abs"].between(-1, 1).all()
    at.select_slider(key="heads_step").set_value(0).run()
    assert not at.exception
    assert at.get("plotly_chart")  # heatmap and history are drawn


def _edge_table(at: AppTest):
    """The Circuit page's table of the edges drawn."""
    return next(d.value for d in at.dataframe if "src" in d.value.columns)


def test_circuit_view_prunes_in_sql(app):
    at = _show(app, "Circuit")
    at.selectbox(key="circuit_method").set_value("attr_patch").run()
    at.slider(key="circuit_k").set_value(5).run()
    edges = _edge_table(at)
    assert len(edges) == 5
    assert edges["score"].abs().is_monotonic_decreasing
    at.radio(key="circuit_mode").set_value("threshold").run()
    threshold = at.slider(key="circuit_threshold").value
    assert (_edge_table(at)["score"].abs() >= threshold).all()


def test_sql_view_runs_examples_and_reports_errors(app):
    at = _show(app, "SQL")
    assert len(at.dataframe[0].value) == 5  # the default example: top 5 heads
    at.selectbox(key="sql_example").set_value("Runs by method").run()
    assert set(at.dataframe[0].value["method"]) >= {
        "dla",
        "act_patch_denoise",
        "act_patch_noise",
        "attr_patch",
        "head_importance",
    }
    key = "sql_text"
    at.text_area(key=key).set_value("DROP TABLE runs").run()
    assert at.error and "SQL error" in at.error[0].value


def test_app_without_database_says_how_to_fill_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_DB", str(tmp_path / "none.duckdb"))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "workbench demo" in at.info[0].value


def test_patching_view_shows_residual_stream_by_position(app):
    at = _show(app, "Patching")
    at.selectbox(key="patch_comp").set_value("resid").run()
    at.selectbox(key="patch_method").set_value("act_patch_denoise").run()
    assert not at.exception
    top = at.dataframe[0].value
    assert len(top) == 10 and top["position"].min() >= 0  # resid is patched position by position
    at.selectbox(key="patch_comp").set_value("head_k").run()
    assert not at.exception
    assert set(at.dataframe[0].value["position"]) == {-1}  # all positions at once


def test_circuit_view_shows_stored_circuits_curves_and_comparisons(app):
    at = _show(app, "Circuit")
    at.selectbox(key="circuit_method").set_value("eap").run()
    assert not at.exception
    assert at.get("plotly_chart") and len(at.get("plotly_chart")) >= 2  # graph and curve
    at.radio(key="circuit_source").set_value("Stored circuit").run()
    assert not at.exception and not at.info
    at.radio(key="circuit_source").set_value("Compare circuits").run()
    assert not at.exception
    labels = at.selectbox(key="circuit_left").options
    assert len(labels) == 4  # eap and exact_edge at two checkpoints
    at.selectbox(key="circuit_right").set_value(labels[0]).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["only left"] == "0" and metrics["only right"] == "0"  # a circuit vs itself
    assert int(metrics["shared edges"]) > 0
    node_box = at.selectbox(key="circuit_node")
    node_box.set_value("a1.h0").run()
    scores = at.dataframe[-2].value
    assert set(scores["node_id"]) >= {"a1.h0", "a1.h0<k>"}
    assert {"act_patch_denoise", "head_importance"} <= set(scores["method"])


def test_heads_catalogue_names_the_induction_head_and_its_composition(app, heads_db):
    """The Catalogue tab of the final checkpoint ranks a layer-1 head first by induction score,
    the head the store's own induction ranking names, and the K-composition into it from a
    layer-0 head leads; before training (step 0) no head scores as an induction head."""
    from tests.conftest import query

    at = _show(app, "Heads")
    assert at.select_slider(key="catalogue_step").value == 1000
    at.selectbox(key="catalogue_score").set_value("induction").run()
    assert not at.exception
    (top,) = [d.value for d in at.dataframe if "induction" in d.value.columns]
    (stored,) = query(
        heads_db,
        """SELECT arg_max(h.node_id, h.value) AS head FROM head_catalogue h
           JOIN checkpoints c USING (checkpoint_id)
           WHERE h.score = 'induction' AND c.step = 1000""",
    )
    assert top.iloc[0]["node_id"] == stored["head"] and stored["head"].startswith("a1.")
    assert top.iloc[0]["induction"] > 0.3  # measured 0.44 (docs/methods.md)
    at.selectbox(key="catalogue_mode").set_value("K").run()
    (pairs,) = [d.value for d in at.dataframe if "src" in d.value.columns]
    into = pairs[pairs["dst"] == stored["head"]]
    assert into.iloc[0]["src"].startswith("a0.")
    # what its parameters map tokens to: the induction head's OV circuit copies, each token it
    # amplifies most mapped to itself first
    at.selectbox(key="catalogue_head").set_value(stored["head"]).run()
    assert not at.exception
    ov, qk = [d.value for d in at.dataframe if "maps to" in d.value.columns]  # OV, then QK
    assert len(qk) == 5
    assert len(ov) == 5
    for row in ov.itertuples():
        assert str(row[3]).split(" · ")[0] == row.token
    at.selectbox(key="catalogue_score").set_value("retrieval").run()
    assert not at.exception and "copy-pastes" in " ".join(c.value for c in at.caption)
    at.select_slider(key="catalogue_step").set_value(0).run()
    assert not at.exception
    (top,) = [d.value for d in at.dataframe if "induction" in d.value.columns]
    assert top["induction"].max() < 0.1  # measured 0.03 before training


def _spot_metrics(db: Path, run_id: str) -> dict[str, float]:
    from tests.conftest import query

    rows = query(db, "SELECT metric, value FROM run_metrics WHERE run_id = ?", [run_id])
    return {r["metric"]: r["value"] for r in rows}


def test_heads_view_shows_how_far_to_trust_a_run(app, heads_db):
    """attr_patch at the last checkpoint: its spot-check badge (agreeing or contradicting as
    the stored metrics say), the checked heads against their exact patches, and the leading
    heads' error bars (their stored standard errors)."""
    from tests.conftest import query
    from workbench.spotcheck import contradicted

    at = _show(app, "Heads")
    at.selectbox(key="heads_method").set_value("attr_patch").run()
    run_id = at.session_state["_links_shown"]["run"]
    metrics = _spot_metrics(heads_db, run_id)
    expected = "contradicted by its spot check" if contradicted(metrics) else "spot check agrees"
    badges = [m.value for m in at.markdown if "badge[" in m.value]
    assert len(badges) == 1 and expected in badges[0]
    (spot,) = [d.value for d in at.dataframe if "exact" in d.value.columns]
    stored = query(heads_db, "SELECT node_id, exact FROM spot_checks WHERE run_id = ?", [run_id])
    assert len(spot) == len(stored) == 8
    assert dict(zip(spot["item"], spot["exact"].round(4), strict=True)) == {
        r["node_id"]: round(r["exact"], 4) for r in stored
    }
    top = next(d.value for d in at.dataframe if "stderr" in d.value.columns)
    sql = "SELECT node_id, stderr FROM node_scores WHERE run_id = ?"
    errors = {r["node_id"]: r["stderr"] for r in query(heads_db, sql, [run_id])}
    assert all(top["stderr"] == [errors[h] for h in top["head_id"]])
    (bars,) = [c for c in at.get("plotly_chart") if '"error_y"' in c.proto.spec]
    assert "heads_error_bars" in bars.proto.id


def test_circuit_view_shows_standard_errors_and_the_circuits_spread(app, heads_db):
    at = _show(app, "Circuit")
    at.selectbox(key="circuit_method").set_value("eap").run()
    run_id = at.session_state["_links_shown"]["run"]
    edges = _edge_table(at)
    assert edges["stderr"].notna().all() and (edges["stderr"] >= 0).all()
    metrics = _spot_metrics(heads_db, run_id)
    captions = " ".join(c.value for c in at.caption)
    assert f"[{metrics['faithfulness_lo']:.3f}, {metrics['faithfulness_hi']:.3f}]" in captions
    assert f"{int(metrics['spot_n'])} scores patched for real" in captions


def test_circuit_view_across_seeds(heads_db, seeds_db, monkeypatch):
    """The Circuit page's "Across seeds": on a database without seed groups it says how to make
    one; on `seeds_db` (the induction model and its renumbered copy) it draws the union of the
    two circuits, the pair's shares as the view stores them, and the recovery matrix."""
    from tests.conftest import query
    from workbench.app import data

    for db in (heads_db, seeds_db):
        monkeypatch.setenv("WORKBENCH_DB", str(db))
        data.query.clear()
        at = AppTest.from_file(APP, default_timeout=120).run()
        _show(at, "Circuit")
        at.radio(key="circuit_source").set_value("Across seeds").run()
        assert not at.exception
        if db == heads_db:
            assert "workbench run seeds" in at.info[0].value
    (row,) = query(seeds_db, "SELECT * FROM seed_stability")
    members = query(seeds_db, "SELECT model_id FROM seed_groups")
    assert at.selectbox(key="circuit_model").value in {m["model_id"] for m in members}
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["mean share: layer profile"] == "1.00"
    assert metrics["mean share: edges (Jaccard)"] == f"{row['edge_jaccard']:.2f}"
    pairs = next(d.value for d in at.dataframe if "model_a" in d.value.columns)
    assert pairs[["edges_a", "edges_b", "edges_shared"]].iloc[0].tolist() == [
        row["edges_a"], row["edges_b"], row["edges_shared"]
    ]  # fmt: skip
    drawn = _edge_table(at)
    assert len(drawn) == row["edges_a"] + row["edges_b"] - row["edges_shared"]
    assert set(drawn["seeds"]) == ({1, 2} if row["edges_shared"] else {1})
    assert len(at.get("plotly_chart")) >= 2  # the graph and the recovery matrix
