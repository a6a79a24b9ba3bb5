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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench import memory, profiling
from workbench.attribution.batches import PromptBatch, lean_activations, repeat_rows
from workbench.attribution.edges import (
    CorruptRuns,
    EdgeGraph,
    ablation_hooks,
    covers_residual_stream,
    graph_hooks_enabled,
    head_projection,
    input_norm_in_place,
    model_graph,
)
from workbench.attribution.metrics import last_position_logits
from workbench.attribution.patching import metric_gap
from workbench.core import QKV, Edge, Hook, Node
from workbench.graph import split_port
from workbench.memory import Scratch
from workbench.results import CircuitResult

logger = logging.getLogger(__name__)

BOOTSTRAP_RESAMPLES = 1000  # resamples of the prompts behind a circuit's faithfulness spread
# What the sources' differences of one ablated pass may hold beyond one copy of the batch: a
# pass runs several masks, each on its own copy, only while their differences fit in this. Each
# copy holds every source's difference from the corrupt run (0.2 GB for 32 prompts of 13 tokens
# on the GPT-2-small shape): at that size a second copy in the pass saved 0.1-0.3 s of a 4-5 s
# curve and set the run's peak, 0.1 GB above the attribution's. Like `--batch-tokens`, the
# grouping may move a curve value's last bits (a matrix product's rows are not always the same
# bits at another row count).
PASS_DIFFERENCES_BYTES = 64 << 20


@dataclass(frozen=True)
class Circuit:
    rule: str
    edges: list[Edge]

    @property
    def nodes(self) -> set[str]:
        ends = {n for e in self.edges for n in e[:2]}  # a few hundred names among many edges
        return {split_port(n)[0] for n in ends}


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
    """The edges that lie on some path from the input to the logits (a head's q/k/v ports
    being the head), in their order."""
    return _on_paths(edges, _node_pairs(edges))


def _node_pairs(edges: list[Edge]) -> list[tuple[str, str]]:
    """Each edge as (source node, destination node), a port's head for the destination."""
    head: dict[str, str] = {}  # a few hundred destinations among many edges: each split once
    for _, dst, _ in edges:
        if dst not in head:
            head[dst] = split_port(dst)[0]
    return [(src, head[dst]) for src, dst, _ in edges]


def _on_paths(edges: list[Edge], pairs: list[tuple[str, str]]) -> list[Edge]:
    """`on_input_to_logits_paths` given each edge's `_node_pairs` (a curve prunes many prefixes
    of one ranking, and computes them once)."""
    succ: dict[str, set[str]] = {}
    pred: dict[str, set[str]] = {}
    for a, b in pairs:
        succ.setdefault(a, set()).add(b)
        pred.setdefault(b, set()).add(a)
    start, end = Node.input().id, Node.logits().id
    if start not in succ or end not in pred:
        return []
    keep = _reachable(start, succ) & _reachable(end, pred)
    return [e for e, (a, b) in zip(edges, pairs, strict=True) if a in keep and b in keep]


def _reachable(start: str, step: dict[str, set[str]]) -> set[str]:
    """`start` and every node reachable from it along `step`."""
    seen, frontier = {start}, [start]
    while frontier:
        for nxt in step.get(frontier.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return seen


class EdgeAblator:
    """The metric with any set of graph edges ablated, caching what every evaluation shares
    (the clean and corrupt metrics and what every source writes on the corrupt prompts, taken
    from `runs` when an attribution made them): one forward pass per evaluation."""

    def __init__(
        self,
        model: HookedTransformer,
        batches: list[PromptBatch],
        graph: EdgeGraph,
        runs: CorruptRuns | None = None,
    ):
        self.model, self.batches, self.graph = model, batches, graph
        self.index_src = {s: i for i, s in enumerate(graph.sources)}
        self.index_dst = {d: i for i, d in enumerate(graph.destinations)}
        self.n = sum(b.size for b in batches)
        if runs is None:
            with profiling.stage("ablation: clean and corrupt runs"):
                runs = corrupt_runs(model, batches, graph)
        self.runs = runs
        self.m_clean, self.m_corrupt = self.runs.m_clean, self.runs.m_corrupt
        # the metric on each prompt of the masks of the last `faithfulness_of_many` call that
        # needed a pass: mask index -> [n_prompts] float64
        self.prompt_values: dict[int, torch.Tensor] = {}
        self.gap = metric_gap(self.m_clean, self.m_corrupt)
        self.complete = covers_residual_stream(model, graph)

    def mask(self, edges: list[Edge] | list[tuple[str, str]]) -> torch.Tensor:
        """[n_src, n_dst] with 1 at the given edges."""
        out = torch.zeros(len(self.graph.sources), len(self.graph.destinations), device="cpu")
        if edges:
            src = torch.tensor([self.index_src[e[0]] for e in edges], device="cpu")
            dst = torch.tensor([self.index_dst[e[1]] for e in edges], device="cpu")
            out[src, dst] = 1.0
        return out

    def faithfulness_of_kept(self, kept: torch.Tensor) -> float:
        """Normalised metric with every valid edge outside `kept` ablated."""
        return self.faithfulness_of_many([kept])[0]

    @torch.no_grad()
    def faithfulness_of_many(
        self, kept: list[torch.Tensor], *, max_rows: int = 64, max_tokens: int | None = None
    ) -> list[float]:
        """`faithfulness_of_kept` of several edge masks, as many per forward pass as fit in
        `max_rows` prompt rows and `max_tokens` tokens and their sources' differences in
        `PASS_DIFFERENCES_BYTES` (each mask runs on its own copy of the batch; one at the
        least). Two masks need no pass: keeping every edge is the clean run (1 by definition)
        and keeping none the corrupt run (0); a mask given twice runs once."""
        valid = self.graph.valid.float()
        values: list[float | None] = [None] * len(kept)
        unique: dict[bytes, int] = {}  # removed mask -> its row in `removed`
        rows: list[torch.Tensor] = []
        where: list[tuple[int, int]] = []  # (mask, its row)
        for i, k in enumerate(kept):
            removed_i = valid * (1 - k.cpu())
            n_removed = int(removed_i.count_nonzero())
            if n_removed == 0:
                values[i] = 1.0
            elif n_removed == self.graph.n_edges and self.complete:
                values[i] = 0.0
            else:
                key = removed_i.bool().numpy().tobytes()
                if key not in unique:
                    unique[key] = len(rows)
                    rows.append(removed_i)
                where.append((i, unique[key]))
        self.prompt_values = {}
        if rows:
            totals, each = self._metric_totals(torch.stack(rows), max_rows, max_tokens)
            for i, row in where:
                values[i] = (float(totals[row]) / self.n - self.m_corrupt) / self.gap
                self.prompt_values[i] = each[row]
        return [float(v) for v in values if v is not None]

    def bootstrap(
        self, prompt_values: torch.Tensor | None, resamples: int = BOOTSTRAP_RESAMPLES
    ) -> dict[str, float]:
        """The spread of a circuit's faithfulness over prompts (`bootstrap_faithfulness`), from
        its metric on each prompt (None: the full graph or the empty circuit, whose
        faithfulness is 1 or 0 on every resample)."""
        runs = self.runs
        if prompt_values is None or runs.clean_values is None or runs.corrupt_values is None:
            return {}
        return bootstrap_faithfulness(
            prompt_values, runs.clean_values, runs.corrupt_values, resamples=resamples
        )

    @torch.no_grad()
    def _metric_totals(
        self, removed: torch.Tensor, max_rows: int, max_tokens: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The metric summed over prompts with the edges of each `removed[m]` ablated, and its
        value on each prompt ([masks, n_prompts], float64 on the CPU)."""
        first_acts = next(iter(self.runs.sources[0].values()))
        removed = removed.to(first_acts)  # the activations' device and dtype
        totals = torch.zeros(removed.shape[0], dtype=torch.float64, device=removed.device)
        each: list[torch.Tensor] = []
        with (
            graph_hooks_enabled(self.model, self.graph, split_qkv=False),
            lean_activations(self.model),
        ):
            for batch, corrupt in zip(self.batches, self.runs.sources, strict=True):
                pos = batch.clean.shape[1]
                rows = max_rows if max_tokens is None else min(max_rows, max_tokens // pos)
                # what every source writes, per copy: one buffer for all of a batch's passes
                width = batch.size * math.prod(corrupt[Node.input().out_hook()].shape[1:])
                per_copy = len(self.graph.sources) * width * removed.element_size()
                fit = max(1, PASS_DIFFERENCES_BYTES // per_copy)
                per_pass = min(max(1, rows // batch.size), fit, removed.shape[0])
                diffs = removed.new_empty(per_pass, len(self.graph.sources), width)
                # the mixed heads' inputs, one copy at a time, at most every q/k/v of a layer
                scratch = Scratch(at_least=len(QKV) * self.model.cfg.n_heads * width)
                batch_values = []
                for first in range(0, removed.shape[0], per_pass):
                    chunk = removed[first : first + per_pass]
                    logits = _run_with_removed_edges(
                        self.model, batch, self.graph, chunk, corrupt, diffs[: len(chunk)], scratch
                    )
                    copies = chunk.shape[0]
                    metric = batch.metric(logits, batch.target.repeat(copies))
                    metric = metric.view(copies, batch.size)
                    totals[first : first + copies] += metric.sum(1).double()
                    batch_values.append(metric.detach().double().cpu())
                each.append(torch.cat(batch_values))
        memory.release()  # the passes' buffers (each pass reuses the one before's)
        return totals, torch.cat(each, dim=1)


def corrupt_runs(
    model: HookedTransformer, batches: list[PromptBatch], graph: EdgeGraph
) -> CorruptRuns:
    """The clean and corrupt forward passes an ablation needs (`CorruptRuns`)."""
    keep = ablation_hooks(model, graph)  # (not the whole cache: only what ablation reads)
    m_clean = m_corrupt = 0.0
    sources = []
    values: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    last = {"stop_at_layer": model.cfg.n_layers}
    with (
        torch.no_grad(),
        graph_hooks_enabled(model, graph, split_qkv=False),
        lean_activations(model),
    ):
        for batch in batches:
            clean_resid = model(batch.clean, **last)
            corr_resid, corrupt = model.run_with_cache(batch.corrupt, names_filter=keep, **last)
            clean_m = batch.metric(last_position_logits(model, clean_resid), batch.target)
            corrupt_m = batch.metric(last_position_logits(model, corr_resid), batch.target)
            m_clean += float(clean_m.sum())
            m_corrupt += float(corrupt_m.sum())
            values[0].append(clean_m.double().cpu())
            values[1].append(corrupt_m.double().cpu())
            sources.append(dict(corrupt.items()))
    n = sum(b.size for b in batches)
    return CorruptRuns(
        sources, m_clean / n, m_corrupt / n, torch.cat(values[0]), torch.cat(values[1])
    )


def bootstrap_faithfulness(
    circuit: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, float]:
    """The spread of a circuit's faithfulness `(mean(circuit) - mean(corrupt)) / (mean(clean) -
    mean(corrupt))` over bootstrap resamples of the prompts (drawn with replacement, the same
    draw for the three per-prompt metrics, seeded): `faithfulness_sd` (their standard
    deviation) and `faithfulness_lo`, `faithfulness_hi` (their 2.5 and 97.5 percentiles).
    A resample whose gap is 0 is left out."""
    n = int(circuit.shape[0])
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, n, size=(resamples, n))
    c, k, r = (t.double().cpu().numpy()[draw].mean(1) for t in (circuit, clean, corrupt))
    gap = k - r
    ok = gap != 0
    values = (c[ok] - r[ok]) / gap[ok]
    if values.size < 2:
        return {}
    lo, hi = np.percentile(values, [2.5, 97.5])
    return {
        "faithfulness_sd": float(values.std(ddof=1)),
        "faithfulness_lo": float(lo),
        "faithfulness_hi": float(hi),
    }


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
    corrupt: dict[str, torch.Tensor],
    diffs: torch.Tensor,
    scratch: Scratch,
) -> torch.Tensor:
    """Clean forward passes, one copy of the batch per mask `removed[m]` ([m, n_src, n_dst]),
    in which each destination's input moves by `sum over removed sources of
    (src_corrupt - src_current)`. Returns the last position's logits ([m * batch, 1,
    d_vocab]), all a metric reads.

    Sources are recorded in graph order as the pass reaches them: `diffs` holds
    `src_corrupt - src_current` for those seen so far and `total` their sum (a destination only
    reads sources upstream of it, a prefix of graph order which the pass has already recorded).
    A destination that removes every upstream source reads the corrupt run's residual stream,
    one that removes none reads the pass's own; a shift that keeps fewer sources than it removes
    is `total` less the kept ones. The model runs unsplit: a head's query, key or value is
    replaced after its projection (`hook_q`, `hook_k`, `hook_v`) by the corrupt run's where it
    removes every input edge, and recomputed from its own moved input only where it removes
    some (`_projection`; a layer's three ports are moved together); MLPs and the final
    residual stream are moved in place. `diffs` ([m, n_src, batch * pos * d_model]) is the
    caller's buffer, its contents ignored: a batch's passes share one, as they share `scratch`,
    where the mixed heads' moved inputs of one copy at a time are computed."""
    cfg = model.cfg
    copies, b = removed.shape[0], batch.size
    shape = tuple(corrupt[Node.input().out_hook()].shape[1:])  # (pos, d_model)
    width = b * math.prod(shape)  # one copy of one source's output, flattened
    n_src = len(graph.sources)
    # copy-major, so that a copy's upstream sources are one contiguous [k, width] matrix
    assert diffs.shape == (copies, n_src, width)
    total = torch.zeros(copies, width, dtype=removed.dtype, device=removed.device)
    order = {name: i for i, name in enumerate(graph.sources)}
    dst_index = {d: i for i, d in enumerate(graph.destinations)}
    upstream = graph.valid.sum(0).tolist()  # per destination: its upstream sources, a prefix
    complete = covers_residual_stream(model, graph)
    seen = [0]  # how many sources (a prefix of graph.sources) have been recorded
    unused: dict[int, set[str]] = {}  # per layer, the q/k/v whose every head is replaced
    layer_input: dict[int, torch.Tensor] = {}
    pos_embed: torch.Tensor | None = None  # a shortformer's, added to query and key inputs

    def recorded(first: int, count: int) -> None:
        total.add_(diffs[:, first : first + count].sum(1))
        seen[0] = first + count

    def record_at(index: int) -> object:
        def record_hook(act: torch.Tensor, hook: object) -> None:
            name = hook.name  # type: ignore[attr-defined]
            source = corrupt[name].reshape(1, width)
            torch.sub(source, act.reshape(copies, width), out=diffs[:, index])
            recorded(index, 1)

        return record_hook

    def record_heads(layer: int) -> object:
        first = order[Node.head_of(layer, 0).id]
        w_o = model.blocks[layer].attn.W_O  # [head, d_head, d_model]
        n_heads = cfg.n_heads

        def record_hook(z: torch.Tensor, hook: object) -> None:
            dz = corrupt[Hook.z(layer)][None] - z.reshape(copies, b, *z.shape[1:])
            for m in range(copies):  # each head's (z_corrupt - z) @ W_O
                dz_m = dz[m].permute(2, 0, 1, 3).reshape(n_heads, -1, z.shape[-1])
                out = diffs[m, first : first + n_heads].view(n_heads, -1, shape[-1])
                torch.bmm(dz_m, w_o, out=out)
            recorded(first, n_heads)

        return record_hook

    def remember_input(layer: int) -> object:
        def hook_fn(act: torch.Tensor, hook: object) -> None:
            layer_input.clear()  # (only the current layer's is read: let the others go)
            layer_input[layer] = act

        return hook_fn

    def remember_position(act: torch.Tensor, hook: object) -> None:
        nonlocal pos_embed
        pos_embed = act

    def shifts(m: int, mask: torch.Tensor, k: int) -> torch.Tensor:
        """[t, width]: `sum over s of mask[s, t] * diffs[m, s]` over the first `k` sources
        (`mask`: [k, t]), from whichever of the removed or kept sources are fewer. In
        `scratch` (valid until the next call), or a view of `total` where every source is
        removed."""
        by_removed = mask.amax(dim=1).nonzero().flatten()
        by_kept = (1 - mask).amax(dim=1).nonzero().flatten()
        if seen[0] == k and len(by_kept) < len(by_removed):  # total less the kept sources
            everything = total[m][None]
            if len(by_kept) == 0:
                return everything.expand(mask.shape[1], -1)
            kept = _weighted(diffs[m, :k], 1 - mask, by_kept, scratch)
            return torch.sub(everything, kept, out=kept)
        return _weighted(diffs[m, :k], mask, by_removed, scratch)

    def move_projections(layer: int) -> dict[str, object]:
        """The hooks at the layer's `hook_q`, `hook_k`, `hook_v`. The mixed heads of all three
        are recomputed together when the first of them runs: one product reads the upstream
        differences once for every moved input of the layer."""
        cols = {
            p: [dst_index[Node.head_of(layer, h, p).id] for h in range(cfg.n_heads)] for p in QKV
        }
        k = upstream[cols[QKV[0]][0]]
        masks = {p: removed[:, :k][:, :, cols[p]] for p in QKV}  # [m, s, head]
        drop_all, mixed = {}, {}
        for p in QKV:
            n_removed = (masks[p] > 0).sum(1)  # [m, head] (counted exactly in any dtype)
            # reading the corrupt run's q/k/v is exact only where the graph's sources are every
            # writer to the residual stream; otherwise such a head is recomputed like the others
            drop_all[p] = (n_removed == k) & complete
            mixed[p] = ~(drop_all[p] | (n_removed == 0))
        replaced = {p: drop_all[p] | mixed[p] for p in QKV}  # [m, head]
        untouched = {p: not bool(replaced[p].any()) for p in QKV}
        # a port whose every head of every copy is replaced: the model's projection is unused
        unused[layer] = {p for p in QKV if bool(replaced[p].all())}
        recomputed: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

        def recompute() -> None:
            assert seen[0] >= k, "a destination read a source the pass has not recorded"
            for p in QKV:
                recomputed[p] = []
            own = layer_input[layer].reshape(copies, width)
            for m in range(copies):
                parts = [(p, mixed[p][m].nonzero().flatten()) for p in QKV]
                parts = [(p, heads) for p, heads in parts if len(heads)]
                if not parts:
                    continue
                mask = torch.cat([masks[p][m][:, heads] for p, heads in parts], dim=1)
                shift = shifts(m, mask, k)
                if shift._base is total:  # every source removed: `total` itself
                    buffer = scratch.take("moved", tuple(shift.shape), shift.dtype, shift.device)
                    moved = torch.add(own[m][None], shift, out=buffer)
                else:  # in place (`shift + own` is `own + shift`, bit for bit)
                    moved = shift.add_(own[m][None])
                moved = moved.view(-1, b, *shape)
                # (the squares in the gathered rows' buffer: `shifts` is done with it)
                moved = input_norm_in_place(model, layer, moved, scratch, squares="gathered")
                position = None if pos_embed is None else pos_embed.reshape(copies, b, *shape)[m]
                first = 0
                for p, heads in parts:
                    x = moved[first : first + len(heads)]
                    first += len(heads)
                    recomputed[p].append(
                        (m, heads, head_projection(model, layer, p, x, heads, position))
                    )

        def move_for(port: str) -> object:
            def move(act: torch.Tensor, hook: object) -> torch.Tensor:
                if untouched[port]:
                    return act
                if port not in recomputed:
                    recompute()
                out = act.reshape(copies, b, *act.shape[1:])  # [m, b, pos, head, d_head]
                if port not in unused[layer]:  # (else every head is written below)
                    out = out.clone()
                m_idx, h_idx = drop_all[port].nonzero(as_tuple=True)
                if len(m_idx):
                    corrupt_qkv = corrupt[Hook.qkv(layer, port)]  # [b, pos, head, d_head]
                    out[m_idx, :, :, h_idx] = corrupt_qkv[:, :, h_idx].permute(2, 0, 1, 3)
                for m, heads, values in recomputed.pop(port):
                    out[m, :, :, heads] = values
                return out.view(act.shape)

            return move

        return {p: move_for(p) for p in QKV}

    def move_single(node: Node) -> object:
        col = dst_index[node.id]
        k = upstream[col]

        def move(act: torch.Tensor, hook: object) -> torch.Tensor:
            # (in place: an MLP's input is TransformerLens's copy of the residual stream, and
            # the final residual stream is read by nothing else)
            assert seen[0] >= k, "a destination read a source the pass has not recorded"
            out = act.view(copies, width)
            for m in range(copies):
                out[m].add_(shifts(m, removed[m, :k, col : col + 1], k)[0])
            return act

        return move

    inputs = Node.input()
    hooks: list = [(inputs.out_hook(), record_at(order[inputs.id]))]
    if cfg.positional_embedding_type == "shortformer":
        hooks.append(("hook_pos_embed", remember_position))
    for layer in range(cfg.n_layers):
        hooks.append((Hook.resid_pre(layer), remember_input(layer)))
        moves = move_projections(layer)
        hooks += [(Hook.qkv(layer, p), moves[p]) for p in QKV]
        hooks.append((Hook.z(layer), record_heads(layer)))
        mlp = Node.mlp(layer)
        if mlp.id in graph.destinations:
            hooks.append((mlp.in_hook(cfg.n_layers), move_single(mlp)))
        if mlp.id in graph.sources:
            hooks.append((mlp.out_hook(), record_at(order[mlp.id])))
    hooks.append((Node.logits().in_hook(cfg.n_layers), move_single(Node.logits())))
    with _projections_skipped(model, unused):
        resid = model.run_with_hooks(
            repeat_rows(batch.clean, copies), fwd_hooks=hooks, stop_at_layer=cfg.n_layers
        )
    return last_position_logits(model, resid)


@contextmanager
def _projections_skipped(model: HookedTransformer, ports: dict[int, set[str]]) -> Iterator[None]:
    """While the block runs, the listed q/k/v projections of each layer (`ports`: those whose
    every head a hook replaces) are not computed: their hooks receive uninitialised tensors of
    the projection's shape. The others are computed as TransformerLens 3.9 computes them.
    Only its plain attention is changed (inputs not split per head, no QK normalisation or
    4-bit weights, no override of the projections, as grouped-query attention has); any other
    computes every projection as before."""
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformer_lens.utilities.attention import simple_attn_linear

    cfg = model.cfg
    special = (cfg.use_split_qkv_input, cfg.use_attn_in, cfg.use_qk_norm, cfg.load_in_4bit)
    plain = AbstractAttention.calculate_qkv_matrices
    patched = []
    for layer, skip in ports.items() if not any(special) else ():
        attn = model.blocks[layer].attn
        if not skip or type(attn).calculate_qkv_matrices is not plain:
            continue

        def calculate(
            *inputs: torch.Tensor, attn: AbstractAttention = attn, skip: set[str] = skip
        ) -> tuple[torch.Tensor, ...]:
            out = []
            for port, x in zip(QKV, inputs, strict=True):
                weight = getattr(attn, f"W_{port.upper()}")  # [head, d_model, d_head]
                if port in skip:
                    value = x.new_empty(*x.shape[:-1], weight.shape[0], weight.shape[2])
                else:
                    value = simple_attn_linear(x, weight, getattr(attn, f"b_{port.upper()}"))
                out.append(getattr(attn, f"hook_{port}")(value))
            return tuple(out)

        attn.calculate_qkv_matrices = calculate  # type: ignore[method-assign]
        patched.append(attn)
    try:
        yield
    finally:
        for attn in patched:
            del attn.calculate_qkv_matrices


def _weighted(
    diffs: torch.Tensor, mask: torch.Tensor, sources: torch.Tensor, scratch: Scratch
) -> torch.Tensor:
    """`sum over s of mask[s, t] * diffs[s]` ([t, width], in `scratch`'s "weighted" buffer)
    where only the listed `sources` have weight: a product over the whole contiguous prefix
    `diffs` ([k, width]) unless the listed ones are few enough that gathering them costs
    less. (A product written to a buffer is the product made anew, bit for bit.)"""
    out = scratch.take("weighted", (mask.shape[1], diffs.shape[1]), diffs.dtype, diffs.device)
    if len(sources) == 0:
        return out.zero_()
    if 4 * len(sources) >= len(diffs):
        return torch.mm(mask.T, diffs, out=out)
    shape = (len(sources), diffs.shape[1])
    gathered = scratch.take("gathered", shape, diffs.dtype, diffs.device)
    torch.index_select(diffs, 0, sources, out=gathered)
    return torch.mm(mask.index_select(0, sources).T, gathered, out=out)


def size_grid(n_edges: int, points: int = 12) -> list[int]:
    """Circuit sizes for a faithfulness curve: 1 .. n_edges, roughly geometric."""
    sizes = {max(1, round(math.exp(i * math.log(n_edges) / (points - 1)))) for i in range(points)}
    return sorted(sizes | {n_edges})


def faithfulness_curve(
    model: HookedTransformer,
    batches: list[PromptBatch],
    graph: EdgeGraph,
    edges: list[Edge],
    *,
    runs: CorruptRuns | None = None,
    max_tokens: int | None = None,
    ablator: "EdgeAblator | None" = None,
) -> list[tuple[int, int, float]]:
    """(requested top-n, edges kept on input->logits paths, faithfulness) along a size grid;
    `runs` are the corrupt runs an attribution already made (made here otherwise), and
    `max_tokens` bounds the tokens of one forward pass (`--batch-tokens`). With `ablator`, its
    `prompt_values` hold each point's metric per prompt afterwards."""
    ablator = ablator or EdgeAblator(model, batches, graph, runs)
    sizes = size_grid(len(edges))
    with profiling.stage("curve: circuits"):
        ranked = sorted(edges, key=lambda e: -abs(e[2]))
        pairs = _node_pairs(ranked)
        kept = [_on_paths(ranked[:size], pairs[:size]) for size in sizes]
        masks = [ablator.mask(k) for k in kept]
    with profiling.stage("curve: ablated passes"):
        values = ablator.faithfulness_of_many(masks, max_tokens=max_tokens)
    return [(size, len(k), v) for size, k, v in zip(sizes, kept, values, strict=True)]


def acdc(ablator: EdgeAblator, *, threshold: float) -> tuple[list[Edge], list[Edge], float]:
    """ACDC-style greedy pruning (Conmy et al. 2023), with the normalised metric in place of
    the KL divergence: starting from the full graph, visit destinations from the logits
    backwards and try removing each incoming edge; keep it removed if the faithfulness drops by
    less than `threshold`. One forward pass per edge tried. Returns (every tried edge scored by
    the drop its removal caused when tried, the kept edges, the final faithfulness)."""
    graph = ablator.graph
    kept = graph.valid.float().clone()
    current = ablator.faithfulness_of_kept(kept)  # the full graph: 1
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
            started = time.perf_counter()
            value = ablator.faithfulness_of_kept(kept)
            if not tried:
                logger.info(
                    "acdc: %d edges to try, one forward pass each: about %.0f s (progress and "
                    "ETA follow)", graph.n_edges, graph.n_edges * (time.perf_counter() - started),
                )  # fmt: skip
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
    runs: CorruptRuns | None = None,
    max_tokens: int | None = None,
) -> tuple[list[tuple[int, int, float]], CircuitResult]:
    """The faithfulness curve of `edges` ranked by |score| (`faithfulness_curve`), and the
    circuit a scoring method stores from it: the smallest top-n (on input->logits paths) whose
    faithfulness reaches `target`, else the largest, with the spread of its faithfulness over
    bootstrap resamples of the prompts (`CircuitResult.spread`, from the curve's own passes)."""
    ablator = EdgeAblator(model, batches, graph, runs)
    curve = faithfulness_curve(model, batches, graph, edges, max_tokens=max_tokens, ablator=ablator)
    size = smallest_faithful(curve, target)
    with profiling.stage("circuit"):
        circuit = select(edges, f"top:{size}")
        n_nodes = len(circuit.nodes)
    point = next(i for i, (n, _, _) in enumerate(curve) if n == size)
    faith = curve[point][2]
    if point in ablator.prompt_values:
        spread = ablator.bootstrap(ablator.prompt_values[point])
    else:  # the full graph or the empty circuit: 1 or 0 on every resample
        spread = {"faithfulness_sd": 0.0, "faithfulness_lo": faith, "faithfulness_hi": faith}
    name = f"{method}: smallest top-n with faithfulness >= {target}"
    return curve, CircuitResult(name, circuit.rule, circuit.edges, n_nodes, faith, spread)


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
