"""Node-level activation patching against `transformer_lens.patching` on the same model and
prompts, and against direct interventions where TransformerLens has no matching function."""

import pytest
import torch
from transformer_lens import ActivationCache, patching

from workbench.attribution.batches import logit_diff, make_batches
from workbench.attribution.patching import patch_sweep
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tiny_hf_dirs):
    """A random GPT-2, and a random Llama whose 4 query heads share 2 key/value heads: its
    `head_k`/`head_v` scores are per query head, as TransformerLens's functions give them."""
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs[request.param]))[0])
    (batch,) = make_batches(load_task("induction", loaded, n_prompts=6))
    return loaded.model, batch


def _metric(model, batch, direction):
    with torch.no_grad():
        m_clean = logit_diff(model(batch.clean), batch.answer, batch.wrong).mean()
        m_corr = logit_diff(model(batch.corrupt), batch.answer, batch.wrong).mean()

    def metric(logits):
        m = logit_diff(logits, batch.answer, batch.wrong).mean()
        return (
            (m - m_corr) / (m_clean - m_corr)
            if direction == "denoise"
            else (m_clean - m) / (m_clean - m_corr)
        )

    return metric


@torch.no_grad()
def _tl(fn, model, batch, direction, cache=None):
    if direction == "denoise":
        _, clean_cache = model.run_with_cache(batch.clean)
        return fn(model, batch.corrupt, clean_cache, _metric(model, batch, direction))
    if cache is None:
        _, cache = model.run_with_cache(batch.corrupt)
    return fn(model, batch.clean, cache, _metric(model, batch, direction))


CASES = [
    ("resid", False, patching.get_act_patch_resid_pre, lambda s: s[:, 0, :]),
    ("attn_out", True, patching.get_act_patch_attn_out, lambda s: s[:, 0, :]),
    ("mlp_out", True, patching.get_act_patch_mlp_out, lambda s: s[:, 0, :]),
    ("head_out", True, patching.get_act_patch_attn_head_out_by_pos, lambda s: s.permute(0, 2, 1)),
    ("head_out", False, patching.get_act_patch_attn_head_out_all_pos, lambda s: s[:, :, 0]),
    ("head_q", False, patching.get_act_patch_attn_head_q_all_pos, lambda s: s[:, :, 0]),
    ("head_k", False, patching.get_act_patch_attn_head_k_all_pos, lambda s: s[:, :, 0]),
    ("head_v", False, patching.get_act_patch_attn_head_v_all_pos, lambda s: s[:, :, 0]),
    ("head_pattern", False, patching.get_act_patch_attn_head_pattern_all_pos, lambda s: s[:, :, 0]),
]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize(("component", "by_position", "tl_fn", "reshape"), CASES)
def test_matches_transformer_lens(tiny, component, by_position, tl_fn, reshape, direction):
    model, batch = tiny
    ours = patch_sweep(
        model,
        [batch],
        component=component,
        direction=direction,
        by_position=by_position,
        max_rows=20,
    )
    reference = _tl(tl_fn, model, batch, direction)
    scores = reshape(ours.scores)
    if component in ("head_k", "head_v") and model.cfg.n_key_value_heads is not None:
        # TransformerLens's loop covers the first n_key_value_heads query heads' copies only;
        # every query head's copy is checked against a direct intervention below
        scores = scores[..., : model.cfg.n_key_value_heads]
    torch.testing.assert_close(scores, reference.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("port", ["k", "v"])
@torch.no_grad()
def test_grouped_query_attention_nodes_are_per_query_head(tiny_hf_dirs, port):
    """With 4 query heads sharing 2 key/value heads, `a{L}.h{H}<k>` is query head H's own copy
    of its group's key: patching it changes that query head alone, and its score is that
    intervention's effect; patching every query head of a group is patching the group."""
    loaded = load_checkpoint(resolve_checkpoints(str(tiny_hf_dirs["llama"]))[0])
    model = loaded.model
    (batch,) = make_batches(load_task("induction", loaded, n_prompts=6))
    assert model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 4
    ours = patch_sweep(model, [batch], component=f"head_{port}", direction="denoise")
    _, clean = model.run_with_cache(batch.clean)
    metric = _metric(model, batch, "denoise")
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_{port}"
        for head in range(model.cfg.n_heads):

            def patch(act, hook, head=head):
                act[:, :, head] = clean[hook.name][:, :, head]
                return act

            logits = model.run_with_hooks(batch.corrupt, fwd_hooks=[(name, patch)])
            expected = float(metric(logits))
            assert float(ours.scores[layer, head, 0]) == pytest.approx(expected, abs=1e-4)
        # the whole group 0 (query heads 0 and 1) is TransformerLens's grouped key/value head 0
        group = model.run_with_hooks(
            batch.corrupt,
            fwd_hooks=[
                (name, lambda act, hook: torch.cat([clean[hook.name][:, :, :2], act[:, :, 2:]], 2))
            ],
        )
        grouped = _grouped_patch(tiny_hf_dirs["llama"], batch, layer, port)
        assert float(metric(group)) == pytest.approx(grouped, abs=1e-4)


def _grouped_patch(path, batch, layer, port) -> float:
    """TransformerLens's own patch of key/value head 0 of `layer` on the grouped model."""
    from transformer_lens import HookedTransformer

    from workbench.models import engine

    cfg = engine._tl_config(path)
    cfg.ungroup_grouped_query_attention = False
    grouped = HookedTransformer(cfg, move_to_device=False)
    ungrouped = load_checkpoint(resolve_checkpoints(str(path))[0]).model
    grouped.load_state_dict(ungrouped.state_dict(), strict=False)
    grouped.eval()
    with torch.no_grad():
        _, clean = grouped.run_with_cache(batch.clean)
    fn = (
        patching.get_act_patch_attn_head_k_all_pos
        if port == "k"
        else (patching.get_act_patch_attn_head_v_all_pos)
    )
    return float(fn(grouped, batch.corrupt, clean, _metric(grouped, batch, "denoise"))[layer, 0])


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_zero_and_mean_ablation_match_transformer_lens(tiny, ablation):
    model, batch = tiny
    ours = patch_sweep(model, [batch], component="head_out", direction="noise", ablation=ablation)
    _, clean_cache = model.run_with_cache(batch.clean)
    replaced = {}
    for name, act in clean_cache.items():
        replaced[name] = (
            torch.zeros_like(act)
            if ablation == "zero"
            else act.mean(0, keepdim=True).expand_as(act)
        )
    cache = ActivationCache(replaced, model)
    reference = _tl(
        patching.get_act_patch_attn_head_out_all_pos, model, batch, "noise", cache=cache
    )
    torch.testing.assert_close(ours.scores[:, :, 0], reference.float(), atol=1e-4, rtol=0)


@torch.no_grad()
def test_attn_out_all_positions_is_a_real_intervention(tiny):
    model, batch = tiny
    ours = patch_sweep(model, [batch], component="attn_out", direction="denoise")
    _, clean = model.run_with_cache(batch.clean)
    metric = _metric(model, batch, "denoise")
    for layer in range(model.cfg.n_layers):
        hook = f"blocks.{layer}.hook_attn_out"
        logits = model.run_with_hooks(
            batch.corrupt, fwd_hooks=[(hook, lambda act, hook: clean[hook.name])]
        )
        assert float(ours.scores[layer, 0, 0]) == pytest.approx(float(metric(logits)), abs=1e-4)


def test_mlp_component_on_attention_only_model_is_refused(induction_final, induction_task):
    with pytest.raises(ValueError, match="attention-only"):
        patch_sweep(
            induction_final.model,
            make_batches(induction_task),
            component="mlp_out",
            direction="noise",
        )


def test_ablation_other_than_resample_needs_noising(tiny):
    model, batch = tiny
    with pytest.raises(ValueError, match="noising only"):
        patch_sweep(model, [batch], component="head_out", direction="denoise", ablation="zero")
