"""Input attribution (`workbench.prompt.inputattr`) held against its reference and its exact
properties.

- Reference: Captum run directly on the Hugging Face model (`inputs_embeds`, the model's own
  logits), the same method and settings, for the tiny random GPT-2 and Llama (grouped-query
  attention). The workbench runs the TransformerLens conversion of the model, whose token
  embeddings are centred for LayerNorm models: every read of the residual stream goes through a
  LayerNorm, so the target's logit is unchanged by adding a multiple of the all-ones vector to an
  embedding, its gradient has no such component, and each attribution is the same number.
- Exact properties on the zoo's induction model: occlusion of a token is the change measured by
  running the model with that embedding replaced; Shapley value sampling is efficient (the scores
  sum to f(e) − f(b)); integrated gradients are complete up to the convergence delta Captum
  reports, which is small at 64 Gauss-Legendre points; the faithfulness curves' ends are the
  prompt and the baseline, and each point is the model run with those tokens replaced.
"""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from workbench.core import Hook
from workbench.errors import BadInput
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.prompt.inputattr import (
    CAPTUM_METHODS,
    AttributionParams,
    TargetLogit,
    atman_scores,
    baseline_embeddings,
    curve_area,
    explain,
    parse_methods,
    target_token,
)

IDS = [5, 17, 33, 2, 9, 41, 7, 5, 17]


def _hf_reference(model_dir, ids: list[int], target: int, method: str, baseline: str):
    """The method run by Captum itself on the Hugging Face model."""
    from captum.attr import (
        FeatureAblation,
        InputXGradient,
        IntegratedGradients,
        Saliency,
        ShapleyValueSampling,
    )
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    embeds = hf.get_input_embeddings()(torch.tensor([ids])).detach()
    table = hf.get_input_embeddings().weight.detach()
    base = torch.zeros_like(embeds) if baseline == "zero" else table.mean(0).expand_as(embeds)

    def f(e: torch.Tensor) -> torch.Tensor:
        return hf(inputs_embeds=e).logits[:, -1, target]

    n = len(ids)
    mask = torch.arange(n).view(1, n, 1)
    inputs = embeds.clone().requires_grad_(True)
    if method == "saliency":
        return Saliency(f).attribute(inputs, abs=False)[0].norm(dim=-1)
    if method == "input_x_gradient":
        return InputXGradient(f).attribute(inputs)[0].sum(-1)
    if method == "integrated_gradients":
        found = IntegratedGradients(f).attribute(inputs, baselines=base, n_steps=64)
        return found[0].sum(-1)
    with torch.no_grad():
        if method == "occlusion":
            return FeatureAblation(f).attribute(embeds, baselines=base, feature_mask=mask)[0, :, 0]
        torch.manual_seed(0)
        found = ShapleyValueSampling(f).attribute(
            embeds, baselines=base, feature_mask=mask, n_samples=25
        )
        return found[0, :, 0]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_equals_captum_on_the_hugging_face_model(tiny_hf_dirs, kind, baseline):
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs[kind]))[-1])
    model = loaded.model
    target = int(model(torch.tensor([IDS]))[0, -1].argmax())
    params = AttributionParams(methods=CAPTUM_METHODS, baseline=baseline)
    found = explain(model, IDS, target, params)
    for method in CAPTUM_METHODS:
        ours = found.scores[method].tokens
        ref = (
            _hf_reference(tiny_hf_dirs[kind], IDS, target, method, baseline)
            .detach()
            .double()
            .numpy()
        )
        scale = np.abs(ref).max()
        assert np.abs(ours - ref).max() <= 1e-4 * scale, (method, ours, ref)


@pytest.fixture(scope="module")
def zoo(induction_final, induction_task):
    pair = induction_task.pairs[0]
    ids = list(pair.clean_tokens)
    model = induction_final.model
    target = int(model(torch.tensor([ids]))[0, -1].argmax())
    found = explain(model, ids, target, AttributionParams(methods=CAPTUM_METHODS))
    return model, ids, target, found


def _logit_with(model, ids: list[int], target: int, replace: dict[int, torch.Tensor]) -> float:
    """The target's logit, the embeddings at `replace`'s positions set by a hook by hand."""

    def put(value: torch.Tensor, hook: object) -> torch.Tensor:
        value = value.clone()
        for pos, vector in replace.items():
            value[0, pos] = vector
        return value

    with torch.no_grad():
        logits = model.run_with_hooks(torch.tensor([ids]), fwd_hooks=[(Hook.EMBED, put)])
    return float(logits[0, -1, target])


def test_occlusion_is_the_measured_change(zoo):
    model, ids, target, found = zoo
    zero = torch.zeros(model.cfg.d_model)
    full = _logit_with(model, ids, target, {})
    assert found.target_logit == pytest.approx(full, abs=1e-5)
    for pos, score in enumerate(found.scores["occlusion"].tokens):
        assert score == pytest.approx(full - _logit_with(model, ids, target, {pos: zero}), abs=1e-5)


def test_shapley_is_efficient_and_integrated_gradients_complete(zoo):
    model, ids, target, found = zoo
    change = found.target_logit - found.baseline_logit
    assert found.scores["shapley"].tokens.sum() == pytest.approx(change, abs=1e-4)
    ig = found.scores["integrated_gradients"]
    assert ig.delta is not None
    # Captum's delta is the completeness gap itself: Σ scores − (f(e) − f(b))
    assert ig.tokens.sum() - change == pytest.approx(ig.delta, abs=1e-4)
    # at 64 Gauss-Legendre points the gap is a small share of the change (measured: < 1e-4)
    assert abs(ig.delta) <= 1e-3 * abs(change)


def test_shapley_sampling_approaches_the_exact_values(zoo):
    """Exact Shapley values by enumerating every coalition of the first tokens (the others kept),
    written here; the sampled estimate at 400 orders is within 5 % of the largest value."""
    model, ids, target, _ = zoo
    players = 6
    fn = TargetLogit(model, ids, target)
    embeds = fn.embeddings()
    zero = torch.zeros_like(embeds)
    import itertools
    import math

    value: dict[frozenset[int], float] = {}
    for size in range(players + 1):
        for coalition in itertools.combinations(range(players), size):
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[:players] = False
            keep[list(coalition)] = True
            mixed = torch.where(keep.view(1, -1, 1), embeds, zero)
            with torch.no_grad():
                value[frozenset(coalition)] = float(fn(mixed)[0])
    exact = np.zeros(players)
    for p in range(players):
        for coalition, v in value.items():
            if p in coalition:
                continue
            weight = math.factorial(len(coalition)) * math.factorial(players - len(coalition) - 1)
            exact[p] += weight / math.factorial(players) * (value[coalition | {p}] - v)

    from captum.attr import ShapleyValueSampling

    rest = embeds[:, players:]

    def game(first: torch.Tensor) -> torch.Tensor:  # the later tokens always present
        return fn(torch.cat([first, rest.expand(first.shape[0], -1, -1)], dim=1))

    mask = torch.arange(players).view(1, -1, 1)
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = ShapleyValueSampling(game).attribute(
            embeds[:, :players], baselines=0.0, feature_mask=mask, n_samples=400
        )[0, :, 0]
    assert np.abs(sampled.numpy() - exact).max() <= 0.05 * np.abs(exact).max() + 1e-3


def test_atman_is_the_loss_change_with_attention_to_a_token_suppressed(zoo, measured):
    """AtMan by its definition, run here one position at a time on the token ids (no batch, no
    embedding hook): every layer's pre-softmax attention scores to key j (the finite ones: the
    causal mask stays) scaled by 0.1, the target's cross-entropy read off the logits."""
    model, ids, target, _ = zoo
    fn = TargetLogit(model, ids, target)
    found = atman_scores(fn, fn.embeddings(), 0.9).tokens

    def loss(position: int | None) -> float:
        def scale(scores: torch.Tensor, hook: object) -> torch.Tensor:
            scores = scores.clone()
            column = scores[..., position]
            scores[..., position] = torch.where(column.isfinite(), column * 0.1, column)
            return scores

        hooks = [] if position is None else [(lambda n: n.endswith("hook_attn_scores"), scale)]
        with torch.no_grad():
            logits = model.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)[0, -1]
        return float(-logits.log_softmax(-1)[target])

    plain = loss(None)
    by_hand = np.array([loss(p) - plain for p in range(len(ids))])
    np.testing.assert_allclose(found, by_hand, atol=1e-4)
    assert np.abs(by_hand).max() > 0.1  # the trained model's attention is sharp: it matters
    # nothing suppressed: zero, up to the float rounding of a batch against a single row
    zero = measured(
        "AtMan at suppression 0, largest |score|",
        np.abs(atman_scores(fn, fn.embeddings(), 0.0).tokens).max(),
    )
    assert zero <= 1e-5  # measured: 0 (native kernels) to 2.2e-7 (avx2, default; one thread)


def test_curves_end_at_the_prompt_and_the_baseline(zoo):
    model, ids, target, found = zoo
    n = len(ids)
    fn = TargetLogit(model, ids, target)
    embeds = fn.embeddings()
    base = baseline_embeddings(model, embeds, "zero")
    for method in CAPTUM_METHODS:
        points = {
            (kind, k): (prob, logit) for m, kind, k, prob, logit in found.curves if m == method
        }
        assert points["deletion", 0][1] == pytest.approx(found.target_logit, abs=1e-5)
        assert points["insertion", n][1] == pytest.approx(found.target_logit, abs=1e-5)
        assert points["deletion", n][1] == pytest.approx(found.baseline_logit, abs=1e-5)
        assert points["insertion", 0][1] == pytest.approx(found.baseline_logit, abs=1e-5)
        # a middle point, by hand: the top two tokens by this method's score replaced
        top = np.argsort(-found.scores[method].tokens, kind="stable")[:2].tolist()
        by_hand = _logit_with(model, ids, target, {p: base[0, p] for p in top})
        assert points["deletion", 2][1] == pytest.approx(by_hand, abs=1e-5)
    prob_at = [p for m, kind, _, p, _ in found.curves if m == "occlusion" and kind == "deletion"]
    assert 0 <= curve_area(prob_at) <= 1


def test_agreement_is_spearman_of_the_token_scores(zoo):
    _, ids, _, found = zoo
    assert found.top_k == -(-len(ids) // 4)
    assert len(found.agreement) == len(CAPTUM_METHODS) * (len(CAPTUM_METHODS) - 1) // 2
    for a, b, rho, share in found.agreement:
        x, y = found.scores[a].tokens, found.scores[b].tokens
        assert rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
        top_x = set(np.argsort(-np.abs(x))[: found.top_k].tolist())
        top_y = set(np.argsort(-np.abs(y))[: found.top_k].tolist())
        assert share == len(top_x & top_y) / found.top_k


def test_bad_targets_and_methods_are_one_sentence():
    pieces = {"Paris": [11], "Parisian": [11, 12]}

    def encode(text: str) -> list[int]:
        return pieces[text]

    def strs(ids: list[int]) -> list[str]:
        return [f"t{i}" for i in ids]

    assert target_token(encode, strs, 100, "Paris") == 11
    assert target_token(None, strs, 100, "#42") == 42
    with pytest.raises(BadInput, match="makes 2 tokens"):
        target_token(encode, strs, 100, "Parisian")
    with pytest.raises(BadInput, match="vocabulary has 100 tokens"):
        target_token(encode, strs, 100, "#100")
    with pytest.raises(BadInput, match="no tokenizer"):
        target_token(None, strs, 100, "Paris")
    with pytest.raises(BadInput, match="unknown method 'lime'"):
        parse_methods("saliency,lime")
    assert parse_methods("none") == ()
