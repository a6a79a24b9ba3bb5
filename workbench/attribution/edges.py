"""Edge attribution over the full graph of a model: EAP, EAP-IG and exact edge patching.

The graph (Conmy et al. 2023; Syed et al. 2023): sources are the embeddings (`input`), each
attention head's output (`a{L}.h{H}`, its `z @ W_O`) and each MLP's output (`m{L}`);
destinations are each head's query, key and value inputs (`a{L}.h{H}<q|k|v>`), each MLP's input
(`m{L}`) and the final residual stream (`logits`). An edge joins a source to every destination
downstream of it (a head does not feed the MLP of its own layer when attention and MLP run in
parallel, as in GPT-NeoX). The residual input of a destination is the sum of the outputs of
every source upstream of it, so an edge is one term of that sum.

* `exact_edge` — patch one edge: the corrupt run, with the destination's input moved by
  `src_clean - src_corrupt` (the source's clean output replaces its corrupt output for that
  destination only). Score `(m_patched - m_corrupt) / (m_clean - m_corrupt)`. One partial
  forward pass per edge, batched per destination layer: for validation on small models.
* `eap` — edge attribution patching (Syed et al. 2023): the first-order approximation of
  exact edge patching, `(src_clean - src_corrupt) . d m / d dst_input` on the corrupt run,
  normalised by the gap: every edge from two forward passes and one backward pass.
* `eap_ig` — EAP with integrated gradients (Hanna et al. 2024, "Have Faith in Faithfulness"):
  the gradient is averaged over `steps` runs whose input embeddings (`hook_resid_pre` of layer
  0: token plus positional embeddings) are interpolated from the corrupt to the clean prompt
  at the points of a Riemann rule (`workbench.attribution.ig`: `midpoint`, alpha = (k - 1/2) /
  steps, k = 1..steps, by default; `right`, k / steps; `left`, k = 0..steps-1, as the authors'
  code). The
  `input` edges sum to the gap as `steps` grows (completeness): the gradient at the embeddings
  is the sum of the gradients at every destination's input, so the sum of the `input` edges'
  normalised scores is integrated gradients' own estimate of 1, stored as `completeness`.

What EAP-IG estimates is not what `exact_edge` measures. `exact_edge` and `eap` score an edge in
the corrupt run with everything else corrupt; EAP-IG averages its effect along a path on which
every input moves from corrupt to clean together, so an edge whose effect depends on other edges
is credited with roughly the mean of its effect with the rest corrupt (denoising) and with the
rest clean (noising: `1 - ` the faithfulness of the full graph without that edge). On the
induction zoo the key path (previous-token head -> induction head key) and the value path (the
attended token) form an AND whose corrupt half works against the answer: patched alone into the
corrupt run, the key edge makes the induction head attend to the corrupt token and scores about
-0.8; removed alone from the clean run it costs about +0.8; EAP-IG gives it about 0.1, and gives
the value edge, which `exact_edge` barely scores, most of the credit. So EAP-IG's signed ranks
differ from `exact_edge`'s there (`tests/test_ground_truth.py`); on models whose edges interact
weakly the two agree (`tests/attribution/test_edges.py`).
"""

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from workbench import memory
from workbench.attribution.batches import (
    PromptBatch,
    frozen_weights,
    lean_activations,
    model_device,
    repeat_rows,
)
from workbench.attribution.ig import DEFAULT_IG_RULE, ig_alphas
from workbench.attribution.metrics import last_position_logits
from workbench.attribution.moments import PromptMoments
from workbench.attribution.patching import metric_gap
from workbench.core import QKV, Hook, Node
from workbench.memory import Scratch

logger = logging.getLogger(__name__)

# TransformerLens 3.9's normalisations whose computation is repeated here in closed form
# (`norm_input_grad`) and in place (`workbench.circuits`' moved inputs)
CLOSED_FORM_NORMS = ("LayerNorm", "LayerNormPre", "RMSNorm", "RMSNormPre")


@dataclass(frozen=True)
class EdgeGraph:
    sources: list[str]
    source_layer: list[float]
    destinations: list[str]
    destination_layer: list[float]

    @property
    def valid(self) -> torch.Tensor:
        src = torch.tensor(self.source_layer, device="cpu")[:, None]  # graph structure: CPU
        dst = torch.tensor(self.destination_layer, device="cpu")[None, :]
        return src < dst

    def edges(self, scores: torch.Tensor) -> list[tuple[str, str, float]]:
        """Every valid edge with its score, sources in graph order, then destinations."""
        src, dst = self.valid.nonzero(as_tuple=True)
        values = scores.detach().cpu()[src, dst].tolist()
        sources, destinations = self.sources, self.destinations
        return [
            (sources[s], destinations[t], v)
            for s, t, v in zip(src.tolist(), dst.tolist(), values, strict=True)
        ]

    @property
    def n_edges(self) -> int:
        return int(self.valid.sum())


def model_graph(model: HookedTransformer, *, include_mlps: bool = True) -> EdgeGraph:
    cfg = model.cfg
    mlps = include_mlps and not cfg.attn_only
    parallel = bool(cfg.parallel_attn_mlp)
    sources, source_layer = [Node.input().id], [-1.0]
    destinations: list[str] = []
    destination_layer: list[float] = []
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            sources.append(Node.head_of(layer, head).id)
            source_layer.append(layer)
        for port in QKV:
            for head in range(cfg.n_heads):
                destinations.append(Node.head_of(layer, head, port).id)
                destination_layer.append(layer)
        if mlps:
            sources.append(Node.mlp(layer).id)
            source_layer.append(layer + 0.5)
            destinations.append(Node.mlp(layer).id)
            destination_layer.append(layer if parallel else layer + 0.5)
    destinations.append(Node.logits().id)
    destination_layer.append(cfg.n_layers)
    return EdgeGraph(sources, source_layer, destinations, destination_layer)


def covers_residual_stream(model: HookedTransformer, graph: EdgeGraph) -> bool:
    """Whether `graph`'s sources are everything that writes to the residual stream (less
    constant biases), so that moving a destination's input by every upstream source's
    corrupt-minus-clean difference gives the corrupt run's input exactly."""
    return set(model_graph(model).sources) <= set(graph.sources)


@contextmanager
def graph_hooks_enabled(
    model: HookedTransformer, graph: EdgeGraph, *, split_qkv: bool = True
) -> Iterator[None]:
    """Expose MLP inputs and (with `split_qkv`) split q/k/v inputs per head, restoring the
    model afterwards. A pass that moves one head's input apart from the others' needs the split;
    a gradient at each head's input does not (`qkv_input_grads`)."""
    split, mlp_in = bool(model.cfg.use_split_qkv_input), bool(model.cfg.use_hook_mlp_in)
    has_mlp_dst = any(Node.parse(d).kind == "mlp" for d in graph.destinations)
    if split_qkv:
        model.set_use_split_qkv_input(True)
    if has_mlp_dst:
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        if split_qkv:
            model.set_use_split_qkv_input(split)
        if has_mlp_dst:
            model.set_use_hook_mlp_in(mlp_in)


def source_hooks(model: HookedTransformer, graph: EdgeGraph) -> list[str]:
    hooks = [Node.input().out_hook()]
    for layer in range(model.cfg.n_layers):
        hooks.append(Hook.z(layer))
        if Node.mlp(layer).id in graph.sources:
            hooks.append(Node.mlp(layer).out_hook())
    return hooks


def ablation_hooks(model: HookedTransformer, graph: EdgeGraph) -> list[str]:
    """What an edge ablation reads from the corrupt run (`CorruptRuns`): what every source
    writes, and each head's query, key and value (a head whose every input edge is removed
    reads them)."""
    qkv = [Hook.qkv(layer, p) for layer in range(model.cfg.n_layers) for p in QKV]
    return source_hooks(model, graph) + qkv


def _destination_hooks(model: HookedTransformer, graph: EdgeGraph) -> list[str]:
    """Where the gradients of every destination's input are read: each head's q, k and v
    (`qkv_input_grads` carries them back through the projection and the normalisation), each
    MLP's input, the final residual stream."""
    hooks = []
    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        hooks += [Hook.qkv(layer, p) for p in QKV]
        if Node.mlp(layer).id in graph.destinations:
            hooks.append(Node.mlp(layer).in_hook(n_layers))
    hooks.append(Node.logits().in_hook(n_layers))
    return hooks


def _layer_inputs(model: HookedTransformer) -> list[str]:
    return [Hook.resid_pre(layer) for layer in range(model.cfg.n_layers)]


def source_differences(
    model: HookedTransformer,
    graph: EdgeGraph,
    acts: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
) -> Float[torch.Tensor, "n_src batch pos d_model"]:
    """What every source writes in `acts` less what it writes in `base` (a head's output being
    its `z @ W_O`), in `graph.sources` order, computed a layer at a time into one buffer. The
    buffer is laid out in the order `einsum("sbpd,tbpd->st", ...)` reorders its first operand
    to (source, batch, d_model, position), so that an edge product reads it in place: einsum
    copied the whole buffer for every destination group before."""
    x = acts[Node.input().out_hook()]
    b, p, d = x.shape
    out = x.new_empty(len(graph.sources), b, d, p).permute(0, 1, 3, 2)  # [n_src, b, p, d]
    out[0] = x - base[Node.input().out_hook()]
    row = 1
    for layer in range(model.cfg.n_layers):
        w_o, z = model.blocks[layer].attn.W_O, Hook.z(layer)
        heads = torch.einsum("bphe,hed->hbpd", acts[z], w_o)
        torch.sub(
            heads, torch.einsum("bphe,hed->hbpd", base[z], w_o), out=out[row : row + len(w_o)]
        )
        row += len(w_o)
        mlp = Node.mlp(layer)
        if mlp.id in graph.sources:
            torch.sub(acts[mlp.out_hook()], base[mlp.out_hook()], out=out[row])
            row += 1
    assert row == len(graph.sources), "the graph's sources are not the model's"
    return out


def destination_grad_groups(
    model: HookedTransformer,
    graph: EdgeGraph,
    acts: dict[str, torch.Tensor],
    scratch: Scratch | None = None,
) -> Iterator[tuple[list[int], Float[torch.Tensor, "t batch pos d_model"]]]:
    """Gradients at every destination's input, a layer's q/k/v inputs (or an MLP's input, or
    the final residual stream) at a time: (their indices in `graph.destinations`, the
    gradients). `acts` holds each layer's input and the `.grad` of `_destination_hooks`. With
    `scratch`, every layer's q/k/v gradients are written into its buffers: a group is valid
    until the next is drawn."""
    n_layers = model.cfg.n_layers
    index = {d: i for i, d in enumerate(graph.destinations)}
    for layer in range(n_layers):
        grads = qkv_input_grads(
            model, layer, acts[Hook.resid_pre(layer)],
            [acts[Hook.qkv(layer, p) + ".grad"] for p in QKV], scratch,
        )  # fmt: skip
        cols = [index[Node.head_of(layer, h, p).id] for p in QKV for h in range(model.cfg.n_heads)]
        yield cols, grads
        mlp = Node.mlp(layer)
        if mlp.id in graph.destinations:
            yield [index[mlp.id]], acts[mlp.in_hook(n_layers) + ".grad"][None]
    yield [index[Node.logits().id]], acts[Node.logits().in_hook(n_layers) + ".grad"][None]


def qkv_input_grads(
    model: HookedTransformer,
    layer: int,
    x: Float[torch.Tensor, "batch pos d_model"],
    grads: list[Float[torch.Tensor, "batch pos head d_head"]],
    scratch: Scratch | None = None,
) -> Float[torch.Tensor, "qkv_head batch pos d_model"]:
    """The gradient at each head's query, key and value input (what TransformerLens's split
    `hook_{q,k,v}_input` would hold) from the gradients at `hook_q`, `hook_k`, `hook_v`: back
    through each head's projection (`W_Q[h]`, `W_K[h]`, `W_V[h]`) and through the block's input
    normalisation at the layer's input `x`, which every head reads unmoved in an unpatched run.
    The normalisation's vector-Jacobian product is taken for every head at once, in the one
    buffer the projections are written to; no per-head copy of the input is ever held for a
    backward pass. Rows: q of heads 0..H-1, then k, then v.

    Where the normalisation's closed form applies (`norm_input_grad`: TransformerLens's
    LayerNorm or RMSNorm, gradients in float32 or float64) the result is laid out in memory as
    (batch, d_model, pos, row), the order in which `einsum("sbpd,tbpd->st", ...)` reads its
    second operand, so that an edge product does not copy it; its buffer holds the
    normalisation's temporaries first. The buffers come from `scratch` (reused: the result is
    overwritten by the next call) or are new."""
    attn = model.blocks[layer].attn
    weights = [attn.W_Q, attn.W_K, attn.W_V]  # [head, d_model, d_head] (k and v per query head)
    n_heads = model.cfg.n_heads
    b, p, d = x.shape
    rows = b * p
    work = scratch if scratch is not None else Scratch()
    dtype, device = grads[0].dtype, grads[0].device
    out = work.take("projected", (3 * n_heads, rows, d), dtype, device)
    for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
        # [head, batch * pos, d_head] @ [head, d_head, d_model], one batched product
        torch.bmm(
            g.reshape(rows, n_heads, -1).transpose(0, 1), w.detach().transpose(1, 2),
            out=out[i * n_heads : (i + 1) * n_heads],
        )  # fmt: skip
    out = out.view(3 * n_heads, *x.shape)
    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return out
    laid_out = work.take("laid out", (b, d, p, 3 * n_heads), dtype, device)
    return norm_input_grad(
        model.blocks[layer].ln1, x, out, overwrite=True,
        work=laid_out.view(3 * n_heads, b, p, d), out=laid_out.permute(3, 0, 2, 1),
    )  # fmt: skip


def norm_input_grad(
    norm: torch.nn.Module,
    x: Float[torch.Tensor, "batch pos d_model"],
    grad: Float[torch.Tensor, "n batch pos d_model"],
    *,
    overwrite: bool = False,
    work: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> Float[torch.Tensor, "n batch pos d_model"]:
    """`grad` (n cotangents per position, at the output of `norm` applied to `x`) carried back to
    `norm`'s input. TransformerLens's LayerNorm and RMSNorm (folded or not) in closed form:
    with `x_hat = c / s`, `c` the (centred) input and `s = sqrt(mean(c^2) + eps)`, the input's
    gradient is `(g - x_hat mean(g x_hat) [- mean(g)]) / s` for `g = grad * w`. Any other
    normalisation by autograd on a copy of `x` per cotangent. With `overwrite`, the result may
    be written over `grad` (so that at most one more tensor of its size is ever held); `work`
    (contiguous, of `grad`'s shape) is that one, used where its dtype is the computation's; with
    `out` (of `grad`'s shape, any layout, `work`'s memory allowed), the result is written there
    where the closed form applies in `out`'s dtype. The same numbers either way."""
    kind = type(norm).__name__
    if kind in ("Identity",):
        return grad
    if kind not in CLOSED_FORM_NORMS:
        expanded = x.detach()[None].expand_as(grad).clone().requires_grad_(True)
        with torch.enable_grad():
            (result,) = torch.autograd.grad(norm(expanded), expanded, grad)
        return result
    centred = kind.startswith("LayerNorm")
    dtype = torch.promote_types(grad.dtype, torch.float32)  # as the norm computes: >= float32
    own = overwrite and grad.dtype == dtype
    g = grad if own else grad.to(dtype, copy=True)
    if hasattr(norm, "w"):
        g.mul_(norm.w.detach().to(dtype))
    c = x.detach().to(dtype)
    if centred:
        c = c - c.mean(-1, keepdim=True)
    scale = (c.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    x_hat = c / scale
    g_mean = g.mean(-1, keepdim=True) if centred else None
    # g -= x_hat * mean(g * x_hat), the two products written into one buffer in turn
    tmp = work if work is not None and work.dtype == dtype else None
    along = torch.mul(g, x_hat, out=tmp).mean(-1, keepdim=True)
    g.sub_(torch.mul(x_hat, along, out=tmp))
    if g_mean is not None:
        g.sub_(g_mean)
    if out is not None and out.dtype == dtype:
        return torch.div(g, scale, out=out)
    return g.div_(scale).to(grad.dtype)


def input_norm_in_place(
    model: HookedTransformer,
    layer: int,
    moved: torch.Tensor,
    scratch: Scratch,
    squares: str = "squares",
) -> torch.Tensor:
    """The block's input normalisation of `moved` inputs (none in a post-norm block), written
    over `moved`. TransformerLens's LayerNorm and RMSNorm (folded or not) in float32 or float64
    are taken step by step as their `forward` takes them, each step in place and the squares
    in `scratch`'s buffer `squares` (a caller done with one of its buffers by then names it),
    so that no input-sized tensor is made (the same numbers); any other
    normalisation or dtype (or inputs not in the model's configured dtype, which the module
    rounds to) is the module's own call."""
    if model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return moved
    norm = model.blocks[layer].ln1
    kind = type(norm).__name__
    floats = (torch.float32, torch.float64)
    if kind not in CLOSED_FORM_NORMS or moved.dtype not in floats or moved.dtype != model.cfg.dtype:
        return norm(moved)
    if kind.startswith("LayerNorm"):
        moved.sub_(moved.mean(-1, keepdim=True))
    squared = torch.pow(
        moved, 2, out=scratch.take(squares, tuple(moved.shape), moved.dtype, moved.device)
    )
    moved.div_((squared.mean(-1, keepdim=True) + norm.eps).sqrt())
    if kind in ("LayerNorm", "RMSNorm"):
        moved.mul_(norm.w)
    if kind == "LayerNorm":
        moved.add_(norm.b)
    return moved


def head_projection(
    model: HookedTransformer,
    layer: int,
    port: str,
    normed: torch.Tensor,
    heads: torch.Tensor,
    position: torch.Tensor | None,
) -> torch.Tensor:
    """[b, pos, head', d_head]: the query, key or value of the listed `heads` of `layer`, each
    from its own normalised input `normed[i]` ([head', b, pos, d_model]), with the positional
    embedding of a shortformer model (`position`) added to query and key inputs, as the model
    computes them."""
    attn = model.blocks[layer].attn
    weight = getattr(attn, f"W_{port.upper()}")[heads]  # [head', d_model, d_head]
    bias = getattr(attn, f"b_{port.upper()}")[heads]  # [head', d_head]
    if position is not None and port != "v":
        normed = normed + position
    return torch.einsum("nbpd,nde->bpne", normed, weight) + bias


@dataclass
class CorruptRuns:
    """What an edge ablation (`workbench.circuits.EdgeAblator`) reuses from the runs an
    attribution already made: per batch, the corrupt prompts' activations at `ablation_hooks`
    (what every source writes: the embeddings, each layer's `hook_z` and MLP output, a head's
    output being its `z @ W_O`; and each head's q, k, v), the metric's means on the clean
    and corrupt prompts, and its value on each prompt (float64, in batch order: what a
    bootstrap over prompts resamples)."""

    sources: list[dict[str, torch.Tensor]]
    m_clean: float
    m_corrupt: float
    clean_values: torch.Tensor | None = None
    corrupt_values: torch.Tensor | None = None
    # per batch, what a spot check reads besides (`workbench.attribution.spotcheck`): what
    # every source writes on the clean prompts, and the corrupt run's input to every layer and
    # its final residual stream at the last position (under the logits' input hook)
    clean_sources: list[dict[str, torch.Tensor]] | None = None
    layer_inputs: list[dict[str, torch.Tensor]] | None = None


@dataclass
class EdgeScores:
    method: str
    graph: EdgeGraph
    scores: Float[torch.Tensor, "n_src n_dst"]
    metric_clean: float
    metric_corrupt: float
    runs: CorruptRuns | None = None  # the corrupt runs' source activations, for the curve
    # standard errors over prompts: of each edge's score, and of each source's summed score
    # over all its destinations (a node's attribution-patching score)
    stderr: Float[torch.Tensor, "n_src n_dst"] | None = None
    source_stderr: Float[torch.Tensor, " n_src"] | None = None

    def edges(self) -> list[tuple[str, str, float]]:
        return self.graph.edges(self.scores)

    def edge_stderr(self) -> list[float] | None:
        """Each edge's standard error, in `edges()` order (None where not computed)."""
        if self.stderr is None:
            return None
        return [e[2] for e in self.graph.edges(self.stderr)]

    @property
    def completeness(self) -> float:
        """Sum of the `input` edges' normalised scores: 1 for exact integrated gradients."""
        return float(self.scores[self.graph.sources.index(Node.input().id)].sum())


def run_with_grads(
    model: HookedTransformer,
    tokens: torch.Tensor,
    batch: PromptBatch,
    keep: list[str],
    grad_of: list[str],
    *,
    scale: float,
    embed_override: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward (optionally replacing the input embeddings), keep activations `keep`, and
    backward `scale` x the metric sum for the gradients at `grad_of`. The weights take no
    gradient: the backward starts from the input embeddings (a leaf), so it computes the
    activations' gradients alone; without `grad_of` the forward pass records nothing for one.
    Only the last position is unembedded: every metric reads it alone. Returns the activations
    and the metric on each prompt (detached, in the model's dtype)."""
    acts: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook: object) -> None:
        acts[hook.name] = act.detach()  # type: ignore[attr-defined]

    def grad_hook(act: torch.Tensor, hook: object) -> None:
        act.retain_grad()
        acts[hook.name + ".live"] = act  # type: ignore[attr-defined]

    def override(act: torch.Tensor, hook: object) -> torch.Tensor:
        assert embed_override is not None
        return embed_override.clone().requires_grad_(True)

    def leaf(act: torch.Tensor, hook: object) -> torch.Tensor:
        return act.detach().requires_grad_(True)

    hooks: list = []
    if embed_override is not None:
        hooks.append((Node.input().out_hook(), override))
    elif grad_of:
        hooks.append((Node.input().out_hook(), leaf))
    hooks += [(name, save) for name in keep] + [(name, grad_hook) for name in grad_of]
    grad_mode = torch.enable_grad() if grad_of else torch.no_grad()
    with frozen_weights(model), lean_activations(model), grad_mode, model.hooks(fwd_hooks=hooks):
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        diffs = batch.metric(last_position_logits(model, resid), batch.target)
        if grad_of:
            (diffs.sum() * scale).backward()
    for name in grad_of:
        live = acts.pop(name + ".live")
        acts[name + ".grad"] = (
            live.grad.detach() if live.grad is not None else torch.zeros_like(live)
        )
    return acts, diffs.detach()


def edge_attribution(
    model: HookedTransformer,
    batches: list[PromptBatch],
    *,
    graph: EdgeGraph | None = None,
    ig_steps: int = 0,
    ig_rule: str = DEFAULT_IG_RULE,
    keep_runs: bool = True,
    for_spot_check: bool = True,
    errors: bool = True,
) -> EdgeScores:
    """`eap` (ig_steps = 0) or `eap_ig` (ig_steps >= 1, points chosen by `ig_rule`) scores
    for every edge of `graph`, with (`keep_runs`) what the corrupt runs leave for an ablation
    (`EdgeScores.runs`; with `for_spot_check`, also what a spot check reads, which it makes
    anew otherwise) and (`errors`) each score's standard error over prompts. The runs are
    the model's own (no per-head copies of q/k/v inputs): each head's input gradient comes from
    its q/k/v gradient (`qkv_input_grads`), and the products with the sources' differences are
    taken a destination layer at a time.

    A score is the mean over prompts of each prompt's own product (its source difference with
    its gradient), so the standard errors come from the same products kept per prompt: one more
    product per destination group, no other pass."""
    alphas = ig_alphas(ig_steps, ig_rule)
    graph = graph or model_graph(model)
    n = sum(b.size for b in batches)
    src_hooks, dst_hooks = source_hooks(model, graph), _destination_hooks(model, graph)
    device = model_device(model)
    total = torch.zeros(len(graph.sources), len(graph.destinations), device=device)
    upstream = graph.valid.sum(0).tolist()  # per destination: its sources, a prefix of them
    edge_moments = PromptMoments(tuple(total.shape), device) if errors else None
    source_moments = PromptMoments((len(graph.sources),), device) if errors else None
    m_clean = m_corrupt = 0.0
    clean_values, corrupt_values = [], []
    method = "eap_ig" if ig_steps else "eap"
    kept_sources: list[dict[str, torch.Tensor]] = []
    scratch = Scratch()  # a layer's q/k/v input gradients, every layer of every batch
    for_ablation = ablation_hooks(model, graph)
    final = Node.logits().in_hook(model.cfg.n_layers)
    for_spot_check = keep_runs and for_spot_check
    keep = for_ablation + _layer_inputs(model) + ([final] if for_spot_check else [])
    clean_kept: list[dict[str, torch.Tensor]] = []
    inputs_kept: list[dict[str, torch.Tensor]] = []
    with graph_hooks_enabled(model, graph, split_qkv=False):
        for batch in tqdm(batches, desc=method, leave=False):
            clean, mc = run_with_grads(model, batch.clean, batch, src_hooks, [], scale=1.0)
            if ig_steps:
                corrupt, mr = run_with_grads(
                    model, batch.corrupt, batch, keep if for_spot_check else for_ablation, [],
                    scale=1.0,
                )  # fmt: skip
            else:
                corrupt, mr = run_with_grads(
                    model, batch.corrupt, batch, keep, dst_hooks, scale=1 / n
                )
                if batch is batches[-1]:
                    # the last (at the default budget, the only) batch's saved activations
                    # are freed: their pages go back before the source differences and the
                    # products' buffers are made beside them. An earlier batch keeps them
                    # for the next batch's pass, which would fault them in again (about
                    # 0.06 s a batch on the GPT-2-small shape)
                    memory.release()
            m_clean, m_corrupt = m_clean + float(mc.sum()), m_corrupt + float(mr.sum())
            clean_values.append(mc.double().cpu())
            corrupt_values.append(mr.double().cpu())
            with torch.no_grad():
                delta = source_differences(model, graph, clean, corrupt)
                groups = (
                    _integrated_grads(model, graph, batch, dst_hooks, clean, corrupt, alphas, n)
                    if ig_steps
                    else destination_grad_groups(model, graph, corrupt, scratch)  # in turn
                )
                per_source = delta.new_zeros(batch.size, len(graph.sources)) if errors else None
                for cols, grads in groups:
                    k = upstream[cols[0]]
                    total[:k, cols] += torch.einsum("sbpd,tbpd->st", delta[:k], grads)
                    if edge_moments is not None and per_source is not None:
                        # each prompt's own products (x n: the gradients carry 1 / n)
                        each = torch.einsum("sbpd,tbpd->bst", delta[:k], grads) * n
                        edge_moments.add(each, (slice(0, k), cols))
                        per_source[:, :k] += each.sum(-1)
                if source_moments is not None and per_source is not None:
                    source_moments.add(per_source)
            if keep_runs:
                kept_sources.append({name: corrupt[name] for name in for_ablation})
            if for_spot_check:
                clean_kept.append(clean)
                inputs = {name: corrupt[name] for name in _layer_inputs(model)}
                inputs_kept.append(inputs | {final: corrupt[final][:, -1:]})
            del clean, corrupt, delta, groups
    del scratch
    memory.release()  # the batches' buffers, before what comes next (the curve)
    m_clean, m_corrupt = m_clean / n, m_corrupt / n
    gap = metric_gap(m_clean, m_corrupt)
    scores = ((total.detach() / gap) * graph.valid.to(device)).float().cpu()
    runs = (
        CorruptRuns(
            kept_sources,
            m_clean,
            m_corrupt,
            torch.cat(clean_values),
            torch.cat(corrupt_values),
            clean_kept if for_spot_check else None,
            inputs_kept if for_spot_check else None,
        )  # fmt: skip
        if keep_runs
        else None
    )
    result = EdgeScores(method, graph, scores, m_clean, m_corrupt, runs)
    if edge_moments is not None and source_moments is not None:
        stderr = edge_moments.stderr(n, 1 / gap)
        result.stderr = stderr * graph.valid if stderr is not None else None
        result.source_stderr = source_moments.stderr(n, 1 / gap)
    return result


def _integrated_grads(
    model: HookedTransformer,
    graph: EdgeGraph,
    batch: PromptBatch,
    dst_hooks: list[str],
    clean: dict[str, torch.Tensor],
    corrupt: dict[str, torch.Tensor],
    alphas: list[float],
    n: int,
) -> list[tuple[list[int], torch.Tensor]]:
    """Every destination's input gradient averaged over the interpolated runs of EAP-IG."""
    start = corrupt[Node.input().out_hook()]
    delta_in = clean[Node.input().out_hook()] - start
    sums: list[tuple[list[int], torch.Tensor]] = []
    for alpha in alphas:
        acts, _ = run_with_grads(
            model, batch.corrupt, batch, _layer_inputs(model), dst_hooks,
            scale=1 / (n * len(alphas)), embed_override=start + alpha * delta_in,
        )  # fmt: skip
        groups = destination_grad_groups(model, graph, acts)  # one group at a time
        if not sums:
            sums = list(groups)
        else:
            for (_, total), (_, grads) in zip(sums, groups, strict=True):
                total += grads
        del acts, groups
    return sums


@torch.no_grad()
def exact_edge_patching(
    model: HookedTransformer,
    batches: list[PromptBatch],
    *,
    graph: EdgeGraph | None = None,
    max_rows: int = 512,
    only: torch.Tensor | None = None,
    progress: bool = True,
) -> EdgeScores:
    """Patch every edge on its own (see the module docstring), or (`only`, a boolean
    [n_src, n_dst] mask) the edges chosen; batched per destination. Scores of edges not
    patched are 0. Each score's standard error over prompts comes with it."""
    graph = graph or model_graph(model)
    cfg = model.cfg
    n = sum(b.size for b in batches)
    valid = graph.valid if only is None else graph.valid & only.cpu().bool()
    n_edges = int(valid.sum())
    device = model_device(model)
    sums = torch.zeros(len(graph.sources), len(graph.destinations), device=device)
    moments = PromptMoments(tuple(sums.shape), device)
    m_clean = m_corrupt = 0.0
    src_hooks = source_hooks(model, graph)
    if only is None:
        passes = sum(
            math.ceil(int(valid[:, t].sum()) / max(1, max_rows // b.size))
            for b in batches
            for t in range(len(graph.destinations))
        )
        logger.info(
            "exact_edge: %d edges x %d prompts, about %d partial forward passes (progress and "
            "ETA per edge follow)", n_edges, n, passes,
        )  # fmt: skip
    bar = tqdm(total=n_edges * len(batches), desc="exact_edge", unit="edge", disable=not progress)
    targets = [t for t in range(len(graph.destinations)) if valid[:, t].any()]
    with graph_hooks_enabled(model, graph), bar:
        for batch in batches:
            names = set(src_hooks) | {Hook.resid_pre(layer) for layer in range(cfg.n_layers)}
            stop = {"names_filter": names.__contains__, "stop_at_layer": cfg.n_layers}
            clean_final, clean = model.run_with_cache(batch.clean, **stop)
            corr_final, corrupt = model.run_with_cache(batch.corrupt, **stop)
            m_clean += float(batch.metric.final(model, clean_final, batch.target).sum())
            corrupt_each = batch.metric.final(model, corr_final, batch.target)
            m_corrupt += float(corrupt_each.sum())
            delta = source_differences(model, graph, dict(clean.items()), dict(corrupt.items()))
            for t in targets:
                dst = graph.destinations[t]
                srcs = valid[:, t].nonzero()[:, 0].tolist()
                if dst == Node.logits().id:
                    values = torch.stack(
                        [
                            batch.metric.final(model, corr_final + delta[s], batch.target)
                            for s in srcs
                        ]
                    )
                else:
                    values = _patch_destination(model, batch, dst, corrupt, delta[srcs], max_rows)
                sums[srcs, t] += values.sum(1)
                moments.add((values - corrupt_each).T, (srcs, t))  # each prompt's own effect
                bar.update(len(srcs))
    m_clean, m_corrupt = m_clean / n, m_corrupt / n
    gap = metric_gap(m_clean, m_corrupt)
    mask = valid.to(device)
    scores = (((sums / n - m_corrupt) / gap) * mask).float().cpu()
    stderr = moments.stderr(n, 1 / gap)
    result = EdgeScores("exact_edge", graph, scores, m_clean, m_corrupt)
    result.stderr = stderr * valid if stderr is not None else None
    return result


def _patch_destination(
    model: HookedTransformer,
    batch: PromptBatch,
    dst: str,
    corrupt: object,
    deltas: torch.Tensor,
    max_rows: int,
) -> torch.Tensor:
    """The metric on each prompt with `dst`'s input moved by each of `deltas` ([n_src, b, p,
    d]): [n_src, b]."""
    node = Node.parse(dst)
    layer, head, hook = node.layer or 0, node.head, node.in_hook(model.cfg.n_layers)
    resid = corrupt[Hook.resid_pre(layer)]  # type: ignore[index]
    per_chunk = max(1, max_rows // batch.size)
    out = torch.zeros(deltas.shape[0], batch.size, device=deltas.device)
    for first in range(0, deltas.shape[0], per_chunk):
        chunk = deltas[first : first + per_chunk]
        k = chunk.shape[0]
        flat = chunk.reshape(k * batch.size, *chunk.shape[2:])

        def move(act: torch.Tensor, hook: object, flat: torch.Tensor = flat) -> torch.Tensor:
            act = act.clone()
            if head is None:
                act += flat
            else:
                act[:, :, head] += flat
            return act

        final = model.run_with_hooks(
            repeat_rows(resid, k), start_at_layer=layer, stop_at_layer=model.cfg.n_layers,
            fwd_hooks=[(hook, move)],
        )  # fmt: skip
        values = batch.metric.final(model, final, batch.target.repeat(k))
        out[first : first + k] = values.view(k, batch.size)
    return out
