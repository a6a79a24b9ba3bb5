"""`workbench run prompt` on the zoo's induction model: stored views checked against the
model and against the papers' definitions computed here (attention rollout by its formula,
attention flow at the first layer, the logit lens's last layer against the model's output,
direct logit attribution summing to the logit), and the app's Prompt page."""

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.db import rows
from workbench.cli import cli
from workbench.core import Hook

APP = str(Path(__file__).resolve().parents[1] / "app" / "main.py")


@pytest.fixture(scope="module")
def stored(induction_dir, tmp_path_factory) -> tuple[Path, str]:
    db = tmp_path_factory.mktemp("prompt") / "w.duckdb"
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "3"]
    assert cli([*argv, "--db", str(db)]) == 0
    ((pid,),) = rows(db, "SELECT prompt_id FROM prompt_views")
    return db, pid


def _attention(db: Path, pid: str) -> np.ndarray:
    (n_layers, n_heads, n) = rows(
        db,
        "SELECT max(layer) + 1, max(head) + 1, max(query_pos) + 1 FROM prompt_attention "
        "WHERE prompt_id = ?",
        [pid],
    )[0]
    a = np.zeros((n_layers, n_heads, n, n))
    for layer, head, q, k, w in rows(
        db,
        "SELECT layer, head, query_pos, key_pos, weight FROM prompt_attention WHERE prompt_id = ?",
        [pid],
    ):
        a[layer, head, q, k] = w
    return a


def test_attention_rollout_and_flow_follow_abnar_and_zuidema(stored, induction_final):
    db, pid = stored
    attention = _attention(db, pid)
    n_layers, _, n, _ = attention.shape
    # the patterns are the model's own
    (ids,) = rows(db, "SELECT token_ids FROM prompt_views WHERE prompt_id = ?", [pid])[0]
    _, cache = induction_final.model.run_with_cache(torch.tensor([ids]))
    for layer in range(n_layers):
        np.testing.assert_allclose(
            attention[layer], cache[Hook.pattern(layer)][0].numpy(), atol=1e-6
        )
    # rollout: A_hat = 0.5 * (head mean) + 0.5 * I, rows renormalised; R_l = A_hat_l ... A_hat_1
    stored_rollout = np.zeros((n_layers, n))
    stored_flow = np.zeros((n_layers, n))
    for method, layer, pos, score in rows(
        db, "SELECT method, layer, position, score FROM prompt_flow WHERE prompt_id = ?", [pid]
    ):
        (stored_rollout if method == "rollout" else stored_flow)[layer, pos] = score
    rollout = np.eye(n)
    for layer in range(n_layers):
        a_hat = 0.5 * attention[layer].mean(0) + 0.5 * np.eye(n)
        a_hat = a_hat / a_hat.sum(-1, keepdims=True)
        rollout = a_hat @ rollout
        np.testing.assert_allclose(stored_rollout[layer], rollout[-1], atol=1e-5)
        if layer == 0:  # one layer: the only path from input j to the last position is one edge
            np.testing.assert_allclose(stored_flow[0], a_hat[-1], atol=1e-5)
    assert np.isclose(stored_rollout.sum(-1), 1, atol=1e-5).all()
    assert (stored_flow <= 1 + 1e-6).all() and (stored_flow >= 0).all()


def test_the_logit_lens_ends_at_the_models_prediction(stored, induction_final):
    db, pid = stored
    ((ids, predicted_id),) = rows(
        db, "SELECT token_ids, predicted_id FROM prompt_views WHERE prompt_id = ?", [pid]
    )
    logits = induction_final.model(torch.tensor([ids]))[0, -1].detach()
    assert predicted_id == int(logits.argmax())
    n_layers = induction_final.model.cfg.n_layers
    ((prob,),) = rows(
        db,
        "SELECT prob FROM prompt_logit_lens WHERE prompt_id = ? AND layer = ? AND position = ? "
        "AND rank IS NULL",
        [pid, n_layers - 1, len(ids) - 1],
    )
    assert prob == pytest.approx(float(logits.softmax(-1)[predicted_id]), abs=1e-5)
    ((top,),) = rows(
        db,
        "SELECT token_id FROM prompt_logit_lens WHERE prompt_id = ? AND layer = ? "
        "AND position = ? AND rank = 0",
        [pid, n_layers - 1, len(ids) - 1],
    )
    assert top == predicted_id


def test_direct_logit_attribution_sums_to_the_logit(stored, induction_final):
    """The heads' (and MLPs') stored scores, with the embeddings' and output biases' direct
    terms computed here, add up to logit(predicted) - mean logit, bias of the unembedding
    aside: the final normalisation is linear once its scale is fixed at this run."""
    db, pid = stored
    model = induction_final.model
    ((ids, predicted_id),) = rows(
        db, "SELECT token_ids, predicted_id FROM prompt_views WHERE prompt_id = ?", [pid]
    )
    scores = dict(rows(db, "SELECT node_id, score FROM prompt_dla WHERE prompt_id = ?", [pid]))
    logits, cache = model.run_with_cache(torch.tensor([ids]))
    direction = (model.W_U[:, predicted_id] - model.W_U.mean(1)).detach()
    scale = cache[Hook.FINAL_SCALE][0, -1] if hasattr(model, "ln_final") else 1.0

    def direct(out: torch.Tensor) -> float:
        if model.cfg.normalization_type in ("LN", "LNPre"):
            out = out - out.mean(-1, keepdim=True)
        return float((out / scale) @ direction)

    rest = direct(cache[Hook.EMBED][0, -1])
    if Hook.POS_EMBED in cache:
        rest += direct(cache[Hook.POS_EMBED][0, -1])
    rest += sum(direct(model.b_O[layer].detach()) for layer in range(model.cfg.n_layers))
    logits = logits.detach()
    target = float(logits[0, -1, predicted_id] - logits[0, -1].mean())
    target -= float((model.b_U[predicted_id] - model.b_U.mean()).detach())  # (MLPs: stored)
    assert sum(scores.values()) + rest == pytest.approx(target, abs=1e-3)
    top = max(scores, key=lambda k: abs(scores[k]))
    assert top == "a1.h0"  # the zoo's induction head carries the answer


def test_routes_are_above_tau_and_reach_the_last_position(stored, induction_final):
    import networkx as nx

    db, pid = stored
    ((tau, ids),) = rows(db, "SELECT tau, token_ids FROM prompt_views WHERE prompt_id = ?", [pid])
    routes = rows(
        db,
        "SELECT src_layer, src_pos, dst_layer, dst_pos, kind, importance FROM prompt_routes "
        "WHERE prompt_id = ?",
        [pid],
    )
    assert routes and all(r[5] >= tau for r in routes)
    graph = nx.DiGraph([((a, b), (c, d)) for a, b, c, d, _, _ in routes])
    goal = (induction_final.model.cfg.n_layers, len(ids) - 1)
    assert all(nx.has_path(graph, node, goal) for node in graph)
    assert {r[4] for r in routes} <= {"attention", "residual", "mlp"}
    # the induction head's query position reads the token after the earlier copy: an attention
    # route into the last position at the last layer
    assert any(r[4] == "attention" and r[2:4] == goal for r in routes)


def test_a_stored_prompt_is_not_computed_again_and_bad_input_exits_2(stored, induction_dir, capsys):
    db, pid = stored
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "3"]
    capsys.readouterr()
    assert cli([*argv, "--db", str(db)]) == 0
    assert f"cached   prompt {pid}" in capsys.readouterr().out
    base = ["run", "prompt", "--model", str(induction_dir), "--db", str(db)]
    for extra, message in (
        ([], "give the prompt as --text TEXT"),
        (["--task", "induction", "--index", "100000"], "--index 100000: task induction has"),
        (["--text", "x", "--tau", "0"], "--tau 0.0: must be between 0 and 1"),
    ):
        assert cli([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert rows(db, "SELECT count(*) FROM prompt_views") == [(1,)]


def _app(db: Path, monkeypatch, params: dict) -> AppTest:
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from app import data

    data.query.clear()
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update(params)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_the_prompt_page_shows_every_view_and_analyses_a_new_prompt(stored, monkeypatch):
    db, pid = stored
    at = _app(db, monkeypatch, {"view": "prompt", "prompt": pid, "layer": "1", "head": "0"})
    assert at.session_state["prompt_pick"] == pid
    assert (at.session_state["prompt_layer"], at.session_state["prompt_head"]) == (1, 0)
    assert len(at.get("plotly_chart")) >= 6  # attention, lens, dla, rollout, flow, routes
    assert len(at.tabs) == 5
    # a new prompt, analysed by the pipeline in a process the page starts
    at.text_input(key="prompt_task").set_value("induction")
    at.number_input(key="prompt_index").set_value(5)
    at = at.button(key="prompt_analyse").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert rows(db, "SELECT count(*) FROM prompt_views") == [(2,)]
    assert at.session_state["prompt_pick"] != pid
