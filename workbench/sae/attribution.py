"""`sae_attr`: attribution of a task metric to SAE features, and feature circuits.

Following Marks et al. 2024 ("Sparse Feature Circuits"), an SAE is spliced into the model at its
hook: the activation `x` is replaced by `decode(f) + err` with `f = encode(x)` and the
reconstruction error `err = x - decode(f)` kept as its own node (`f:{sae_id}:err`), so the
spliced model computes exactly what the model computes. Scores are normalised by the
clean-vs-corrupt gap of the metric, as for `eap`:

* node `a` (a feature or an error): `sum_pos (a_clean - a_corrupt) . grad`, where `grad` is
  `d m / d a` averaged over `ig_steps` runs with the SAE's features and error interpolated from
  corrupt to clean (integrated gradients, as Marks et al. use for nodes; `ig_steps = 0` takes the
  corrupt run's gradient, plain attribution patching; the interpolation points follow a Riemann
  rule, `workbench.attribution.ig`). Each SAE is spliced in alone for its own scores, the model
  running unchanged around it, so an SAE's scores add up to about the effect of patching all of
  it, which is exactly the gap with the error node included (IG's completeness: each SAE's sum
  is stored as `ig_completeness:{sae_id}`).
* edge `u -> d` between SAEs at consecutive hooks: `sum_pos (u_clean - u_corrupt) .
  d/du [ sum_pos' grad_d . d ]` on the corrupt run, the part of `d`'s score that goes through
  `u` (one backward pass per downstream node, over the layers between the two hooks only).
* `input -> a` for the first SAE's nodes and `a -> logits` for the last SAE's nodes carry the
  node's own score, so a feature circuit is a graph from `input` to `logits`.
* `a{L}.h{H} -> f:{sae_id}:{i}`: the head's direct write into the feature, `sum_pos
  grad_i . 1[f_i > 0] . W_enc[:, i] . (head_out_clean - head_out_corrupt)`, for SAEs that read the
  residual stream; these link head circuits to feature circuits.

Faithfulness of a node set K: the spliced model (every SAE in) on the clean prompts with every
feature and error outside K set to its corrupt value, as a fraction of the gap (1 with every
node, 0 with none). The circuit is the smallest top-n of nodes by |score| (n = 1, 2, 4, ...)
reaching the target; edges are computed among its nodes and the `n_nodes` best of each SAE.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.batches import PromptBatch, model_device
from workbench.attribution.ig import DEFAULT_IG_RULE, ig_alphas
from workbench.attribution.moments import PromptMoments
from workbench.attribution.patching import metric_gap
from workbench.core import Edge, Hook, Node
from workbench.sae.saes import LoadedSae


@dataclass
class SaeAttribution:
    sae_ids: list[str]
    node_scores: dict[str, float]
    edges: list[Edge]  # the feature graph (input -> features -> logits)
    head_edges: list[Edge]  # heads -> features
    metric_clean: float
    metric_corrupt: float
    selected: list[list[str]] = field(default_factory=list)  # per SAE, its kept nodes
    completeness: dict[str, float] = field(default_factory=dict)  # per SAE id, sum of its scores
    node_stderr: dict[str, float] = field(default_factory=dict)  # over prompts, per scored node


class SplicedModel:
    """A model with SAEs spliced in at their hooks, and the per-batch clean and corrupt feature
    and error values every evaluation shares."""

    def __init__(
        self,
        model: HookedTransformer,
        saes: list[LoadedSae],
        sae_ids: list[str],
        batches: list[PromptBatch],
    ):
        order = sorted(range(len(saes)), key=lambda i: Hook.depth(saes[i].hook, model.cfg.n_layers))
        self.model = model
        self.saes = [saes[i] for i in order]
        self.sae_ids = [sae_ids[i] for i in order]
        hooks = [s.hook for s in self.saes]
        if len(set(hooks)) != len(hooks):
            raise ValueError("sae_attr needs SAEs at distinct hooks")
        self.batches = batches
        self.device = model_device(model)
        self.n = sum(b.size for b in batches)
        self.clean: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        self.corrupt: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        m_clean = m_corrupt = 0.0
        with torch.no_grad():
            for batch in batches:
                m, values = self.run(batch.clean, batch)
                m_clean += float(m.sum())
                self.clean.append(values)
                m, values = self.run(batch.corrupt, batch)
                m_corrupt += float(m.sum())
                self.corrupt.append(values)
        self.m_clean, self.m_corrupt = m_clean / self.n, m_corrupt / self.n
        self.gap = metric_gap(self.m_clean, self.m_corrupt)

    def run(
        self,
        tokens: torch.Tensor,
        batch: PromptBatch,
        edit: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]
        | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per-prompt metric and each SAE's (features, error); `edit(k, f, err)` may replace
        them before the SAE's output `decode(f) + err` goes on, or return None to leave the
        activation as it is (the SAE only reads)."""
        values: list[tuple[torch.Tensor, torch.Tensor]] = []

        def splice(k: int, sae: LoadedSae) -> Callable[..., torch.Tensor]:
            def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                # the SAE and its nodes work in the SAE's precision; the model gets its own back
                x = act.reshape(act.shape[0], act.shape[1], -1).to(sae.dtype)
                f = sae.encode(x)
                err = x - sae.decode(f)
                if edit is not None:
                    edited = edit(k, f, err)
                    if edited is None:
                        values.append((f, err))
                        return act
                    f, err = edited
                values.append((f, err))
                return (sae.decode(f) + err).reshape(act.shape).to(act.dtype)

            return hook_fn

        hooks = [(s.hook, splice(k, s)) for k, s in enumerate(self.saes)]
        logits = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        return batch.metric(logits, batch.target), values

    def node_ids(self, k: int) -> list[str]:
        sae_id = self.sae_ids[k]
        features = [Node.sae_feature(sae_id, i) for i in range(self.saes[k].d_sae)]
        return [node.id for node in [*features, Node.sae_error(sae_id)]]

    def faithfulness(self, kept: set[str]) -> float:
        """The clean run with every node outside `kept` at its corrupt value."""
        masks = []
        for k in range(len(self.saes)):
            ids = self.node_ids(k)
            masks.append(torch.tensor([nid in kept for nid in ids], device=self.device))
        total = 0.0
        with torch.no_grad():
            for b, batch in enumerate(self.batches):

                def edit(k: int, f: torch.Tensor, err: torch.Tensor, b: int = b) -> Any:
                    keep_f, keep_err = masks[k][:-1], bool(masks[k][-1])
                    f_corr, err_corr = self.corrupt[b][k]
                    f = torch.where(keep_f, f, f_corr)
                    return f, (err if keep_err else err_corr)

                m, _ = self.run(batch.clean, batch, edit)
                total += float(m.sum())
        return (total / self.n - self.m_corrupt) / self.gap

    def patch_nodes(self, nodes: set[str]) -> float:
        """The corrupt run with `nodes` set to their clean values, normalised like a node
        score: the exact counterpart of a node's attribution."""
        total = 0.0
        with torch.no_grad():
            for b, batch in enumerate(self.batches):

                def edit(k: int, f: torch.Tensor, err: torch.Tensor, b: int = b) -> Any:
                    ids = self.node_ids(k)
                    take = torch.tensor([nid in nodes for nid in ids[:-1]], device=self.device)
                    f_clean, err_clean = self.clean[b][k]
                    f = torch.where(take, f_clean, f)
                    return f, (err_clean if ids[-1] in nodes else err)

                m, _ = self.run(batch.corrupt, batch, edit)
                total += float(m.sum())
        return (total / self.n - self.m_corrupt) / self.gap


def _grad_run(
    spliced: SplicedModel, b: int, k: int, alpha: float = 0.0
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The corrupt run of batch `b` with SAE k spliced in, its features and error set to
    `corrupt + alpha * (clean - corrupt)` as leaves of the autograd graph; every other SAE only
    reads (the model runs unchanged around SAE k), so gradients reach SAE k through the model
    itself. Returns the summed metric and every SAE's (features, error): after SAE k they are
    functions of SAE k's nodes, for edges."""
    batch = spliced.batches[b]

    def edit(j: int, f: torch.Tensor, err: torch.Tensor) -> Any:
        if j != k:
            return None
        (f_clean, err_clean), (f_corr, err_corr) = spliced.clean[b][k], spliced.corrupt[b][k]
        f = (f_corr + alpha * (f_clean - f_corr)).requires_grad_(True)
        return f, (err_corr + alpha * (err_clean - err_corr)).requires_grad_(True)

    with torch.enable_grad():
        m, values = spliced.run(batch.corrupt, batch, edit)
    return m.sum(), values


Grads = list[list[tuple[torch.Tensor, torch.Tensor]]]  # [batch][sae] -> (d m/d f, d m/d err)


def node_attribution(
    spliced: SplicedModel, ig_steps: int = 0, ig_rule: str = DEFAULT_IG_RULE
) -> tuple[dict[str, float], Grads, dict[str, float]]:
    """Every feature's and error's score, the gradients (per batch and SAE) behind them, and
    each score's standard error over prompts (from the same products kept per prompt).

    `ig_steps = 0`: attribution patching, gradients of the corrupt run. `ig_steps = N`:
    integrated gradients (as Marks et al. use for nodes): for each SAE, the gradient averaged
    over N runs with that SAE's features and error interpolated from corrupt to clean (at the
    points of `ig_rule`), so an SAE's scores sum to nearly the whole effect of patching all of
    it, however non-linear the layers after it are."""
    n_saes = len(spliced.saes)
    device = spliced.device
    totals = [torch.zeros(s.d_sae + 1, dtype=torch.float64, device=device) for s in spliced.saes]
    moments = [PromptMoments((s.d_sae + 1,), device) for s in spliced.saes]
    grads_per_batch: Grads = []
    alphas = ig_alphas(ig_steps, ig_rule)
    for b in tqdm(range(len(spliced.batches)), desc="sae_attr nodes", leave=False):
        sums = [
            (torch.zeros_like(spliced.corrupt[b][k][0]), torch.zeros_like(spliced.corrupt[b][k][1]))
            for k in range(n_saes)
        ]
        for k in range(n_saes):
            for alpha in alphas:
                metric, values = _grad_run(spliced, b, k, alpha)
                g_f, g_err = torch.autograd.grad(metric, values[k])
                weight = 1.0 / len(alphas)
                sums[k] = (sums[k][0] + weight * g_f, sums[k][1] + weight * g_err)
        for k in range(n_saes):
            g_f, g_err = sums[k]
            (f_clean, err_clean), (f_corr, err_corr) = spliced.clean[b][k], spliced.corrupt[b][k]
            totals[k][:-1] += ((f_clean - f_corr) * g_f).sum((0, 1)).double()
            totals[k][-1] += float(((err_clean - err_corr) * g_err).sum())
            each_f = ((f_clean - f_corr) * g_f).sum(1)  # [batch, d_sae]
            each_err = ((err_clean - err_corr) * g_err).sum((1, 2))[:, None]
            moments[k].add(torch.cat([each_f, each_err], dim=1).detach())
        grads_per_batch.append([(g.detach(), e.detach()) for g, e in sums])
    scale = spliced_scale(spliced)
    scores: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for k in range(n_saes):
        errors = moments[k].stderr(spliced.n, 1 / spliced.gap)
        for i, (node, value) in enumerate(
            zip(spliced.node_ids(k), (totals[k] * scale).tolist(), strict=True)
        ):
            if value != 0.0:
                scores[node] = value
                if errors is not None:
                    stderr[node] = float(errors[i])
    return scores, grads_per_batch, stderr


def feature_circuit(
    spliced: SplicedModel,
    *,
    ig_steps: int = 10,
    ig_rule: str = DEFAULT_IG_RULE,
    n_nodes: int = 16,
    target: float = 0.8,
    max_nodes: int = 256,
    head_links: bool = True,
) -> tuple[SaeAttribution, list[tuple[int, int, float]], set[str], float]:
    """Node scores; the faithfulness curve over the top 1, 2, 4, ... nodes; the smallest node
    set reaching `target`; edges among the kept nodes plus the `n_nodes` best of each SAE (at
    most `max_nodes` per SAE). Returns (attribution, curve, circuit nodes, faithfulness)."""
    scores, grads, stderr = node_attribution(spliced, ig_steps, ig_rule)
    ranked = sorted(scores, key=lambda n: -abs(scores[n]))
    curve = []
    for size in _sizes(len(ranked)):
        curve.append((size, spliced.faithfulness(set(ranked[:size]))))
    size, faith = next(((n, f) for n, f in curve if f >= target), curve[-1])
    kept = set(ranked[:size])
    selected: list[list[int]] = []
    for k in range(len(spliced.saes)):
        ids = spliced.node_ids(k)
        own = [i for i, node in enumerate(ids) if node in scores]
        own.sort(key=lambda i: -abs(scores[ids[i]]))
        chosen = [i for i in own if ids[i] in kept] + own[:n_nodes]
        selected.append(list(dict.fromkeys(chosen))[:max_nodes])
    attribution = SaeAttribution(
        sae_ids=spliced.sae_ids,
        node_scores=scores,
        edges=_graph_edges(spliced, selected, scores, grads),
        head_edges=_head_edges(spliced, selected, grads, spliced_scale(spliced))
        if head_links
        else [],
        metric_clean=spliced.m_clean,
        metric_corrupt=spliced.m_corrupt,
        selected=[[spliced.node_ids(k)[i] for i in sel] for k, sel in enumerate(selected)],
        completeness=completeness(spliced, scores),
        node_stderr=stderr,
    )
    full_curve = [(n, len(circuit_edges(attribution, set(ranked[:n]))), f) for n, f in curve]
    return attribution, full_curve, kept, faith


def spliced_scale(spliced: SplicedModel) -> float:
    return 1.0 / (spliced.n * spliced.gap)


def completeness(spliced: SplicedModel, scores: dict[str, float]) -> dict[str, float]:
    """Per SAE, the sum of its nodes' scores: patching every node of an SAE (error included)
    is the whole gap, so exact integrated gradients give 1."""
    return {
        sae_id: sum(scores.get(n, 0.0) for n in spliced.node_ids(k))
        for k, sae_id in enumerate(spliced.sae_ids)
    }


def _sizes(n: int) -> list[int]:
    return sorted({min(2**i, n) for i in range(int(math.log2(max(n, 1))) + 2)} - {0})


def _graph_edges(
    spliced: SplicedModel, selected: list[list[int]], scores: dict[str, float], grads: Grads
) -> list[Edge]:
    n_saes = len(spliced.saes)
    first_ids, last_ids = spliced.node_ids(0), spliced.node_ids(n_saes - 1)
    start, end = Node.input().id, Node.logits().id
    edges: list[Edge] = [(start, first_ids[i], scores[first_ids[i]]) for i in selected[0]]
    for k in range(n_saes - 1):
        edges += _pair_edges(spliced, k, selected, grads, spliced_scale(spliced))
    edges += [(last_ids[i], end, scores[last_ids[i]]) for i in selected[-1]]
    return edges


def _zero_if_none(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _pair_edges(
    spliced: SplicedModel,
    k: int,
    selected: list[list[int]],
    grads_per_batch: list[list[tuple[torch.Tensor, torch.Tensor]]],
    scale: float,
) -> list[Edge]:
    """Edges from SAE k's selected nodes to SAE k+1's selected nodes."""
    up, down = selected[k], selected[k + 1]
    d_up = spliced.saes[k].d_sae
    totals = torch.zeros(len(up), len(down), dtype=torch.float64, device=spliced.device)
    up_index = torch.tensor([i for i in up if i < d_up], dtype=torch.long, device=spliced.device)
    up_err = [j for j, i in enumerate(up) if i == d_up]
    up_feat_rows = [j for j, i in enumerate(up) if i < d_up]
    for b in range(len(spliced.batches)):
        _, values = _grad_run(spliced, b, k)
        f_up, err_up = values[k]
        f_down, err_down = values[k + 1]
        g_f_down, g_err_down = grads_per_batch[b][k + 1]
        delta_f = spliced.clean[b][k][0] - spliced.corrupt[b][k][0]
        delta_err = spliced.clean[b][k][1] - spliced.corrupt[b][k][1]
        for col, j in enumerate(down):
            if j < spliced.saes[k + 1].d_sae:
                target = (g_f_down[..., j] * f_down[..., j]).sum()
            else:
                target = (g_err_down * err_down).sum()
            g_f, g_err = torch.autograd.grad(
                target, [f_up, err_up], retain_graph=True, allow_unused=True
            )
            g_f = _zero_if_none(g_f, f_up)
            g_err = _zero_if_none(g_err, err_up)
            if up_feat_rows:
                per_feature = (delta_f * g_f).sum((0, 1))[up_index].double()
                totals[up_feat_rows, col] += per_feature
            for row in up_err:
                totals[row, col] += float((delta_err * g_err).sum())
    ids_up, ids_down = spliced.node_ids(k), spliced.node_ids(k + 1)
    return [
        (ids_up[i], ids_down[j], float(totals[r, c]) * scale)
        for r, i in enumerate(up)
        for c, j in enumerate(down)
    ]


def _upstream_head_layers(hook: str, n_layers: int) -> list[int]:
    layer = Hook.layer(hook)
    if layer is None:
        return []
    if hook == Hook.attn_out(layer):
        return [layer]
    if not Hook.reads_residual(hook):
        return []
    depth = Hook.depth(hook, n_layers)
    return [lyr for lyr in range(n_layers) if Hook.depth(Hook.attn_out(lyr), 0) < depth]


def _head_edges(
    spliced: SplicedModel,
    selected: list[list[int]],
    grads_per_batch: list[list[tuple[torch.Tensor, torch.Tensor]]],
    scale: float,
) -> list[Edge]:
    model = spliced.model
    edges: list[Edge] = []
    for k, sae in enumerate(spliced.saes):
        layers = _upstream_head_layers(sae.hook, model.cfg.n_layers)
        feats = [i for i in selected[k] if i < sae.d_sae]
        if not layers or not feats or sae.d_in != model.cfg.d_model:
            continue
        w_enc = sae.sae.W_enc.detach()[:, feats]  # [d_model, n_feats]
        names = [Hook.z(lyr) for lyr in layers]
        totals = torch.zeros(
            len(layers), model.cfg.n_heads, len(feats), dtype=torch.float64, device=spliced.device
        )
        for b, batch in enumerate(spliced.batches):
            with torch.no_grad():
                _, clean = model.run_with_cache(batch.clean, names_filter=names)
                _, corrupt = model.run_with_cache(batch.corrupt, names_filter=names)
            g_f = grads_per_batch[b][k][0][..., feats]
            active = (spliced.corrupt[b][k][0][..., feats] > 0).to(g_f.dtype)
            weight = g_f * active  # [batch, pos, n_feats]
            for li, (lyr, name) in enumerate(zip(layers, names, strict=True)):
                delta_z = clean[name] - corrupt[name]  # [batch, pos, head, d_head]
                w_o = model.blocks[lyr].attn.W_O.detach()  # [head, d_head, d_model]
                head_out = torch.einsum("bphd,hdm->bphm", delta_z, w_o).to(w_enc.dtype)
                writes = torch.einsum("bphm,mf->bphf", head_out, w_enc)
                totals[li] += torch.einsum("bphf,bpf->hf", writes, weight).double()
        ids = spliced.node_ids(k)
        for li, lyr in enumerate(layers):
            for h in range(model.cfg.n_heads):
                for c, i in enumerate(feats):
                    head = Node.head_of(lyr, h).id
                    edges.append((head, ids[i], float(totals[li, h, c]) * scale))
    return edges


def circuit_edges(attribution: SaeAttribution, kept: set[str]) -> list[Edge]:
    ends = kept | {Node.input().id, Node.logits().id}
    return [e for e in attribution.edges if e[0] in ends and e[1] in ends]
