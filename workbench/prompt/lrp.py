"""Input attributions of one prediction by layer-wise relevance propagation: AttnLRP, and the
gradient-weighted relevance rollout built on it.

**AttnLRP** (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-wise Relevance Propagation
for Transformers"; reference implementation lxt 2.1, its "efficient" mode). The relevance of a
tensor x is x ⊙ g̃: the tensor times a *modified* gradient g̃ of the explained quantity, here
the target token's logit (pre-softmax) at the last position. The forward pass is the model's
own, value for value; only the backward pass is changed, by TransformerLens hooks, so that the
gradient × input of each operation is the paper's LRP rule for it:

* linear maps (embeddings, projections, unembedding) and the residual additions: the plain
  gradient (the epsilon rule with epsilon → 0 and biases absorbing their share);
* LayerNorm / RMSNorm: the normalisation's scale (√(var + eps), √(mean x² + eps)) is a
  constant in the backward pass (every `hook_scale` is detached), so a norm passes relevance
  on as the linear map it is at this input (the identity rule); a LayerNorm's centring stays
  in the gradient;
* elementwise activations (GELU, SiLU, ReLU, ...), in the MLP and in a gated MLP's gate: the
  identity rule, the gradient of f at x replaced by f(x) / (x + 1e-10) (lxt's epsilon);
* bilinear products, the uniform rule (relevance split equally between the two factors):
  the gated MLP's product act(x W_gate) ⊙ (x W_in) gets half the gradient; in attention, A·v
  halves what reaches v and A, and q·kᵀ halves again what reaches q and k, so the gradient
  is multiplied by ½ at `hook_v` and by ¼ at `hook_q` and `hook_k` (where lxt divides it
  too; rotary embeddings and the 1/√d_head scale are linear, so where it happens does not
  matter);
* softmax: the plain gradient. For s = softmax(x) and output relevances R_j = s_j g_j, its
  gradient × input is R_in,i = x_i (R_i − s_i Σ_j R_j), the paper's softmax rule (a Taylor
  decomposition at zero whose bias term is dropped), so attention does not conserve relevance;
  masked positions get none.

lxt's GPT-2 and Llama maps patch exactly these: `GPT2MLP` (identity rule on the activation),
`nn.LayerNorm` and `LlamaRMSNorm` (scale detached), `LlamaMLP` (identity rule on the gate and
the product's gradient halved), every attention function (q and k gradients ÷ 4, v ÷ 2) and
dropout (off). tests/prompt/test_lrp.py compares this module with lxt 2.1 on a tiny GPT-2 and a
tiny Llama (data in tests/prompt/data/lxt/, written by tools/lxt_fixture.py).

Conventions. `tokens` is the relevance of the token embedding (the output of `hook_embed`),
`positional` that of a learned positional embedding (`hook_pos_embed`; None for rotary models),
each summed over d_model; their sum is the relevance of `resid_pre` of layer 0. The relevance
of the logit's own bias (`b_U`, which holds the final LayerNorm's folded bias) and of every
other bias stays with that bias. The workbench loads models with LayerNorm weights folded and
writing weights centred; neither changes any relevance, because each read of the residual
stream is through a norm whose (scale-detached) gradient is orthogonal to the all-ones
direction. What is conserved exactly, by Euler's theorem for the functions the modified
backward pass linearises: the final norm and unembedding pass on the logit less the target's
`b_U` (so `layers[-1].sum() == value - b_U[target]`), and an MLP block without biases passes on
all of its relevance (identity rule and uniform rule together make it degree-1 homogeneous).
An attention block without biases passes on half of its output's relevance through v, plus
half the relevance Σ S ⊙ g̃_S of its scores S through q and k; the latter is not the other
half in general (the softmax rule), so attention does not conserve relevance.

**Gradient-weighted relevance rollout** (Chefer, Gur & Wolf 2021, "Transformer Interpretability
Beyond Attention Visualization"), with AttnLRP's relevances in place of the paper's own LRP:
for each layer, Ā = E_h[(∇A ⊙ R_A)⁺], where A is a head's attention pattern, ∇A the plain
gradient of the target logit with respect to it (an unmodified backward pass), R_A the AttnLRP
relevance of the pattern (½ A ⊙ g̃_A: the uniform rule's half of A·v), E_h the mean over query
heads and ⁺ the positive part. The rollout is C = M_L · … · M_1 with M_l = I + Ā_l, each row of
M_l divided by its sum (the authors' code, `compute_rollout_attention`, for the paper's
C = Π (I + Ā)); `normalise_rows=False` keeps the rows unnormalised (their BERT code). The
token scores are the last position's row of C over the input positions.

Architectures: whatever TransformerLens's `HookedTransformer` runs with learned ("standard") or
rotary positions, LayerNorm / RMSNorm (folded or not) or none, plain or gated MLPs, grouped-
query and parallel attention. Features lxt has no rule for are a BadInput naming them. The
computation runs on the model's device in float32 and returns CPU tensors; it is
deterministic.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens import HookedTransformer

from workbench.errors import BadInput

logger = logging.getLogger(__name__)

IDENTITY_EPS = 1e-10  # the identity rule's f(x) / (x + eps), as lxt 2.1
Q_K_FACTOR = 0.25  # uniform rule on A·v, then on q·kᵀ
V_FACTOR = 0.5  # uniform rule on A·v
GATE_FACTOR = 0.5  # uniform rule on a gated MLP's product
PATTERN_FACTOR = 0.5  # A's share of A·v's relevance (rollout's R_A)


@dataclass
class LrpResult:
    """AttnLRP relevances of one prediction (all on the CPU, float32)."""

    value: float  # the target's logit at the last position
    tokens: torch.Tensor  # [pos]: relevance of each token embedding (hook_embed)
    positional: torch.Tensor | None  # [pos]: learned positional embedding's, else None
    layers: torch.Tensor  # [n_layers + 1, pos]: at each layer's resid_pre, and the final resid


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x itself in the forward pass; its gradient multiplied by `factor` in the backward."""
    held = x.detach()
    return held + factor * (x - held)


def _identity_rule(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """fx = f(x) for an elementwise f, its value unchanged, with the gradient f(x) / x."""
    ratio = (fx / (x + IDENTITY_EPS)).detach()
    return fx.detach() + ratio * (x - x.detach())


def check_supported(model: HookedTransformer) -> None:
    """BadInput naming the first feature of `model` AttnLRP has no rule for here."""
    cfg = model.cfg
    if cfg.dtype != torch.float32:
        raise BadInput(f"AttnLRP runs in float32; this model is loaded in {cfg.dtype}")
    problems = [
        (cfg.num_experts is not None, "mixture-of-experts routing"),
        (str(cfg.act_fn).endswith("_ln"), f"a normalisation inside the MLP ({cfg.act_fn})"),
        (cfg.use_attention_sinks, "attention sinks"),
        (cfg.use_qk_norm, "normalised queries and keys"),
        (cfg.clip_qkv is not None, "clipped queries, keys and values"),
        (cfg.use_logn_attn, "log-n attention scaling"),
        (cfg.attn_scores_soft_cap > 0, "soft-capped attention scores"),
        (cfg.output_logits_soft_cap > 0, "soft-capped logits"),
        (
            cfg.positional_embedding_type not in ("standard", "rotary"),
            f"{cfg.positional_embedding_type} positional embeddings",
        ),
    ]
    for bad, feature in problems:
        if bad:
            raise BadInput(f"AttnLRP has no rule for {feature}")


def _check_prompt(model: HookedTransformer, ids: list[int], target: int) -> None:
    cfg = model.cfg
    if not ids:
        raise BadInput("AttnLRP needs at least one token")
    if len(ids) > cfg.n_ctx:
        raise BadInput(f"the prompt has {len(ids)} tokens, more than the context of {cfg.n_ctx}")
    if not all(0 <= t < cfg.d_vocab for t in [*ids, target]):
        raise BadInput(f"token ids must be in [0, {cfg.d_vocab})")


Hook = tuple[str | Callable[[str], bool], Callable[..., Any]]


def _forward(
    model: HookedTransformer, ids: list[int], target: int, *, lrp: bool, patterns: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The target's logit at the last position and the tensors kept on the way (embeddings,
    residual streams, and with `patterns` each layer's pattern), with AttnLRP's backward pass
    when `lrp`, else the plain one. The embeddings are leaves of the graph."""
    cfg = model.cfg
    n_layers = cfg.n_layers
    kept: dict[str, torch.Tensor] = {}
    pre_acts: dict[tuple[int, str], torch.Tensor] = {}

    def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        kept[hook.name] = x
        return x

    def keep(x: torch.Tensor, hook: Any) -> torch.Tensor:
        kept[hook.name] = x
        return x

    hooks: list[Hook] = [("hook_embed", leaf)]
    if cfg.positional_embedding_type == "standard":
        hooks.append(("hook_pos_embed", leaf))
    hooks += [(f"blocks.{layer}.hook_resid_pre", keep) for layer in range(n_layers)]
    hooks += [(f"blocks.{n_layers - 1}.hook_resid_post", keep)]
    if patterns:
        hooks += [(f"blocks.{layer}.attn.hook_pattern", keep) for layer in range(n_layers)]
    if lrp:
        hooks.append((lambda name: name.endswith("hook_scale"), lambda x, hook: x.detach()))
        for layer in range(n_layers):
            attn = f"blocks.{layer}.attn."
            hooks += [
                (attn + "hook_q", lambda x, hook: _scale_grad(x, Q_K_FACTOR)),
                (attn + "hook_k", lambda x, hook: _scale_grad(x, Q_K_FACTOR)),
                (attn + "hook_v", lambda x, hook: _scale_grad(x, V_FACTOR)),
            ]
            if not cfg.attn_only:
                hooks += _mlp_hooks(model, layer, pre_acts)
    tokens = torch.tensor([ids], dtype=torch.long, device=model.W_E.device)
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logit = model(tokens)[0, -1, target].float()
    return logit, kept


def _mlp_hooks(
    model: HookedTransformer, layer: int, pre_acts: dict[tuple[int, str], torch.Tensor]
) -> list[Hook]:
    """The MLP's identity rule (and a gated MLP's uniform rule): its pre-activations are kept
    at `hook_pre` (and `hook_pre_linear`) and `hook_post` is replaced by the same values
    computed from them with the modified gradient."""
    mlp = model.blocks[layer].mlp
    prefix = f"blocks.{layer}.mlp."

    def store(x: torch.Tensor, hook: Any) -> torch.Tensor:
        pre_acts[(layer, hook.name.rsplit(".", 1)[-1])] = x
        return x

    def post(x: torch.Tensor, hook: Any) -> torch.Tensor:
        pre = pre_acts[(layer, "hook_pre")]
        if not model.cfg.gated_mlp:
            return _identity_rule(pre, x)
        gate = _identity_rule(pre, mlp.act_fn(pre))
        product = _scale_grad(gate * pre_acts[(layer, "hook_pre_linear")], GATE_FACTOR)
        return product + mlp.b_in

    hooks: list[Hook] = [(prefix + "hook_pre", store), (prefix + "hook_post", post)]
    if model.cfg.gated_mlp:
        hooks.append((prefix + "hook_pre_linear", store))
    return hooks


def _relevance(x: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:  # nothing downstream reads it
        return torch.zeros(x.shape[1], dtype=torch.float32)
    return (x.detach().float() * grad.float()).sum(-1)[0].cpu()


def attn_lrp(model: HookedTransformer, ids: list[int], target: int) -> LrpResult:
    """AttnLRP relevance of `target`'s logit at the last position of the token ids `ids` (see
    the module docstring for the rules and conventions)."""
    check_supported(model)
    _check_prompt(model, ids, target)
    logit, kept = _forward(model, ids, target, lrp=True, patterns=False)
    return _lrp_result(model, logit, kept)


def _lrp_result(
    model: HookedTransformer,
    logit: torch.Tensor,
    kept: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor | None] | None = None,
) -> LrpResult:
    n_layers = model.cfg.n_layers
    names = ["hook_embed", *(n for n in ("hook_pos_embed",) if n in kept)]
    names += [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    names += [f"blocks.{n_layers - 1}.hook_resid_post"]
    if grads is None:
        grads = _grads(logit, {name: kept[name] for name in names})
    rel = {name: _relevance(kept[name], grads[name]) for name in names}
    layers = [rel[f"blocks.{layer}.hook_resid_pre"] for layer in range(n_layers)]
    layers.append(rel[f"blocks.{n_layers - 1}.hook_resid_post"])
    value = float(logit.detach())
    logger.debug("AttnLRP of a logit of %.4g over %d tokens", value, kept["hook_embed"].shape[1])
    return LrpResult(
        value=value,
        tokens=rel["hook_embed"],
        positional=rel.get("hook_pos_embed"),
        layers=torch.stack(layers),
    )


def _grads(logit: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    names = list(tensors)
    grads = torch.autograd.grad(logit, [tensors[n] for n in names], allow_unused=True)
    return dict(zip(names, grads, strict=True))


def rollout_matrices(model: HookedTransformer, ids: list[int], target: int) -> torch.Tensor:
    """[layer, q, k]: each layer's Ā = E_h[(∇A ⊙ R_A)⁺] (module docstring), on the CPU."""
    check_supported(model)
    _check_prompt(model, ids, target)
    n_layers = model.cfg.n_layers
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    logit, kept = _forward(model, ids, target, lrp=True, patterns=True)
    lrp_grads = _grads(logit, {n: kept[n] for n in pattern_names})
    plain_logit, plain = _forward(model, ids, target, lrp=False, patterns=True)
    plain_grads = _grads(plain_logit, {n: plain[n] for n in pattern_names})
    out = []
    for name in pattern_names:
        pattern = kept[name].detach().float()
        lrp_grad, grad = lrp_grads[name], plain_grads[name]
        if lrp_grad is None or grad is None:  # a layer the logit does not read
            out.append(torch.zeros(pattern.shape[-2:], dtype=torch.float32))
            continue
        relevance = PATTERN_FACTOR * pattern * lrp_grad.float()
        out.append((grad.float() * relevance).clamp(min=0)[0].mean(0).cpu())
    return torch.stack(out)


def relevance_rollout(
    model: HookedTransformer, ids: list[int], target: int, *, normalise_rows: bool = True
) -> torch.Tensor:
    """[pos]: the last position's row of the gradient-weighted relevance rollout
    C = M_L · … · M_1, M_l = I + Ā_l (rows divided by their sums unless `normalise_rows` is
    False), for `target`'s logit at the last position (module docstring)."""
    matrices = rollout_matrices(model, ids, target).double()
    n = matrices.shape[-1]
    joint = torch.eye(n, dtype=torch.float64)
    for a in matrices:
        m = torch.eye(n, dtype=torch.float64) + a
        if normalise_rows:
            m = m / m.sum(-1, keepdim=True)
        joint = m @ joint
    return joint[-1].float()
