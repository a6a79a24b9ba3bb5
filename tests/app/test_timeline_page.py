"""The Timeline page and the Overview's run queue, with Streamlit's AppTest."""

from datetime import datetime

import duckdb
import pytest

from tests.app.test_app import _show, app  # noqa: F401  (the fixture)


def test_timeline_shows_heads_across_training_and_a_circuit_diff(app, heads_db):  # noqa: F811
    at = _show(app, "Timeline")
    assert at.selectbox(key="timeline_scores").options  # heads scored at several checkpoints
    at.selectbox(key="timeline_scores").set_value(
        next(o for o in at.selectbox(key="timeline_scores").options if "act_patch_denoise" in o)
    ).run()
    assert not at.exception
    formed = at.dataframe[0].value  # the formation steps
    assert {"node_id", "formation_step", "peak"} <= set(formed.columns) and len(formed) > 0
    # the circuit diff between the two checkpoints with stored circuits (edges at 500 and 1000)
    metrics = {m.label: m.value for m in at.metric}
    con = duckdb.connect(str(heads_db), read_only=True)
    ids = con.execute(
        """SELECT ci.circuit_id FROM circuits ci JOIN runs r USING (run_id)
           JOIN checkpoints c USING (checkpoint_id)
           WHERE r.method = ? ORDER BY c.step""",
        [at.selectbox(key="timeline_circuits").value.split(" · ")[0]],
    ).fetchall()
    diff = con.execute(
        "SELECT status, count(*) FROM circuit_diff(?, ?) GROUP BY status", [ids[-2][0], ids[-1][0]]
    ).fetchall()
    con.close()
    for status, n in diff:
        assert metrics[status] == str(n)
    # each circuit's faithfulness with its bootstrap interval, as stored
    for circuit_id, step in ((ids[-2][0], 500), (ids[-1][0], 1000)):
        con = duckdb.connect(str(heads_db), read_only=True)
        value, lo, hi = con.execute(
            """SELECT c.faithfulness, lo.value, hi.value FROM circuits c
               JOIN run_metrics lo ON lo.run_id = c.run_id AND lo.metric = 'faithfulness_lo'
               JOIN run_metrics hi ON hi.run_id = c.run_id AND hi.metric = 'faithfulness_hi'
               WHERE c.circuit_id = ?""",
            [circuit_id],
        ).fetchone()
        con.close()
        assert metrics[f"faithfulness at {step}"] == f"{value:.2f} [{lo:.2f}, {hi:.2f}]"
    # the head's curves carry error bars where the method has standard errors
    at.selectbox(key="timeline_node").set_value("a1.h0").run()
    assert "standard error over prompts" in " ".join(c.value for c in at.caption)
    curves = next(c for c in at.get("plotly_chart") if '"error_y"' in c.proto.spec)
    assert curves is not None


def test_timeline_draws_the_cross_recovery_of_the_stored_circuits(app, heads_db):  # noqa: F811
    """The eap circuits of steps 500 and 1000, each evaluated at both: the matrix drawn is the
    stored one, and the caption reads off the step from which the last circuit holds."""
    at = _show(app, "Timeline")
    assert at.selectbox(key="timeline_recovery").value == "eap · " + _task_id(heads_db)
    con = duckdb.connect(str(heads_db), read_only=True)
    stored = con.execute(
        """SELECT kb.step, x.faithfulness FROM cross_recovery x JOIN circuits c USING (circuit_id)
           JOIN runs r USING (run_id) JOIN checkpoints ka ON ka.checkpoint_id = r.checkpoint_id
           JOIN checkpoints kb ON kb.checkpoint_id = x.checkpoint_id
           WHERE ka.step = 1000 ORDER BY kb.step"""
    ).fetchall()
    con.close()
    assert [step for step, _ in stored] == [500, 1000]
    since = next(step for step, value in stored if all(v >= 0.8 for s, v in stored if s >= step))
    caption = next(c.value for c in at.caption if "circuit of the last checkpoint" in c.value)
    assert f"from step {since} on" in caption
    figure = next(
        c for c in at.get("plotly_chart") if '"evaluated at step"' in c.proto.spec
    )  # the matrix's heatmap
    assert figure is not None


def _task_id(db) -> str:
    con = duckdb.connect(str(db), read_only=True)
    (task,) = con.execute("SELECT DISTINCT task_id FROM cross_recovery").fetchone()
    con.close()
    return task


def test_overview_shows_the_run_queue(app, heads_db, tmp_path):  # noqa: F811
    import shutil

    db = tmp_path / "w.duckdb"
    shutil.copy(heads_db, db)
    con = duckdb.connect(str(db))
    now = datetime.now()
    con.execute(
        "INSERT INTO run_queue VALUES ('j1', 'heads', 'dla', 'm@0', 'induction', 'running', "
        "'r1', 1, 'h', ?, ?, ?), ('j2', 'edges', 'eap', 'm@0', 'induction', 'queued', NULL, 1, "
        "'h', ?, NULL, NULL)",
        [now, now, now, now],
    )
    con.close()
    pytest.MonkeyPatch().setenv("WORKBENCH_DB", str(db))
    from streamlit.testing.v1 import AppTest

    from tests.app.test_app import APP
    from workbench.app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception
    assert any("In progress: 1 running, 1 queued" in h.value for h in at.subheader)
    queue = at.dataframe[0].value  # the queue comes first
    assert queue["status"].tolist() == ["running", "queued"]
