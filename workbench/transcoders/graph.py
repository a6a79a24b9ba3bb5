"""The attribution graph of one prompt (Ameisen et al. 2025, "Circuit Tracing"), in the
conventions of circuit-tracer and Neuronpedia.

**The replacement model.** Every attention pattern and every normalisation scale is frozen at
its value on the prompt, and each MLP's output is replaced by its transcoder's features, the
transcoder's bias and skip term, and an error term (the MLP's real output less the
reconstruction), so the forward pass is exact. With the patterns and scales frozen and the
features' activations held, the map from the nodes to every later readout is linear: effects
travel through the residual stream and the attention heads' OV circuits, and through the skip
terms.

**Nodes**, in the order of the adjacency matrix:
1. *features*: every active transcoder feature at each (layer, position), or the
   `max_feature_nodes` of largest influence on the logits;
2. *errors*: one per (layer, position), layer-major (`layer * n_pos + pos`);
3. *tokens*: the embedding of each position's token;
4. *logits*: the most probable next tokens, until their probabilities add up to
   `desired_logit_prob`, at most `max_n_logits`.
With `zero_first_position` (the prompt starts with BOS), position 0 carries no feature and no
error node, as in circuit-tracer.

**Edges.** `adjacency[t, s]` (row = target, column = source) is the direct effect of source s
on target t's readout in the frozen linear model: the readout of a feature is its
pre-activation less its encoder bias, `W_enc[:, f] · x_in`; the readout of a logit node is its
logit less the mean logit over the vocabulary, `(W_U[:, v] - mean_v' W_U[:, v']) · ln_final(x)`
at the last position, less its own bias `b_U[v] - mean(b_U)`. A source writes a vector into
the residual stream: a feature `activation * W_dec[f]` into its layer's MLP output, an error
its error vector there, a token its embedding; the edge is that vector dotted with the gradient
of the target's readout at the place it is written. Because the frozen model is affine in the
nodes, each readout equals the sum of its incoming edges plus the readout with every node
removed: what no node carries (positional embeddings, the attention and transcoder biases and
everything they feed, and position 0's MLP outputs when it is not a node).

**Pruning and scores** (`prune`, `graph_scores`) are those of
`workbench.transcoders.pruning`, on the adjacency and the logit probabilities.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from workbench.attribution.batches import frozen_weights
from workbench.transcoders import pruning
from workbench.transcoders.pruning import Offsets, Pruned
from workbench.transcoders.sets import TranscoderSet

logger = logging.getLogger(__name__)

KINDS = ("feature", "error", "token", "logit")


@dataclass
class AttributionGraph:
    """The full (unpruned) graph of one prompt. Feature i of the graph is active feature
    `selected[i]`, at (layer, position, feature) `active[selected[i]]`."""

    tokens: list[int]
    n_layers: int
    active: Int[torch.Tensor, "n_active 3"]  # (layer, position, feature), every active feature
    activations: Float[torch.Tensor, " n_active"]
    selected: Int[torch.Tensor, " n_features"]  # indices into `active` that are nodes
    logit_tokens: list[int]
    logit_probabilities: Float[torch.Tensor, " n_logits"]
    adjacency: Float[torch.Tensor, "n_nodes n_nodes"]  # [target, source]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected)

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def offsets(self) -> dict[str, int]:
        """The first index of each kind of node."""
        errors = self.n_features
        tokens = errors + self.n_layers * self.n_pos
        logits = tokens + self.n_pos
        return {"feature": 0, "error": errors, "token": tokens, "logit": logits}

    def error_index(self, layer: int, pos: int) -> int:
        return self.offsets()["error"] + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.offsets()["token"] + pos

    def logit_index(self, i: int) -> int:
        return self.offsets()["logit"] + i

    def nodes(self) -> list[dict[str, Any]]:
        """One record per node, in adjacency order: kind, layer (None for tokens; n_layers for
        logits), position, feature (features), token id (tokens, logits), activation
        (features), probability (logits)."""
        out: list[dict[str, Any]] = []
        for i in self.selected.tolist():
            layer, pos, feature = self.active[i].tolist()
            out.append(
                {"kind": "feature", "layer": layer, "position": pos, "feature": feature,
                 "token_id": None, "activation": float(self.activations[i]),
                 "probability": None}
            )  # fmt: skip
        for layer in range(self.n_layers):
            for pos in range(self.n_pos):
                out.append(
                    {"kind": "error", "layer": layer, "position": pos, "feature": None,
                     "token_id": None, "activation": None, "probability": None}
                )  # fmt: skip
        for pos, token in enumerate(self.tokens):
            out.append(
                {"kind": "token", "layer": None, "position": pos, "feature": None,
                 "token_id": token, "activation": None, "probability": None}
            )  # fmt: skip
        for token, p in zip(self.logit_tokens, self.logit_probabilities.tolist(), strict=True):
            out.append(
                {"kind": "logit", "layer": self.n_layers, "position": self.n_pos - 1,
                 "feature": None, "token_id": token, "activation": None, "probability": p}
            )  # fmt: skip
        return out

    def logit_weights(self) -> Float[torch.Tensor, " n_nodes"]:
        w = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype)
        w[self.offsets()["logit"] :] = self.logit_probabilities.to(w.dtype)
        return w


# -- computing the graph ------------------------------------------------------------------------


@dataclass
class _Prompt:
    """What the clean forward pass gives: per layer the transcoders' inputs, the MLP outputs,
    the active features (with encoder and scaled decoder vectors) and the error vectors."""

    x_in: list[torch.Tensor]
    errors: torch.Tensor  # [n_layers, n_pos, d_model]
    active: torch.Tensor  # [n_active, 3]
    activations: torch.Tensor
    encoders: torch.Tensor  # [n_active, d_in]
    decoders: torch.Tensor  # [n_active, d_model], activation * W_dec[f]
    logits: torch.Tensor  # [d_vocab], last position


def _clean_pass(model: Any, tokens: torch.Tensor, tset: TranscoderSet, zero_first: bool) -> _Prompt:
    n_layers = model.cfg.n_layers
    names = [tset.input_hook(i) for i in range(n_layers)]
    names += [tset.output_hook(i) for i in range(n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=names)
    x_in, errors, active, acts, enc, dec = [], [], [], [], [], []
    for layer in range(n_layers):
        tc = tset[layer]
        x = cache[tset.input_hook(layer)][0]
        f = tc.encode(x)
        if zero_first:
            f[0] = 0
        error = cache[tset.output_hook(layer)][0] - (tc.decode(f) + tc.skip(x))
        if zero_first:
            error[0] = 0
        pos, feat = f.nonzero(as_tuple=True)
        values = f[pos, feat]
        x_in.append(x)
        errors.append(error)
        active.append(torch.stack([torch.full_like(pos, layer), pos, feat], dim=1))
        acts.append(values)
        enc.append(tc.W_enc[:, feat].T)
        dec.append(values[:, None] * tc.W_dec[feat])
    return _Prompt(
        x_in,
        torch.stack(errors),
        torch.cat(active),
        torch.cat(acts),
        torch.cat(enc),
        torch.cat(dec),
        logits[0, -1],
    )


class _FrozenModel:
    """The replacement model on `batch` copies of the prompt, its autograd graph kept: patterns
    and scales detached, the embeddings the leaf, each MLP output cut from its own inputs but
    for the transcoder's skip term. `rows` gives the edges into a batch of targets."""

    def __init__(self, model: Any, tokens: torch.Tensor, tset: TranscoderSet, batch: int):
        self.model, self.tset, self.batch = model, tset, batch
        n_layers = model.cfg.n_layers
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        store: dict[str, torch.Tensor] = {}

        def freeze(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return act.detach()

        def leaf(act: torch.Tensor, hook: Any) -> torch.Tensor:
            store["embed"] = act.detach().requires_grad_(True)
            return store["embed"]

        def keep_input(layer: int):
            def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                self.inputs[layer] = act
                return act

            return hook_fn

        def cut_mlp(layer: int):
            def hook_fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
                skip = tset[layer].skip(self.inputs[layer])
                out = skip + (act - skip).detach()
                if not out.requires_grad:  # no skip term: the output is a leaf
                    out.requires_grad_(True)
                self.outputs[layer] = out
                return out

            return hook_fn

        hooks: list[tuple[str, Any]] = [
            (name, freeze)
            for name in model.hook_dict
            if name.endswith("hook_pattern") or name.endswith("hook_scale")
        ]
        hooks.append(("hook_embed", leaf))
        for layer in range(n_layers):
            hooks.append((tset.input_hook(layer), keep_input(layer)))
            hooks.append((tset.output_hook(layer), cut_mlp(layer)))
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            resid = model(tokens[None].expand(batch, -1), stop_at_layer=n_layers)
            ln_final = getattr(model, "ln_final", None)
            self.final = ln_final(resid) if ln_final is not None else resid
        self.embed = store["embed"]

    def rows(
        self, prompt: _Prompt, targets: list[tuple[int, int, torch.Tensor]]
    ) -> Float[torch.Tensor, "n_targets n_sources"]:
        """Edges into each target (layer, position, readout vector; layer n_layers reads
        ln_final's output) from every source: [active features | errors | tokens]."""
        n, n_layers = len(targets), self.model.cfg.n_layers
        assert 0 < n <= self.batch
        objective = torch.zeros((), dtype=self.final.dtype, device=self.final.device)
        for row, (layer, pos, vec) in enumerate(targets):
            read = self.final if layer == n_layers else self.inputs[layer]
            objective = objective + read[row, pos] @ vec
        wrt = [self.outputs[layer] for layer in range(n_layers)] + [self.embed]
        grads = torch.autograd.grad(objective, wrt, retain_graph=True, allow_unused=True)
        zero = torch.zeros_like(self.embed)
        g_out = [(g if g is not None else zero)[:n] for g in grads[:-1]]
        g_embed = (grads[-1] if grads[-1] is not None else zero)[:n]
        feature_cols = torch.zeros((n, len(prompt.active)), dtype=zero.dtype, device=zero.device)
        for layer in range(n_layers):
            in_layer = (prompt.active[:, 0] == layer).nonzero(as_tuple=True)[0]
            for pos in prompt.active[in_layer, 1].unique().tolist():
                idx = in_layer[prompt.active[in_layer, 1] == pos]
                feature_cols[:, idx] = g_out[layer][:, pos] @ prompt.decoders[idx].T
        error_cols = torch.stack(
            [(g_out[layer] * prompt.errors[layer]).sum(-1) for layer in range(n_layers)], dim=1
        ).reshape(n, -1)
        token_cols = (g_embed * self.embed[0].detach()).sum(-1)
        return torch.cat([feature_cols, error_cols, token_cols], dim=1).detach()


def salient_logits(
    logits: Float[torch.Tensor, " d_vocab"], max_n_logits: int, desired_logit_prob: float
) -> tuple[list[int], Float[torch.Tensor, " n"]]:
    """The most probable tokens until their probabilities reach `desired_logit_prob` (at most
    `max_n_logits`), and their probabilities."""
    probs = torch.softmax(logits.double(), dim=-1)
    top = torch.topk(probs, min(max_n_logits, probs.shape[-1]))
    n = int(torch.searchsorted(torch.cumsum(top.values, 0), desired_logit_prob)) + 1
    n = min(n, len(top.values))
    return top.indices[:n].tolist(), top.values[:n].to(logits.dtype)


def attribute(
    model: Any,
    tokens: Int[torch.Tensor, " n_pos"],
    tset: TranscoderSet,
    *,
    zero_first_position: bool,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 32,
    update_interval: int = 4,
) -> AttributionGraph:
    """The attribution graph of `tokens` (one prompt) through `tset`'s transcoders.

    Edges into the logits come first; then those into features, in batches of `batch_size`
    backward passes through one retained forward pass of `batch_size` copies of the prompt
    (memory: that forward pass's activations and a batch of gradients). With
    `max_feature_nodes`, features are visited in order of their influence on the logits
    through the rows computed so far, re-estimated every `update_interval` batches; features
    never visited are left out of the graph."""
    dtype = model.W_U.dtype
    device = tokens.device
    tset = tset.to(device, dtype)
    n_layers, n_pos = model.cfg.n_layers, len(tokens)
    with frozen_weights(model):
        prompt = _clean_pass(model, tokens, tset, zero_first_position)
        logit_ids, logit_probs = salient_logits(prompt.logits, max_n_logits, desired_logit_prob)
        W_U = model.W_U
        logit_vecs = W_U[:, logit_ids].T - W_U.mean(dim=1)[None]
        n_active = len(prompt.active)
        cap = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
        frozen = _FrozenModel(model, tokens, tset, min(batch_size, max(cap, len(logit_ids))))
        logit_rows = torch.cat(
            [
                frozen.rows(prompt, [(n_layers, n_pos - 1, v) for v in chunk])
                for chunk in logit_vecs.split(frozen.batch)
            ]
        )
        # a row for each feature visited (at most `cap`), in the order visited
        feature_rows = torch.zeros((cap, logit_rows.shape[1]), dtype=logit_rows.dtype)
        feature_rows = feature_rows.to(device)
        order = torch.full((cap,), -1, dtype=torch.long, device=device)  # row -> feature
        n_done = 0
        progress = tqdm(total=cap, desc="attribution graph", unit="feature")
        while n_done < cap:
            if cap == n_active:  # every feature gets its row: in index order
                todo = torch.arange(n_done, n_active, device=device)
            else:
                todo = _next_features(
                    prompt, logit_rows, logit_probs, feature_rows[:n_done], order[:n_done]
                )
            todo = todo[: min(update_interval * frozen.batch, cap - n_done)]
            for chunk in todo.split(frozen.batch):
                targets = [
                    (int(prompt.active[i, 0]), int(prompt.active[i, 1]), prompt.encoders[i])
                    for i in chunk.tolist()
                ]
                rows = slice(n_done, n_done + len(chunk))
                feature_rows[rows] = frozen.rows(prompt, targets)
                order[rows] = chunk
                n_done += len(chunk)
                progress.update(len(chunk))
        progress.close()
        del frozen
    selected, rows_of = order.sort()  # the features visited, in index order, and their rows
    adjacency = _assemble(feature_rows[rows_of], logit_rows, selected, n_active)
    return AttributionGraph(
        tokens=tokens.tolist(),
        n_layers=n_layers,
        active=prompt.active.cpu(),
        activations=prompt.activations.cpu(),
        selected=selected.cpu(),
        logit_tokens=logit_ids,
        logit_probabilities=logit_probs.cpu(),
        adjacency=adjacency.cpu(),
        params={
            "max_n_logits": max_n_logits,
            "desired_logit_prob": desired_logit_prob,
            "max_feature_nodes": max_feature_nodes,
            "zero_first_position": zero_first_position,
        },
    )


def _next_features(
    prompt: _Prompt,
    logit_rows: torch.Tensor,
    logit_probs: torch.Tensor,
    feature_rows: torch.Tensor,
    order: torch.Tensor,
) -> torch.Tensor:
    """Unvisited features, most influential first, by the rows computed so far
    (`feature_rows[i]` is feature `order[i]`'s)."""
    n_active = len(prompt.active)
    normalised = torch.cat([logit_rows, feature_rows]).abs_()  # one copy of the rows, in place
    normalised /= normalised.sum(dim=1, keepdim=True).clamp(min=1e-10)
    row_node = torch.cat([torch.full((len(logit_rows),), -1, device=normalised.device), order])
    visited = torch.zeros(n_active, dtype=torch.bool, device=normalised.device)
    visited[order] = True
    weights = torch.zeros(len(normalised), dtype=normalised.dtype, device=normalised.device)
    weights[: len(logit_rows)] = logit_probs.to(normalised.dtype)
    total = torch.zeros(normalised.shape[1], dtype=normalised.dtype, device=normalised.device)
    for _ in range(1000):
        spread = weights @ normalised
        total += spread
        weights = torch.zeros_like(weights)
        is_feature = row_node >= 0
        weights[is_feature] = spread[row_node[is_feature]]
        if not weights.any():
            break
    influence = total[:n_active].clone()
    influence[visited] = -1
    ranked = torch.argsort(influence, descending=True, stable=True)
    return ranked[: int((~visited).sum())]


def _assemble(
    feature_rows: torch.Tensor, logit_rows: torch.Tensor, selected: torch.Tensor, n_active: int
) -> torch.Tensor:
    """The square adjacency [features | errors | tokens | logits] from the selected features'
    rows (in `selected` order) and the logits' rows, computed over [every active feature |
    errors | tokens]."""
    keep_cols = torch.cat(
        [selected, torch.arange(n_active, feature_rows.shape[1], device=selected.device)]
    )
    n_sel, n_other = len(selected), feature_rows.shape[1] - n_active
    n_logits = len(logit_rows)
    n = n_sel + n_other + n_logits
    adjacency = torch.zeros((n, n), dtype=feature_rows.dtype, device=feature_rows.device)
    adjacency[:n_sel, : n_sel + n_other] = feature_rows[:, keep_cols]
    adjacency[n_sel + n_other :, : n_sel + n_other] = logit_rows[:, keep_cols]
    return adjacency


# -- influence, pruning and scores (workbench.transcoders.pruning, on NumPy arrays) -------------


def _arrays(graph: AttributionGraph) -> tuple[np.ndarray, np.ndarray, Offsets]:
    off = graph.offsets()
    return (
        graph.adjacency.double().numpy(),
        graph.logit_weights().double().numpy(),
        Offsets(off["error"], off["token"], off["logit"]),
    )


def prune(
    graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> Pruned:
    """The nodes and edges kept at these thresholds (see `workbench.transcoders.pruning`)."""
    return pruning.prune(*_arrays(graph), node_threshold, edge_threshold)


def graph_scores(graph: AttributionGraph) -> tuple[float, float]:
    """(replacement score, completeness score) of the unpruned graph."""
    return pruning.scores(*_arrays(graph))


# -- interventions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intervention:
    """Set feature `feature` of layer `layer`'s transcoder at `position` to `value` (0 removes
    it; a multiple of its activation scales it)."""

    layer: int
    position: int
    feature: int
    value: float


def spliced_logits(
    model: Any,
    tokens: Int[torch.Tensor, " n_pos"],
    tset: TranscoderSet,
    interventions: Sequence[Intervention] = (),
) -> Float[torch.Tensor, "n_pos d_vocab"]:
    """The model's logits with every MLP replaced by its transcoder plus the error term of the
    unmodified prompt (so that with no intervention they are the model's own), and the given
    features set to their values. Nothing else is frozen: attention and later features respond
    to the change, as in circuit-tracer's feature interventions."""
    n_layers = model.cfg.n_layers
    tset = tset.to(tokens.device, model.W_U.dtype)
    names = [tset.input_hook(i) for i in range(n_layers)]
    names += [tset.output_hook(i) for i in range(n_layers)]
    by_layer: dict[int, list[Intervention]] = {}
    for iv in interventions:
        if not 0 <= iv.layer < n_layers:
            raise ValueError(f"layer {iv.layer}: the model has {n_layers}")
        by_layer.setdefault(iv.layer, []).append(iv)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=names)
        errors = [
            cache[tset.output_hook(i)] - tset[i](cache[tset.input_hook(i)]) for i in range(n_layers)
        ]

        def output(layer: int, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            tc = tset[layer]
            f = tc.encode(x)
            for iv in by_layer.get(layer, []):
                f[:, iv.position, iv.feature] = iv.value
            return tc.decode(f) + tc.skip(x) + errors[layer]

        hooks = tset.splice_hooks(output)
        return model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
