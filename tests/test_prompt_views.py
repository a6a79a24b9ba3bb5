"""`workbench run prompt` on the zoo's induction model: stored views checked against the
model and against the papers' definitions computed here (attention rollout by its formula,
attention flow at the first layer, the logit lens's last layer against the model's output,
direct logit attribution summing to the logit), and the app's Prompt page.

Attention flow is checked against networkx's maximum flow on the same layered graph (the
definition, kept here as the reference) on random causal patterns, and the information-flow
routes against the whole-block computation they replace (also kept here); the prompt's length
and the flow's time are bounded with one sentence and exit status 2."""

import time
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.db import rows
from workbench.cli import cli
from workbench.core import Hook
from workbench.errors import BadInput
from workbench.prompt.views import (
    DEFAULT_TAU,
    FLOW_SCALE,
    attention_flow,
    prompt_views,
    residual_attention,
)

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
    from workbench.app import data

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
    assert len(at.tabs) == 7  # ... routes, why this token, Patchscope
    # a new prompt, analysed by the pipeline in a process the page starts
    at.text_input(key="prompt_task").set_value("induction")
    at.number_input(key="prompt_index").set_value(5)
    at = at.button(key="prompt_analyse").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert rows(db, "SELECT count(*) FROM prompt_views") == [(2,)]
    assert at.session_state["prompt_pick"] != pid


# attention flow against networkx -------------------------------------------------------------


def _networkx_graph(patterns: torch.Tensor) -> nx.DiGraph:
    """Abnar & Zuidema's layered graph: node (l, p) is position p before layer l; Â_l[q, k] is
    the capacity of (l, k) -> (l + 1, q)."""
    mixed = residual_attention(patterns).double()
    n_layers, n = mixed.shape[0], mixed.shape[-1]
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for q in range(n):
            for k in range(q + 1):
                weight = float(mixed[layer, q, k])
                if weight > 0:
                    graph.add_edge((layer, k), (layer + 1, q), capacity=weight)
    return graph


def _networkx_flow(patterns: torch.Tensor) -> np.ndarray:
    """The reference: one networkx maximum flow per (layer, input position)."""
    graph = _networkx_graph(patterns)
    n_layers, _, n, _ = patterns.shape
    flow = np.zeros((n_layers, n))
    for layer in range(n_layers):
        for source in range(n):
            flow[layer, source] = nx.maximum_flow_value(graph, (0, source), (layer + 1, n - 1))
    return flow


def _random_patterns(n_layers: int, n_heads: int, n: int, seed: int, *, spread: float = 2.0):
    """Causal attention patterns from random scores; a large `spread` makes them nearly hard,
    and one head in three attends to a single key exactly (zero weight elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_layers, n_heads, n, n, generator=gen, dtype=torch.float64) * spread
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    patterns = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    hard = torch.nn.functional.one_hot(scores.masked_fill(~causal, float("-inf")).argmax(-1), n)
    patterns[:, ::3] = hard[:, ::3].to(patterns.dtype)
    return patterns.float()


def _flow_tolerance(n_layers: int, n: int) -> np.ndarray:
    """[layer]: capacities are floored to multiples of 1 / FLOW_SCALE, so the flow to layer l is
    below the exact one by less than (edges of a minimum cut) / FLOW_SCALE, at most the edges
    of the graph up to layer l; plus networkx's own float rounding."""
    edges = np.arange(1, n_layers + 1) * n * (n + 1) / 2
    return edges / FLOW_SCALE + 1e-12


@pytest.mark.parametrize("seed", range(12))
def test_attention_flow_equals_networkx_on_random_patterns(seed):
    n_layers, n_heads, n = 1 + seed % 4, 1 + seed % 3, 2 + (5 * seed) % 15
    patterns = _random_patterns(n_layers, n_heads, n, seed, spread=(1.0, 4.0, 12.0)[seed % 3])
    reference = _networkx_flow(patterns)
    flow = attention_flow(patterns).numpy()
    assert flow.dtype == np.float64 and flow.shape == (n_layers, n)
    gap = reference - flow
    assert (gap >= -1e-12).all()  # floored capacities: never above the exact flow
    assert (gap <= _flow_tolerance(n_layers, n)[:, None]).all(), np.abs(gap).max()
    np.testing.assert_array_equal(flow[0], residual_attention(patterns)[0, -1].double().numpy())


def test_attention_flow_at_a_real_models_width_matches_networkx_where_checked():
    """SmolLM2's 9 heads at 6 layers x 96 tokens (27,936 edges): networkx would take minutes
    for all 576 problems; it checks two of the deepest layer's here."""
    patterns = _random_patterns(6, 9, 96, seed=7)
    start = time.monotonic()
    flow = attention_flow(patterns, max_seconds=600).numpy()
    assert time.monotonic() - start < 600  # it ended
    graph = _networkx_graph(patterns)
    tolerance = _flow_tolerance(6, 96)[-1]
    for source in (0, 40):
        exact = nx.maximum_flow_value(graph, (0, source), (6, 95))
        assert 0 <= exact - flow[-1, source] <= tolerance
    assert (flow >= 0).all() and (flow <= 1 + 1e-6).all()


def test_attention_flow_stops_with_one_sentence_after_its_time_limit():
    patterns = _random_patterns(30, 9, 128, seed=3)  # SmolLM2's shape: tens of seconds
    start = time.monotonic()
    with pytest.raises(BadInput) as err:
        attention_flow(patterns, max_seconds=1)
    assert time.monotonic() - start < 120  # it ended rather than ran on
    message = str(err.value)
    assert message.startswith("attention flow over 30 layers x 128 tokens did not finish within ")
    assert "--flow-seconds 1 " in message and "(0: no limit)" in message
    assert "\n" not in message


def test_a_prompt_longer_than_the_context_or_a_flow_over_its_limit_exits_2(
    stored, induction_dir, capsys
):
    db, pid = stored
    ((text,),) = rows(db, "SELECT text FROM prompt_views WHERE prompt_id = ?", [pid])
    long_text = " ".join([text] * 8)
    base = ["run", "prompt", "--model", str(induction_dir), "--db", str(db)]
    before = rows(db, "SELECT prompt_id FROM prompt_views ORDER BY prompt_id")
    capsys.readouterr()
    assert cli([*base, "--text", long_text]) == 2
    err = capsys.readouterr().err
    assert "the prompt (--text) is " in err and "more than the model's context of 48 tokens" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # a prompt that fits, with attention flow given no time at all
    assert cli([*base, "--text", text, "--force", "--flow-seconds", "0.000001"]) == 2
    err = capsys.readouterr().err
    assert "did not finish within --flow-seconds 1e-06" in err
    assert cli([*base, "--text", text, "--flow-seconds", "-1"]) == 2
    assert "--flow-seconds -1.0: must be 0 (no limit) or more" in capsys.readouterr().err
    assert rows(db, "SELECT prompt_id FROM prompt_views ORDER BY prompt_id") == before


# information-flow routes against the whole-block computation ----------------------------------


def _proximity(y: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    raw = (y.abs().sum() - (y[None] - terms).abs().sum(-1)).clamp(min=0)
    total = raw.sum()
    return raw / total if total > 0 else raw


def _whole_block_routes(model, cache, patterns: torch.Tensor, n: int, tau: float) -> list:
    """The reference: every source's term of a whole attention block at once, [n, n, d_model],
    every edge listed, then filtered by tau and by reaching the last position."""
    cfg = model.cfg
    every = []
    for layer in range(cfg.n_layers):
        resid_pre = cache[Hook.resid_pre(layer)][0]
        v = cache[Hook.qkv(layer, "v")][0]
        if v.shape[1] != cfg.n_heads:
            v = v.repeat_interleave(cfg.n_heads // v.shape[1], dim=1)
        per_source = torch.einsum(
            "hqk,khe,hed->qkd", patterns[layer].to(v.dtype), v, model.W_O[layer]
        )
        attn_out = cache[Hook.attn_out(layer)][0]
        for q in range(n):
            terms = torch.cat([resid_pre[q][None], per_source[q, : q + 1]])
            imp = _proximity((resid_pre[q] + attn_out[q]).float(), terms.float())
            every.append((layer, q, layer + 1, q, "residual", float(imp[0])))
            for k in range(q + 1):
                every.append((layer, k, layer + 1, q, "attention", float(imp[1 + k])))
        if not cfg.attn_only:
            mid = cache[Hook.resid_mid(layer)][0]
            mlp = cache[Hook.mlp_out(layer)][0]
            for q in range(n):
                imp = _proximity((mid[q] + mlp[q]).float(), torch.stack([mid[q], mlp[q]]).float())
                every.append((layer, q, layer + 1, q, "mlp", float(imp[1])))
    kept = [e for e in every if e[5] >= tau]
    graph = nx.DiGraph([((a, b), (c, d)) for a, b, c, d, _, _ in kept])
    goal = (cfg.n_layers, n - 1)
    reach = (nx.ancestors(graph, goal) | {goal}) if goal in graph else set()
    return [e for e in kept if (e[2], e[3]) in reach and (e[0], e[1]) in reach]


@torch.no_grad()
def _check_routes(model, ids: list[int], tau: float) -> int:
    views = prompt_views(model, ids, tau)
    _, cache = model.run_with_cache(torch.tensor([ids]))
    reference = _whole_block_routes(model, cache, views.attention, len(ids), tau)
    assert [e[:5] for e in views.routes] == [e[:5] for e in reference]
    np.testing.assert_allclose(
        [e[5] for e in views.routes], [e[5] for e in reference], rtol=1e-5, atol=1e-6
    )
    return len(reference)


@pytest.mark.parametrize("tau", [DEFAULT_TAU, 1e-4])
@pytest.mark.parametrize("chunk_queries", [None, 3])
def test_routes_in_chunks_equal_the_whole_block_computation(
    induction_task, induction_final, tiny_hf_dirs, monkeypatch, tau, chunk_queries
):
    """The zoo's induction model (attention only) and a tiny Llama (MLPs, grouped-query
    attention, d_model 32), in one chunk of query positions or in chunks of 3."""
    from workbench.models import load_checkpoint, resolve_checkpoints
    from workbench.prompt import views as views_module

    if chunk_queries:
        monkeypatch.setattr(views_module, "ROUTES_CHUNK_ELEMENTS", chunk_queries * 41 * 32)
    llama = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs["llama"]))[-1])
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    assert _check_routes(llama.model, ids, tau) > 0
    ids = list(induction_task.pairs[3].clean_tokens)
    assert _check_routes(induction_final.model, ids, tau) > 0
