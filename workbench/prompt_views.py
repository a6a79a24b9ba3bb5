"""One prompt, looked at closely: what `workbench run prompt` computes and stores.

For a token sequence and a checkpoint:
- **attention**: every head's attention pattern;
- **logit lens**: the residual stream after each layer, through the final normalisation and the
  unembedding, as next-token probabilities (the top 5 at every layer and position, and the
  probability of the model's final prediction);
- **direct logit attribution**: each head's and MLP's direct contribution to the logit of the
  predicted next token at the last position, through the final normalisation linearised at this
  run (its scale, and the centring of a LayerNorm), minus the mean logit over the vocabulary;
- **attention rollout** and **attention flow** (Abnar & Zuidema 2020, "Quantifying Attention Flow
  in Transformers"): with each layer's head-averaged attention mixed with the identity for the
  residual connection, Â = ½A + ½I (rows renormalised), rollout after layer l is
  Â_l Â_{l-1} ... Â_1 and its last row is how much the last position draws on each input
  position; flow treats the layers as a graph with capacities Â and takes, for each input
  position, the maximum flow from it to the last position after layer l;
- **information-flow routes** (Ferrando & Voita 2024, "Information Flow Routes"): each attention
  block's update at a position decomposes into one term per source position (Σ_h A_h[i, j]
  v_h[j] W_O^h); with the residual term and the MLP's output, each term's importance to the
  block's result y is the proximity max(0, ‖y‖₁ − ‖y − c‖₁), normalised over the terms; the
  MLP's edge is its output's importance to the MLP block's result. Edges at or above the
  threshold `tau` that reach the last position's final residual form the routes graph.
"""

from dataclasses import dataclass, field

import networkx as nx
import torch
from transformer_lens import HookedTransformer

from workbench.attribution.metrics import final_norm, frozen_final_norm
from workbench.core import Hook, Node

LENS_TOP = 5
DEFAULT_TAU = 0.04


@dataclass
class PromptViews:
    token_ids: list[int]
    predicted_id: int
    attention: torch.Tensor  # [layer, head, query, key], on the CPU
    lens: list[tuple[int, int, int, int, float]]  # layer, position, rank, token id, prob
    lens_target: torch.Tensor  # [layer, position]: probability of `predicted_id`
    dla: dict[str, float]  # node id -> contribution to the predicted token's logit
    rollout: torch.Tensor  # [layer, position]: the last position's rollout row after layer l
    flow: torch.Tensor  # [layer, position]: max flow from each position to the last one
    routes: list[tuple[int, int, int, int, str, float]] = field(default_factory=list)
    # (from layer, from position, to layer, to position, kind, importance); layer l of a node
    # is the residual stream before block l (0: the embeddings, n_layers: the final one)


def residual_attention(patterns: torch.Tensor) -> torch.Tensor:
    """[layer, head, q, k] -> [layer, q, k]: ½ (head mean) + ½ I, rows renormalised."""
    mean = patterns.mean(1)
    eye = torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    mixed = 0.5 * mean + 0.5 * eye
    return mixed / mixed.sum(-1, keepdim=True)


def attention_rollout(patterns: torch.Tensor) -> torch.Tensor:
    """[layer, head, q, k] -> [layer, q, k]: the rollout after each layer."""
    mixed = residual_attention(patterns)
    out = []
    acc = torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
    for layer in range(mixed.shape[0]):
        acc = mixed[layer] @ acc
        out.append(acc)
    return torch.stack(out)


def attention_flow(patterns: torch.Tensor) -> torch.Tensor:
    """[layer, head, q, k] -> [layer, position]: the maximum flow from each input position to
    the last position after each layer, capacities Â."""
    mixed = residual_attention(patterns).double().cpu()
    n_layers, n = mixed.shape[0], mixed.shape[-1]
    graph = nx.DiGraph()
    for layer in range(n_layers):
        for q in range(n):
            for k in range(q + 1):
                weight = float(mixed[layer, q, k])
                if weight > 0:
                    graph.add_edge((layer, k), (layer + 1, q), capacity=weight)
    flow = torch.zeros(n_layers, n, dtype=torch.float64)
    for layer in range(n_layers):
        sink = (layer + 1, n - 1)
        for source in range(n):
            if (0, source) in graph and sink in graph:
                flow[layer, source] = nx.maximum_flow_value(graph, (0, source), sink)
    return flow


def _proximity(y: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """[d], [t, d] -> [t]: max(0, ‖y‖₁ − ‖y − c‖₁), normalised to sum to 1."""
    raw = (y.abs().sum() - (y[None] - terms).abs().sum(-1)).clamp(min=0)
    total = raw.sum()
    return raw / total if total > 0 else raw


@torch.no_grad()
def prompt_views(
    model: HookedTransformer, token_ids: list[int], tau: float = DEFAULT_TAU
) -> PromptViews:
    cfg = model.cfg
    device = model.W_U.device
    tokens = torch.tensor([token_ids], dtype=torch.long, device=device)
    logits, cache = model.run_with_cache(tokens)
    n_layers, n = cfg.n_layers, len(token_ids)
    predicted = int(logits[0, -1].argmax())

    patterns = torch.stack([cache[Hook.pattern(layer)][0] for layer in range(n_layers)]).float()

    # logit lens: every layer's residual through the final norm and the unembedding
    lens: list[tuple[int, int, int, int, float]] = []
    target = torch.zeros(n_layers, n)
    for layer in range(n_layers):
        resid = cache[Hook.resid_post(layer)]
        probs = (final_norm(model, resid) @ model.W_U + model.b_U)[0].float().softmax(-1)
        top = probs.topk(LENS_TOP, dim=-1)
        for pos in range(n):
            for rank in range(LENS_TOP):
                lens.append(
                    (layer, pos, rank, int(top.indices[pos, rank]), float(top.values[pos, rank]))
                )
        target[layer] = probs[:, predicted].cpu()

    # direct logit attribution at the last position, the final norm linearised at this run
    direction = model.W_U[:, predicted] - model.W_U.mean(1)
    scale = cache[Hook.FINAL_SCALE][0, -1] if hasattr(model, "ln_final") else None

    def direct(out: torch.Tensor) -> torch.Tensor:
        return frozen_final_norm(model, out, scale).float() @ direction.float()

    dla: dict[str, float] = {}
    for layer in range(n_layers):
        z_last = cache[Hook.z(layer)][0, -1]  # [head, d_head]
        per_head = torch.einsum("he,hed->hd", z_last, model.W_O[layer])
        for head, value in enumerate(direct(per_head).tolist()):
            dla[Node.head_of(layer, head).id] = value
        if not cfg.attn_only:
            dla[Node.mlp(layer).id] = float(direct(cache[Hook.mlp_out(layer)][0, -1]))

    rollout = attention_rollout(patterns)[:, -1].cpu()
    flow = attention_flow(patterns).float()
    routes = _routes(model, cache, patterns, n, tau)
    return PromptViews(
        token_ids=list(token_ids),
        predicted_id=predicted,
        attention=patterns.cpu(),
        lens=lens,
        lens_target=target,
        dla=dla,
        rollout=rollout,
        flow=flow,
        routes=routes,
    )


def _routes(
    model: HookedTransformer, cache, patterns: torch.Tensor, n: int, tau: float
) -> list[tuple[int, int, int, int, str, float]]:  # type: ignore[no-untyped-def]
    cfg = model.cfg
    every: list[tuple[int, int, int, int, str, float]] = []
    for layer in range(cfg.n_layers):
        resid_pre = cache[Hook.resid_pre(layer)][0]
        v = cache[Hook.qkv(layer, "v")][0]  # [pos, kv head or head, d_head]
        if v.shape[1] != cfg.n_heads:  # grouped keys and values: each query head's own view
            v = v.repeat_interleave(cfg.n_heads // v.shape[1], dim=1)
        per_source = torch.einsum(
            "hqk,khe,hed->qkd", patterns[layer].to(v.dtype), v, model.W_O[layer]
        )
        attn_out = cache[Hook.attn_out(layer)][0]
        for q in range(n):
            terms = torch.cat([resid_pre[q][None], per_source[q, : q + 1]])
            y = resid_pre[q] + attn_out[q]
            imp = _proximity(y.float(), terms.float())
            every.append((layer, q, layer + 1, q, "residual", float(imp[0])))
            for k in range(q + 1):
                every.append((layer, k, layer + 1, q, "attention", float(imp[1 + k])))
        if not cfg.attn_only:
            mid = cache[Hook.resid_mid(layer)][0]
            mlp = cache[Hook.mlp_out(layer)][0]
            for q in range(n):
                y = (mid[q] + mlp[q]).float()
                imp = _proximity(y, torch.stack([mid[q], mlp[q]]).float())
                every.append((layer, q, layer + 1, q, "mlp", float(imp[1])))
    # keep what is above tau and reaches the last position's final residual
    kept = [e for e in every if e[5] >= tau]
    graph = nx.DiGraph()
    for a_layer, a_pos, b_layer, b_pos, _, _ in kept:
        graph.add_edge((a_layer, a_pos), (b_layer, b_pos))
    goal = (cfg.n_layers, n - 1)
    reach = (nx.ancestors(graph, goal) | {goal}) if goal in graph else set()
    return [e for e in kept if (e[2], e[3]) in reach and (e[0], e[1]) in reach]


def lens_ids(views: PromptViews) -> list[int]:
    """The token ids the stored views name (the lens's top tokens and the prediction)."""
    return sorted({tid for _, _, _, tid, _ in views.lens} | {views.predicted_id})


def prompt_id(checkpoint_id: str, token_ids: list[int], tau: float) -> str:
    import hashlib
    import json

    key = json.dumps({"checkpoint": checkpoint_id, "tokens": list(token_ids), "tau": tau})
    return "p-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def rows(
    views: PromptViews,
    *,
    pid: str,
    checkpoint_id: str,
    text: str,
    tokens: list[str],
    names: dict[int, str],
    tau: float,
) -> dict[str, list[dict]]:
    """The store's rows for these views (plain Python: the store builds its Arrow tables);
    `names`: the token strings of the ids `lens_ids` names."""
    n_layers, n_heads, n, _ = views.attention.shape
    attention = [
        {"prompt_id": pid, "layer": layer, "head": head, "query_pos": q, "key_pos": k,
         "weight": float(views.attention[layer, head, q, k])}
        for layer in range(n_layers) for head in range(n_heads)
        for q in range(n) for k in range(q + 1)
    ]  # fmt: skip
    lens = [
        {"prompt_id": pid, "layer": layer, "position": pos, "rank": rank, "token_id": tid,
         "token": names.get(tid), "prob": prob}
        for layer, pos, rank, tid, prob in views.lens
    ]  # fmt: skip
    lens += [
        {"prompt_id": pid, "layer": layer, "position": pos, "rank": None,
         "token_id": views.predicted_id, "token": names.get(views.predicted_id),
         "prob": float(views.lens_target[layer, pos])}
        for layer in range(n_layers) for pos in range(n)
    ]  # fmt: skip
    flow = [
        {"prompt_id": pid, "method": method, "layer": layer, "position": pos,
         "score": float(values[layer, pos])}
        for method, values in (("rollout", views.rollout), ("flow", views.flow))
        for layer in range(n_layers) for pos in range(n)
    ]  # fmt: skip
    return {
        "prompt_views": [
            {
                "prompt_id": pid,
                "checkpoint_id": checkpoint_id,
                "text": text,
                "token_ids": views.token_ids,
                "tokens": tokens,
                "predicted_id": views.predicted_id,
                "predicted": names.get(views.predicted_id),
                "tau": tau,
            }
        ],  # fmt: skip
        "prompt_attention": attention,
        "prompt_logit_lens": lens,
        "prompt_dla": [{"prompt_id": pid, "node_id": k, "score": v} for k, v in views.dla.items()],
        "prompt_flow": flow,
        "prompt_routes": [
            {
                "prompt_id": pid,
                "src_layer": a,
                "src_pos": b,
                "dst_layer": c,
                "dst_pos": d,
                "kind": kind,
                "importance": imp,
            }
            for a, b, c, d, kind, imp in views.routes
        ],  # fmt: skip
    }
