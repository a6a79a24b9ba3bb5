"""Attention-head attribution: which heads carry the clean-vs-corrupt difference of a task?

Four methods, each giving one score per attention head (`a{L}.h{H}`):

* `dla` — direct logit attribution. On the clean prompts, the output of each head at the last
  position, divided by the final layer norm's scale (and centred, as the folded layer norm does),
  is projected onto the unembedding direction `W_U[:, answer] - W_U[:, wrong]`. It measures the
  head's *direct* contribution to the logit difference, in logit units, ignoring every path
  through later layers. It also defines head -> `logits` edges with the same scores. For another
  metric the direction is that metric's gradient with respect to the normalised final residual
  at the clean run (the metric linearised there; for the logit difference this is exact).

* `act_patch_denoise` / `act_patch_noise` — exact activation patching of a head's output
  (`hook_z`, all positions at once). Denoising runs the corrupt prompts with one head's clean
  output patched in; noising runs the clean prompts with one head's corrupt output. Scores are
  normalised so 1 is the whole clean-vs-corrupt gap:
  `(m_patched - m_corrupt) / (m_clean - m_corrupt)` and `(m_clean - m_patched) / (m_clean -
  m_corrupt)`. This gives the same numbers as `transformer_lens.patching`'s
  `get_act_patch_attn_head_out_all_pos` but with less work: a patch at layer L cannot change
  anything before L, so each patched run starts from the cached residual stream at layer L
  (`start_at_layer`), the patches of all heads of a layer run as one batch, and only the last
  position's logits of the answer and wrong tokens are computed.

* `attr_patch` — attribution patching (Nanda 2023): the first-order Taylor approximation of
  denoising, `(z_clean - z_corrupt) . d metric / d z` evaluated on the corrupt run, for every
  head from two forward passes and one backward pass. Normalised like `act_patch_denoise`.
  The same gradients give edge scores in the style of edge attribution patching (Syed et al.
  2023): for a source (the embeddings, `input`, or a head's output) and a destination (a later
  head's query, key or value input, `a{L}.h{H}<q|k|v>`, or the final residual, `logits`), the
  score is `(src_clean - src_corrupt) . d metric / d dst_input`, normalised by the gap.

The metric is the task's (`workbench.attribution.metrics`); by default the mean over prompts of
`logit(answer) - logit(wrong)` at the last position.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.baseline import Baseline
from workbench.attribution.batches import PromptBatch, final_norm, model_device
from workbench.attribution.edges import edge_attribution, run_with_grads
from workbench.attribution.metrics import frozen_final_norm
from workbench.attribution.patching import patch_sweep
from workbench.core import Hook, Node


@dataclass
class HeadScores:
    """Scores of one method: `scores[layer, head]` plus the edges the method defines."""

    method: str
    scores: Float[torch.Tensor, "n_layers n_heads"]
    metric_clean: float
    metric_corrupt: float
    edges: list[tuple[str, str, float]] = field(default_factory=list)
    # standard errors over prompts of `scores` and of `edges` (None: not computed)
    stderr: Float[torch.Tensor, "n_layers n_heads"] | None = None
    edge_stderr: list[float] | None = None


@torch.no_grad()
def direct_logit_attribution(
    model: HookedTransformer, batches: list[PromptBatch], baseline: Baseline | None = None
) -> HeadScores:
    cfg = model.cfg
    n = sum(b.size for b in batches)
    total = torch.zeros(cfg.n_layers, cfg.n_heads, device=model_device(model))
    metrics = [0.0, 0.0]
    # the final normalisation, linearised at the clean run: centring (LayerNorm only) and the
    # division by the clean run's scale; a model without one unembeds the residual as it is
    normalised = hasattr(model, "ln_final")
    for batch in batches:
        names = [Hook.z(layer) for layer in range(cfg.n_layers)] + [Hook.FINAL_SCALE]
        names.append(Hook.resid_post(cfg.n_layers - 1))
        logits, cache = model.run_with_cache(batch.clean, names_filter=names)
        metrics[0] += float(batch.metric(logits, batch.target).sum())
        if baseline is None:
            metrics[1] += float(batch.metric(model(batch.corrupt), batch.target).sum())
        # d metric / d (normalised final residual) at the clean run: for logit_diff the
        # difference of the two tokens' unembeddings
        final = final_norm(model, cache[Hook.resid_post(cfg.n_layers - 1)][:, -1:])[:, 0]
        direction = batch.metric.unembed_grad(model, final, batch.target).T  # [d_model, b]
        for layer in range(cfg.n_layers):
            z_last = cache[Hook.z(layer)][:, -1]  # [b, head, d_head]
            out = torch.einsum("bhe,hed->bhd", z_last, model.W_O[layer])
            scale = cache[Hook.FINAL_SCALE][:, -1][:, None, :] if normalised else None
            out = frozen_final_norm(model, out, scale)
            total[layer] += torch.einsum("bhd,db->h", out.float(), direction.float())
    scores = (total / n).float().cpu()
    edges = [
        (Node.head_of(layer, head).id, Node.logits().id, float(scores[layer, head]))
        for layer in range(cfg.n_layers)
        for head in range(cfg.n_heads)
    ]
    corrupt = baseline.metric_corrupt if baseline is not None else metrics[1] / n
    return HeadScores("dla", scores, metrics[0] / n, corrupt, edges)


def head_out_patching(
    model: HookedTransformer,
    batches: list[PromptBatch],
    *,
    direction: Literal["denoise", "noise"],
    max_rows: int = 512,
) -> HeadScores:
    """Exact patching of every head's output (all positions), batched per layer."""
    result = patch_sweep(
        model, batches, component="head_out", direction=direction, max_rows=max_rows
    )
    scores = result.scores[:, :, 0]
    return HeadScores(
        f"act_patch_{direction}",
        scores,
        result.metric_clean,
        result.metric_corrupt,
        stderr=result.stderr[:, :, 0] if result.stderr is not None else None,
    )


def head_importance(
    model: HookedTransformer, batches: list[PromptBatch], baseline: Baseline | None = None
) -> HeadScores:
    """Head importance scores (Michel et al. 2019): `mean_x |d m(x) / d xi_h|`, where the mask
    `xi_h` multiplies head h's output and the derivative is taken at `xi = 1` on each clean
    prompt. At `xi = 1` the derivative is `sum_pos z_h . d m / d z_h`, so one forward and one
    backward pass give every head. Unnormalised (logit-difference units)."""
    cfg = model.cfg
    n = sum(b.size for b in batches)
    total = torch.zeros(cfg.n_layers, cfg.n_heads, device=model_device(model))
    m_clean = m_corrupt = 0.0
    names = [Hook.z(layer) for layer in range(cfg.n_layers)]
    for batch in tqdm(batches, desc="head_importance", leave=False):
        acts, metric = run_with_grads(model, batch.clean, batch, names, names, scale=1.0)
        m_clean += float(metric.sum())
        if baseline is None:
            with torch.no_grad():
                m_corrupt += float(batch.metric(model(batch.corrupt), batch.target).sum())
        for layer, name in enumerate(names):
            per_prompt = (acts[name] * acts[f"{name}.grad"]).sum((1, 3))  # [batch, head]
            total[layer] += per_prompt.abs().sum(0)
    scores = (total / n).float().cpu()
    corrupt = baseline.metric_corrupt if baseline is not None else m_corrupt / n
    return HeadScores("head_importance", scores, m_clean / n, corrupt)


def attribution_patching(model: HookedTransformer, batches: list[PromptBatch]) -> HeadScores:
    """Attribution patching of every head, plus its edges, from one edge-attribution pass.

    A head's output reaches the metric only through the inputs of the nodes downstream of it
    (later heads' q/k/v, MLPs, the final residual), so its attribution-patching score is the
    sum of its outgoing EAP edge scores over the full graph. The stored edges are those among
    `input`, heads and `logits`."""
    result = edge_attribution(model, batches, keep_runs=False)
    cfg = model.cfg
    rows = [
        result.graph.sources.index(Node.head_of(layer, head).id)
        for layer in range(cfg.n_layers)
        for head in range(cfg.n_heads)
    ]
    scores = result.scores[rows].sum(1).view(cfg.n_layers, cfg.n_heads)
    everything = result.edges()
    stored = [
        i
        for i, e in enumerate(everything)
        if Node.parse(e[0]).kind != "mlp" and Node.parse(e[1]).kind != "mlp"
    ]
    edge_stderr = result.edge_stderr()
    return HeadScores(
        "attr_patch",
        scores,
        result.metric_clean,
        result.metric_corrupt,
        [everything[i] for i in stored],
        stderr=(
            result.source_stderr[rows].view(cfg.n_layers, cfg.n_heads)
            if result.source_stderr is not None
            else None
        ),
        edge_stderr=[edge_stderr[i] for i in stored] if edge_stderr is not None else None,
    )
