"""Why this token: input attribution for one prediction, its faithfulness and the agreement
between methods.

The quantity explained is the **logit of the target token at the prompt's last position**
(pre-softmax; the model's own prediction unless a target is given). The inputs are the prompt's
token embeddings: the output of the embedding (`hook_embed`, `W_E[token]`), with positional
embeddings, where the model has them, added by the model as usual and never attributed. A token's
score is the sum over `d_model` of its embedding's attribution, unless a method says otherwise.

The gradient and perturbation family runs on Captum ("Captum: a unified and generic model
interpretability library for PyTorch", Kokhlikyan et al. 2020), which is its engine here:

- `saliency` (Simonyan et al. 2014): the L2 norm over `d_model` of the gradient of the logit with
  respect to the token's embedding (unsigned);
- `input_x_gradient` (Shrikumar et al. 2016): Σ_d e_d ∂f/∂e_d. The same backward pass gives it
  over each layer's positions too: Σ_d h_d ∂f/∂h_d at each layer's residual input
  (`resid_pre`) and at the final residual stream;
- `integrated_gradients` (Sundararajan et al. 2017): Σ_d (e_d − b_d) ∫₀¹ ∂f/∂e_d(b + α(e − b)) dα
  with Captum's Gauss-Legendre rule of `ig_steps` points. Complete: the scores sum to
  f(e) − f(b) up to the rule's error, which Captum reports as the convergence delta and which is
  stored beside the scores;
- `occlusion` (Zeiler & Fergus 2014, as feature ablation over tokens): f(e) − f(e with the token's
  embedding replaced by the baseline), one token at a time;
- `shapley` (Shapley value sampling, Castro et al. 2009): each token a player, a missing token's
  embedding replaced by the baseline, `shapley_samples` random orders of the tokens (seeded).
  Efficient for every sample: the scores sum to f(e) − f(b) exactly (up to float rounding).

The baseline b is the zero vector by default (`zero`), or the mean of the embedding matrix's rows
(`mean`): the same baseline replaces a token in integrated gradients, occlusion, Shapley values
and the faithfulness curves.

`atman` (AtMan, Deb et al. 2023, "AtMan: Understanding Transformer Predictions Through Memory
Efficient Attention Manipulation") is a perturbation of attention rather than of embeddings: for
each input position j, every head's pre-softmax attention score from every query to key j is
multiplied by 1 − `atman_suppression` (0.9) in every layer (a masked score stays masked), and j's
score is the rise of the target's cross-entropy, −log p(target), over the unperturbed run (in
nats; AtMan's explanation without its conceptual suppression of similar tokens). A negative
score is multiplied too, which raises its attention weight, as AtMan does.

Propagation and decomposition methods are implemented in the workbench: `attn_lrp` and
`relevance_rollout` (`workbench.prompt.lrp`), `alti` and `globenc`
(`workbench.prompt.decomposition`); each module states its rules.

**Faithfulness** (Samek et al. 2017; Petsiuk et al. 2018): for each method, the tokens in order of
decreasing score; the *deletion* curve replaces the first k of them by the baseline (k = 0 … n) and
reads the target's probability and logit, the *insertion* curve starts from every token replaced and
puts the first k back. A faithful ranking makes deletion fall fast (a small area under the curve)
and insertion rise fast (a large area). The areas are the trapezoid rule over k/n ∈ [0, 1], of
the probability and of the logit as a share of the change from the baseline,
(logit_k − f(b)) / (f(e) − f(b)), which tells methods apart where any one deletion already takes
the probability to nothing (a short prompt).

**Agreement** ("Order in the Court: Explainable AI Methods Prone to Disagreement", Neely et al.
2021; Krishna et al. 2022): for every pair of methods, Spearman's rank correlation of the token
scores, and the share of the top-k tokens by |score| the two have in common (k = ⌈n/4⌉).
"""

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.metrics import last_position_logits
from workbench.core import Hook
from workbench.errors import BadInput

logger = logging.getLogger(__name__)

CAPTUM_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "occlusion", "shapley")
OWN_METHODS = ("atman", "attn_lrp", "relevance_rollout", "alti", "globenc")
METHODS = CAPTUM_METHODS + OWN_METHODS
BASELINES = ("zero", "mean")
CURVE_KINDS = ("deletion", "insertion")
CURVE_ROWS = 32  # prompt variants evaluated in one forward pass of a curve


@dataclass(frozen=True)
class AttributionParams:
    """What an explanation computes; part of its id."""

    methods: tuple[str, ...] = METHODS
    baseline: str = "zero"
    ig_steps: int = 64
    shapley_samples: int = 25
    seed: int = 0
    atman_suppression: float = 0.9

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class MethodScores:
    """One method's attribution of the target's logit."""

    method: str
    tokens: np.ndarray  # [pos]
    layers: np.ndarray | None = None  # [rows, pos]: over each layer's positions, if defined
    seconds: float = 0.0
    delta: float | None = None  # integrated gradients' convergence delta (Captum's)


@dataclass
class Explanation:
    """Every method's attribution of one prediction, with faithfulness curves and agreement."""

    target_id: int
    target_logit: float
    target_prob: float
    baseline_logit: float  # the target's logit with every token replaced by the baseline
    scores: dict[str, MethodScores] = field(default_factory=dict)
    curves: list[tuple[str, str, int, float, float]] = field(default_factory=list)
    # (method, deletion|insertion, k, probability, logit)
    agreement: list[tuple[str, str, float, float]] = field(default_factory=list)
    # (method a, method b, spearman, top-k share)
    top_k: int = 1


def parse_methods(text: str) -> tuple[str, ...]:
    """`all`, `none` or a comma-separated list of METHODS; BadInput naming an unknown one."""
    text = text.strip()
    if text == "all":
        return METHODS
    if text in ("none", ""):
        return ()
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise BadInput(
            f"--attribution: unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}, "
            "all or none"
        )
    return names


def check_params(params: AttributionParams) -> None:
    if params.baseline not in BASELINES:
        raise BadInput(f"--attr-baseline {params.baseline!r}: choose from {', '.join(BASELINES)}")
    if params.ig_steps < 2:
        raise BadInput(f"--ig-steps {params.ig_steps}: must be 2 or more")
    if params.shapley_samples < 1:
        raise BadInput(f"--shapley-samples {params.shapley_samples}: must be 1 or more")
    if not 0 <= params.atman_suppression <= 1:
        raise BadInput(f"--atman-suppression {params.atman_suppression}: must be from 0 to 1")


class TargetLogit:
    """f(embeddings) = the target's logit at the last position, for a batch of embedding tensors
    [batch, pos, d_model] put in place of the prompt's token embeddings."""

    def __init__(self, model: HookedTransformer, ids: Sequence[int], target: int) -> None:
        self.model = model
        self.device = model.W_U.device
        self.tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        self.target = int(target)

    def embeddings(self) -> torch.Tensor:
        """[1, pos, d_model]: the prompt's token embeddings, as the model computes them."""
        with torch.no_grad():
            return self.model.embed(self.tokens).detach()

    def last_logits(
        self, embeds: torch.Tensor, hooks: Sequence[tuple[object, Callable]] = ()
    ) -> torch.Tensor:
        """[batch, d_vocab]: the last position's logits with `embeds` as token embeddings (and
        any other forward `hooks`)."""
        batch = embeds.shape[0]

        def put(value: torch.Tensor, hook: object) -> torch.Tensor:
            return embeds.to(value.dtype)

        resid = self.model.run_with_hooks(
            self.tokens.expand(batch, -1),
            fwd_hooks=[(Hook.EMBED, put), *hooks],
            stop_at_layer=self.model.cfg.n_layers,
        )
        return last_position_logits(self.model, resid)[:, 0]

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.last_logits(embeds)[:, self.target]


def baseline_embeddings(model: HookedTransformer, embeds: torch.Tensor, kind: str) -> torch.Tensor:
    """The baseline in the shape of `embeds`: zeros, or the mean row of the embedding matrix."""
    if kind == "zero":
        return torch.zeros_like(embeds)
    return model.W_E.detach().mean(0).to(embeds.dtype).expand_as(embeds).clone()


def token_mask(embeds: torch.Tensor) -> torch.Tensor:
    """Captum's feature mask, [1, pos, 1] (broadcast over d_model): position p is feature p."""
    n = embeds.shape[1]
    return torch.arange(n, device=embeds.device).view(1, n, 1)


def captum_scores(
    fn: TargetLogit,
    method: str,
    embeds: torch.Tensor,
    baseline: torch.Tensor,
    params: AttributionParams,
) -> MethodScores:
    """One of CAPTUM_METHODS, run by Captum on `fn`."""
    from captum.attr import (
        FeatureAblation,
        InputXGradient,
        IntegratedGradients,
        LayerGradientXActivation,
        Saliency,
        ShapleyValueSampling,
    )

    n = embeds.shape[1]
    inputs = embeds.clone().requires_grad_(True)
    with torch.enable_grad():
        if method == "saliency":
            grads = Saliency(fn).attribute(inputs, abs=False)
            return MethodScores(method, _cpu(grads[0].norm(dim=-1)))
        if method == "input_x_gradient":
            model = fn.model
            points = [model.blocks[layer].hook_resid_pre for layer in range(model.cfg.n_layers)]
            points.append(model.blocks[-1].hook_resid_post)
            per_token = InputXGradient(fn).attribute(inputs)
            found = LayerGradientXActivation(fn, points).attribute(inputs)
            layers = np.stack([_cpu(layer[0].sum(-1)) for layer in found])
            return MethodScores(method, _cpu(per_token[0].sum(-1)), layers=layers)
        if method == "integrated_gradients":
            ig = IntegratedGradients(fn, multiply_by_inputs=True)
            attributions, delta = ig.attribute(
                inputs,
                baselines=baseline,
                n_steps=params.ig_steps,
                internal_batch_size=max(1, min(params.ig_steps, CURVE_ROWS)),
                return_convergence_delta=True,
            )
            return MethodScores(method, _cpu(attributions[0].sum(-1)), delta=float(delta[0]))
        mask = token_mask(inputs)
        with torch.no_grad():
            if method == "occlusion":
                found = FeatureAblation(fn).attribute(
                    inputs.detach(),
                    baselines=baseline,
                    feature_mask=mask,
                    perturbations_per_eval=min(n, CURVE_ROWS),
                )
                return MethodScores(method, _cpu(found[0, :, 0]))
            if method == "shapley":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(params.seed)
                    found = ShapleyValueSampling(fn).attribute(
                        inputs.detach(),
                        baselines=baseline,
                        feature_mask=mask,
                        n_samples=params.shapley_samples,
                        perturbations_per_eval=min(n, CURVE_ROWS),
                        show_progress=False,
                    )
                return MethodScores(method, _cpu(found[0, :, 0]))
    raise BadInput(f"unknown attribution method {method!r}")


def atman_scores(fn: TargetLogit, embeds: torch.Tensor, suppression: float) -> MethodScores:
    """AtMan: one row per input position j (CURVE_ROWS at a time) with every attention score to
    key j scaled by 1 − `suppression` in every layer and head; j's score is −log p(target) of
    that row less the unperturbed prompt's."""
    n = embeds.shape[1]

    def loss(positions: list[int]) -> torch.Tensor:
        """−log p(target) with key p suppressed in row i for positions[i] = p (none if -1)."""

        def suppress(scores: torch.Tensor, hook: object) -> torch.Tensor:
            scale = torch.ones(len(positions), 1, 1, n, dtype=scores.dtype, device=scores.device)
            for row, position in enumerate(positions):
                if position >= 0:
                    scale[row, 0, 0, position] = 1 - suppression
            return torch.where(torch.isfinite(scores), scores * scale, scores)

        hooks = [(lambda name: name.endswith("hook_attn_scores"), suppress)]
        batch = embeds.expand(len(positions), -1, -1)
        with torch.no_grad():
            logits = fn.last_logits(batch, hooks).float()
        return -logits.log_softmax(-1)[:, fn.target]

    plain = loss([-1])
    found = torch.cat(
        [loss(list(range(s, min(s + CURVE_ROWS, n)))) for s in range(0, n, CURVE_ROWS)]
    )
    return MethodScores("atman", _cpu(found - plain))


def own_scores(model: HookedTransformer, ids: list[int], target: int, method: str) -> MethodScores:
    """One of OWN_METHODS; BadInput when it does not apply to the model's architecture."""
    if method in ("attn_lrp", "relevance_rollout"):
        from workbench.prompt import lrp

        if method == "attn_lrp":
            found = lrp.attn_lrp(model, ids, target)
            return MethodScores(method, _cpu(found.tokens), layers=_cpu(found.layers))
        return MethodScores(method, _cpu(lrp.relevance_rollout(model, ids, target)))
    from workbench.prompt import decomposition

    run = decomposition.alti if method == "alti" else decomposition.globenc
    decomposed = run(model, ids)
    rollout = _cpu(decomposed.rollout)
    return MethodScores(method, rollout[-1], layers=rollout)


def applicable(model: HookedTransformer, method: str) -> str | None:
    """None when `method` applies to the model, else the one-sentence reason it does not."""
    try:
        if method in ("attn_lrp", "relevance_rollout"):
            from workbench.prompt import lrp

            lrp.check_supported(model)
        elif method in ("alti", "globenc"):
            from workbench.prompt import decomposition

            decomposition.check_decomposable(model, [0, 0], "attention")
    except BadInput as reason:
        return str(reason)
    return None


def explain(
    model: HookedTransformer,
    ids: list[int],
    target: int,
    params: AttributionParams,
    *,
    skip_inapplicable: bool = False,
) -> Explanation:
    """Every method of `params` on the prediction of `target` at the last position of `ids`,
    the faithfulness curves of each and the agreement of every pair. A method that does not
    apply to the architecture is BadInput, or left out (logged) with `skip_inapplicable`."""
    check_params(params)
    fn = TargetLogit(model, ids, target)
    embeds = fn.embeddings()
    baseline = baseline_embeddings(model, embeds, params.baseline)
    with torch.no_grad():
        logits = fn.last_logits(torch.cat([embeds, baseline]))
    probs = logits.float().softmax(-1)[:, target]
    found = Explanation(
        target_id=int(target),
        target_logit=float(logits[0, target]),
        target_prob=float(probs[0]),
        baseline_logit=float(logits[1, target]),
        top_k=max(1, math.ceil(len(ids) / 4)),
    )
    for method in tqdm(params.methods, desc="input attribution", leave=False):
        started = time.perf_counter()
        try:
            if method in CAPTUM_METHODS:
                scores = captum_scores(fn, method, embeds, baseline, params)
            elif method == "atman":
                scores = atman_scores(fn, embeds, params.atman_suppression)
            else:
                scores = own_scores(model, ids, target, method)
        except BadInput:
            if not skip_inapplicable or method in (*CAPTUM_METHODS, "atman"):
                raise
            logger.info("%s does not apply to this model: left out", method)
            continue
        scores.seconds = time.perf_counter() - started
        found.scores[method] = scores
        for kind in CURVE_KINDS:
            for k, (prob, logit) in enumerate(curve(fn, embeds, baseline, scores.tokens, kind)):
                found.curves.append((method, kind, k, prob, logit))
    found.agreement = agreement(found.scores, found.top_k)
    return found


def ranking(scores: np.ndarray) -> list[int]:
    """Positions by decreasing score; ties by position (a stable order)."""
    return [int(p) for p in np.argsort(-scores, kind="stable")]


def curve(
    fn: TargetLogit,
    embeds: torch.Tensor,
    baseline: torch.Tensor,
    scores: np.ndarray,
    kind: str,
) -> list[tuple[float, float]]:
    """[(probability, logit) of the target] for k = 0 … n tokens deleted (or inserted) in the
    order of `scores`."""
    order = ranking(scores)
    n = len(order)
    variants = []
    for k in range(n + 1):
        keep = torch.ones(n, dtype=torch.bool)
        keep[order[:k]] = False
        if kind == "insertion":
            keep = ~keep
        keep_d = keep.to(embeds.device).view(1, n, 1)
        variants.append(torch.where(keep_d, embeds, baseline))
    points: list[tuple[float, float]] = []
    with torch.no_grad():
        for start in range(0, n + 1, CURVE_ROWS):
            logits = fn.last_logits(torch.cat(variants[start : start + CURVE_ROWS])).float()
            prob = logits.softmax(-1)[:, fn.target]
            target = logits[:, fn.target]
            points += list(zip(prob.tolist(), target.tolist(), strict=True))
    return points


def curve_area(values: Sequence[float]) -> float:
    """The trapezoid area under values[k] over k/n, k = 0 … n (n ≥ 1)."""
    n = len(values) - 1
    if n < 1:
        return float(values[0]) if values else float("nan")
    return float(sum((values[k] + values[k + 1]) / 2 for k in range(n)) / n)


def top_share(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The share of the k tokens of largest |score| under `a` that are among b's k."""
    top_a = set(np.argsort(-np.abs(a), kind="stable")[:k].tolist())
    top_b = set(np.argsort(-np.abs(b), kind="stable")[:k].tolist())
    return len(top_a & top_b) / k


def agreement(scores: dict[str, MethodScores], top_k: int) -> list[tuple[str, str, float, float]]:
    """(a, b, Spearman's rank correlation, top-k share) for every pair of methods, a before b in
    the order they were computed; the correlation is NaN when either ranking is constant."""
    names = list(scores)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            x, y = scores[a].tokens, scores[b].tokens
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                rho = float("nan")
            else:
                rho = float(spearmanr(x, y).statistic)
            rows.append((a, b, rho, top_share(x, y, top_k)))
    return rows


def target_token(
    encode: Callable[[str], list[int]] | None,
    token_strs: Callable[[list[int]], list[str]],
    d_vocab: int,
    target: str,
) -> int:
    """The id of `--target`: a text the tokenizer makes one token of, or `#ID` for a token id;
    BadInput when the tokenizer splits it, or the id is outside the vocabulary."""
    if target.startswith("#") and target[1:].isdigit():
        token = int(target[1:])
        if token >= d_vocab:
            raise BadInput(f"--target {target}: the vocabulary has {d_vocab} tokens")
        return token
    if encode is None:
        raise BadInput(f"--target {target!r}: the model has no tokenizer; give a token id as #ID")
    ids = encode(target)
    if len(ids) != 1:
        pieces = token_strs(ids)
        raise BadInput(
            f"--target {target!r}: the tokenizer makes {len(ids)} tokens of it {pieces}; "
            "give one token (mind the leading space), or its id as #ID"
        )
    return ids[0]


def _cpu(values: torch.Tensor) -> np.ndarray:
    return values.detach().float().cpu().numpy().astype(np.float64)


def explanation_id(
    checkpoint_id: str, ids: list[int], target: int, params: AttributionParams
) -> str:
    """What an explanation is stored under: `x-` and 12 hex digits of the sha256 of (checkpoint,
    token ids, target, parameters)."""
    from workbench.hashing import sha256_json

    key = {"checkpoint": checkpoint_id, "tokens": list(ids), "target": int(target)}
    return "x-" + sha256_json(key | {"params": params.as_dict()})[:12]


def explanation_rows(
    found: Explanation, *, explanation_id: str
) -> dict[str, list[dict[str, object]]]:
    """The store's rows of `found` by table (EXPLANATION_TABLES). A method's per-layer rows keep
    their own row index as `layer` (the residual stream before that block)."""
    eid = explanation_id
    attr: list[dict[str, object]] = []
    methods: list[dict[str, object]] = []
    for method, scores in found.scores.items():
        attr += [
            {"explanation_id": eid, "method": method, "layer": None, "position": p, "score": v}
            for p, v in enumerate(scores.tokens.tolist())
        ]
        if scores.layers is not None:
            first = scores.layers.shape[0]
            offset = 1 if method in ("alti", "globenc") else 0  # rollout after block l: l + 1
            for row in range(first):
                attr += [
                    {"explanation_id": eid, "method": method, "layer": row + offset,
                     "position": p, "score": v}
                    for p, v in enumerate(scores.layers[row].tolist())
                ]  # fmt: skip
        areas: dict[str, float | None] = {}
        gap = found.target_logit - found.baseline_logit
        for kind in CURVE_KINDS:
            points = [(p, x) for m, k, _, p, x in found.curves if m == method and k == kind]
            areas[kind] = curve_area([p for p, _ in points]) if points else None
            shares = [(x - found.baseline_logit) / gap for _, x in points] if gap else []
            areas[f"{kind}_logit"] = curve_area(shares) if shares else None
        methods.append(
            {
                "explanation_id": eid,
                "method": method,
                "seconds": scores.seconds,
                "total": float(scores.tokens.sum()),
                "delta": scores.delta,
                "deletion_auc": areas["deletion"],
                "insertion_auc": areas["insertion"],
                "deletion_logit_auc": areas["deletion_logit"],
                "insertion_logit_auc": areas["insertion_logit"],
            }
        )
    curves = [
        {"explanation_id": eid, "method": m, "kind": kind, "k": k, "prob": p, "logit": logit}
        for m, kind, k, p, logit in found.curves
    ]
    agree: list[dict[str, object]] = [
        {"explanation_id": eid, "method_a": a, "method_b": b,
         "spearman": None if math.isnan(rho) else rho, "top_k_share": share}
        for a, b, rho, share in found.agreement
    ]  # fmt: skip
    return {
        "prompt_input_attr": attr,
        "prompt_attr_methods": methods,
        "prompt_attr_curves": curves,
        "prompt_attr_agreement": agree,
    }
