"""`workbench.prompt.lrp`: AttnLRP against lxt 2.1 and against exact properties of its rules,
and the gradient-weighted relevance rollout against an independent computation.

* lxt 2.1 (tests/prompt/data/lxt/, written by tools/lxt_fixture.py from the models of
  `tests.prompt.lxt_weights`): the token, positional and per-layer relevances of two targets
  on a tiny GPT-2 (biases, learned positions, GELU) and a tiny Llama (RMSNorm, rotary,
  grouped-query attention, SiLU-gated MLP), loaded here by the workbench's own loader. The
  deviation allowed is `LXT_TOL` times the largest |token relevance| of lxt's run (relative to
  that scale, absolute per entry). Conventions agree without conversion: lxt's relevance of
  `inputs_embeds` is ours of `hook_embed` (the workbench's centred W_E changes no relevance,
  since every gradient reaching the residual stream is orthogonal to the all-ones direction),
  lxt's of `transformer.wpe`'s output is our `positional`, and its relevances of each decoder
  block's input and of the last block's output are our `layers`.
* Exact identities, up to float rounding:
  - the final norm (its scale held constant) and the unembedding pass on the logit less its
    bias: `layers[-1].sum() == value - b_U[target]` (any model; absolute 1e-4);
  - `tokens + positional == layers[0]`: the embeddings add up to resid_pre 0 (absolute 1e-5);
  - with every bias zero and attention writing nothing (W_O = 0), every layer's resid_pre and
    the tokens carry exactly the logit: the identity rule makes GELU / SiLU linear at the
    input, the uniform rule halves the doubled relevance of the gated product, norms are
    linear at the input, so every map is degree-1 homogeneous (Euler; `CONSERVED_TOL` times
    |logit| + Σ |token relevance|);
  - attention (one layer, no biases): the input keeps the logit less half the attention's
    direct contribution (the uniform rule gives v half of A·v) plus half the softmax input's
    relevance Σ S ⊙ ∂logit/∂S (the uniform rule on q·kᵀ after A's half), computed here by
    plain autograd on a forward pass written out in the test (absolute 1e-5).
* The zoo's trained induction model (attention-only, LayerNorm, biases): AttnLRP and the rollout
  against a forward pass written out here from the model's weights, with the rules as
  `torch.autograd.Function`s (not hooks), and the rollout's product computed in NumPy; the
  same on an untrained attention-only model with random biases and norm weights. Relevances to
  1e-5 of the largest |token relevance|, rollout rows to 1e-4 relative.
* GPT-NeoX (parallel attention, partial rotary) runs and keeps the exact identities; features
  without a rule (SoLU's inner LayerNorm, ALiBi, soft-capped scores) are a BadInput.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tests.prompt import lxt_weights as lw
from workbench.errors import BadInput
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.prompt.lrp import attn_lrp, relevance_rollout, rollout_matrices

DATA = Path(__file__).resolve().parent / "data" / "lxt"
LXT_TOL = 1e-4  # relative to the largest |token relevance| of lxt's run
CONSERVED_TOL = 1e-5
KINDS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HookedTransformer]:
    """The fixture's two models, written from their seeds and loaded by the workbench."""
    root = tmp_path_factory.mktemp("lxt-models")
    out = {}
    for kind in KINDS:
        directory = lw.write_model(kind, root / kind)
        out[kind] = load_checkpoint(resolve_checkpoints(str(directory))[-1]).model
    return out


def _fixture(kind: str) -> dict[str, np.ndarray]:
    with np.load(DATA / f"{kind}.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("kind", KINDS)
def test_models_are_the_ones_lxt_explained(tiny, kind):
    """The same prompt, and the same logits to float rounding: the workbench's conversion of
    the seeded weights is the model lxt ran."""
    ref = _fixture(kind)
    assert ref["input_ids"].tolist() == lw.prompt()
    with torch.no_grad():
        logits = tiny[kind](torch.tensor([lw.prompt()]))[0].numpy()
    assert np.abs(logits - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_matches_lxt(tiny, kind, measured):
    ref = _fixture(kind)
    for i, target in enumerate(ref["targets"].tolist()):
        result = attn_lrp(tiny[kind], lw.prompt(), target)
        scale = float(np.abs(ref["tokens"][i]).max())
        assert result.value == pytest.approx(float(ref["value"][i]), abs=1e-4)
        compared = [(result.tokens, ref["tokens"][i]), (result.layers, ref["layers"][i])]
        if kind == "gpt2":
            assert result.positional is not None
            compared.append((result.positional, ref["positional"][i]))
        else:
            assert result.positional is None
        for ours, theirs in compared:
            assert ours.dtype == torch.float32 and ours.shape == theirs.shape
            gap = float(np.abs(ours.numpy() - theirs).max()) / scale
            assert measured(f"lxt_{kind}_relative_gap", gap) <= LXT_TOL


@pytest.mark.parametrize("kind", KINDS)
def test_final_norm_and_unembedding_conserve(tiny, kind):
    model = tiny[kind]
    for target in _fixture(kind)["targets"].tolist():
        result = attn_lrp(model, lw.prompt(), target)
        expected = result.value - float(model.b_U[target].detach())
        assert float(result.layers[-1].sum()) == pytest.approx(expected, abs=1e-4)
        embedded = result.tokens + (0 if result.positional is None else result.positional)
        torch.testing.assert_close(embedded, result.layers[0], rtol=0, atol=1e-5)


def test_parallel_attention_and_partial_rotary(tiny_hf_dirs):
    """GPT-NeoX (attention and MLP in parallel, rotary on part of each head): the exact
    identities hold and the rollout row is a distribution."""
    model = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs["gpt_neox"]))[-1]).model
    assert model.cfg.parallel_attn_mlp
    ids = [5, 17, 3, 5, 17, 40, 2]
    result = attn_lrp(model, ids, 3)
    assert result.positional is None
    torch.testing.assert_close(result.tokens, result.layers[0], rtol=0, atol=1e-6)
    expected = result.value - float(model.b_U[3].detach())
    assert float(result.layers[-1].sum()) == pytest.approx(expected, abs=1e-4)
    assert float(relevance_rollout(model, ids, 3).sum()) == pytest.approx(1.0, abs=1e-6)


def _mlp_only(kind: str) -> HookedTransformer:
    """A random bias-free model whose attention writes nothing (W_O = 0), with random norm
    weights: LayerNorm + GELU + learned positions, or RMSNorm + SiLU-gated MLP + rotary +
    grouped-query attention."""
    common = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32,
              "d_vocab": 23, "n_ctx": 16, "seed": 0}  # fmt: skip
    if kind == "ln_gelu":
        cfg = HookedTransformerConfig(**common, act_fn="gelu", normalization_type="LN")
    else:
        cfg = HookedTransformerConfig(
            **common, act_fn="silu", gated_mlp=True, normalization_type="RMS",
            positional_embedding_type="rotary", n_key_value_heads=1,
        )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf.startswith("b") or leaf == "W_O":
                param.zero_()
            elif leaf == "w":  # norm weights
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("kind", ["ln_gelu", "rms_gated"])
def test_bias_free_mlps_conserve_the_logit(kind):
    model = _mlp_only(kind)
    ids = [3, 7, 1, 19, 4, 11, 2]
    for target in (5, 17):
        result = attn_lrp(model, ids, target)
        size = abs(result.value) + float(result.tokens.abs().sum())
        for layer_sum in result.layers.sum(-1).tolist():
            assert layer_sum == pytest.approx(result.value, abs=CONSERVED_TOL * size)
        total = result.tokens.sum() + (0 if result.positional is None else result.positional.sum())
        assert float(total) == pytest.approx(result.value, abs=CONSERVED_TOL * size)


def test_attention_keeps_half_of_v_and_half_of_the_softmax_input():
    """One attention layer, no biases, RMSNorm: relevance at resid_pre 0 is
    logit − ½ DLA + ½ Σ S ⊙ ∂logit/∂S, every term computed here by a forward pass written out
    and plain autograd (the final norm's scale held constant, as the rules hold it)."""
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=23, n_ctx=16, attn_only=True,
        normalization_type="RMS", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1].startswith("b"):
                param.zero_()
            else:
                param.copy_((1 if name.endswith(".w") else 0) + 0.5 * torch.randn(
                    param.shape, generator=generator))  # fmt: skip
    ids, target = [4, 9, 2, 2, 17, 6], 11
    result = attn_lrp(model, ids, target)

    attn = model.blocks[0].attn
    x = (model.W_E[ids] + model.W_pos[: len(ids)]).detach()

    def rms(t: torch.Tensor) -> torch.Tensor:
        return (t.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()

    h = x / rms(x) * model.blocks[0].ln1.w
    q = torch.einsum("pd,hde->hpe", h, attn.W_Q)
    k = torch.einsum("pd,hde->hpe", h, attn.W_K)
    v = torch.einsum("pd,hde->hpe", h, attn.W_V)
    scores = (q @ k.transpose(-1, -2) / attn.attn_scale).detach().requires_grad_(True)
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = torch.einsum("hpe,hed->pd", pattern @ v, attn.W_O)
    final = x + out
    direction = model.ln_final.w * model.W_U[:, target]
    scale = rms(final).detach()
    logit = (final[-1] / scale[-1]) @ direction
    (grad_scores,) = torch.autograd.grad(logit, scores)
    dla = float(((out[-1] / scale[-1]) @ direction).detach())
    softmax_input = float((scores.detach() * grad_scores)[:, causal].sum())
    value = float(logit.detach())
    assert result.value == pytest.approx(value, abs=1e-5)
    expected = value - dla / 2 + softmax_input / 2
    assert float(result.layers[0].sum()) == pytest.approx(expected, abs=1e-5)


# --- an attention-only LayerNorm model written out, the rules as autograd Functions ---------


class _Scaled(torch.autograd.Function):
    """The identity, its gradient times a factor."""

    @staticmethod
    def forward(ctx, x, factor):  # type: ignore[no-untyped-def]
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad * ctx.factor, None


def _written_out(model: HookedTransformer, ids: list[int], target: int, *, rules: bool):
    """The target's logit of an attention-only model loaded by the workbench (LayerNorm folded:
    `LNPre`), from its weights; with `rules`, the norm scales constant and q, k, v's gradients
    scaled by ¼, ¼, ½. Returns the logit, the embedding leaves, the residual streams and the
    patterns."""
    cfg = model.cfg
    n = len(ids)
    embed = model.W_E[ids].detach().clone().requires_grad_(True)
    pos = model.W_pos[:n].detach().clone().requires_grad_(True)
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    def norm(t: torch.Tensor) -> torch.Tensor:
        t = t - t.mean(-1, keepdim=True)
        scale = (t.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
        return t / (scale.detach() if rules else scale)

    def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
        return _Scaled.apply(t, factor) if rules else t

    resid, streams, patterns = embed + pos, [], []
    for block in model.blocks:
        streams.append(resid)
        attn = block.attn
        h = norm(resid)
        q = scaled(torch.einsum("pd,hde->hpe", h, attn.W_Q) + attn.b_Q[:, None], 0.25)
        k = scaled(torch.einsum("pd,hde->hpe", h, attn.W_K) + attn.b_K[:, None], 0.25)
        v = scaled(torch.einsum("pd,hde->hpe", h, attn.W_V) + attn.b_V[:, None], 0.5)
        scores = (q @ k.transpose(-1, -2) / attn.attn_scale).masked_fill(~causal, float("-inf"))
        pattern = scores.softmax(-1)
        patterns.append(pattern)
        resid = resid + torch.einsum("hpe,hed->pd", pattern @ v, attn.W_O) + attn.b_O
    streams.append(resid)
    logit = norm(resid)[-1] @ model.W_U[:, target] + model.b_U[target]
    return logit, embed, pos, streams, patterns


def _written_out_relevance(
    model: HookedTransformer, ids: list[int], target: int
) -> tuple[float, list[torch.Tensor]]:
    """The written-out logit and input × gradient (summed over d_model) of the token and
    positional embeddings and of each residual stream, under the rules."""
    logit, embed, pos, streams, _ = _written_out(model, ids, target, rules=True)
    tensors = [embed, pos, *streams]
    grads = torch.autograd.grad(logit, tensors)
    relevance = [(t * g).sum(-1).detach() for t, g in zip(tensors, grads, strict=True)]
    return float(logit.detach()), relevance


@pytest.fixture(scope="module")
def induction_prompt(induction_final, induction_task) -> tuple[list[int], int]:
    pair = induction_task.pairs[3]
    return list(pair.clean_tokens), int(pair.answer)


def test_induction_model_against_written_out_rules(induction_final, induction_prompt):
    model = induction_final.model
    assert model.cfg.attn_only and model.cfg.normalization_type == "LNPre"
    ids, target = induction_prompt
    result = attn_lrp(model, ids, target)
    logit, relevance = _written_out_relevance(model, ids, target)
    assert result.value == pytest.approx(logit, abs=1e-4)
    scale = float(relevance[0].abs().max())
    torch.testing.assert_close(result.tokens, relevance[0], rtol=0, atol=1e-5 * scale)
    assert result.positional is not None
    torch.testing.assert_close(result.positional, relevance[1], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(result.layers, torch.stack(relevance[2:]), rtol=0, atol=1e-5 * scale)
    # the final norm and the unembedding pass on the logit less the target's bias
    assert float(result.layers[-1].sum()) == pytest.approx(
        result.value - float(model.b_U[target].detach()), abs=1e-4
    )


def _written_out_rollout(
    model: HookedTransformer, ids: list[int], target: int, *, normalise_rows: bool = True
) -> np.ndarray:
    """Chefer et al.'s rollout row from the written-out model: Ā = mean_h((∇A ⊙ R_A)⁺), R_A
    = ½ A ⊙ (AttnLRP gradient at A), ∇A the plain gradient; C = Π (I + Ā) in NumPy."""
    logit, _, _, _, patterns = _written_out(model, ids, target, rules=True)
    lrp_grads = torch.autograd.grad(logit, patterns)
    plain_logit, _, _, _, plain_patterns = _written_out(model, ids, target, rules=False)
    plain_grads = torch.autograd.grad(plain_logit, plain_patterns)
    n = len(ids)
    joint = np.eye(n)
    for a, lrp_grad, grad in zip(patterns, lrp_grads, plain_grads, strict=True):
        relevance = 0.5 * a.detach().double() * lrp_grad.double()
        bar = np.maximum((grad.double() * relevance).numpy(), 0).mean(0)
        m = np.eye(n) + bar
        if normalise_rows:
            m = m / m.sum(-1, keepdims=True)
        joint = m @ joint
    return joint[-1]


@pytest.mark.parametrize("normalise_rows", [True, False])
def test_induction_rollout_against_written_out(induction_final, induction_prompt, normalise_rows):
    model = induction_final.model
    ids, target = induction_prompt
    ours = relevance_rollout(model, ids, target, normalise_rows=normalise_rows)
    expected = _written_out_rollout(model, ids, target, normalise_rows=normalise_rows)
    assert ours.shape == (len(ids),) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-6)


def _random_attention_only(tmp_path: Path) -> HookedTransformer:
    """An untrained attention-only LayerNorm model with random biases and norm weights, saved
    as a zoo checkpoint and loaded by the workbench (folded and centred)."""
    from workbench.models.zoo_format import save_zoo_checkpoint

    cfg_kwargs = {"n_layers": 3, "d_model": 24, "n_heads": 3, "d_head": 8, "d_vocab": 29,
                  "n_ctx": 16, "attn_only": True, "normalization_type": "LN",
                  "seed": 0}  # fmt: skip
    model = HookedTransformer(HookedTransformerConfig(**cfg_kwargs))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith(".w") else 0.0
            param.copy_(base + 0.4 * torch.randn(param.shape, generator=generator))
    out = tmp_path / "random_attention"
    save_zoo_checkpoint(
        out, cfg_kwargs=cfg_kwargs, state_dict=model.state_dict(), tokenizer=None,
        meta={"task": "random", "step": 0, "seed": 0},
    )  # fmt: skip
    return load_checkpoint(resolve_checkpoints(str(out))[-1]).model


def test_random_attention_model_against_written_out(tmp_path):
    model = _random_attention_only(tmp_path)
    ids, target = [1, 5, 9, 5, 9, 12, 1, 5], 9
    result = attn_lrp(model, ids, target)
    logit, relevance = _written_out_relevance(model, ids, target)
    assert result.value == pytest.approx(logit, abs=1e-4)
    scale = float(relevance[0].abs().max())
    torch.testing.assert_close(result.tokens, relevance[0], rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(result.layers, torch.stack(relevance[2:]), rtol=0, atol=1e-5 * scale)
    for normalise_rows in (True, False):
        ours = relevance_rollout(model, ids, target, normalise_rows=normalise_rows)
        expected = _written_out_rollout(model, ids, target, normalise_rows=normalise_rows)
        np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_rollout_properties(tiny, kind):
    """Ā is non-negative and causal; each normalised factor is row-stochastic, so the row is a
    distribution over the input positions; unnormalised, every factor is I plus a non-negative
    matrix, so the last position keeps at least 1; and the row is the last row of M_2 M_1 built
    here from the matrices."""
    model = tiny[kind]
    ids, target = lw.prompt(), int(_fixture(kind)["targets"][0])
    matrices = rollout_matrices(model, ids, target)
    n = len(ids)
    assert matrices.shape == (model.cfg.n_layers, n, n)
    assert bool((matrices >= 0).all())
    assert bool((matrices.triu(1) == 0).all())  # causal: no position draws on a later one
    row = relevance_rollout(model, ids, target)
    assert bool((row >= 0).all())
    assert float(row.sum()) == pytest.approx(1.0, abs=1e-6)
    raw = relevance_rollout(model, ids, target, normalise_rows=False)
    assert float(raw[-1]) >= 1.0 and bool((raw >= 0).all())
    # two layers: the last row of M_2 M_1, by hand
    m = [torch.eye(n, dtype=torch.float64) + a.double() for a in matrices]
    m = [x / x.sum(-1, keepdim=True) for x in m]
    torch.testing.assert_close(row.double(), (m[1] @ m[0])[-1], rtol=0, atol=1e-6)


def test_deterministic_and_leaves_no_hooks(tiny):
    model = tiny["llama"]
    with torch.no_grad():  # the caller's no_grad does not stop it
        first = attn_lrp(model, lw.prompt(), 5)
    second = attn_lrp(model, lw.prompt(), 5)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.layers, second.layers)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "feature"),
    [
        ({"act_fn": "solu_ln", "d_mlp": 32}, "a normalisation inside the MLP"),
        ({"positional_embedding_type": "alibi", "attn_only": True}, "alibi positional"),
        ({"attn_scores_soft_cap": 30.0, "attn_only": True}, "soft-capped attention scores"),
    ],
)
def test_unsupported_architectures(overrides, feature):
    kwargs = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "d_vocab": 23,
              "n_ctx": 16, "act_fn": "gelu", "d_mlp": 32, **overrides}  # fmt: skip
    model = HookedTransformer(HookedTransformerConfig(**kwargs))
    with pytest.raises(BadInput, match=f"AttnLRP has no rule for {feature}"):
        attn_lrp(model, [1, 2, 3], 4)
    with pytest.raises(BadInput, match="AttnLRP has no rule for"):
        relevance_rollout(model, [1, 2, 3], 4)


def test_bad_prompts(tiny):
    model = tiny["gpt2"]
    with pytest.raises(BadInput, match="at least one token"):
        attn_lrp(model, [], 1)
    with pytest.raises(BadInput, match="token ids must be in"):
        attn_lrp(model, [1, 2], lw.VOCAB)
    with pytest.raises(BadInput, match="more than the context"):
        attn_lrp(model, [1] * (lw.N_CTX + 1), 1)
