"""Circuits from edge scores: selection with networkx, and faithfulness by edge ablation.

A circuit is a set of edges of the model's graph (`workbench.attribution.edges`). Selection by
`top:N` (the N edges of largest |score|) or `threshold:X` (|score| >= X) keeps only the edges
that lie on a path from `input` to `logits` (edges into a head's q/k/v input count as edges into
the head). Faithfulness is the metric of the clean prompts with every edge *outside* the circuit
ablated, as a fraction of the clean-vs-corrupt gap: `(m_circuit - m_corrupt) / (m_clean -
m_corrupt)`. Ablating an edge replaces its source's output by the source's output on the corrupt
prompt, for that destination only (the input of the destination moves by
`src_corrupt - src_current`), so the full graph scores 1 and the empty circuit scores 0.
"""

import math
from dataclasses import dataclass

import networkx as nx
import torch
from transformer_lens import HookedTransformer

from workbench.attribution.batches import PromptBatch, logit_diff
from workbench.attribution.edges import EdgeGraph, graph_hooks_enabled, source_outputs
from workbench.attribution.patching import metric_gap
from workbench.graph import split_port

Edge = tuple[str, str, float]


@dataclass(frozen=True)
class Circuit:
    rule: str
    edges: list[Edge]

    @property
    def nodes(self) -> set[str]:
        return {split_port(n)[0] for e in self.edges for n in e[:2]}


def select(edges: list[Edge], rule: str) -> Circuit:
    """The circuit of `rule` (`top:N` or `threshold:X`) pruned to input -> logits paths."""
    kind, _, value = rule.partition(":")
    ranked = sorted(edges, key=lambda e: -abs(e[2]))
    if kind == "top":
        chosen = ranked[: int(value)]
    elif kind == "threshold":
        chosen = [e for e in ranked if abs(e[2]) >= float(value)]
    else:
        raise ValueError(f"circuit rule {rule!r}: expected top:N or threshold:X")
    return Circuit(rule, on_input_to_logits_paths(chosen))


def on_input_to_logits_paths(edges: list[Edge]) -> list[Edge]:
    graph = nx.DiGraph()
    for src, dst, _ in edges:
        graph.add_edge(src, split_port(dst)[0])
    if "input" not in graph or "logits" not in graph:
        return []
    forward = nx.descendants(graph, "input") | {"input"}
    backward = nx.ancestors(graph, "logits") | {"logits"}
    keep = forward & backward
    return [e for e in edges if e[0] in keep and split_port(e[1])[0] in keep]


@torch.no_grad()
def faithfulness(
    model: HookedTransformer, batches: list[PromptBatch], graph: EdgeGraph, circuit: list[Edge]
) -> float:
    """Metric with every graph edge outside `circuit` ablated, as a fraction of the gap."""
    index_src = {s: i for i, s in enumerate(graph.sources)}
    index_dst = {d: i for i, d in enumerate(graph.destinations)}
    keep = torch.zeros(len(graph.sources), len(graph.destinations))
    for src, dst, _ in circuit:
        keep[index_src[src], index_dst[dst]] = 1.0
    removed = graph.valid.float() * (1 - keep)
    n = sum(b.size for b in batches)
    m_clean = m_corrupt = m_circuit = 0.0
    with graph_hooks_enabled(model, graph):
        for batch in batches:
            clean_logits, _ = model.run_with_cache(batch.clean, names_filter=lambda name: False)
            corr_logits, corrupt = model.run_with_cache(batch.corrupt)
            m_clean += float(logit_diff(clean_logits, batch.answer, batch.wrong).sum())
            m_corrupt += float(logit_diff(corr_logits, batch.answer, batch.wrong).sum())
            corrupt_out = source_outputs(model, graph, dict(corrupt.items()))
            logits = _run_with_removed_edges(model, batch, graph, removed, corrupt_out)
            m_circuit += float(logit_diff(logits, batch.answer, batch.wrong).sum())
    gap = metric_gap(m_clean / n, m_corrupt / n)
    return (m_circuit / n - m_corrupt / n) / gap


def _run_with_removed_edges(
    model: HookedTransformer,
    batch: PromptBatch,
    graph: EdgeGraph,
    removed: torch.Tensor,
    corrupt_out: torch.Tensor,
) -> torch.Tensor:
    """Clean forward pass in which each destination's input moves by
    `sum over removed sources of (src_corrupt - src_current)`."""
    cfg = model.cfg
    current: dict[int, torch.Tensor] = {}  # source index -> its output in this run
    order = {name: i for i, name in enumerate(graph.sources)}

    def record_input(act: torch.Tensor, hook: object) -> None:
        current[order["input"]] = act.clone()

    def record_heads(z: torch.Tensor, hook: object) -> None:
        layer = int(hook.name.split(".")[1])  # type: ignore[attr-defined]
        outs = torch.einsum("bphe,hed->hbpd", z, model.W_O[layer])
        for head in range(cfg.n_heads):
            current[order[f"a{layer}.h{head}"]] = outs[head]

    def record_mlp(act: torch.Tensor, hook: object) -> None:
        current[order[f"m{hook.name.split('.')[1]}"]] = act.clone()  # type: ignore[attr-defined]

    def shift_for(dst_indices: list[int]) -> torch.Tensor:
        srcs = sorted(current)
        diffs = corrupt_out[srcs] - torch.stack([current[s] for s in srcs])  # [s, b, p, d]
        return torch.einsum("sbpd,st->tbpd", diffs, removed[srcs][:, dst_indices])

    dst_index = {d: i for i, d in enumerate(graph.destinations)}

    def move_qkv(act: torch.Tensor, hook: object) -> torch.Tensor:
        layer, port = hook.name.split(".")[1], hook.name.split("_")[-2]  # type: ignore[attr-defined]
        idx = [dst_index[f"a{layer}.h{h}<{port}>"] for h in range(cfg.n_heads)]
        return act + shift_for(idx).permute(1, 2, 0, 3)

    def move_single(name: str) -> object:
        def move(act: torch.Tensor, hook: object) -> torch.Tensor:
            return act + shift_for([dst_index[name]])[0]

        return move

    hooks: list = [("blocks.0.hook_resid_pre", record_input)]
    for layer in range(cfg.n_layers):
        hooks += [(f"blocks.{layer}.hook_{p}_input", move_qkv) for p in "qkv"]
        hooks.append((f"blocks.{layer}.attn.hook_z", record_heads))
        if f"m{layer}" in graph.destinations:
            hooks.append((f"blocks.{layer}.hook_mlp_in", move_single(f"m{layer}")))
        if f"m{layer}" in graph.sources:
            hooks.append((f"blocks.{layer}.hook_mlp_out", record_mlp))
    hooks.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", move_single("logits")))
    return model.run_with_hooks(batch.clean, fwd_hooks=hooks)


def size_grid(n_edges: int, points: int = 12) -> list[int]:
    """Circuit sizes for a faithfulness curve: 1 .. n_edges, roughly geometric."""
    sizes = {max(1, round(math.exp(i * math.log(n_edges) / (points - 1)))) for i in range(points)}
    return sorted(sizes | {n_edges})


def faithfulness_curve(
    model: HookedTransformer, batches: list[PromptBatch], graph: EdgeGraph, edges: list[Edge]
) -> list[tuple[int, int, float]]:
    """(requested top-n, edges kept on input->logits paths, faithfulness) along a size grid."""
    curve = []
    for size in size_grid(len(edges)):
        circuit = select(edges, f"top:{size}")
        curve.append((size, len(circuit.edges), faithfulness(model, batches, graph, circuit.edges)))
    return curve


def smallest_faithful(curve: list[tuple[int, int, float]], target: float = 0.8) -> int:
    """The smallest top-n whose circuit reaches `target` faithfulness (else the largest)."""
    for size, _kept, value in curve:
        if value >= target:
            return size
    return curve[-1][0]
