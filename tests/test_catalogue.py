"""The head catalogue's scores against TransformerLens's own definitions (its head detector,
`all_composition_scores`, the eigenvalues of `FactoredMatrix`) and against the zoo's known
induction circuit."""

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig, head_detector

from workbench import catalogue
from workbench.zoo.ground_truth import INDUCTION_THRESHOLD, PREV_THRESHOLD
from workbench.zoo.ground_truth import pattern_scores as zoo_pattern_scores
from workbench.zoo.vocab import word_ids


def _random_model(n_kv: int | None = None) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=24, d_head=8, n_heads=4, d_vocab=40, act_fn="gelu",
        normalization_type="LN", n_key_value_heads=n_kv, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("W_Q", "W_K", "_W_K")):
                param.mul_(4)  # sharper attention than the initialisation's
    return model


@pytest.mark.parametrize("n_kv", [None, 2])
def test_pattern_scores_are_transformer_lens_head_detector(n_kv):
    """Per sequence, TransformerLens's detection pattern and similarity score (`"mul"`, no
    exclusions) on the same model's attention, averaged over sequences, give the same
    numbers; on a grouped-query model, per query head."""
    model = _random_model(n_kv)
    tokens = catalogue.repeated_tokens(range(1, 40), n_sequences=5, half=10, bos=0, seed=1)
    scores = catalogue.pattern_scores(model, tokens)
    _, cache = model.run_with_cache(tokens)
    detectors = {
        "previous_token": head_detector.get_previous_token_head_detection_pattern,
        "duplicate_token": head_detector.get_duplicate_token_head_detection_pattern,
        "induction": head_detector.get_induction_head_detection_pattern,
    }
    for name, detect in detectors.items():
        expected = torch.zeros(3, 4)
        for i in range(len(tokens)):
            pattern = detect(tokens[i : i + 1])
            for layer in range(3):
                for head in range(4):
                    expected[layer, head] += head_detector.compute_head_attention_similarity_score(
                        cache["pattern", layer][i, head], pattern,
                        exclude_bos=False, exclude_current_token=False, error_measure="mul",
                    ) / len(tokens)  # fmt: skip
        torch.testing.assert_close(scores[name], expected, atol=1e-5, rtol=1e-5)
        assert expected.max() > 0.01  # something to match: the check is not of zeros
    sink = torch.stack([cache["pattern", layer][:, :, 1:, 0].mean((0, 2)) for layer in range(3)])
    torch.testing.assert_close(scores["sink"], sink)


@pytest.mark.parametrize("n_kv", [None, 2])
def test_copying_scores_are_the_full_ov_circuits_eigenvalues(n_kv):
    model = _random_model(n_kv)
    full = model.W_E @ model.OV @ model.W_U  # TransformerLens's FactoredMatrix, [layer, head]
    eigenvalues = full.eigenvalues
    expected = eigenvalues.sum(-1).real / eigenvalues.abs().sum(-1)
    torch.testing.assert_close(catalogue.copying_scores(model), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv", [None, 2])
@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_are_transformer_lens(mode, n_kv):
    model = _random_model(n_kv)
    ours = catalogue.composition_scores(model, mode)
    torch.testing.assert_close(ours, model.all_composition_scores(mode), atol=1e-5, rtol=1e-4)
    assert ours[0, :, 1].min() > 0 and (ours[1, :, 0] == 0).all()  # later layers only


def test_a_mode_not_q_k_or_v_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        catalogue.composition_scores(_random_model(), "O")


def test_catalogue_finds_the_zoos_induction_circuit(induction_final):
    """On the trained induction zoo model: its previous-token head (layer 0) and its induction
    head (layer 1), as the ground truth finds them from attention, lead the catalogue's scores,
    and the induction head's keys are composed from the previous-token head's output more than
    from any other head's."""
    model, tok = induction_final.model, induction_final.tokenizer
    prev, induction = zoo_pattern_scores(induction_final)
    prev_heads = {h for h in range(len(prev)) if prev[h] > PREV_THRESHOLD}
    induction_heads = {h for h in range(len(induction)) if induction[h] > INDUCTION_THRESHOLD}
    assert prev_heads and induction_heads
    tokens = catalogue.repeated_tokens(
        word_ids(tok), n_sequences=16, half=(model.cfg.n_ctx - 1) // 2, bos=tok.bos_token_id
    )
    scores = catalogue.pattern_scores(model, tokens)
    assert int(scores["previous_token"][0].argmax()) in prev_heads
    assert int(scores["induction"][1].argmax()) in induction_heads
    # they stand out: measured 0.54 against at most 0.075 (previous token), 0.44 against at
    # most 0.03 (induction, whose best is about 0.5: the first half has nothing to induce)
    for name, layer in (("previous_token", 0), ("induction", 1)):
        second, first = scores[name][layer].sort().values[-2:]
        assert first > 4 * second, (name, scores[name][layer])
    k_comp = catalogue.composition_scores(model, "K")  # measured 0.30 against at most 0.12
    for head in induction_heads:
        assert int(k_comp[0, :, 1, head].argmax()) in prev_heads
