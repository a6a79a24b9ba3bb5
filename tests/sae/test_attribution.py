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
    return attribution.node_attribution(spliced, ig_steps=5)


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


def test_patching_single_features_matches_their_scores(spliced, scores):
    """The last SAE reads the final residual stream: a feature's score is the effect of patching
    that one feature from the clean into the corrupt run."""
    node_scores, _ = scores
    top = ranked(node_scores, 1, spliced)[:10]
    exact = torch.tensor([spliced.patch_nodes({n}) for n in top])
    predicted = torch.tensor([node_scores[n] for n in top])
    assert torch.corrcoef(torch.stack([exact, predicted]))[0, 1] > 0.95
    assert torch.allclose(predicted, exact, rtol=0.4, atol=0.01)


@pytest.mark.parametrize("n", [1, 4, 16, 64])
def test_ablating_the_top_features_moves_the_metric_as_predicted(spliced, scores, n):
    node_scores, _ = scores
    top = ranked(node_scores, 1, spliced)[:n]
    every = {x for k in range(len(spliced.saes)) for x in spliced.node_ids(k)}
    drop = 1.0 - spliced.faithfulness(every - set(top))
    assert drop == pytest.approx(sum(node_scores[x] for x in top), abs=0.1)


@pytest.mark.parametrize("k", [0, 1])
def test_an_saes_scores_add_up_to_patching_all_of_it(spliced, scores, k):
    node_scores, _ = scores
    total = sum(node_scores.get(n, 0.0) for n in spliced.node_ids(k))
    assert spliced.patch_nodes(set(spliced.node_ids(k))) == pytest.approx(1.0, abs=1e-4)
    assert total == pytest.approx(1.0, abs=0.2)


def test_edges_match_moving_one_upstream_feature(spliced, scores):
    """Edge u -> d is first order, like EAP: move u alone a small step (0.1%) from its corrupt
    towards its clean value in the corrupt run and measure how far d moves, weighted by d's
    gradient, against the edge's score (scaled by the step). A TopK SAE's features are piecewise
    linear: a step that crosses a kink (a downstream feature entering or leaving the top k) breaks
    the first-order match, so most, not all, of the strongest edges must agree."""
    eps = 1e-3
    node_scores, grads = scores
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
    assert int(close.sum()) >= len(pair) - 2, list(zip(predicted, exact, strict=True))
