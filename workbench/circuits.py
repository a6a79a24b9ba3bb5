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

import logging
import math
import time
from dataclasses import dataclass

import networkx as nx
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.batches import PromptBatch, repeat_rows
from workbench.attribution.edges import (
    EdgeGraph,
    graph_hooks_enabled,
    model_graph,
    source_hooks,
    source_outputs,
)
from workbench.attribution.metrics import last_position_logits
from workbench.attribution.patching import metric_gap
from workbench.core import QKV, Edge, Hook, Node
from workbench.graph import split_port
from workbench.results import CircuitResult

logger = logging.getLogger(__name__)


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
    start, end = Node.input().id, Node.logits().id
    if start not in graph or end not in graph:
        return []
    forward = nx.descendants(graph, start) | {start}
    backward = nx.ancestors(graph, end) | {end}
    keep = forward & backward
    return [e for e in edges if e[0] in keep and split_port(e[1])[0] in keep]


class EdgeAblator:
    """The metric with any set of graph edges ablated, caching what every evaluation shares
    (the clean and corrupt metrics and every source's corrupt output): one forward pass per
    evaluation."""

    def __init__(self, model: HookedTransformer, batches: list[PromptBatch], graph: EdgeGraph):
        self.model, self.batches, self.graph = model, batches, graph
        self.index_src = {s: i for i, s in enumerate(graph.sources)}
        self.index_dst = {d: i for i, d in enumerate(graph.destinations)}
        self.n = sum(b.size for b in batches)
        m_clean = m_corrupt = 0.0
        self.corrupt_out: list[torch.Tensor] = []
        keep = source_hooks(model, graph)  # (not the whole cache: only what sources write)
        with torch.no_grad(), graph_hooks_enabled(model, graph):
            for batch in batches:
                clean_logits = model(batch.clean)
                corr_logits, corrupt = model.run_with_cache(batch.corrupt, names_filter=keep)
                m_clean += float(batch.metric(clean_logits, batch.target).sum())
                m_corrupt += float(batch.metric(corr_logits, batch.target).sum())
                self.corrupt_out.append(source_outputs(model, graph, dict(corrupt.items())))
        self.m_clean, self.m_corrupt = m_clean / self.n, m_corrupt / self.n
        self.gap = metric_gap(self.m_clean, self.m_corrupt)

    def mask(self, edges: list[Edge] | list[tuple[str, str]]) -> torch.Tensor:
        """[n_src, n_dst] with 1 at the given edges."""
        out = torch.zeros(len(self.graph.sources), len(self.graph.destinations), device="cpu")
        for edge in edges:
            out[self.index_src[edge[0]], self.index_dst[edge[1]]] = 1.0
        return out

    def faithfulness_of_kept(self, kept: torch.Tensor) -> float:
        """Normalised metric with every valid edge outside `kept` ablated."""
        return self.faithfulness_of_many([kept])[0]

    @torch.no_grad()
    def faithfulness_of_many(self, kept: list[torch.Tensor], *, max_rows: int = 64) -> list[float]:
        """`faithfulness_of_kept` of several edge masks, as many per forward pass as fit in
        `max_rows` prompt rows (each mask runs on its own copy of the batch)."""
        valid = self.graph.valid.float()
        removed = torch.stack([valid * (1 - k.cpu()) for k in kept])  # [m, n_src, n_dst]
        removed = removed.to(self.corrupt_out[0])  # the activations' device and dtype
        totals = torch.zeros(len(kept), dtype=torch.float64, device=removed.device)
        with graph_hooks_enabled(self.model, self.graph):
            for batch, corrupt_out in zip(self.batches, self.corrupt_out, strict=True):
                per_pass = max(1, max_rows // batch.size)
                for first in range(0, len(kept), per_pass):
                    chunk = removed[first : first + per_pass]
                    logits = _run_with_removed_edges(
                        self.model, batch, self.graph, chunk, corrupt_out
                    )
                    copies = chunk.shape[0]
                    metric = batch.metric(logits, batch.target.repeat(copies))
                    metric = metric.view(copies, batch.size)
                    totals[first : first + copies] += metric.sum(1).double()
        return [(float(t) / self.n - self.m_corrupt) / self.gap for t in totals]


def faithfulness(
    model: HookedTransformer, batches: list[PromptBatch], graph: EdgeGraph, circuit: list[Edge]
) -> float:
    """Metric with every graph edge outside `circuit` ablated, as a fraction of the gap."""
    ablator = EdgeAblator(model, batches, graph)
    return ablator.faithfulness_of_kept(ablator.mask(circuit))


def _run_with_removed_edges(
    model: HookedTransformer,
    batch: PromptBatch,
    graph: EdgeGraph,
    removed: torch.Tensor,
    corrupt_out: torch.Tensor,
) -> torch.Tensor:
    """Clean forward passes, one copy of the batch per mask `removed[m]` ([m, n_src, n_dst]),
    in which each destination's input moves by `sum over removed sources of
    (src_corrupt - src_current)`. Sources are recorded in graph order as the pass reaches
    them; `diffs` holds `src_corrupt - src_current` for those seen so far (a destination only
    reads sources upstream of it, which the pass has already recorded). Returns the last
    position's logits ([m * batch, 1, d_vocab]), all a metric reads."""
    cfg = model.cfg
    copies = removed.shape[0]
    n_src, b = corrupt_out.shape[0], batch.size
    diffs = corrupt_out.new_zeros(n_src, copies * b, *corrupt_out.shape[2:])
    order = {name: i for i, name in enumerate(graph.sources)}
    seen = [0]  # how many sources (a prefix of graph.sources) have been recorded

    def record(index: int, out: torch.Tensor) -> None:
        diffs[index] = repeat_rows(corrupt_out[index], copies) - out
        seen[0] = max(seen[0], index + 1)

    def record_at(index: int) -> object:
        def record_hook(act: torch.Tensor, hook: object) -> None:
            record(index, act)

        return record_hook

    def record_heads(layer: int) -> object:
        first = order[Node.head_of(layer, 0).id]

        def record_hook(z: torch.Tensor, hook: object) -> None:
            outs = torch.einsum("bphe,hed->hbpd", z, model.W_O[layer])
            corrupt_heads = corrupt_out[first : first + cfg.n_heads].repeat(1, copies, 1, 1)
            diffs[first : first + cfg.n_heads] = corrupt_heads - outs  # copy-major, as the batch
            seen[0] = max(seen[0], first + cfg.n_heads)

        return record_hook

    def shift_for(dst_indices: list[int]) -> torch.Tensor:
        k = seen[0]
        upstream = diffs[:k].view(k, copies, b, *diffs.shape[2:])  # [s, m, b, p, d]
        shift = torch.einsum("smbpd,mst->tmbpd", upstream, removed[:, :k][:, :, dst_indices])
        return shift.reshape(len(dst_indices), copies * b, *diffs.shape[2:])

    dst_index = {d: i for i, d in enumerate(graph.destinations)}

    def move_qkv(layer: int, port: str) -> object:
        idx = [dst_index[Node.head_of(layer, h, port).id] for h in range(cfg.n_heads)]

        def move(act: torch.Tensor, hook: object) -> torch.Tensor:
            return act + shift_for(idx).permute(1, 2, 0, 3)

        return move

    def move_single(node: Node) -> object:
        def move(act: torch.Tensor, hook: object) -> torch.Tensor:
            return act + shift_for([dst_index[node.id]])[0]

        return move

    inputs = Node.input()
    hooks: list = [(inputs.out_hook(), record_at(order[inputs.id]))]
    for layer in range(cfg.n_layers):
        hooks += [(Hook.qkv_input(layer, p), move_qkv(layer, p)) for p in QKV]
        hooks.append((Hook.z(layer), record_heads(layer)))
        mlp = Node.mlp(layer)
        if mlp.id in graph.destinations:
            hooks.append((mlp.in_hook(cfg.n_layers), move_single(mlp)))
        if mlp.id in graph.sources:
            hooks.append((mlp.out_hook(), record_at(order[mlp.id])))
    hooks.append((Node.logits().in_hook(cfg.n_layers), move_single(Node.logits())))
    resid = model.run_with_hooks(
        repeat_rows(batch.clean, copies), fwd_hooks=hooks, stop_at_layer=cfg.n_layers
    )
    return last_position_logits(model, resid)


def size_grid(n_edges: int, points: int = 12) -> list[int]:
    """Circuit sizes for a faithfulness curve: 1 .. n_edges, roughly geometric."""
    sizes = {max(1, round(math.exp(i * math.log(n_edges) / (points - 1)))) for i in range(points)}
    return sorted(sizes | {n_edges})


def faithfulness_curve(
    model: HookedTransformer, batches: list[PromptBatch], graph: EdgeGraph, edges: list[Edge]
) -> list[tuple[int, int, float]]:
    """(requested top-n, edges kept on input->logits paths, faithfulness) along a size grid."""
    ablator = EdgeAblator(model, batches, graph)
    sizes = size_grid(len(edges))
    ranked = sorted(edges, key=lambda e: -abs(e[2]))
    kept = [on_input_to_logits_paths(ranked[:size]) for size in sizes]
    values = ablator.faithfulness_of_many([ablator.mask(k) for k in kept])
    return [(size, len(k), v) for size, k, v in zip(sizes, kept, values, strict=True)]


def acdc(ablator: EdgeAblator, *, threshold: float) -> tuple[list[Edge], list[Edge], float]:
    """ACDC-style greedy pruning (Conmy et al. 2023), with the normalised metric in place of
    the KL divergence: starting from the full graph, visit destinations from the logits
    backwards and try removing each incoming edge; keep it removed if the faithfulness drops by
    less than `threshold`. One forward pass per edge tried. Returns (every tried edge scored by
    the drop its removal caused when tried, the kept edges, the final faithfulness)."""
    graph = ablator.graph
    kept = graph.valid.float().clone()
    started = time.perf_counter()
    current = ablator.faithfulness_of_kept(kept)
    one_pass = time.perf_counter() - started
    logger.info(
        "acdc: %d edges to try, one forward pass each: about %.0f s (progress and ETA follow)",
        graph.n_edges, graph.n_edges * one_pass,
    )  # fmt: skip
    progress = tqdm(total=graph.n_edges, desc="acdc", unit="edge")
    order = sorted(
        range(len(graph.destinations)), key=lambda t: -graph.destination_layer[t]
    )  # logits first
    tried: list[Edge] = []
    for t in order:
        for s in range(len(graph.sources)):
            if not graph.valid[s, t]:
                continue
            progress.update(1)
            kept[s, t] = 0.0
            value = ablator.faithfulness_of_kept(kept)
            drop = current - value
            tried.append((graph.sources[s], graph.destinations[t], drop))
            if drop < threshold:
                current = value
            else:
                kept[s, t] = 1.0
    progress.close()
    circuit = [e for e in tried if kept[ablator.index_src[e[0]], ablator.index_dst[e[1]]] > 0]
    return tried, on_input_to_logits_paths(circuit), current


def smallest_faithful(curve: list[tuple[int, int, float]], target: float = 0.8) -> int:
    """The smallest top-n whose circuit reaches `target` faithfulness (else the largest)."""
    for size, _kept, value in curve:
        if value >= target:
            return size
    return curve[-1][0]


def smallest_faithful_circuit(
    model: HookedTransformer,
    batches: list[PromptBatch],
    graph: EdgeGraph,
    edges: list[Edge],
    *,
    target: float,
    method: str,
) -> tuple[list[tuple[int, int, float]], CircuitResult]:
    """The faithfulness curve of `edges` ranked by |score|, and the circuit a scoring method
    stores from it: the smallest top-n (on input->logits paths) whose faithfulness reaches
    `target`, else the largest."""
    curve = faithfulness_curve(model, batches, graph, edges)
    size = smallest_faithful(curve, target)
    circuit = select(edges, f"top:{size}")
    faith = next(f for n, _, f in curve if n == size)
    name = f"{method}: smallest top-n with faithfulness >= {target}"
    return curve, CircuitResult(name, circuit.rule, circuit.edges, len(circuit.nodes), faith)


@dataclass
class AcdcRun:
    """What `run_acdc` found: the metric on the clean and corrupt prompts, every tried edge with
    the drop its removal caused, and the kept circuit."""

    metric_clean: float
    metric_corrupt: float
    tried: list[Edge]
    circuit: CircuitResult


def run_acdc(model: HookedTransformer, batches: list[PromptBatch], threshold: float) -> AcdcRun:
    """ACDC (`acdc`) over the model's whole edge graph."""
    ablator = EdgeAblator(model, batches, model_graph(model))
    tried, kept, faith = acdc(ablator, threshold=threshold)
    circuit = CircuitResult(
        f"acdc: greedy pruning, threshold {threshold}",
        f"acdc:{threshold}",
        kept,
        len(Circuit("acdc", kept).nodes),
        faith,
    )
    return AcdcRun(ablator.m_clean, ablator.m_corrupt, tried, circuit)
