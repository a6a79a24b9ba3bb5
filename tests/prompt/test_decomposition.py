"""ALTI and GlobEnc (`workbench.prompt.decomposition`) against an independent computation.

No reference implementation of either paper installs from PyPI (the authors' code is research
repositories; Inseq 0.7.1 has value zeroing but neither method), so the reference here takes
another route to each source's term: the layer is run with the value vector of every position
but one zeroed (in a batch, one copy of the prompt per source), so the attention's output at
position i is A[i, j] v_j W_O plus the output bias, measured from the model's own forward pass,
not from the per-source einsum the module computes. On the tiny GPT-2, Llama (grouped-query
attention) and GPT-NeoX (parallel attention and MLP) that forward pass is the Hugging Face
model's, through PyTorch hooks on its value projection, its attention module and its blocks;
on the zoo's induction model and on random models with each normalisation (no Hugging Face
original) it is TransformerLens's, through a hook on `hook_v`. The two methods' formulas are
then applied to those terms in float64 and rolled out as a product of matrices.

Exact properties are checked too: the terms and the output bias sum to the block's output and,
through the linearised normalisation, to the norm's `hook_normalized`; rows are non-negative,
zero above the diagonal and sum to 1 (or, for an ALTI row with no contribution, are zero); the
rollout of identity layers is the identity; the result does not depend on the chunking or on
whether grouped values are expanded per query head. On the trained induction model both
methods find the induction head's source: the token after the earlier copy."""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.conftest import NORMALISATIONS
from workbench.core import Hook
from workbench.errors import BadInput
from workbench.prompt import decomposition as dec
from workbench.prompt.decomposition import Decomposition, alti, globenc, rollout

N_TOKENS = 12
METHODS = {"alti": alti, "globenc": globenc}
TOLERANCE = 1e-5  # shares, float32 decomposition against the float64 reference (measured <= 1.3e-6)


def _random_ids(n: int = N_TOKENS, seed: int = 0, vocab: int = 97) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_tl(tiny_hf_dirs) -> dict[str, object]:
    from workbench.models import load_checkpoint, resolve_checkpoints

    kinds = ("gpt2", "llama", "gpt_neox")
    return {k: load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs[k]))[-1]).model for k in kinds}


@pytest.fixture(scope="module")
def tiny_hf(tiny_hf_dirs) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    models = {}
    for kind in ("gpt2", "llama", "gpt_neox"):
        model = AutoModelForCausalLM.from_pretrained(
            str(tiny_hf_dirs[kind]), dtype=torch.float32, attn_implementation="eager"
        )
        models[kind] = model.eval()
    return models


# the reference: each source's term from forward passes with the other values zeroed ------------

Captured = dict[str, torch.Tensor]  # per layer: x, each, none, all, out, mlp


def _keep_only(n: int) -> torch.Tensor:
    """[n + 2, n]: copy j < n keeps position j's value only, copy n none, copy n + 1 all."""
    mask = torch.zeros(n + 2, n, dtype=torch.float64)
    mask[torch.arange(n), torch.arange(n)] = 1
    mask[n + 1] = 1
    return mask


def _split(n: int, attn: torch.Tensor, **rest: torch.Tensor) -> Captured:
    """The batch's captured tensors as one layer's reference inputs, in float64."""
    attn = attn.double()
    captured = {"each": attn[:n], "none": attn[n], "all": attn[n + 1]}
    captured |= {k: v[n + 1].double() for k, v in rest.items()}
    return captured


def _hf_modules(hf, kind: str, layer: int):
    """(block, value projection, attention, mlp) of a Hugging Face model's layer."""
    if kind == "gpt2":
        block = hf.transformer.h[layer]
        return block, block.attn.c_attn, block.attn, block.mlp
    if kind == "llama":
        block = hf.model.layers[layer]
        return block, block.self_attn.v_proj, block.self_attn, block.mlp
    block = hf.gpt_neox.layers[layer]
    return block, block.attention.query_key_value, block.attention, block.mlp


def _zero_values(kind: str, n_heads: int, mask: torch.Tensor) -> Callable:
    """A forward hook on the value projection keeping, in batch row b, the values of the
    positions where mask[b] is 1 (every value element: bias included)."""

    def hook(module, args, out):
        keep = mask.to(out.dtype)[:, :, None]
        if kind == "gpt2":  # [b, pos, 3 d]: q, k, v
            d = out.shape[-1] // 3
            return torch.cat([out[..., : 2 * d], out[..., 2 * d :] * keep], -1)
        if kind == "llama":  # [b, pos, kv heads x d_head]
            return out * keep
        # GPT-NeoX: [b, pos, heads x (q, k, v)], each head's q, k, v side by side
        per_head = out.view(*out.shape[:2], n_heads, -1)
        hs = per_head.shape[-1] // 3
        v = per_head[..., 2 * hs :] * keep[..., None]
        return torch.cat([per_head[..., : 2 * hs], v], -1).view(out.shape)

    return hook


def _saver(seen: dict[str, torch.Tensor], name: str) -> Callable:
    """A PyTorch forward hook storing the module's output (a tuple's first) in seen[name]."""

    def hook(module, args, out):
        seen[name] = out[0] if isinstance(out, tuple) else out

    return hook


def _tl_saver(seen: dict[str, torch.Tensor], name: str) -> Callable:
    """A TransformerLens hook storing its activation in seen[name]."""

    def hook(activation, hook):
        seen[name] = activation.clone()

    return hook


@torch.no_grad()
def _hf_layer(hf, kind: str, ids: list[int], layer: int) -> Captured:
    n = len(ids)
    mask = _keep_only(n)
    block, value, attention, mlp = _hf_modules(hf, kind, layer)
    seen: dict[str, torch.Tensor] = {}

    def save_input(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handles = [
        value.register_forward_hook(_zero_values(kind, hf.config.num_attention_heads, mask)),
        attention.register_forward_hook(_saver(seen, "attn")),
        mlp.register_forward_hook(_saver(seen, "mlp")),
        block.register_forward_hook(_saver(seen, "out")),
        block.register_forward_pre_hook(save_input, with_kwargs=True),
    ]
    try:
        hf(torch.tensor([ids] * (n + 2)))
    finally:
        for handle in handles:
            handle.remove()
    return _split(n, **seen)


def _hf_reference(hf, kind: str, ids: list[int]) -> list[Captured]:
    return [_hf_layer(hf, kind, ids, layer) for layer in range(hf.config.num_hidden_layers)]


@torch.no_grad()
def _tl_layer(model, ids: list[int], layer: int) -> Captured:
    """The same route through TransformerLens's forward pass (`hook_v` zeroed)."""
    n = len(ids)
    mask = _keep_only(n)
    seen: dict[str, torch.Tensor] = {}

    def zero(v, hook):
        return v * mask.to(v.dtype)[:, :, None, None]

    hooks = [(Hook.qkv(layer, "v"), zero), (Hook.attn_out(layer), _tl_saver(seen, "attn"))]
    hooks += [(Hook.resid_pre(layer), _tl_saver(seen, "x"))]
    hooks += [(Hook.resid_post(layer), _tl_saver(seen, "out"))]
    if not model.cfg.attn_only:
        hooks.append((Hook.mlp_out(layer), _tl_saver(seen, "mlp")))
    model.run_with_hooks(torch.tensor([ids] * (n + 2)), fwd_hooks=hooks)
    return _split(n, **seen)


def _tl_reference(model, ids: list[int]) -> list[Captured]:
    return [_tl_layer(model, ids, layer) for layer in range(model.cfg.n_layers)]


def _reference(
    captured: list[Captured],
    method: str,
    output: str,
    *,
    centre: bool,
    eps: float | None,
    parallel: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """([layer, pos, pos], [layer, pos]): the method's row-normalised matrices from the
    captured terms, in float64, and the last row of their product after each layer; `eps`
    None: no normalisation."""
    matrices = []
    for c in captured:
        n = c["x"].shape[0]
        terms = (c["each"] - c["none"][None]).transpose(0, 1).clone()  # [i, j, d]
        terms[torch.ones(n, n).triu(1).bool()] = 0  # causal: sources after i give nothing
        diagonal = c["x"] + (c["mlp"] if output == "layer" and parallel else 0)
        terms[torch.arange(n), torch.arange(n)] += diagonal
        y = c["x"] + c["all"] if output == "attention" else c["out"]
        if centre:
            terms = terms - terms.mean(-1, keepdim=True)
            y = y - y.mean(-1, keepdim=True)
        if eps is not None:
            scale = (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()
            terms, y = terms / scale[:, None], y / scale
        if method == "alti":
            raw = (y.abs().sum(-1)[:, None] - (y[:, None] - terms).abs().sum(-1)).clamp(min=0)
        else:
            raw = terms.norm(dim=-1)
        raw = raw * torch.ones(n, n, dtype=raw.dtype).tril()
        total = raw.sum(-1, keepdim=True)  # 0: no term is measured to contribute (a zero row)
        matrices.append(torch.where(total > 0, raw / total.clamp(min=1e-300), 0).numpy())
    acc = np.eye(matrices[0].shape[0])
    rows = []
    for m in matrices:
        acc = m @ acc
        rows.append(acc[-1].copy())
    return np.stack(matrices), np.stack(rows)


def _hf_eps(hf) -> float:
    cfg = hf.config
    for name in ("layer_norm_epsilon", "rms_norm_eps", "layer_norm_eps"):
        if hasattr(cfg, name):
            return float(getattr(cfg, name))
    raise AssertionError("no epsilon in the config")


def _compare(got: Decomposition, want: tuple[np.ndarray, np.ndarray], measured, name: str):
    layers, rows = want
    assert got.layers.dtype == torch.float32 and got.layers.device.type == "cpu"
    assert got.layers.shape == layers.shape and got.rollout.shape == rows.shape
    layer_gap = float(np.abs(got.layers.double().numpy() - layers).max())
    rollout_gap = float(np.abs(got.rollout.double().numpy() - rows).max())
    measured(f"{name} layers max gap", layer_gap)
    measured(f"{name} rollout max gap", rollout_gap)
    assert layer_gap <= TOLERANCE and rollout_gap <= TOLERANCE, (layer_gap, rollout_gap)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox"])
@pytest.mark.parametrize("method", ["alti", "globenc"])
@pytest.mark.parametrize("output", ["attention", "layer"])
def test_equals_the_hugging_face_models_value_zeroing_route(
    tiny_tl, tiny_hf, kind, method, output, measured
):
    """Float32 decomposition against the float64 reference: reduction order matters."""
    ids = _random_ids()
    captured = _hf_reference(tiny_hf[kind], kind, ids)
    want = _reference(
        captured,
        method,
        output,
        centre=kind != "llama",
        eps=_hf_eps(tiny_hf[kind]),
        parallel=kind == "gpt_neox",
    )
    got = METHODS[method](tiny_tl[kind], ids, output=output)
    assert (got.method, got.output) == (method, output)
    _compare(got, want, measured, f"{kind} {method} {output}")


@pytest.mark.parametrize("method", ["alti", "globenc"])
def test_equals_transformer_lens_value_zeroing_on_the_induction_model(
    induction_final, induction_task, method, measured
):
    """The zoo's induction model (attention only, LayerNorm, trained: marked numerics)."""
    model = induction_final.model
    ids = list(induction_task.pairs[3].clean_tokens)
    want = _reference(
        _tl_reference(model, ids),
        method,
        "attention",
        centre=True,
        eps=model.cfg.eps,
        parallel=False,
    )
    _compare(METHODS[method](model, ids), want, measured, f"induction {method}")


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["alti", "globenc"])
def test_the_induction_layer_draws_on_the_token_after_the_earlier_copy(
    induction_final, induction_task, method, measured
):
    """At the zoo model's last layer (its induction head), the last position's largest source
    other than itself is the token after the earlier occurrence of the last token, in every
    prompt of the task (a trained model's behaviour: the margin is recorded)."""
    model = induction_final.model
    margins = []
    for pair in induction_task.pairs:
        ids = list(pair.clean_tokens)
        target = 1 + max(p for p in range(len(ids) - 1) if ids[p] == ids[-1])
        row = METHODS[method](model, ids).layers[-1, -1].clone()
        row[-1] = 0
        assert int(row.argmax()) == target, (ids, row)
        others = row.clone()
        others[target] = 0
        margins.append(float(row[target] - others.max()))
    assert min(measured(f"induction {method} margin", min(margins)), 1.0) > 0.02


@pytest.mark.numerics
@pytest.mark.parametrize("norm", NORMALISATIONS)
@pytest.mark.parametrize("output", ["attention", "layer"])
def test_equals_value_zeroing_with_every_normalisation(norm_dirs, norm, output, measured):
    """Random zoo-format models with MLPs and each normalisation TransformerLens supports
    (LayerNorm and RMSNorm folded at loading, or none)."""
    from workbench.models import load_checkpoint, resolve_checkpoints

    model = load_checkpoint(resolve_checkpoints(str(norm_dirs[norm]))[-1]).model
    ids = _random_ids(10, seed=3, vocab=model.cfg.d_vocab)
    captured = _tl_reference(model, ids)
    for method in METHODS:
        want = _reference(
            captured,
            method,
            output,
            centre=norm in ("LN", "LNPre"),
            eps=None if norm is None else model.cfg.eps,
            parallel=False,
        )
        got = METHODS[method](model, ids, output=output)
        _compare(got, want, measured, f"norm {norm} {method} {output}")


# exact properties ----------------------------------------------------------------------------


KINDS = ["gpt2", "llama", "gpt_neox", pytest.param("induction", marks=pytest.mark.numerics)]


def _model(request: pytest.FixtureRequest, tiny_tl, kind: str):
    """A tiny Hugging Face model, or the zoo's trained induction model (only when asked for:
    a test of the tiny models alone does not depend on a training run)."""
    if kind == "induction":
        return request.getfixturevalue("induction_final").model
    return tiny_tl[kind]


def _reader(cfg, layer: int) -> str:
    """The norm that reads a sequential block's `resid_mid`: the MLP's, or in an
    attention-only model the next block's attention's, or the final norm's."""
    if not cfg.attn_only:
        return f"blocks.{layer}.ln2.hook_normalized"
    if layer + 1 < cfg.n_layers:
        return f"blocks.{layer + 1}.ln1.hook_normalized"
    return "ln_final.hook_normalized"


@pytest.mark.parametrize("kind", KINDS)
def test_terms_sum_to_the_output_and_through_the_norm_to_hook_normalized(request, tiny_tl, kind):
    """Σ_j T_i(x_j) + b_O is the block's output (`resid_mid`, or resid_pre + attn_out in a
    parallel block); at output "layer" plus the MLP's output (sequential) it is `resid_post`.
    Through the linearised normalisation, the output is what the norm reading it computes
    (`hook_normalized` of LN2, or of the next block's LN1 / the final norm)."""
    model = _model(request, tiny_tl, kind)
    cfg = model.cfg
    ids = _random_ids(20, seed=1, vocab=model.cfg.d_vocab)
    n = len(ids)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]))
    for layer in range(cfg.n_layers):
        b_o = model.b_O[layer].detach().float()
        terms, y = dec.source_terms(model, cache, layer, range(n), "attention")
        assert terms.dtype == torch.float32 and terms.shape == (n, n, cfg.d_model)
        assert (terms[torch.ones(n, n).triu(1).bool()] == 0).all()
        block = cache[Hook.resid_pre(layer)][0] + cache[Hook.attn_out(layer)][0]
        torch.testing.assert_close(y, block.float(), rtol=0, atol=0)
        torch.testing.assert_close(terms.sum(1) + b_o, y, rtol=1e-5, atol=1e-5)
        normed_terms, normed = dec.normalise(model, terms, y)
        torch.testing.assert_close(normed_terms.sum(1) + dec.normalise(
            model, b_o.expand(n, 1, -1), y)[0][:, 0], normed, rtol=1e-5, atol=1e-5)  # fmt: skip
        if not cfg.parallel_attn_mlp:
            reader = _reader(cfg, layer)
            torch.testing.assert_close(normed, cache[reader][0].float(), rtol=1e-5, atol=1e-5)
        if cfg.attn_only:
            continue
        terms, y = dec.source_terms(model, cache, layer, range(n), "layer")
        torch.testing.assert_close(y, cache[Hook.resid_post(layer)][0].float(), rtol=0, atol=0)
        rest = b_o + (0 if cfg.parallel_attn_mlp else cache[Hook.mlp_out(layer)][0].float())
        torch.testing.assert_close(terms.sum(1) + rest, y, rtol=1e-5, atol=1e-5)
        nxt = f"blocks.{layer + 1}.ln1" if layer + 1 < cfg.n_layers else "ln_final"
        normed = dec.normalise(model, terms, y)[1]
        torch.testing.assert_close(
            normed, cache[f"{nxt}.hook_normalized"][0].float(), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["alti", "globenc"])
def test_rows_are_shares_and_the_rollout_is_their_product(request, tiny_tl, kind, method):
    model = _model(request, tiny_tl, kind)
    ids = _random_ids(20, seed=1, vocab=model.cfg.d_vocab)
    n = len(ids)
    outputs = ["attention"] + ([] if model.cfg.attn_only else ["layer"])
    for output in outputs:
        got = METHODS[method](model, ids, output=output)
        assert got.layers.shape == (model.cfg.n_layers, n, n)
        assert got.rollout.shape == (model.cfg.n_layers, n)
        for t in (got.layers, got.raw, got.rollout):
            assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert (got.layers >= 0).all() and (got.raw >= 0).all()
        assert (got.layers[:, torch.ones(n, n).triu(1).bool()] == 0).all()
        _check_shares(got)
        # GlobEnc's diagonal norm is never 0; ALTI's rows here all have a contribution
        assert (got.raw.sum(-1) > 0).all()
        torch.testing.assert_close(got.rollout.sum(-1), torch.ones(model.cfg.n_layers))
        # the first position attends to itself only: its row is all self
        assert (got.layers[:, 0, 0] == 1).all()


def _check_shares(got: Decomposition) -> None:
    """Rows are shares (sum to 1) or, where no term is measured to contribute, all zero; the
    rollout is the product of the rows."""
    sums = got.layers.sum(-1)
    full = got.raw.sum(-1) > 0
    torch.testing.assert_close(sums[full], torch.ones(int(full.sum())))
    assert (sums[~full] == 0).all()
    want = got.raw / got.raw.sum(-1, keepdim=True).clamp(min=1e-30)
    torch.testing.assert_close(got.layers, want)
    torch.testing.assert_close(got.rollout, rollout(got.layers)[:, -1].float())
    assert (got.rollout.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.numerics
def test_an_alti_row_with_no_contribution_is_zero_and_logged(norm_dirs, caplog):
    """In a random LayerNorm model at output "layer", a position's MLP output dominates it so
    that every term is farther from the output than the output's own L1 norm: ALTI's row is
    zero (not 0 / 0), the rollout loses that share, and the log says so."""
    from workbench.models import load_checkpoint, resolve_checkpoints

    model = load_checkpoint(resolve_checkpoints(str(norm_dirs["LN"]))[-1]).model
    ids = _random_ids(10, seed=3, vocab=model.cfg.d_vocab)
    with caplog.at_level("INFO", logger=dec.__name__):
        got = alti(model, ids, output="layer")
    empty = got.raw.sum(-1) == 0
    assert empty.any() and not torch.isnan(got.layers).any()
    _check_shares(got)
    assert f"alti: {int(empty.sum())} of {empty.numel()} rows have no term" in caplog.text
    assert not torch.isnan(globenc(model, ids, output="layer").layers).any()


def test_rollout_of_identity_layers_is_the_identity_and_otherwise_a_product():
    eye = torch.eye(7).expand(3, 7, 7)
    assert torch.equal(rollout(eye), eye.double())
    gen = torch.Generator().manual_seed(0)
    layers = torch.rand(4, 7, 7, generator=gen).tril()
    layers = layers / layers.sum(-1, keepdim=True)
    want = np.eye(7)
    for layer, got in zip(layers.double().numpy(), rollout(layers).numpy(), strict=True):
        want = layer @ want
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got.sum(-1), 1, atol=1e-12)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["alti", "globenc"])
def test_chunks_of_query_positions_give_the_same_result(tiny_tl, monkeypatch, method):
    """Llama (grouped-query attention) in one chunk and in chunks of 3 query positions."""
    model = tiny_tl["llama"]
    ids = _random_ids(40, seed=2)
    whole = METHODS[method](model, ids, output="layer")
    monkeypatch.setattr(dec, "CHUNK_ELEMENTS", 3 * len(ids) * model.cfg.d_model)
    chunked = METHODS[method](model, ids, output="layer")
    torch.testing.assert_close(chunked.layers, whole.layers, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.rollout, whole.rollout, rtol=1e-5, atol=1e-6)


def test_grouped_values_give_what_ungrouped_values_give(tiny_tl):
    """The workbench ungroups grouped-query attention (one value per query head); a model whose
    `hook_v` holds one value per key/value head decomposes the same."""
    import copy

    ungrouped = tiny_tl["llama"]
    grouped = copy.deepcopy(ungrouped)
    grouped.cfg.ungroup_grouped_query_attention = False
    ids = _random_ids()
    with torch.no_grad():
        _, cache = grouped.run_with_cache(torch.tensor([ids]))
    assert cache[Hook.qkv(0, "v")].shape[2] == grouped.cfg.n_key_value_heads < grouped.cfg.n_heads
    for method in METHODS.values():
        want, got = method(ungrouped, ids, output="layer"), method(grouped, ids, output="layer")
        torch.testing.assert_close(got.layers, want.layers, rtol=1e-5, atol=1e-6)


def test_globenc_rows_ignore_a_sequential_mlp_but_altis_do_not(tiny_tl):
    """In a sequential block the MLP's output changes GlobEnc's terms only by the common scale
    (its rows at "layer" equal those at "attention"); ALTI compares the terms with the output,
    MLP included, so its rows change."""
    model = tiny_tl["gpt2"]
    ids = _random_ids()
    at_block = globenc(model, ids, output="attention")
    at_layer = globenc(model, ids, output="layer")
    torch.testing.assert_close(at_layer.layers, at_block.layers, rtol=1e-5, atol=1e-6)
    gap = (alti(model, ids, output="layer").layers - alti(model, ids).layers).abs().max()
    assert gap > 1e-3


def _small(**cfg) -> object:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    """A random one-layer TransformerLens model with `cfg` on top of a small configuration."""
    base = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_head": 8, "d_vocab": 11, "n_ctx": 8}
    base |= {"act_fn": "gelu", "seed": 0}
    return HookedTransformer(HookedTransformerConfig(**(base | cfg)))


def test_bad_input_is_one_sentence(tiny_tl):
    model = tiny_tl["gpt2"]
    attn_only = _small(attn_only=True, normalization_type="LN")
    cases = [
        (model, [], {}, "the prompt has no tokens"),
        (model, [1] * 65, {}, "the prompt is 65 tokens, more than the model's context of 64"),
        (model, [1, 97], {}, "token id 97 is outside the model's vocabulary of 97"),
        (model, [1, 2], {"output": "mlp"}, "output 'mlp': must be one of attention, layer"),
        (attn_only, [1, 2], {"output": "layer"}, 'output "layer" needs MLPs'),
    ]
    for m, ids, kwargs, message in cases:
        for method in METHODS.values():
            with pytest.raises(BadInput) as err:
                method(m, ids, **kwargs)
            assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_model_that_normalises_attention_outputs_is_bad_input():
    model = _small(normalization_type="RMS", use_normalization_before_and_after=True)
    for method in METHODS.values():
        with pytest.raises(BadInput, match="not a sum of one term per source position"):
            method(model, [1, 2, 3])
