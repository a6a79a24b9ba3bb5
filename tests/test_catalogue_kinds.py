"""The head kinds of the catalogue beyond TransformerLens's detector: dormant heads (attention
resting on the first token), retrieval heads (copy-paste from a needle while decoding) and what
a head's parameters map tokens to (MAPS), each against a computation written here: a head made
dormant by construction, greedy decoding prompt by prompt with the full attention cache, and
the full OV and QK matrices of TransformerLens's `FactoredMatrix`."""

import json
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tests.conftest import query
from tests.test_catalogue import _random_model
from workbench import catalogue
from workbench.catalogue import maps
from workbench.catalogue.run import draw_vocabulary
from workbench.cli import cli
from workbench.errors import BadInput
from workbench.zoo.vocab import word_ids


def _model(attn_only: bool = False, n_kv: int | None = None) -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=40, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu",
        normalization_type="LN", attn_only=attn_only, n_key_value_heads=n_kv, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return HookedTransformer(cfg)


def test_dormant_shares_split_at_the_repeat() -> None:
    # one sequence, two heads, five query positions; the repeat starts at position 3
    first = torch.tensor([[[1.0, 0.95, 0.2, 0.9, 0.89], [1.0, 0.1, 0.1, 0.1, 0.1]]])
    novel, repeated = catalogue.scores.dormant_shares(first, repeat_from=3)
    assert novel.tolist() == [0.5, 0.0]  # positions 1 and 2: 0.95 rests, 0.2 does not
    assert repeated.tolist() == [0.5, 0.0]  # positions 3 and 4: 0.9 rests, 0.89 does not


def test_a_head_made_dormant_is_dormant_everywhere() -> None:
    """Head a0.h0 made to look only at the first token (its query a constant that only the first
    position's key answers): dormant at every position of both halves, as its attention in
    TransformerLens's cache says; the other heads as their cached attention says."""
    model = _model()
    tokens = catalogue.repeated_tokens(range(1, 50), n_sequences=4, half=10, bos=0, seed=2)
    _, cache = model.run_with_cache(tokens)
    first = cache["blocks.0.ln1.hook_normalized"][0, 0]  # the first position, normalised
    direction = torch.randn(8)
    with torch.no_grad():
        attn = model.blocks[0].attn
        attn.W_Q[0] = 0
        attn.b_Q[0] = direction
        attn.W_K[0] = 50 * torch.outer(first / first.norm(), direction)
        attn.b_K[0] = 0
    scores = catalogue.pattern_scores(model, tokens)
    assert scores["dormant_novel"][0, 0] == 1.0 and scores["dormant_repeated"][0, 0] == 1.0
    _, cache = model.run_with_cache(tokens)
    for layer in range(2):
        rests = cache["pattern", layer][:, :, :, 0] >= catalogue.scores.DORMANT_SINK
        expected_novel = rests[:, :, 1:11].float().mean((0, 2))
        expected_repeated = rests[:, :, 11:].float().mean((0, 2))
        torch.testing.assert_close(scores["dormant_novel"][layer], expected_novel)
        torch.testing.assert_close(scores["dormant_repeated"][layer], expected_repeated)


def test_needle_prompts_hide_an_unambiguous_needle() -> None:
    prompts = catalogue.scores.needle_prompts(
        range(3, 40), n_prompts=6, context=30, needle=8, cue=2, bos=1, seed=4
    )
    assert prompts.tokens.shape == (6, 30 - 6)  # the answer's 6 tokens are the model's to write
    rows = zip(prompts.tokens, prompts.needle_start, prompts.answers, strict=True)
    for row, start, answer in rows:
        needle = row[start : start + 8]
        assert row[0] == 1 and len(set(needle.tolist())) == 8
        hay = torch.cat([row[1:start], row[start + 8 : -2]]).tolist()
        assert not set(hay) & set(needle.tolist())  # the haystack holds no needle token
        assert row[-2:].tolist() == needle[:2].tolist()  # the prompt ends with the cue
        assert answer.tolist() == needle[2:].tolist()


def _greedy_hits(model: HookedTransformer, prompts) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Retrieval written out: each prompt alone, decoded greedily with the full cache."""
    cfg = model.cfg
    hits = torch.zeros(cfg.n_layers, cfg.n_heads)
    n, steps = prompts.answers.shape
    for i in range(n):
        tokens = prompts.tokens[i : i + 1]
        start = int(prompts.needle_start[i])
        for _ in range(steps):
            logits, cache = model.run_with_cache(tokens)
            written = int(logits[0, -1].argmax())
            for layer in range(cfg.n_layers):
                for head in range(cfg.n_heads):
                    key = int(cache["pattern", layer][0, head, -1].argmax())
                    if start <= key < start + prompts.needle and int(tokens[0, key]) == written:
                        hits[layer, head] += 1
            tokens = torch.cat([tokens, torch.tensor([[written]])], dim=1)
    return hits / (n * steps)


def test_retrieval_scores_are_greedy_copy_paste(induction_final, measured) -> None:
    """On the trained induction model the batched score equals decoding prompt by prompt; its
    induction head is its retrieval head (measured 0.56-0.77 over zoo seeds 0-3, the next head
    0.03-0.55); before training (step 0) no head retrieves (at most 0.04)."""
    model, tok = induction_final.model, induction_final.tokenizer
    prompts = catalogue.scores.needle_prompts(
        draw_vocabulary(induction_final), n_prompts=8, context=model.cfg.n_ctx, needle=8,
        cue=2, bos=tok.bos_token_id,
    )  # fmt: skip
    scores = catalogue.scores.retrieval_scores(model, prompts)
    torch.testing.assert_close(scores, _greedy_hits(model, prompts))
    tokens = catalogue.repeated_tokens(
        word_ids(tok), n_sequences=16, half=(model.cfg.n_ctx - 1) // 2, bos=tok.bos_token_id
    )
    induction = catalogue.pattern_scores(model, tokens)["induction"]
    top = int(induction[1].argmax())
    assert measured("retrieval_of_induction_head", float(scores[1, top])) > 0.45


@pytest.mark.parametrize("ungroup", [False, True])
def test_retrieval_on_grouped_query_attention_is_greedy_copy_paste(ungroup: bool) -> None:
    """With keys and values cached per key/value head, and (TransformerLens's cache cannot
    hold them) with grouped-query attention run per query head, as the loader runs it."""
    model = _random_model(2, n_ctx=40, d_vocab=50, ungroup_grouped_query_attention=ungroup)
    prompts = catalogue.scores.needle_prompts(
        range(2, 50), n_prompts=6, context=40, needle=8, cue=2, bos=1, seed=3
    )
    scores = catalogue.scores.retrieval_scores(model, prompts)
    torch.testing.assert_close(scores, _greedy_hits(model, prompts))


def test_no_head_retrieves_before_training(induction_dir) -> None:
    from workbench.models import load_checkpoint, resolve_checkpoints

    loaded = load_checkpoint(resolve_checkpoints(str(induction_dir))[0])
    assert loaded.checkpoint.step == 0
    prompts = catalogue.scores.needle_prompts(
        draw_vocabulary(loaded), n_prompts=16, context=loaded.model.cfg.n_ctx, needle=8,
        cue=2, bos=loaded.tokenizer.bos_token_id,
    )  # fmt: skip
    assert float(catalogue.scores.retrieval_scores(loaded.model, prompts).max()) < 0.1


@pytest.mark.parametrize("attn_only", [True, False])
def test_relation_scores_are_top_k_of_the_full_ov_circuit(attn_only: bool) -> None:
    """Against TransformerLens's full OV circuit (`model.OV`, `W_V W_O` per head) between the
    embedding and the unembedding; in a model with MLPs, heads after layer 0 read the
    embedding through the first MLP (MAPS's convention)."""
    model = _model(attn_only)
    sources, targets = list(range(10, 30)), [(3 * t) % 50 for t in range(10, 30)]
    for k in (1, 5):
        promoted, suppressed = maps.relation_scores(model, sources, targets, k)
        for layer in range(2):
            e = model.W_E[sources]
            if layer > 0 and not attn_only:
                block = model.blocks[0]
                e = block.mlp(block.ln2(e[None]))[0]
            for head in range(4):
                logits = (e @ model.OV[layer, head].AB @ model.W_U).detach()
                top = logits.topk(k).indices
                bottom = logits.topk(k, largest=False).indices
                hit = [targets[i] in top[i].tolist() for i in range(20)]
                miss = [targets[i] in bottom[i].tolist() for i in range(20)]
                assert float(promoted[layer, head]) == pytest.approx(sum(hit) / 20)
                assert float(suppressed[layer, head]) == pytest.approx(sum(miss) / 20)
    identity = maps.relation_scores(model, sources, sources, 50)[0]
    assert bool((identity == 1.0).all())  # k = the vocabulary: every target is in it


@pytest.mark.parametrize("n_kv", [None, 2])
def test_top_mappings_are_the_full_circuits_largest_entries(n_kv: int | None) -> None:
    """Each head's top source tokens by the norm its circuit gives them over their own, and
    their top targets, from the full matrices of TransformerLens's `model.OV` and `model.QK`;
    on a grouped-query model, per query head."""
    model = _model(attn_only=True, n_kv=n_kv)
    vocabulary = list(range(5, 45))
    rows = maps.top_mappings(model, vocabulary, n_tokens=3, n_mappings=4)
    assert len(rows) == 2 * 4 * 2 * 3 * 4
    e = model.W_E[vocabulary].detach()
    for row in rows:
        layer, head = row["layer"], row["head"]
        factored = (model.OV if row["circuit"] == "OV" else model.QK)[layer, head].AB.detach()
        moved = e @ factored
        amplification = moved.norm(dim=-1) / e.norm(dim=-1)
        src = vocabulary.index(row["src_token"])
        assert row["amplification"] == pytest.approx(float(amplification[src]), rel=1e-4)
        assert src == int(amplification.topk(3).indices[row["src_rank"]])
        full = moved @ (model.W_U[:, vocabulary] if row["circuit"] == "OV" else e.T).detach()
        values, targets = full[src].topk(4)
        assert row["dst_token"] == vocabulary[int(targets[row["rank"]])]
        assert row["value"] == pytest.approx(float(values[row["rank"]]), rel=1e-4, abs=1e-5)


def test_the_zoos_induction_head_maps_every_token_to_itself(induction_final) -> None:
    """The identity relation with k = 1 (MAPS's copying): the trained induction head's OV
    circuit sends every vocabulary token to itself first (measured 1.0, seed 0; its copying
    eigenvalue score says the same)."""
    model, tok = induction_final.model, induction_final.tokenizer
    ids = word_ids(tok)
    promoted, _ = maps.relation_scores(model, ids, ids, 1)
    tokens = catalogue.repeated_tokens(ids, n_sequences=16, half=23, bos=tok.bos_token_id)
    top = int(catalogue.pattern_scores(model, tokens)["induction"][1].argmax())
    assert float(promoted[1, top]) > 0.9
    assert float(promoted[0].max()) < 0.5  # layer 0's heads do not copy


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "no relations"),
        (['{"relation": "a", "pairs": [["x", "y"]]}', "{oops"], ":2: not valid JSON"),
        (['["x"]'], ":1: expected a JSON object"),
        (['{"relation": "a", "pairs": [["x", "y"]], "top": 3}'], ":1: unknown field 'top'"),
        (['{"pairs": [["x", "y"]]}'], ":1: field 'relation' must be a name"),
        (['{"relation": "a", "pairs": []}'], ":1: field 'pairs' must be a non-empty list"),
        (['{"relation": "a", "pairs": [["x", 3]]}'], ":1: pairs[0] must be [source, target]"),
        (['{"relation": "a", "pairs": [["x", "y"]], "k": 0}'], ":1: field 'k' must be"),
        (['{"relation": "a", "pairs": [["x", "y"]], "k": true}'], ":1: field 'k' must be"),
        (
            ['{"relation": "a", "pairs": [["x", "y"]]}'] * 2,
            "relation 'a' is named on more than one line",
        ),
    ],
)
def test_bad_relation_files_are_one_sentence(tmp_path: Path, lines: list[str], message: str):
    path = tmp_path / "relations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput) as err:
        maps.read_relations(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_catalogue_command_scores_relations(induction_dir, induction_final, tmp_path, capsys):
    """`--relations`: each relation's promoted and suppressed scores per head, the pairs it
    used in the catalogue's params (a two-token pair left out); a relation none of whose pairs
    the tokenizer reads as one token each is exit 2 and stores nothing."""
    tok = induction_final.tokenizer
    words = [tok.decode([i]) for i in word_ids(tok)[:6]]
    path = tmp_path / "relations.jsonl"
    pairs = [[w, w] for w in words] + [[f"{words[0]} {words[1]}", words[2]]]
    path.write_text(json.dumps({"relation": "copying", "pairs": pairs, "k": 1}) + "\n")
    db = tmp_path / "w.duckdb"
    argv = ["run", "catalogue", "--model", str(induction_dir), "--db", str(db)]
    assert cli([*argv, "--sequences", "2", "--relations", str(path)]) == 0
    rows = query(db, "SELECT score, count(*) AS n FROM head_catalogue GROUP BY ALL")
    counts = {r["score"]: r["n"] for r in rows}
    assert counts["maps:copying"] == counts["maps_suppression:copying"] == 8
    (params,) = query(db, "SELECT params FROM catalogues")
    (relation,) = json.loads(params["params"])["relations"]
    assert (relation["name"], relation["pairs"], relation["used"]) == ("copying", 7, 6)
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in words]
    promoted, _ = maps.relation_scores(induction_final.model, ids, ids, 1)
    for r in query(
        db, "SELECT layer, head, value FROM head_catalogue WHERE score = 'maps:copying'"
    ):
        assert r["value"] == pytest.approx(float(promoted[r["layer"], r["head"]]))
    unusable = tmp_path / "unusable.jsonl"
    unusable.write_text('{"relation": "long", "pairs": [["a b c d", "e f g h"]]}\n')
    other = tmp_path / "other.duckdb"
    capsys.readouterr()
    assert cli([*argv[:-1], str(other), "--relations", str(unusable)]) == 2
    assert "relation 'long': none of its 1 pairs is one token" in capsys.readouterr().err
    if other.exists():
        assert query(other, "SELECT count(*) AS n FROM catalogues")[0]["n"] == 0
