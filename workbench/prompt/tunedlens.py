"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens"): one learned affine translator per layer that maps the residual stream at that layer
to a point the model's own final normalisation and unembedding decode into a next-token
distribution close to the model's final one.

**The lens.** For layer l (0 ≤ l < n_layers) the translator reads the residual stream *before*
block l, `blocks.{l}.hook_resid_pre` (l = 0: the embeddings), and the lens's logits are

    lens_l(h) = U(N(h + W_l h + b_l)),

with W_l [d_model, d_model] in `torch.nn.Linear`'s convention ([out, in]: `W_l h` is
`weight[l] @ h`), b_l [d_model], N the model's final normalisation (`model.ln_final`, none for a
model without one) and U the unembedding (`x @ W_U + b_U`), decoded in the model's dtype as the
logit lens of `workbench.prompt.views` decodes (no output soft cap). The translator is added to
h, so the zero translator (the initial one) is the logit lens, and weight decay pulls the lens
towards it. The stream after the last block needs no translator: the lens there is the model's
own decoding of its final residual stream.

**Training** minimises, for every layer separately, the Kullback-Leibler divergence from the
model's final next-token distribution p (softmax of the model's float32 logits at the same
position: position t's lens is compared with the model's prediction of token t + 1) to the
lens's q_l: KL(p ‖ q_l) = Σ_v p_v (log p_v − log q_{l,v}), averaged over every position of the
step's windows (each layer's loss back-propagates to its own translator only). Every position
counts: p is defined at each, so a corpus's loss mask is not used. The step:

* gradients of all translators clipped together to a global L2 norm of `max_grad_norm` (1);
* `optimizer="sgd"` (the default): SGD with Nesterov momentum `momentum` (0.9), learning rate
  `lr_scale · (1 − momentum)` (PyTorch's momentum buffer sums gradients, which scales steady
  steps by 1 / (1 − momentum); this undoes it, so `lr_scale` 1 is an effective rate of 1), and
  coupled weight decay `weight_decay` (1e-3: added to the gradient, on weights and biases);
* `optimizer="adam"`: Adam with AMSGrad, betas (momentum, 0.999), learning rate
  `lr_scale · 1e-3`, the same coupled weight decay;
* the learning rate times a linear schedule: `s / warmup` for step s < warmup, then
  `max(0, (steps − warmup − s) / max(1, steps − 2·warmup))`. With no warm-up (the default) that
  decays linearly from the full rate at step 0 to zero after the last step; with a warm-up it
  reaches zero at step `steps − warmup` and stays there (tuned-lens 0.2 passes
  `steps − warmup` as the schedule's total; kept so that the same settings train the same lens).

The optimisation's defaults are tuned-lens 0.2's (`tuned_lens.scripts.ingredients.Optimizer`
and `train_loop.Train`: 250 steps of 2¹⁸ tokens, KL loss, SGD as above). Two of its choices are
options here: its loop computes each layer's lens and loss under a bfloat16 autocast
(`bf16_autocast`; off by default, float32), and it reads windows in a seeded shuffled order
(`shuffle`, from a `torch.Generator` seeded with `seed`). It reads its data once; here, when the
steps need more windows than there are, another pass begins (a new permutation). A step takes
`tokens_per_step // context` windows (at least one), run through the model
`micro_batch_tokens // context` windows at a time (at least one); the loss of a micro-batch is
weighted by its share of the step's tokens, so the gradient is that of the mean over the step
whatever the micro-batching.

**The residual frame.** The workbench's models are TransformerLens models processed with
`center_writing_weights`: a LayerNorm model's residual stream r is transformers' hidden state h
centred, r = C h with C = I − 11ᵀ/d, and the final norm's weights are folded into W_U (the
decoding is the same function: a LayerNorm decodes h and C h alike). A lens (W, b) applied here
to r is, on transformers' hidden states, the lens (W C, b): its point r + W r + b differs from
h + W C h + b by the mean of h times 1, which the final LayerNorm removes, so both decode to the
same logits. It ignores the mean of h. A lens (W', b') trained on h is not in general of that
form: W' 1 ≠ 0 reads the mean of h, which r no longer has, and that part's gradient also changes
the global clipping. So the two trainings agree step for step only where h has zero mean at every
position (then W' 1 gets no gradient and W' = W' C throughout); otherwise they part after the
first step. RMSNorm models are not centred: there r = h and the two lenses are the same.

Saved lenses are directories like SAEs': `tuned_lens.safetensors` (`weight` float32
[n_layers, d_model, d_model], `bias` float32 [n_layers, d_model]) and `config.json` (the format,
the shapes, the hooks read, and the provenance: checkpoint, corpus hash, training settings).
"""

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.batches import frozen_weights, model_device
from workbench.attribution.metrics import final_norm
from workbench.core import Hook
from workbench.errors import BadInput

logger = logging.getLogger(__name__)

FORMAT = "workbench-tuned-lens"
FORMAT_VERSION = 1
WEIGHTS_FILE = "tuned_lens.safetensors"
CONFIG_FILE = "config.json"
LENS_TOP = 5
SGD_BASE_LR, ADAM_BASE_LR = 1.0, 1e-3  # times lr_scale (SGD: then times 1 - momentum)


@dataclass(frozen=True)
class TunedLensConfig:
    """How to train a tuned lens; the defaults are tuned-lens 0.2's (see the module)."""

    steps: int = 250
    tokens_per_step: int = 2**18
    micro_batch_tokens: int = 2048  # tokens per forward pass (whole windows, at least one)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    bf16_autocast: bool = False
    shuffle: bool = True
    seed: int = 0

    def check(self) -> None:
        """BadInput naming the first setting out of range."""
        for name in ("steps", "tokens_per_step", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise BadInput(f"tuned lens {name} {getattr(self, name)}: must be at least 1")
        if self.optimizer not in ("sgd", "adam"):
            raise BadInput(f"tuned lens optimizer {self.optimizer!r}: expected 'sgd' or 'adam'")
        if not 0 <= self.warmup_steps < self.steps:
            raise BadInput(
                f"tuned lens warmup_steps {self.warmup_steps}: must be at least 0 and below "
                f"steps ({self.steps})"
            )
        if not 0 < self.momentum < 1:
            raise BadInput(f"tuned lens momentum {self.momentum}: must be in (0, 1)")
        for name in ("lr_scale", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise BadInput(f"tuned lens {name} {getattr(self, name)}: must be positive")
        if not self.weight_decay >= 0:
            raise BadInput(f"tuned lens weight_decay {self.weight_decay}: must be at least 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lr(self) -> float:
        """The optimiser's base learning rate."""
        if self.optimizer == "sgd":
            return self.lr_scale * SGD_BASE_LR * (1 - self.momentum)
        return self.lr_scale * ADAM_BASE_LR

    def schedule(self, step: int) -> float:
        """The learning rate's factor at `step` (0-based; see the module)."""
        warmup, total = self.warmup_steps, self.steps - self.warmup_steps
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))


class TunedLens(torch.nn.Module):
    """Per-layer affine translators (`weight` [n_layers, d_model, d_model] as [layer, out, in],
    `bias` [n_layers, d_model]) applied residually to `blocks.{l}.hook_resid_pre`; float32, on
    the CPU unless moved. Zero: the logit lens."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = torch.nn.Parameter(torch.zeros(n_layers, d_model))

    @classmethod
    def zeros_for(cls, model: HookedTransformer) -> "TunedLens":
        """The untrained lens (the logit lens) for `model`'s shapes."""
        return cls(int(model.cfg.n_layers), int(model.cfg.d_model))

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[-1])

    def translate(
        self, h: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_model"]:
        """h + W_l h + b_l in float32 (the translators brought to h's device)."""
        w = self.weight[layer].to(h.device)
        b = self.bias[layer].to(h.device)
        h = h.float()
        return h + F.linear(h, w, b)

    def layer_logits(
        self, model: HookedTransformer, h: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """Layer `layer`'s lens logits for its residual stream `h` (before block `layer`)."""
        return decode(model, self.translate(h, layer))

    def logits(
        self, model: HookedTransformer, resid: Float[torch.Tensor, "n_layers ... d_model"]
    ) -> Float[torch.Tensor, "n_layers ... d_vocab"]:
        """Every layer's lens logits, `resid[l]` being the stream before block l, float32."""
        if resid.shape[0] != self.n_layers or resid.shape[-1] != self.d_model:
            raise ValueError(
                f"resid {tuple(resid.shape)}: expected [{self.n_layers}, ..., {self.d_model}]"
            )
        return torch.stack(
            [self.layer_logits(model, resid[layer], layer).float() for layer in range(len(resid))]
        )

    def check_fits(self, model: HookedTransformer, where: str) -> None:
        """BadInput if the lens's shapes are not `model`'s."""
        n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            raise BadInput(
                f"{where}: a tuned lens for {self.n_layers} layers of width {self.d_model}, "
                f"but the model has {n_layers} layers of width {d_model}"
            )


def decode(
    model: HookedTransformer, x: Float[torch.Tensor, "... d_model"]
) -> Float[torch.Tensor, "... d_vocab"]:
    """The model's final normalisation and unembedding, in the model's dtype (the logit lens's
    decoding in `workbench.prompt.views`)."""
    return final_norm(model, x.to(model.W_U.dtype)) @ model.W_U + model.b_U


def resid_hooks(n_layers: int) -> list[str]:
    """The hooks a lens reads, layer by layer."""
    return [Hook.resid_pre(layer) for layer in range(n_layers)]


def _kl(log_p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits)) per position, p given by its log-probabilities (a token of
    probability 0 adds 0)."""
    p = log_p.exp()
    terms = p * (log_p - logits.log_softmax(-1))
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


@torch.no_grad()
def _run(model: HookedTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's float32 final log-probabilities and its residual stream before each block."""
    names = resid_hooks(int(model.cfg.n_layers))
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return logits.float().log_softmax(-1), [cache[name] for name in names]


@dataclass
class StepRecord:
    """One optimiser step, as `train_tuned_lens` reports it to `on_step`."""

    step: int  # 1-based: the number of steps taken
    lr: float  # the learning rate the step used
    losses: list[float]  # each layer's mean KL over the step's tokens, before the step
    lens: "TunedLens"  # the lens after the step (the live module: copy what you keep)


@dataclass
class _Windows:
    """The order in which training reads windows: passes over them, shuffled each pass."""

    n: int
    shuffle: bool
    generator: torch.Generator
    order: list[int] = field(default_factory=list)
    passes: int = 0

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                self.passes += 1
                perm = torch.randperm(self.n, generator=self.generator) if self.shuffle else None
                self.order = perm.tolist() if perm is not None else list(range(self.n))
            out.append(self.order.pop(0))
        return out


def train_tuned_lens(
    model: HookedTransformer,
    windows: Int[torch.Tensor, "n context"],
    config: TunedLensConfig | None = None,
    *,
    on_step: Callable[[StepRecord], None] | None = None,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens for `model` on token windows (e.g. a `workbench.sae.corpus.Corpus`'s
    `windows`) as the module describes; the model's weights get no gradient. Deterministic for
    a config; the lens is returned on the CPU. `on_step` is called after every step."""
    config = config or TunedLensConfig()
    config.check()
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 1:
        raise BadInput(f"tuned lens windows {tuple(windows.shape)}: expected [n, context]")
    device = model_device(model)
    n, ctx = int(windows.shape[0]), int(windows.shape[1])
    per_step = max(1, config.tokens_per_step // ctx)
    per_pass = max(1, config.micro_batch_tokens // ctx)
    lens = TunedLens.zeros_for(model).to(device)
    params = [lens.weight, lens.bias]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=config.lr(), momentum=config.momentum, nesterov=True,
            weight_decay=config.weight_decay,
        )  # fmt: skip
    else:
        optimizer = torch.optim.Adam(
            params, lr=config.lr(), betas=(config.momentum, 0.999), amsgrad=True,
            weight_decay=config.weight_decay,
        )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.schedule)
    order = _Windows(n, config.shuffle, torch.Generator().manual_seed(config.seed))
    n_layers = lens.n_layers
    if config.warmup_steps and config.steps <= 2 * config.warmup_steps:
        logger.warning(
            "tuned lens: with %d warm-up steps of %d the learning rate is 0 from the end of the "
            "warm-up on (the schedule decays over steps - warmup_steps)",
            config.warmup_steps, config.steps,
        )  # fmt: skip
    last: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with frozen_weights(model):
            bar = tqdm(range(config.steps), desc="tuned lens", leave=False, disable=not progress)
            for step in bar:
                chosen = order.take(per_step)
                optimizer.zero_grad(set_to_none=False)
                sums = [0.0] * n_layers
                for start in range(0, per_step, per_pass):
                    idx = chosen[start : start + per_pass]
                    tokens = windows[idx].to(device)
                    log_p, resid = _run(model, tokens)
                    share = len(idx) / per_step
                    for layer in range(n_layers):
                        with torch.autocast(
                            device.type, dtype=torch.bfloat16, enabled=config.bf16_autocast
                        ):
                            kl = _kl(log_p, lens.layer_logits(model, resid[layer], layer)).mean()
                        (kl * share).backward()
                        sums[layer] += float(kl.detach()) * share
                if not all(math.isfinite(v) for v in sums):
                    raise RuntimeError(
                        f"tuned lens training diverged at step {step + 1}: KL per layer {sums}"
                    )
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = float(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
                last = sums
                bar.set_postfix(kl=f"{sum(sums) / n_layers:.4f}")
                if on_step is not None:
                    on_step(StepRecord(step + 1, lr, sums, lens))
    finally:
        model.train(was_training)
    lens.zero_grad(set_to_none=True)
    lens.requires_grad_(False)
    logger.info(
        "trained a tuned lens: %d steps of %d windows of %d tokens (%d passes over %d windows); "
        "last step's KL per layer %s",
        config.steps, per_step, ctx, order.passes, n, [round(v, 4) for v in last],
    )  # fmt: skip
    return lens.cpu()


@torch.no_grad()
def lens_kl(
    model: HookedTransformer,
    lens: TunedLens | None,
    windows: Int[torch.Tensor, "n context"],
    *,
    micro_batch_tokens: int = 2048,
) -> Float[torch.Tensor, " n_layers"]:
    """Each layer's mean KL(model's final distribution ‖ lens) over every position of
    `windows` (float32, on the CPU); `lens` None: the logit lens (the zero lens)."""
    lens = lens if lens is not None else TunedLens.zeros_for(model)
    ctx = int(windows.shape[1])
    per_pass = max(1, micro_batch_tokens // ctx)
    totals = torch.zeros(lens.n_layers, dtype=torch.float64)
    device = model_device(model)
    for start in range(0, len(windows), per_pass):
        log_p, resid = _run(model, windows[start : start + per_pass].to(device))
        for layer in range(lens.n_layers):
            kl = _kl(log_p, lens.layer_logits(model, resid[layer], layer).float())
            totals[layer] += kl.sum().double().cpu()
    return (totals / windows.numel()).float()


@dataclass
class LensPredictions:
    """A tuned lens on one prompt. Row l of every table is the residual stream before block l
    (0: the embeddings) through layer l's translator, for l < n_layers; row n_layers is the
    final residual stream decoded without a translator (the model's prediction, without an
    output soft cap). The logit lens of `workbench.prompt.views`, whose layer l is the stream
    after block l, corresponds to row l + 1."""

    token_ids: list[int]
    predicted_id: int  # the model's top next token at the last position
    lens: list[tuple[int, int, int, int, float]]  # row, position, rank, token id, prob
    target: torch.Tensor  # [n_layers + 1, position]: probability of `predicted_id`
    kl: torch.Tensor  # [n_layers + 1, position]: KL(model's final distribution ‖ row's)


@torch.no_grad()
def tuned_lens_predictions(
    model: HookedTransformer, lens: TunedLens, ids: list[int], top: int = LENS_TOP
) -> LensPredictions:
    """The lens's top `top` next tokens and their probabilities at every row and position, the
    probability of the model's final prediction, and the KL from the model's distribution."""
    lens.check_fits(model, "tuned lens")
    n_layers = lens.n_layers
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=model_device(model))
    names = [*resid_hooks(n_layers), Hook.resid_post(n_layers - 1)]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    predicted = int(logits[0, -1].argmax())
    log_p = logits[0].float().log_softmax(-1)
    rows: list[tuple[int, int, int, int, float]] = []
    n = len(ids)
    target = torch.zeros(n_layers + 1, n)
    kl = torch.zeros(n_layers + 1, n)
    for row in range(n_layers + 1):
        if row < n_layers:
            row_logits = lens.layer_logits(model, cache[names[row]], row)
        else:
            row_logits = decode(model, cache[names[row]])
        probs = row_logits[0].float().softmax(-1)
        best = probs.topk(min(top, probs.shape[-1]), dim=-1)
        best_ids, best_probs = best.indices.tolist(), best.values.tolist()
        for pos in range(n):
            for rank in range(len(best_ids[pos])):
                rows.append((row, pos, rank, best_ids[pos][rank], best_probs[pos][rank]))
        target[row] = probs[:, predicted].cpu()
        kl[row] = _kl(log_p, row_logits[0].float()).cpu()
    return LensPredictions(list(ids), predicted, rows, target, kl)


def lens_provenance(
    checkpoint_id: str, corpus: Any, config: TunedLensConfig, **extra: Any
) -> dict[str, Any]:
    """The provenance `save_tuned_lens` stores: the checkpoint, the corpus (a
    `workbench.sae.corpus.Corpus`: its name, sha256 and shape) and the training settings."""
    return {
        "checkpoint_id": checkpoint_id,
        "corpus": {
            "name": corpus.name,
            "sha256": corpus.sha256,
            "n_windows": int(corpus.windows.shape[0]),
            "context_size": int(corpus.windows.shape[1]),
        },
        "training": config.to_dict(),
        **extra,
    }


def save_tuned_lens(lens: TunedLens, directory: Path | str, provenance: dict[str, Any]) -> Path:
    """Write `lens` to `directory` (created if missing): `tuned_lens.safetensors` and
    `config.json` with `provenance` (JSON-serialisable)."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        "weight": lens.weight.detach().float().cpu().contiguous(),
        "bias": lens.bias.detach().float().cpu().contiguous(),
    }
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "n_layers": lens.n_layers,
        "d_model": lens.d_model,
        "reads": Hook.resid_pre(0).replace(".0.", ".{layer}."),
        "convention": "logits_l = unembed(final_norm(h + weight[l] @ h + bias[l]))",
        "provenance": provenance,
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return path


def load_tuned_lens(directory: Path | str) -> tuple[TunedLens, dict[str, Any]]:
    """(the lens, its provenance) from a directory `save_tuned_lens` wrote; BadInput naming the
    file and the field when it is missing, malformed or inconsistent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise BadInput(f"{path}: no tuned lens directory here")
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (cfg_path, w_path):
        if not file.is_file():
            raise BadInput(f"{path}: not a tuned lens directory (no {file.name})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadInput(f"{cfg_path}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise BadInput(f"{cfg_path}: expected a JSON object")
    if config.get("format") != FORMAT:
        raise BadInput(f"{cfg_path}: field 'format' is {config.get('format')!r}, not {FORMAT!r}")
    if config.get("version") != FORMAT_VERSION:
        raise BadInput(
            f"{cfg_path}: field 'version' is {config.get('version')!r}; this workbench reads "
            f"version {FORMAT_VERSION}"
        )
    for name in ("n_layers", "d_model"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadInput(f"{cfg_path}: field '{name}' must be a positive integer, not {value!r}")
    provenance = config.get("provenance", {})
    if not isinstance(provenance, dict):
        raise BadInput(f"{cfg_path}: field 'provenance' must be a JSON object")
    n_layers, d_model = config["n_layers"], config["d_model"]
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BadInput(f"{w_path}: not a readable safetensors file ({err})") from err
    expected = {"weight": (n_layers, d_model, d_model), "bias": (n_layers, d_model)}
    for name, shape in expected.items():
        if name not in tensors:
            raise BadInput(f"{w_path}: tensor '{name}' is missing")
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise BadInput(
                f"{w_path}: tensor '{name}' has shape {list(tensor.shape)}, but config.json's "
                f"n_layers and d_model give {list(shape)}"
            )
        if not tensor.is_floating_point():
            raise BadInput(f"{w_path}: tensor '{name}' is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise BadInput(f"{w_path}: tensor '{name}' has non-finite values")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise BadInput(f"{w_path}: unexpected tensor '{extra[0]}'")
    lens = TunedLens(n_layers, d_model)
    with torch.no_grad():
        lens.weight.copy_(tensors["weight"].float())
        lens.bias.copy_(tensors["bias"].float())
    lens.requires_grad_(False)
    return lens, provenance
