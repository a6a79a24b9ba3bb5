"""Norm-based decompositions of whole layers for one prompt: ALTI and GlobEnc on a decoder-only
TransformerLens model.

Both methods split a layer's output at each position i into one vector per source position j,
T_i(x_j), a function of the layer's input at position j alone, measure each vector's share of
the output, and roll the per-layer shares out across layers:

- **ALTI** (Ferrando, Gállego & Costa-jussà 2022, "Measuring the Mixing of Contextual
  Information in the Transformer"): c_{i←j} = max(0, ‖x̃_i‖₁ − ‖x̃_i − T_i(x_j)‖₁), the
  output's L1 norm less the Manhattan distance from the term to the output, normalised over j
  to sum to 1; x̃_i is the whole output, bias terms included (as the reference implementation
  computes it: the biases belong to no source but are part of x̃_i).
- **GlobEnc** (Modarressi, Fayyaz, Yaghoobzadeh & Pilehvar 2022, "GlobEnc: Quantifying Global
  Token Attribution by Incorporating the Whole Encoder Layer in Transformers"): the Euclidean
  norm ‖T_i(x_j)‖₂ of each term through the residual connection and the normalisation
  (N_{Res+LN}), normalised over j to sum to 1.

**The layer's output on a pre-LN decoder.** The papers decompose a post-LN encoder layer,
x̃_i = LN(x_i + Σ_j Σ_h α^h_{ij} f^h(x_j) + b_O). In a pre-LN decoder (GPT-2, Llama, the zoo
models) the normalisation is applied to each source's own input before the attention block
and the residual stream is never normalised in place, so here, with x_j the residual stream
before block l (`resid_pre`):

    y_i = x_i + Σ_j Σ_h A^h[i, j] v^h_j W_O^h + b_O      (`resid_mid`, output "attention")
    T_i(x_j) = Σ_h A^h[i, j] v^h_j W_O^h + [i = j] x_i

v^h_j = LN1(x_j) W_V^h + b_V^h depends on x_j alone (LN1's scale is x_j's own, so this is exact:
nothing is linearised inside the block). With grouped-query attention each query head h reads
its key/value head's v_j. The residual is merged into the diagonal term, as both papers do, so
each layer is a [pos, pos] token-to-token matrix. The attention's output bias b_O belongs to
no source: it is part of y_i (ALTI's x̃_i) but of no T_i(x_j). Causal attention gives every
source j > i a zero term and a zero share.

**The normalisation.** The output is then taken through the normalisation that reads it (the
MLP's LN2 on `resid_mid`; the next block's LN1 or the final norm on `resid_post`, which is
`resid_mid` in an attention-only model), linearised at this input: N(z) = P z / s_i, with
s_i = sqrt(mean((P y_i)²) + eps) the scale the norm computes on the whole output y_i, fixed,
and P the centring z − mean(z) for LayerNorm, the identity for RMSNorm (no normalisation: N is
the identity). So x̃_i = N(y_i) = Σ_j N(T_i(x_j)) + N(b_O) exactly, and in a sequential block
x̃_i is what TransformerLens's `hook_normalized` of that norm holds. The norm's elementwise
weight and bias are not applied: the workbench loads every model with them folded into the
weights that read the norm (TransformerLens's fold_ln), and the readers of one output (the
MLP, the next block's attention, the unembedding) each have their own. Consequence: s_i is
one positive number per row, which multiplies every term of the row and its output alike, so
it cancels from both methods' normalised rows; only the centring changes them (and with the
writing weights centred at loading, as the workbench does for LayerNorm models, the terms are
already centred up to rounding). The papers, on a post-LN encoder, include the norm's
weight γ.

**Output "layer": the variant that treats the MLP.** ALTI measures the attention block with its
residual connection and normalisation, as above. GlobEnc's N_Enc goes on through the
feed-forward block to the layer's output: the FFN's nonlinearity is skipped, each N_{Res+LN}
term is passed through the FFN's residual connection and its normalisation (LN2), whose scale
is computed on the layer's real output, FFN included. Here `output="layer"` measures at
`resid_post` = y_i + MLP_i the same way: in a sequential block the MLP reads the mixture y_i,
so its output is a function of no single source; it is attributed to none, and enters only the
normalisation's scale (s_i of `resid_post`) and, for ALTI, the output x̃_i the terms are
compared with. For GlobEnc in a sequential block this changes nothing but the common scale (its
rows equal those of output "attention"); for ALTI it does, and where the MLP's output dominates
a position's output every term can be farther from x̃_i than x̃_i's own L1 norm: that row is
then all zero (no source is measured to contribute; the reference normalisation would divide
0 by 0), and the rolled-out rows lose the share that passed through that position (they sum
to less than 1). It is logged. In a parallel block (GPT-NeoX, GPT-J:
`resid_post` = x_i + Attn(LN1(x)) + MLP(LN2(x_i))) the MLP reads x_i alone, so its output is
part of the diagonal term T_i(x_i) and the decomposition of `resid_post` is exact; output
"attention" there is x_i + the attention's output alone, a sum the model never forms. Models
that normalise the attention's output before adding it (`use_normalization_before_and_after`)
do not decompose per source: BadInput.

**Rollout** (both papers, as attention rollout without the added identity, since the residual
is in the diagonal): R_1 = M_1 and R_l = M_l R_{l-1}, M_l the row-normalised matrix of layer l
(rows: output positions, columns: sources); row i of R_l is how much position i after layer l
draws on each input token. `Decomposition.rollout[l]` is R_{l+1}'s last row; it sums to 1
unless a zero row (above) was on the way.
GlobEnc's reference code rolls out the unnormalised norms and shows each row divided by its
maximum; here the rows are normalised first (a share of each position's output per source, as
ALTI), and `Decomposition.raw` keeps the unnormalised values for whoever wants the other.

Cost: one run with a cache of the hooks used, then per layer a chunk of query positions at a
time, their per-source terms [chunk, pos, d_model] at most `CHUNK_ELEMENTS` numbers (the
information-flow routes' bound, `workbench.prompt.views`; a few temporaries of that size exist
at once), never a block's [pos, pos, d_model].
Computed in float32 on the model's device; the results are float32 CPU tensors.
"""

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from transformer_lens import ActivationCache, HookedTransformer

from workbench.core import Hook
from workbench.errors import BadInput
from workbench.prompt.views import ROUTES_CHUNK_ELEMENTS

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = ROUTES_CHUNK_ELEMENTS  # per-source terms held at once (16 MB in float32)
OUTPUTS = ("attention", "layer")
Output = Literal["attention", "layer"]
Method = Literal["alti", "globenc"]


@dataclass
class Decomposition:
    """One method's decomposition of one prompt, every tensor float32 on the CPU.

    `layers[l, i, j]`: source j's share of position i's output of layer l (zero for j > i;
    each row sums to 1, or is all zero when no term is measured to contribute: see ALTI at
    output "layer" in the module's docstring). `raw[l, i, j]`: the same before
    the row normalisation (ALTI: max(0, ‖x̃_i‖₁ − ‖x̃_i − T_i(x_j)‖₁); GlobEnc: ‖T_i(x_j)‖₂).
    `rollout[l, j]`: the last position's rolled-out row after layer l (R_{l+1}[-1])."""

    method: str  # "alti" or "globenc"
    output: str  # "attention" (resid_mid) or "layer" (resid_post)
    layers: torch.Tensor  # [layer, pos, pos]
    raw: torch.Tensor  # [layer, pos, pos]
    rollout: torch.Tensor  # [layer, pos]


def alti(
    model: HookedTransformer, ids: list[int], *, output: Output = "attention"
) -> Decomposition:
    """ALTI (Ferrando et al. 2022) of the token sequence `ids`, at each layer's `output`
    ("attention": `resid_mid`; "layer": `resid_post`, the MLP attributed to no source in a
    sequential block, to its own position in a parallel one), rolled out; see the module's
    docstring for every convention. BadInput if the model does not decompose per source."""
    return _decompose(model, ids, "alti", output)


def globenc(
    model: HookedTransformer, ids: list[int], *, output: Output = "attention"
) -> Decomposition:
    """GlobEnc (Modarressi et al. 2022) of the token sequence `ids`: the norm of each source's
    term at each layer's `output` through the residual and the normalisation, rows normalised,
    rolled out; see the module's docstring. BadInput if the model does not decompose per
    source."""
    return _decompose(model, ids, "globenc", output)


def rollout(layers: torch.Tensor) -> torch.Tensor:
    """[layer, pos, pos] -> [layer, pos, pos]: R_1 = M_1, R_l = M_l R_{l-1}, in float64 on the
    CPU (returned as float64)."""
    matrices = layers.detach().to("cpu", torch.float64)
    out = torch.empty_like(matrices)
    acc = torch.eye(matrices.shape[-1], dtype=torch.float64)
    for layer in range(matrices.shape[0]):
        acc = matrices[layer] @ acc
        out[layer] = acc
    return out


def check_decomposable(model: HookedTransformer, ids: list[int], output: str) -> None:
    """BadInput, one sentence, when the model or the prompt cannot be decomposed."""
    cfg = model.cfg
    if output not in OUTPUTS:
        raise BadInput(f"output {output!r}: must be one of {', '.join(OUTPUTS)}")
    if getattr(cfg, "use_normalization_before_and_after", False):
        raise BadInput(
            "the model normalises each attention output before adding it to the residual "
            "stream, so a layer's output is not a sum of one term per source position"
        )
    if output == "layer" and cfg.attn_only:
        raise BadInput('output "layer" needs MLPs: the model is attention-only (use "attention")')
    if not ids:
        raise BadInput("the prompt has no tokens")
    if len(ids) > cfg.n_ctx:
        raise BadInput(
            f"the prompt is {len(ids)} tokens, more than the model's context of {cfg.n_ctx}"
        )
    bad = [t for t in ids if not 0 <= t < cfg.d_vocab]
    if bad:
        raise BadInput(f"token id {bad[0]} is outside the model's vocabulary of {cfg.d_vocab}")


def hook_names(model: HookedTransformer, output: str) -> set[str]:
    """The activations a decomposition reads."""
    names: set[str] = set()
    for layer in range(model.cfg.n_layers):
        names |= {
            Hook.resid_pre(layer),
            Hook.qkv(layer, "v"),
            Hook.pattern(layer),
            Hook.attn_out(layer),
        }
        if output == "layer":
            names |= {Hook.resid_post(layer), Hook.mlp_out(layer)}
    return names


def source_terms(
    model: HookedTransformer, cache: ActivationCache, layer: int, queries: range, output: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer`'s per-source terms for the query positions `queries`, before the
    normalisation: ([q, pos, d_model] T_i(x_j), [q, d_model] the output y_i), float32. The
    terms plus the attention's output bias (and, at output "layer" in a sequential block, the
    MLP's output) sum to y_i."""
    value_out = _value_out(model, cache, layer, model.W_O[layer])
    return _terms(model, cache, layer, queries, output, value_out)


def _value_out(
    model: HookedTransformer, cache: ActivationCache, layer: int, w_o: torch.Tensor
) -> torch.Tensor:
    """[key, head, d_model]: each source's value through each head's W_O (`w_o`, the layer's
    [head, d_head, d_model]), float32; with grouped-query attention each query head reads its
    key/value head's value."""
    v = cache[Hook.qkv(layer, "v")][0].float()  # [pos, kv head or head, d_head]
    if v.shape[1] != model.cfg.n_heads:
        v = v.repeat_interleave(model.cfg.n_heads // v.shape[1], dim=1)
    return torch.einsum("khe,hed->khd", v, w_o.float())


def _terms(
    model: HookedTransformer,
    cache: ActivationCache,
    layer: int,
    queries: range,
    output: str,
    value_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`source_terms` with each source's value through W_O ([key, head, d_model]) given."""
    cfg = model.cfg
    q0, q1 = queries.start, queries.stop
    resid_pre = cache[Hook.resid_pre(layer)][0, q0:q1].float()
    pattern = cache[Hook.pattern(layer)][0, :, q0:q1].float()  # [head, q, key]
    weights = pattern.permute(2, 1, 0).contiguous()  # [key, q, head]
    terms = torch.bmm(weights, value_out).transpose(0, 1).contiguous()  # [q, key, d_model]
    diagonal = resid_pre
    if output == "layer":
        y = cache[Hook.resid_post(layer)][0, q0:q1].float()
        if cfg.parallel_attn_mlp:  # the MLP reads x_i alone: its output is T_i(x_i)'s
            diagonal = diagonal + cache[Hook.mlp_out(layer)][0, q0:q1].float()
    else:
        y = resid_pre + cache[Hook.attn_out(layer)][0, q0:q1].float()
    rows = torch.arange(q1 - q0, device=terms.device)
    terms[rows, rows + q0] += diagonal
    return terms, y


def normalise(
    model: HookedTransformer, terms: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation that reads y, linearised at y: ([q, t, d] N(terms), [q, d] N(y)) with
    N(z) = P z / s, s = sqrt(mean((P y)²) + eps) per row, P the centring for LayerNorm and the
    identity for RMSNorm; both unchanged without normalisation. Elementwise weights are not
    applied (folded into the readers' weights)."""
    kind = model.cfg.normalization_type
    if kind is None:
        return terms, y
    if kind in ("LN", "LNPre"):
        terms = terms - terms.mean(-1, keepdim=True)
        y = y - y.mean(-1, keepdim=True)
    scale = (y.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    return terms / scale[:, None], y / scale


def _scores(method: str, terms: torch.Tensor, y: torch.Tensor, queries: range) -> torch.Tensor:
    """[q, pos]: each term's unnormalised score, zero for sources after the query."""
    if method == "alti":
        raw = (y.abs().sum(-1, keepdim=True) - (y[:, None] - terms).abs().sum(-1)).clamp(min=0)
    else:
        raw = torch.linalg.vector_norm(terms, dim=-1)
    source = torch.arange(terms.shape[1], device=raw.device)
    position = torch.arange(queries.start, queries.stop, device=raw.device)
    return raw.masked_fill(source[None] > position[:, None], 0)


def _row_normalised(raw: torch.Tensor) -> torch.Tensor:
    total = raw.sum(-1, keepdim=True)
    return torch.where(total > 0, raw / total.clamp(min=torch.finfo(raw.dtype).tiny), raw)


@torch.no_grad()
def _decompose(
    model: HookedTransformer, ids: list[int], method: Method, output: str
) -> Decomposition:
    check_decomposable(model, ids, output)
    cfg = model.cfg
    device = model.W_U.device
    n = len(ids)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=device)
    names = hook_names(model, output)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    chunk = max(1, CHUNK_ELEMENTS // (n * cfg.d_model))
    raw = torch.zeros(cfg.n_layers, n, n)
    w_o = model.W_O  # (a property that stacks every layer's weights: read once)
    for layer in range(cfg.n_layers):
        value_out = _value_out(model, cache, layer, w_o[layer])
        for start in range(0, n, chunk):
            queries = range(start, min(n, start + chunk))
            terms, y = _terms(model, cache, layer, queries, output, value_out)
            terms, y = normalise(model, terms, y)
            raw[layer, queries.start : queries.stop] = _scores(method, terms, y, queries).cpu()
        logger.debug("%s: layer %d of %d decomposed", method, layer + 1, cfg.n_layers)
    layers = _row_normalised(raw)
    empty = int((raw.sum(-1) == 0).sum())
    if empty:
        logger.info(
            "%s: %d of %d rows have no term nearer the output than the output's own norm: "
            "zero rows, and the rollout loses their share",
            method,
            empty,
            cfg.n_layers * n,
        )
    rolled = rollout(layers)[:, -1].float()
    return Decomposition(method=method, output=output, layers=layers, raw=raw, rollout=rolled)
