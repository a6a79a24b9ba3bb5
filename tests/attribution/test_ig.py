"""Riemann rules of integrated gradients: the points of each rule, `left` against a direct
implementation of the EAP-IG authors' rule, exact identities between the rules, and the
completeness every stored IG run carries."""

import pytest
import torch

from tests.attribution.test_edges import GPT2_EDGES, _source_delta
from workbench.attribution import edges
from workbench.attribution.batches import logit_diff
from workbench.attribution.ig import ig_alphas
from workbench.cli import cli
from workbench.store import Store


def test_rule_points():
    assert ig_alphas(4, "left") == [0.0, 0.25, 0.5, 0.75]
    assert ig_alphas(4, "right") == [0.25, 0.5, 0.75, 1.0]
    assert ig_alphas(4, "midpoint") == [0.125, 0.375, 0.625, 0.875]
    assert ig_alphas(0, "midpoint") == [0.0]  # no steps: attribution patching
    with pytest.raises(ValueError):
        ig_alphas(4, "trapezoid")


def _authors_rule_scores(model, batch, steps: int) -> dict[tuple[str, str], float]:
    """EAP-IG as the authors' code computes it, written out per edge: the input embeddings
    (`hook_resid_pre` of layer 0) set to corrupt + (k / steps)(clean - corrupt) for
    k = 0..steps-1 in the corrupt run, the gradient of the mean metric at each destination's
    input averaged over the steps, dotted with the source's clean - corrupt output, over the
    clean - corrupt gap."""
    _, clean = model.run_with_cache(batch.clean)
    _, corrupt = model.run_with_cache(batch.corrupt)
    start = corrupt["blocks.0.hook_resid_pre"]
    delta_in = clean["blocks.0.hook_resid_pre"] - start
    with torch.no_grad():
        gap = float(
            logit_diff(model(batch.clean), batch.answer, batch.wrong).mean()
            - logit_diff(model(batch.corrupt), batch.answer, batch.wrong).mean()
        )
    sums = dict.fromkeys(GPT2_EDGES, 0.0)
    for k in range(steps):
        live: dict[str, torch.Tensor] = {}

        def embed(act, hook, k=k):
            return start + (k / steps) * delta_in

        def keep(act, hook, live=live):
            act.retain_grad()
            live[hook.name] = act

        names = {_input_hook(model, dst) for _, dst in GPT2_EDGES}
        with edges.graph_hooks_enabled(model, edges.model_graph(model)):
            logits = model.run_with_hooks(
                batch.corrupt,
                fwd_hooks=[("blocks.0.hook_resid_pre", embed)] + [(n, keep) for n in names],
            )
            logit_diff(logits, batch.answer, batch.wrong).mean().backward()
        model.zero_grad(set_to_none=True)
        for src, dst in GPT2_EDGES:
            grad = live[_input_hook(model, dst)].grad
            if "<" in dst:
                grad = grad[:, :, int(dst[4])]
            delta = _source_delta(model, batch, src).detach()
            sums[(src, dst)] += float((delta * grad).sum())
    return {edge: total / steps / gap for edge, total in sums.items()}


def _input_hook(model, dst: str) -> str:
    if dst == "logits":
        return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if dst.startswith("m"):
        return f"blocks.{dst[1:]}.hook_mlp_in"
    return f"blocks.{dst[1]}.hook_{dst[-2]}_input"


def test_left_rule_is_the_eap_ig_authors_rule(tiny):
    model, batches = tiny
    batch = batches[0]
    ours = edges.edge_attribution(model, batches[:1], ig_steps=3, ig_rule="left").edges()
    scores = {(s, d): v for s, d, v in ours}
    for edge, expected in _authors_rule_scores(model, batch, 3).items():
        assert scores[edge] == pytest.approx(expected, rel=1e-4, abs=1e-6), edge


def test_rules_are_the_same_sum_at_other_points(tiny):
    """Exact identities between the rules (the gradient points they share): left with one step
    is EAP; N(right_N - left_N) = right_1 - left_1; midpoint_N = 2 right_2N - right_N."""
    model, batches = tiny

    def scores(steps, rule):
        return edges.edge_attribution(model, batches, ig_steps=steps, ig_rule=rule).scores

    eap = edges.edge_attribution(model, batches).scores
    torch.testing.assert_close(scores(1, "left"), eap, rtol=0, atol=1e-6)
    right_1, left_1 = scores(1, "right"), eap
    torch.testing.assert_close(3 * (scores(3, "right") - scores(3, "left")), right_1 - left_1,
                               rtol=0, atol=2e-5)  # fmt: skip
    torch.testing.assert_close(scores(2, "midpoint"), 2 * scores(4, "right") - scores(2, "right"),
                               rtol=0, atol=2e-5)  # fmt: skip


def test_stored_eap_ig_runs_carry_their_completeness_and_rule(tmp_path, induction_dir):
    db = tmp_path / "w.duckdb"
    argv = ["run", "edges", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    argv += ["--method", "eap_ig"]
    assert cli([*argv, "--ig-rule", "right"]) == 0  # the default before midpoint
    assert cli(argv) == 0  # midpoint, the default: another rule is another run
    assert cli([*argv, "--ig-rule", "midpoint"]) == 0  # ... stored once
    with Store(db, read_only=True) as store:
        rows = store.query(
            """SELECT r.run_id, r.params->>'ig_rule' AS rule, m.value AS completeness,
                      (SELECT sum(score) FROM edges e
                        WHERE e.run_id = r.run_id AND e.src = 'input') AS input_sum
               FROM runs r JOIN run_metrics m USING (run_id)
               WHERE m.metric = 'ig_completeness' ORDER BY rule"""
        ).to_pylist()
    assert [r["rule"] for r in rows] == ["midpoint", "right"]
    for row in rows:
        assert row["completeness"] == pytest.approx(row["input_sum"], abs=1e-6)
        # 5 steps on the zoo: right is off by up to 0.2 of the gap, midpoint by a few percent
        assert row["completeness"] == pytest.approx(1.0, abs=0.3)


def test_unknown_rule_is_bad_usage(tmp_path, induction_dir, capsys):
    db = tmp_path / "w.duckdb"
    argv = ["run", "edges", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    assert cli([*argv, "--method", "eap_ig", "--ig-rule", "trapezoid"]) == 2
    assert "--ig-rule trapezoid" in capsys.readouterr().err
    assert not db.exists()
