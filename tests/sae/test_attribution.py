"""`sae_attr` against real interventions on the spliced model (SAELens SAEs on the induction
zoo model): patching or ablating features moves the metric as their scores predict."""

import pytest
import torch

from tests.sae.conftest import HOOKS
from workbench.attribution.batches import make_batches
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.sae import attribution
from workbench.sae.saes import load_sae
from workbench.tasks import load_task


@pytest.fixture(scope="module")
def spliced(sae_run, induction_dir):
    model = load_checkpoint(resolve_checkpoints(str(induction_dir))[-1])
    saes = [load_sae(sae_run.saes[h]["path"], model) for h in HOOKS]
    batches = make_batches(load_task("induction", model))
    return attribution.SplicedModel(model.model, saes, ["early", "late"], batches)


@pytest.fixture(scope="module")
def scores(spliced):
    return attribution.node_attribution(spliced, ig_steps=5, ig_rule="right")


def ranked(scores: dict[str, float], k: int, spliced) -> list[str]:
    ids = [n for n in spliced.node_ids(k) if n in scores]
    return sorted(ids, key=lambda n: -abs(scores[n]))


def test_spliced_model_with_error_nodes_is_the_model(spliced):
    model = spliced.model
    m = 0.0
    with torch.no_grad():
        for batch in spliced.batches:
            last = model(batch.clean)[:, -1]
            answer = last.gather(1, batch.answer[:, None])
            m += float((answer - last.gather(1, batch.wrong[:, None])).sum())
    assert spliced.m_clean == pytest.approx(m / spliced.n, abs=1e-4)
    every = {n for k in range(len(spliced.saes)) for n in spliced.node_ids(k)}
    assert spliced.faithfulness(every) == pytest.approx(1.0, abs=1e-5)
    assert spliced.faithfulness(set()) == pytest.approx(0.0, abs=1e-5)


@pytest.fixture(scope="module")
def frozen(sae_run, induction_dir):
    """The spliced model on one batch with the final normalisation's scale frozen at its value
    in the corrupt run. The last SAE reads the final residual stream, so everything after it
    (its decoder, the frozen normalisation, the unembedding, the logit difference) is then
    linear: a last-SAE node's gradient is the same at every point, and its attribution must
    equal the effect of patching it, for any number of steps and any rule."""
    loaded = load_checkpoint(resolve_checkpoints(str(induction_dir))[-1])
    model = loaded.model
    batches = make_batches(load_task("induction", loaded))[:1]
    _, cache = model.run_with_cache(batches[0].corrupt, names_filter="ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"]
    model.add_hook("ln_final.hook_scale", lambda act, hook: scale, is_permanent=True)
    saes = [load_sae(sae_run.saes[h]["path"], loaded) for h in HOOKS]
    return attribution.SplicedModel(model, saes, ["early", "late"], batches)


@pytest.mark.parametrize(("steps", "rule"), [(0, "right"), (5, "right"), (3, "left")])
def test_with_the_final_scale_frozen_each_score_is_its_patch_effect(frozen, steps, rule):
    """Every last-SAE node with a score, the error node included."""
    scores, _, _ = attribution.node_attribution(frozen, ig_steps=steps, ig_rule=rule)
    nodes = [n for n in frozen.node_ids(1) if n in scores]
    assert frozen.node_ids(1)[-1] in nodes and len(nodes) > 10
    for node in nodes:
        assert scores[node] == pytest.approx(frozen.patch_nodes({node}), abs=1e-5), node


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_with_the_final_scale_frozen_ablating_top_nodes_removes_their_scores(frozen, n):
    """Faithfulness with the top-n last-SAE nodes set to their corrupt values in the clean run:
    the metric drops by exactly the sum of their scores."""
    scores, _, _ = attribution.node_attribution(frozen, ig_steps=2, ig_rule="right")
    top = ranked(scores, 1, frozen)[:n]
    every = {x for k in range(len(frozen.saes)) for x in frozen.node_ids(k)}
    drop = 1.0 - frozen.faithfulness(every - set(top))
    assert drop == pytest.approx(sum(scores[x] for x in top), abs=1e-5)
    assert sum(attribution.completeness(frozen, scores).values()) != 0.0


def test_with_the_final_scale_frozen_the_last_sae_is_complete(frozen):
    scores, _, _ = attribution.node_attribution(frozen, ig_steps=1, ig_rule="left")
    assert attribution.completeness(frozen, scores)["late"] == pytest.approx(1.0, abs=1e-5)


# |completeness - 1| of each SAE, midpoint rule at 16 steps on the real (unfrozen) model:
# measured 0.0002-0.0006 over zoo and SAE seeds 0-2 and the avx512, avx2 and default kernels
# (make spread); the right rule at 5 steps is off by up to 0.14 on the same models.
COMPLETENESS_MARGIN = 0.005


@pytest.mark.parametrize("k", [0, 1])
def test_an_saes_scores_add_up_to_patching_all_of_it(spliced, k, measured):
    """Patching every node of one SAE (error included) is the whole gap, exactly; integrated
    gradients along that path add up to it up to the Riemann error."""
    assert spliced.patch_nodes(set(spliced.node_ids(k))) == pytest.approx(1.0, abs=1e-4)
    scores, _, _ = attribution.node_attribution(spliced, ig_steps=16, ig_rule="midpoint")
    total = attribution.completeness(spliced, scores)[spliced.sae_ids[k]]
    assert abs(measured("completeness_error", total - 1.0)) <= COMPLETENESS_MARGIN


def test_edges_match_moving_one_upstream_feature(spliced, scores, measured):
    """Edge u -> d is first order, like EAP: move u alone a small step (0.1%) from its corrupt
    towards its clean value in the corrupt run and measure how far d moves, weighted by d's
    gradient, against the edge's score (scaled by the step). A TopK SAE's features are piecewise
    linear: a step that crosses a kink (a downstream feature entering or leaving the top k) breaks
    the first-order match, so most, not all, of the strongest edges must agree."""
    eps = 1e-3
    node_scores, grads, _ = scores
    up = ranked(node_scores, 0, spliced)
    down = ranked(node_scores, 1, spliced)
    selected = [
        [spliced.node_ids(0).index(n) for n in up[:8]],
        [spliced.node_ids(1).index(n) for n in down[:8]],
    ]
    edges = attribution._graph_edges(spliced, selected, node_scores, grads)
    pair = sorted(
        (e for e in edges if e[0].startswith("f:early") and e[1].startswith("f:late")),
        key=lambda e: -abs(e[2]),
    )[:12]
    assert pair
    exact, predicted = [], []
    for src, dst, score in pair:
        feature_up = spliced.node_ids(0).index(src)
        feature_down = spliced.node_ids(1).index(dst)
        total = 0.0
        for b, batch in enumerate(spliced.batches):

            def edit(k, f, err, b=b, i=feature_up):
                if k != 0:
                    return None
                f_clean, err_clean = spliced.clean[b][0]
                f_corr, err_corr = spliced.corrupt[b][0]
                if i == spliced.saes[0].d_sae:
                    return f, err_corr + eps * (err_clean - err_corr)
                f = f.clone()
                f[..., i] = f_corr[..., i] + eps * (f_clean[..., i] - f_corr[..., i])
                return f, err

            with torch.no_grad():
                _, values = spliced.run(batch.corrupt, batch, edit)
            g_f, g_err = grads[b][1]
            f_corr, err_corr = spliced.corrupt[b][1]
            f_new, err_new = values[1]
            if feature_down == spliced.saes[1].d_sae:
                total += float((g_err * (err_new - err_corr)).sum())
            else:
                d = feature_down
                total += float((g_f[..., d] * (f_new[..., d] - f_corr[..., d])).sum())
        exact.append(total / (spliced.n * spliced.gap * eps))
        predicted.append(score)
    assert max(abs(p) for p in predicted) > 1e-3
    close = torch.isclose(torch.tensor(predicted), torch.tensor(exact), rtol=0.05, atol=2e-4)
    # edges that do not match: none of 12 over seeds 0-2 and three kernels (make spread)
    misses = measured("edges_crossing_a_kink", len(pair) - int(close.sum()))
    assert misses <= 2, list(zip(predicted, exact, strict=True))
