"""One prompt's views at one checkpoint: what `workbench run prompt` (`workbench.prompt.run`)
computes and stores.

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

Cost at a real model's prompt length. Attention flow is one maximum-flow problem per (layer,
input position); each is solved by SciPy's Dinic on only the part of the layered graph it can
use, with capacities floored to multiples of 2^-30 (so a flow is at most 2^-30 per edge of a
minimum cut below the exact one, never above). Its work still grows with layers² x tokens³, so
`flow_seconds` bounds it: past that, one sentence (BadInput) rather than a long wait. The routes
take a chunk of query positions at a time (`ROUTES_CHUNK_ELEMENTS` numbers of per-source
terms), never a block's [tokens, tokens, d_model] at once.
"""

import time
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import maximum_flow
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.metrics import final_norm, frozen_final_norm
from workbench.core import Hook, Node
from workbench.errors import BadInput

LENS_TOP = 5
DEFAULT_TAU = 0.04
DEFAULT_FLOW_SECONDS = 300.0
FLOW_SCALE = 2**30  # attention flow's capacities are floored to multiples of 1 / FLOW_SCALE
ROUTES_CHUNK_ELEMENTS = 2**22  # the routes' per-source terms held at once (16 MB in float32)


@dataclass
class PromptViews:
    """Every view of one prompt at one checkpoint, as `prompt_views` computes them; `view_rows`
    makes the store's rows of them."""

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


def attention_flow(patterns: torch.Tensor, *, max_seconds: float | None = None) -> torch.Tensor:
    """[layer, head, q, k] -> [layer, position]: the maximum flow from each input position to
    the last position after each layer, capacities Â.

    One maximum-flow problem per (layer, input position), solved by SciPy's Dinic on the layered
    graph cut down to what the problem can use: the layers up to the sink's and the positions
    from the source's on (causal attention never sends anything backwards). The solver takes
    integer capacities: each Â is floored to a multiple of 2^-30 (`FLOW_SCALE`), so a flow is
    never above the exact one and below it by less than 2^-30 per edge of a minimum cut. The
    first layer's flow is the single edge's capacity, exactly. `max_seconds`: BadInput rather
    than a computation longer than that."""
    mixed = residual_attention(patterns).double().cpu().numpy()
    n_layers, n = mixed.shape[0], mixed.shape[-1]
    flow = np.zeros((n_layers, n))
    flow[0] = mixed[0, n - 1]
    q, k = np.tril_indices(n)
    capacity = np.floor(mixed[:, q, k] * FLOW_SCALE).astype(np.int32)  # [layer, edge]
    start = time.monotonic()
    for layer in tqdm(range(1, n_layers), desc="attention flow", leave=False, disable=None):
        graph = _flow_graph(capacity[: layer + 1], q, k, n)
        for source in range(n):
            if max_seconds is not None and time.monotonic() - start > max_seconds:
                raise BadInput(_flow_too_long(n_layers, n, layer, source, max_seconds))
            flow[layer, source] = _max_flow(graph, source, layer + 1, n) / FLOW_SCALE
    return torch.from_numpy(flow)


def _flow_graph(capacity: np.ndarray, q: np.ndarray, k: np.ndarray, n: int) -> sp.csr_array:
    """The layered graph from the inputs (layer 0) to the last position after the last layer of
    `capacity` ([layer, edge], edges (k -> q) in `np.tril_indices` order), as a CSR matrix whose
    nodes are ordered by position from the last one, then by layer: the nodes a source at
    position s can reach are then the first (n - s)(layers + 1), a leading block of the matrix.
    Edges into the last layer other than the sink's, and edges of capacity 0, are left out."""
    layers = capacity.shape[0]
    layer = np.repeat(np.arange(layers, dtype=np.int32), len(q))
    into = np.tile(q.astype(np.int32), layers)
    rows = (n - 1 - np.tile(k.astype(np.int32), layers)) * (layers + 1) + layer
    cols = (n - 1 - into) * (layers + 1) + layer + 1
    data = capacity.reshape(-1)
    keep = (data > 0) & ((layer + 1 < layers) | (into == n - 1))
    size = n * (layers + 1)
    graph = sp.csr_array((data[keep], (rows[keep], cols[keep])), shape=(size, size))
    graph.sort_indices()
    return graph


def _max_flow(graph: sp.csr_array, source: int, layers: int, n: int) -> int:
    """The integer maximum flow from input position `source` to the last position after
    `layers` layers, on the leading block of `graph` that source reaches."""
    size = (n - source) * (layers + 1)
    end = graph.indptr[size]
    block = sp.csr_array(
        (graph.data[:end], graph.indices[:end], graph.indptr[: size + 1]), shape=(size, size)
    )
    block.has_sorted_indices = True
    return int(maximum_flow(block, (n - 1 - source) * (layers + 1), layers).flow_value)


def _flow_too_long(n_layers: int, n: int, layer: int, source: int, seconds: float) -> str:
    """The sentence for a flow stopped at (layer, source); the share done is weighted by each
    problem's size, (layer + 1)(n - source)² (the first layer's flow costs nothing)."""
    size = (n - np.arange(n, dtype=np.float64)) ** 2
    done = size.sum() * sum(range(2, layer + 1)) + (layer + 1) * size[:source].sum()
    total = size.sum() * sum(range(2, n_layers + 1))
    return (
        f"attention flow over {n_layers} layers x {n} tokens did not finish within "
        f"--flow-seconds {seconds:g} (about {100 * done / total:.0f}% done): raise "
        "--flow-seconds (0: no limit) or analyse a shorter prompt"
    )


@torch.no_grad()
def prompt_views(
    model: HookedTransformer,
    token_ids: list[int],
    tau: float = DEFAULT_TAU,
    *,
    flow_seconds: float | None = DEFAULT_FLOW_SECONDS,
) -> PromptViews:
    """Every view of one prompt; BadInput if attention flow would take longer than
    `flow_seconds` (None: no limit)."""
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
        top_ids, top_probs = top.indices.tolist(), top.values.tolist()
        for pos in range(n):
            for rank in range(LENS_TOP):
                lens.append((layer, pos, rank, top_ids[pos][rank], top_probs[pos][rank]))
        target[layer] = probs[:, predicted].cpu()

    # direct logit attribution at the last position, the final norm linearised at this run
    direction = model.W_U[:, predicted] - model.W_U.mean(1)
    scale = cache[Hook.FINAL_SCALE][0, -1] if hasattr(model, "ln_final") else None

    def direct(out: torch.Tensor) -> torch.Tensor:
        return frozen_final_norm(model, out, scale).float() @ direction.float()

    dla: dict[str, float] = {}
    w_o = model.W_O  # (a property that stacks every layer's weights: read once)
    for layer in range(n_layers):
        z_last = cache[Hook.z(layer)][0, -1]  # [head, d_head]
        per_head = torch.einsum("he,hed->hd", z_last, w_o[layer])
        for head, value in enumerate(direct(per_head).tolist()):
            dla[Node.head_of(layer, head).id] = value
        if not cfg.attn_only:
            dla[Node.mlp(layer).id] = float(direct(cache[Hook.mlp_out(layer)][0, -1]))

    rollout = attention_rollout(patterns)[:, -1].cpu()
    flow = attention_flow(patterns, max_seconds=flow_seconds).float()
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
    """The routes graph: every edge's importance, a chunk of query positions at a time (their
    per-source terms, [chunk, n, d_model], at most `ROUTES_CHUNK_ELEMENTS` numbers: never a
    block's whole [n, n, d_model]), keeping those at or above `tau` that reach the last
    position's final residual."""
    cfg = model.cfg
    chunk = max(1, ROUTES_CHUNK_ELEMENTS // ((n + 1) * cfg.d_model))
    kept: list[tuple[int, int, int, int, str, float]] = []
    w_o = model.W_O  # (a property that stacks every layer's weights: read once)
    for layer in range(cfg.n_layers):
        resid_pre = cache[Hook.resid_pre(layer)][0]
        v = cache[Hook.qkv(layer, "v")][0]  # [pos, kv head or head, d_head]
        if v.shape[1] != cfg.n_heads:  # grouped keys and values: each query head's own view
            v = v.repeat_interleave(cfg.n_heads // v.shape[1], dim=1)
        value_out = torch.einsum("khe,hed->khd", v, w_o[layer])  # [key, head, d_model]
        attn = patterns[layer].to(v.dtype)
        y = resid_pre + cache[Hook.attn_out(layer)][0]
        for start in range(0, n, chunk):
            qs = range(start, min(n, start + chunk))
            weights = attn[:, qs.start : qs.stop].permute(2, 1, 0).contiguous()  # [k, q, head]
            per_source = torch.bmm(weights, value_out).transpose(0, 1)  # [q, k, d_model]
            terms = torch.cat([resid_pre[qs.start : qs.stop, None], per_source], 1)
            imp = _proximities(y[qs.start : qs.stop].float(), terms.float(), qs, n)
            for i, t in (imp.double() >= tau).nonzero().tolist():
                q = qs.start + i
                kind, src = ("residual", q) if t == 0 else ("attention", t - 1)
                kept.append((layer, src, layer + 1, q, kind, float(imp[i, t])))
        if not cfg.attn_only:
            mid = cache[Hook.resid_mid(layer)][0]
            mlp = cache[Hook.mlp_out(layer)][0]
            imp = _proximities((mid + mlp).float(), torch.stack([mid, mlp], 1).float())
            for q, value in enumerate(imp[:, 1].tolist()):
                if value >= tau:
                    kept.append((layer, q, layer + 1, q, "mlp", value))
    # keep what reaches the last position's final residual
    graph = nx.DiGraph()
    for a_layer, a_pos, b_layer, b_pos, _, _ in kept:
        graph.add_edge((a_layer, a_pos), (b_layer, b_pos))
    goal = (cfg.n_layers, n - 1)
    reach = (nx.ancestors(graph, goal) | {goal}) if goal in graph else set()
    return [e for e in kept if (e[2], e[3]) in reach and (e[0], e[1]) in reach]


def _proximities(
    y: torch.Tensor, terms: torch.Tensor, queries: range | None = None, n: int = 0
) -> torch.Tensor:
    """[q, d], [q, t, d] -> [q, t]: for each row, each term's max(0, ‖y‖₁ − ‖y − c‖₁),
    normalised to sum to 1 over the row's terms. With `queries` (the rows' positions), the
    terms are [residual, source 0 .. n - 1] and the sources after a row's own position (which
    causal attention gives nothing) are not among its terms."""
    raw = (y.abs().sum(-1, keepdim=True) - (y[:, None] - terms).abs().sum(-1)).clamp(min=0)
    if queries is not None:
        source = torch.arange(n + 1, device=raw.device) - 1
        position = torch.arange(queries.start, queries.stop, device=raw.device)
        raw = raw.masked_fill(source[None] > position[:, None], 0)
    total = raw.sum(-1, keepdim=True)
    return torch.where(total > 0, raw / total.clamp(min=torch.finfo(raw.dtype).tiny), raw)


def lens_ids(views: PromptViews) -> list[int]:
    """The token ids the stored views name (the lens's top tokens and the prediction)."""
    return sorted({tid for _, _, _, tid, _ in views.lens} | {views.predicted_id})


def prompt_id(checkpoint_id: str, token_ids: list[int], tau: float) -> str:
    """What a prompt's views are stored under: `p-` and the first 12 hex digits of the sha256 of
    (checkpoint, token ids, tau)."""
    import hashlib
    import json

    key = json.dumps({"checkpoint": checkpoint_id, "tokens": list(token_ids), "tau": tau})
    return "p-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def view_rows(
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
    weights = views.attention.tolist()  # (a tensor read element by element is far slower)
    attention = [
        {"prompt_id": pid, "layer": layer, "head": head, "query_pos": q, "key_pos": k,
         "weight": weights[layer][head][q][k]}
        for layer in range(n_layers) for head in range(n_heads)
        for q in range(n) for k in range(q + 1)
    ]  # fmt: skip
    lens = [
        {"prompt_id": pid, "layer": layer, "position": pos, "rank": rank, "token_id": tid,
         "token": names.get(tid), "prob": prob}
        for layer, pos, rank, tid, prob in views.lens
    ]  # fmt: skip
    target = views.lens_target.tolist()
    lens += [
        {"prompt_id": pid, "layer": layer, "position": pos, "rank": None,
         "token_id": views.predicted_id, "token": names.get(views.predicted_id),
         "prob": target[layer][pos]}
        for layer in range(n_layers) for pos in range(n)
    ]  # fmt: skip
    flow = [
        {"prompt_id": pid, "method": method, "layer": layer, "position": pos,
         "score": values[layer][pos]}
        for method, values in (("rollout", views.rollout.tolist()), ("flow", views.flow.tolist()))
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
