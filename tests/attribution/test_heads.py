"""Head attribution against independent references: `transformer_lens.patching` for exact
patching, real interventions on the residual stream for DLA, and finite differences of real
interpolated patches for attribution patching."""

import pytest
import torch
from transformer_lens import patching

from workbench.attribution import heads
from workbench.attribution.batches import logit_diff, make_batches
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.tasks import load_task


@pytest.fixture(scope="module", params=["zoo", "gpt2", "llama", "norm-LN", "norm-RMS", "norm-None"])
def model_and_batches(request, induction_final, induction_task, tiny_hf_dirs, norm_dirs):
    """The induction zoo; random GPT-2 and Llama (grouped-query attention); random models with
    LayerNorm, RMSNorm and no normalisation at all."""
    if request.param == "zoo":
        return induction_final.model, make_batches(induction_task)
    if request.param.startswith("norm-"):
        norm = request.param.removeprefix("norm-")
        path = norm_dirs[None if norm == "None" else norm]
    else:
        path = tiny_hf_dirs[request.param]
    loaded = load_checkpoint(resolve_checkpoints(str(path))[0])
    return loaded.model, make_batches(load_task("induction", loaded, n_prompts=12))


@torch.no_grad()
def _tl_reference(model, batch, direction):
    m_clean = float(logit_diff(model(batch.clean), batch.answer, batch.wrong).mean())
    m_corr = float(logit_diff(model(batch.corrupt), batch.answer, batch.wrong).mean())
    gap = m_clean - m_corr
    if direction == "denoise":
        _, cache = model.run_with_cache(batch.clean)

        def metric(logits):
            return (logit_diff(logits, batch.answer, batch.wrong).mean() - m_corr) / gap

        return patching.get_act_patch_attn_head_out_all_pos(model, batch.corrupt, cache, metric)
    _, cache = model.run_with_cache(batch.corrupt)

    def noise_metric(logits):
        return (m_clean - logit_diff(logits, batch.answer, batch.wrong).mean()) / gap

    return patching.get_act_patch_attn_head_out_all_pos(model, batch.clean, cache, noise_metric)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_patching_matches_transformer_lens(model_and_batches, direction):
    model, batches = model_and_batches
    assert len(batches) == 1
    ours = heads.head_out_patching(
        model, batches, direction=direction, max_rows=7
    )  # forces chunking
    reference = _tl_reference(model, batches[0], direction)
    torch.testing.assert_close(ours.scores, reference.to(ours.scores.dtype), atol=1e-4, rtol=0)


def test_patching_results_do_not_depend_on_batching(induction_final, induction_task):
    model = induction_final.model
    one = heads.head_out_patching(model, make_batches(induction_task), direction="denoise")
    many = heads.head_out_patching(
        model, make_batches(induction_task, max_batch=5), direction="denoise"
    )
    torch.testing.assert_close(one.scores, many.scores, atol=1e-5, rtol=0)


@torch.no_grad()
def test_dla_equals_removing_the_head_from_the_final_residual(model_and_batches):
    """With the final normalisation's scale frozen (a model without one has nothing to freeze),
    removing a head's last-position output from the final residual stream changes the logit
    difference by exactly its DLA."""
    model, batches = model_and_batches
    batch = batches[0]
    dla = heads.direct_logit_attribution(model, batches)
    _, cache = model.run_with_cache(batch.clean)
    base = logit_diff(model(batch.clean), batch.answer, batch.wrong).mean()
    last = model.cfg.n_layers - 1
    for layer, head in [(0, 0), (last, 1), (last, model.cfg.n_heads - 1)]:
        head_out = cache["z", layer][:, -1, head] @ model.W_O[layer, head]

        def remove(resid, hook, head_out=head_out):
            resid[:, -1] -= head_out
            return resid

        def freeze_scale(scale, hook):
            return cache["ln_final.hook_scale"]

        hooks = [(f"blocks.{last}.hook_resid_post", remove)]
        if hasattr(model, "ln_final"):
            hooks.append(("ln_final.hook_scale", freeze_scale))
        logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
        change = base - logit_diff(logits, batch.answer, batch.wrong).mean()
        assert float(change) == pytest.approx(float(dla.scores[layer, head]), abs=1e-4)


def test_attribution_patching_is_the_derivative_of_a_real_patch(induction_final, induction_task):
    """attr_patch = d/dt of the metric when z moves from corrupt towards clean by t (t -> 0)."""
    model = induction_final.model
    batches = make_batches(induction_task)
    batch = batches[0]
    result = heads.attribution_patching(model, batches)
    gap = result.metric_clean - result.metric_corrupt
    _, clean = model.run_with_cache(batch.clean)
    _, corrupt = model.run_with_cache(batch.corrupt)
    eps = 1e-3
    for layer, head in [(0, 0), (1, 0), (1, 2)]:
        delta = clean["z", layer][:, :, head] - corrupt["z", layer][:, :, head]

        def nudge(z, hook, delta=delta, head=head, t=eps):
            z[:, :, head] += t * delta
            return z

        def metric(t: float, layer=layer, nudge=nudge) -> float:
            hooks = [(f"blocks.{layer}.attn.hook_z", lambda z, hook: nudge(z, hook, t=t))]
            logits = model.run_with_hooks(batch.corrupt, fwd_hooks=hooks)
            return float(logit_diff(logits.double(), batch.answer, batch.wrong).mean().detach())

        derivative = (metric(eps) - metric(-eps)) / (2 * eps) / gap
        assert derivative == pytest.approx(float(result.scores[layer, head]), abs=2e-3)


def test_attribution_edges_are_derivatives_of_real_edge_patches(induction_final, induction_task):
    """An edge score is the derivative of the metric when only the destination's input sees
    the source's output move from corrupt towards clean."""
    model = induction_final.model
    batches = make_batches(induction_task)
    batch = batches[0]
    result = heads.attribution_patching(model, batches)
    edges = {(s, d): v for s, d, v in result.edges}
    gap = result.metric_clean - result.metric_corrupt
    _, clean = model.run_with_cache(batch.clean)
    _, corrupt = model.run_with_cache(batch.corrupt)
    src_out = {
        f"a0.h{h}": (clean["z", 0][:, :, h] - corrupt["z", 0][:, :, h]) @ model.W_O[0, h]
        for h in range(model.cfg.n_heads)
    }
    best = max(
        ((s, d) for s, d in edges if s.startswith("a0") and d.endswith("<k>")),
        key=lambda e: abs(edges[e]),
    )
    for src, dst in [best, ("a0.h1", "a1.h0<q>"), ("a0.h2", "a1.h3<v>")]:
        dst_head, port = int(dst[4]), dst[-2]
        delta = src_out[src]

        def metric(t: float, delta=delta, dst_head=dst_head, port=port) -> float:
            def nudge(x, hook):
                x[:, :, dst_head] += t * delta
                return x

            model.set_use_split_qkv_input(True)
            try:
                logits = model.run_with_hooks(
                    batch.corrupt, fwd_hooks=[(f"blocks.1.hook_{port}_input", nudge)]
                )
            finally:
                model.set_use_split_qkv_input(False)
            return float(logit_diff(logits.double(), batch.answer, batch.wrong).mean().detach())

        eps = 1e-3
        derivative = (metric(eps) - metric(-eps)) / (2 * eps) / gap
        assert derivative == pytest.approx(edges[(src, dst)], abs=2e-3), (src, dst)


def test_induction_head_tops_final_denoising_scores(induction_final, induction_task):
    result = heads.head_out_patching(
        induction_final.model, make_batches(induction_task), direction="denoise"
    )
    layer, head = divmod(int(result.scores.argmax()), induction_final.model.cfg.n_heads)
    assert layer == 1
    assert result.metric_clean - result.metric_corrupt > 2.0


@torch.no_grad()
def test_head_importance_is_the_mean_absolute_derivative_of_a_head_mask(model_and_batches):
    """Scaling a head's output by (1 +- eps) on every prompt gives each prompt's derivative."""
    model, batches = model_and_batches
    batch = batches[0]
    result = heads.head_importance(model, batches)
    eps = 1e-3
    for layer, head in [(0, 0), (model.cfg.n_layers - 1, 1)]:

        def per_prompt(scale, layer=layer, head=head):
            def mask(z, hook):
                z[:, :, head] *= scale
                return z

            hooks = [(f"blocks.{layer}.attn.hook_z", mask)]
            logits = model.run_with_hooks(batch.clean, fwd_hooks=hooks)
            return logit_diff(logits.double(), batch.answer, batch.wrong)

        derivative = (per_prompt(1 + eps) - per_prompt(1 - eps)) / (2 * eps)
        assert float(derivative.abs().mean()) == pytest.approx(
            float(result.scores[layer, head]), abs=2e-3, rel=1e-3
        )
