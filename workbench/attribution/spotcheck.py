"""The exact scores behind a spot check (`workbench.spotcheck`): the chosen edges or heads
patched for real, on the run's own prompts."""

import torch
from transformer_lens import HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from workbench.attribution.batches import PromptBatch, model_device, repeat_rows
from workbench.attribution.edges import (
    CorruptRuns,
    EdgeGraph,
    EdgeScores,
    exact_edge_patching,
    graph_hooks_enabled,
    head_projection,
    input_norm_in_place,
)
from workbench.attribution.patching import metric_gap
from workbench.core import Hook, Node
from workbench.memory import Scratch
from workbench.spotcheck import SpotCheck, edge_check, node_check, sample_items


def check_edges(
    model: HookedTransformer, batches: list[PromptBatch], result: EdgeScores, n: int
) -> SpotCheck | None:
    """`n` of `result`'s edges (`sample_items`) patched exactly (`exact_edges`)."""
    edges = result.edges()
    chosen = sample_items([e[2] for e in edges], n)
    if not chosen:
        return None
    pairs = [(edges[i][0], edges[i][1]) for i, _ in chosen]
    values = exact_edges(model, batches, result.graph, pairs, runs=result.runs)
    return edge_check(pairs, [s for _, s in chosen], [edges[i][2] for i, _ in chosen], values)


def _plain_projections(model: HookedTransformer) -> bool:
    """Whether a head's moved query, key or value input can be recomputed at its `hook_q`
    (`hook_k`, `hook_v`) from the block's input: a pre-norm block without a positional
    embedding added to the attention's input (shortformer)."""
    cfg = model.cfg
    return (
        cfg.original_architecture not in POST_NORM_ARCHITECTURES
        and cfg.positional_embedding_type != "shortformer"
    )


@torch.no_grad()
def exact_edges(
    model: HookedTransformer,
    batches: list[PromptBatch],
    graph: EdgeGraph,
    pairs: list[tuple[str, str]],
    runs: CorruptRuns | None = None,
) -> list[float]:
    """Exact patching of each edge `(src, dst)` on its own, as `exact_edge` scores it: the
    corrupt run with `dst`'s input moved by `src_clean - src_corrupt`, normalised by the gap.
    The run is the model's own (no per-head copies of the residual stream): a head's moved
    query, key or value is recomputed for that head alone at its `hook_q` (`hook_k`,
    `hook_v`) from the moved, normalised input; the edges into one destination share a pass,
    from the destination's layer on. The clean and corrupt runs are those an attribution kept
    (`runs`, with its clean sources and layer inputs), else made here. Models where that does
    not apply take `exact_edge`'s own passes for the edges chosen."""
    if not _plain_projections(model):
        src_index = {s: i for i, s in enumerate(graph.sources)}
        dst_index = {d: i for i, d in enumerate(graph.destinations)}
        only = torch.zeros(len(graph.sources), len(graph.destinations), dtype=torch.bool)
        for s, d in pairs:
            only[src_index[s], dst_index[d]] = True
        found = exact_edge_patching(model, batches, graph=graph, only=only, progress=False)
        return [float(found.scores[src_index[s], dst_index[d]]) for s, d in pairs]
    cfg = model.cfg
    by_dst: dict[str, list[int]] = {}
    for i, (_, dst) in enumerate(pairs):
        by_dst.setdefault(dst, []).append(i)
    sources = {Node.parse(s) for s, _ in pairs}
    names = {node.out_hook() if node.kind != "attn_head" else Hook.z(node.layer or 0)
             for node in sources}  # fmt: skip
    names |= {Hook.resid_pre(Node.parse(d).layer or 0) for d in by_dst if d != "logits"}
    stop = {"names_filter": names.__contains__, "stop_at_layer": cfg.n_layers}
    sums = torch.zeros(len(pairs), dtype=torch.float64)
    m_clean = m_corrupt = 0.0
    reuse = runs is not None and runs.clean_sources is not None and runs.layer_inputs is not None
    final = Node.logits().in_hook(cfg.n_layers)
    with graph_hooks_enabled(model, graph, split_qkv=False):
        for b, batch in enumerate(batches):
            if reuse:
                assert runs is not None and runs.clean_sources and runs.layer_inputs
                clean = runs.clean_sources[b]
                corrupt = runs.sources[b] | runs.layer_inputs[b]
                corr_final = corrupt[final]
            else:
                clean_final, clean = model.run_with_cache(batch.clean, **stop)
                corr_final, corrupt = model.run_with_cache(batch.corrupt, **stop)
                m_clean += float(batch.metric.final(model, clean_final, batch.target).sum())
                m_corrupt += float(batch.metric.final(model, corr_final, batch.target).sum())

            def delta(src: str, clean=clean, corrupt=corrupt) -> torch.Tensor:
                node = Node.parse(src)
                if node.kind == "attn_head":
                    layer, head = node.layer or 0, node.head or 0
                    dz = clean[Hook.z(layer)][:, :, head] - corrupt[Hook.z(layer)][:, :, head]
                    return dz @ model.blocks[layer].attn.W_O[head]
                return clean[node.out_hook()] - corrupt[node.out_hook()]

            for dst, rows in by_dst.items():
                deltas = torch.stack([delta(pairs[i][0]) for i in rows])  # [k, b, pos, d]
                if dst == Node.logits().id:
                    values = torch.stack(
                        [batch.metric.final(model, corr_final + d, batch.target) for d in deltas]
                    )
                else:
                    values = _moved_pass(model, batch, dst, corrupt, deltas)
                sums[rows] += values.sum(1).double().cpu()
    n = sum(b.size for b in batches)
    if reuse and runs is not None:
        m_clean, m_corrupt = runs.m_clean, runs.m_corrupt
    else:
        m_clean, m_corrupt = m_clean / n, m_corrupt / n
    gap = metric_gap(m_clean, m_corrupt)
    return ((sums / n - m_corrupt) / gap).tolist()


def _moved_pass(
    model: HookedTransformer,
    batch: PromptBatch,
    dst: str,
    corrupt: object,
    deltas: torch.Tensor,
) -> torch.Tensor:
    """The metric on each prompt ([k, b]) of the corrupt run from `dst`'s layer on, copy i with
    `dst`'s input moved by `deltas[i]`."""
    node = Node.parse(dst)
    layer = node.layer or 0
    k, b = deltas.shape[0], batch.size
    resid = corrupt[Hook.resid_pre(layer)]  # type: ignore[index]
    if node.kind == "mlp":
        flat = deltas.reshape(k * b, *deltas.shape[2:])

        def move(act: torch.Tensor, hook: object) -> torch.Tensor:
            return act + flat

        hook = node.in_hook(model.cfg.n_layers)
    else:  # a head's query, key or value
        head, port = node.head or 0, node.port or "q"
        moved = input_norm_in_place(model, layer, resid[None] + deltas, Scratch())
        heads = torch.full((k,), head, dtype=torch.long, device=deltas.device)
        values = head_projection(model, layer, port, moved, heads, None)  # [b, pos, k, d_head]

        def move(act: torch.Tensor, hook: object) -> torch.Tensor:
            out = act.view(k, b, *act.shape[1:]).clone()
            out[:, :, :, head] = values.permute(2, 0, 1, 3)
            return out.view(act.shape)

        hook = Hook.qkv(layer, port)
    final = model.run_with_hooks(
        repeat_rows(resid, k), start_at_layer=layer, stop_at_layer=model.cfg.n_layers,
        fwd_hooks=[(hook, move)],
    )  # fmt: skip
    return batch.metric.final(model, final, batch.target.repeat(k)).view(k, b)


@torch.no_grad()
def exact_head_patching(
    model: HookedTransformer, batches: list[PromptBatch], heads: list[tuple[int, int]]
) -> list[float]:
    """Denoising of each head's output (`hook_z`, every position) on its own: the corrupt run
    with that head's clean output, `(m_patched - m_corrupt) / (m_clean - m_corrupt)`, as
    `act_patch_denoise` scores it. One partial forward pass per head and batch, from the
    head's layer on."""
    cfg = model.cfg
    layers = sorted({layer for layer, _ in heads})
    names = {Hook.z(layer) for layer in layers} | {Hook.resid_pre(layer) for layer in layers}
    n = sum(b.size for b in batches)
    sums = torch.zeros(len(heads), dtype=torch.float64, device=model_device(model))
    m_clean = m_corrupt = 0.0
    stop = {"names_filter": names.__contains__, "stop_at_layer": cfg.n_layers}
    for batch in batches:
        clean_final, clean = model.run_with_cache(batch.clean, **stop)
        corr_final, corrupt = model.run_with_cache(batch.corrupt, **stop)
        m_clean += float(batch.metric.final(model, clean_final, batch.target).sum())
        m_corrupt += float(batch.metric.final(model, corr_final, batch.target).sum())
        for i, (layer, head) in enumerate(heads):
            source = clean[Hook.z(layer)][:, :, head]

            def patch(z: torch.Tensor, hook: object, source=source, head=head) -> torch.Tensor:
                z = z.clone()
                z[:, :, head] = source
                return z

            final = model.run_with_hooks(
                corrupt[Hook.resid_pre(layer)], start_at_layer=layer,
                stop_at_layer=cfg.n_layers, fwd_hooks=[(Hook.z(layer), patch)],
            )  # fmt: skip
            sums[i] += float(batch.metric.final(model, final, batch.target).sum())
    m_clean, m_corrupt = m_clean / n, m_corrupt / n
    gap = metric_gap(m_clean, m_corrupt)
    return ((sums / n - m_corrupt) / gap).tolist()


def check_heads(
    model: HookedTransformer,
    batches: list[PromptBatch],
    scores: list[tuple[str, float]],
    n: int,
) -> SpotCheck | None:
    """`n` of the heads' scores (`(node id, score)`, `sample_items`) measured by denoising
    each head's output exactly (`exact_head_patching`)."""
    chosen = sample_items([s for _, s in scores], n)
    if not chosen:
        return None
    nodes = [scores[i][0] for i, _ in chosen]
    heads = [(Node.parse(node).layer or 0, Node.parse(node).head or 0) for node in nodes]
    exact = exact_head_patching(model, batches, heads)
    return node_check(nodes, [s for _, s in chosen], [scores[i][1] for i, _ in chosen], exact)
