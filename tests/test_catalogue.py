"""The head catalogue's scores against TransformerLens's own definitions (its head detector,
`all_composition_scores`, the eigenvalues of `FactoredMatrix`) and against the zoo's known
induction circuit."""

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig, head_detector

from workbench import catalogue
from workbench.catalogue import run as catalogue_run
from workbench.zoo.ground_truth import INDUCTION_THRESHOLD, PREV_THRESHOLD
from workbench.zoo.ground_truth import pattern_scores as zoo_pattern_scores
from workbench.zoo.vocab import word_ids


def _random_model(n_kv: int | None = None, **config: object) -> HookedTransformer:
    settings: dict = {
        "n_layers": 3, "d_model": 32, "n_ctx": 24, "d_head": 8, "n_heads": 4, "d_vocab": 40,
        "act_fn": "gelu", "normalization_type": "LN", "n_key_value_heads": n_kv, "seed": 0,
    }  # fmt: skip
    cfg = HookedTransformerConfig(**(settings | config))
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


def _rows(db, sql: str) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_catalogue_command_stores_every_head_once_and_bad_input_exits_2(
    induction_dir, induction_final, tmp_path, capsys
):
    """`workbench run catalogue` stores each head's scores, its top token mappings and every
    earlier-to-later head pair's Q/K/V composition, equal to the scores computed directly on
    the same sequences; a second run finds it stored, `--force` replaces it; bad values exit 2
    naming the option and leave the stored catalogue as it was."""
    from workbench.catalogue.run import draw_vocabulary
    from workbench.cli import cli

    db = tmp_path / "w.duckdb"
    argv = ["run", "catalogue", "--model", str(induction_dir), "--db", str(db)]
    assert cli([*argv, "--sequences", "4", "--length", "8", "--seed", "3"]) == 0
    (cid,) = [ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if "catalogue" in ln]
    cfg = induction_final.model.cfg
    n_heads = cfg.n_layers * cfg.n_heads
    assert _rows(db, "SELECT score, count(*) FROM head_catalogue GROUP BY ALL ORDER BY 1") == [
        (name, n_heads) for name in sorted(catalogue_run.HEAD_SCORES)
    ]
    pairs = sum(
        cfg.n_heads * cfg.n_heads * (cfg.n_layers - 1 - layer) for layer in range(cfg.n_layers)
    )
    assert _rows(db, "SELECT mode, count(*) FROM head_composition GROUP BY ALL ORDER BY 1") == [
        (mode, pairs) for mode in "KQV"
    ]
    tokens = catalogue.repeated_tokens(
        draw_vocabulary(induction_final), n_sequences=4, half=8,
        bos=induction_final.tokenizer.bos_token_id, seed=3,
    )  # fmt: skip
    direct = catalogue.pattern_scores(induction_final.model, tokens)["induction"]
    stored = _rows(db, "SELECT layer, head, value FROM head_catalogue WHERE score = 'induction'")
    for layer, head, value in stored:
        assert value == pytest.approx(float(direct[layer, head]), abs=1e-6)
    k_comp = catalogue.composition_scores(induction_final.model, "K")
    for src, dst, value in _rows(
        db, "SELECT src, dst, value FROM head_composition WHERE mode = 'K'"
    ):
        (sl, sh), (dl, dh) = (tuple(int(x) for x in n[1:].split(".h")) for n in (src, dst))
        assert value == pytest.approx(float(k_comp[sl, sh, dl, dh]), abs=1e-6)

    assert cli([*argv, "--sequences", "4", "--length", "8", "--seed", "3"]) == 0
    assert f"cached   catalogue {cid}" in capsys.readouterr().out
    before = _rows(db, "SELECT created_at FROM catalogues")
    assert cli([*argv, "--sequences", "4", "--length", "8", "--seed", "3", "--force"]) == 0
    assert f"done     catalogue {cid}" in capsys.readouterr().out
    n_scores = len(catalogue_run.HEAD_SCORES)
    assert _rows(db, "SELECT count(*) FROM head_catalogue") == [(n_scores * n_heads,)]
    assert _rows(db, "SELECT count(*) FROM head_mappings") == [(n_heads * 2 * 5 * 5,)]
    assert _rows(db, "SELECT created_at FROM catalogues") != before

    for extra, message in (
        (["--sequences", "0"], "--sequences 0: must be 1 or more"),
        (["--length", "1"], "--length 1: must be 2 or more"),
        (["--length", "1000"], f"context of {cfg.n_ctx} tokens"),
        (["--seed", str(2**64)], f"--seed {2**64}: must be between 0 and 2**63 - 1"),
        (["--checkpoint", "12345"], "12345"),
        (["--needle-context", "10"], "--needle-context 10: must be 18 or more"),
        (["--needle-context", "1000"], f"context of {cfg.n_ctx} tokens"),
        (["--relations", str(tmp_path / "none.jsonl")], "none.jsonl: file not found"),
    ):
        assert cli([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert _rows(db, "SELECT catalogue_id FROM catalogues") == [(cid,)]
    assert _rows(db, "SELECT count(*) FROM head_catalogue") == [(n_scores * n_heads,)]
