"""Training a transcoder for every layer of a model at once, and measuring the set.

SAELens trains SAEs only, so the workbench trains transcoders itself: each step runs the model
once on a batch of corpus windows and gives every layer's transcoder the (MLP input, MLP output)
pairs of that batch. A per-layer transcoder with ReLU features and, by default, a linear skip
connection (Paulo et al. 2025, "Transcoders beat sparse autoencoders for interpretability")
minimises

    |y - ŷ|² / |y - mean(y)|²  +  λ · Σ_f f · |W_dec[f]| / sqrt(d_model)

per token, with y the MLP output, both sides scaled by their root mean square on the first
batch (so λ does not depend on the model's scale; the scales are folded into the weights
afterwards, so the saved transcoder reads and writes the model's own activations). λ rises
linearly over the first 5 % of steps. Positions holding the BOS token and the first position of
every window are left out: the attribution graph has no features at BOS, and a window's first
token is the attention sink of a model that reads it without BOS, its MLP outputs far from the
text's (on SmolLM2-135M up to 770 times the norm of the other positions' at layer 11, and all
but 0.1 % of that layer's variance). Training is deterministic given the seed on one
machine's kernels. The corpus's last windows (`held_out`, a tenth by default) are never trained
on.

The set's quality (`measure`): per layer L0 and the explained variance of the MLP output on the
held-out windows (every window for a set that was loaded, not trained), the fraction of
features that never fire and the feature statistics and top examples of
`workbench.sae.features` over every window; for the set, the next-token cross-entropy on the
held-out windows with every MLP replaced by its transcoder at once (the replacement model; the
positions not counted keep the MLP's own output, as position 0 does in a graph), between
zero-ablating every MLP (0) and the model itself (1).
"""

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from tqdm.auto import tqdm

from workbench.attribution.batches import model_device
from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.sae.corpus import Corpus
from workbench.sae.features import FeatureStats, mean_next_token_losses
from workbench.transcoders.sets import DEFAULT_HOOK_IN, DEFAULT_HOOK_OUT, Transcoder, TranscoderSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TranscoderTraining:
    """What a trained set depends on (its part of the run key)."""

    expansion: int = 4
    d_transcoder: int | None = None
    skip: bool = True
    l1_coefficient: float = 0.2
    training_tokens: int = 400_000
    batch_size_tokens: int = 1024
    lr: float = 1e-3
    seed: int = 0
    held_out: float = 0.1

    def check(self) -> None:
        for name in ("expansion", "training_tokens", "batch_size_tokens"):
            if getattr(self, name) < 1:
                raise BadInput(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.d_transcoder is not None and self.d_transcoder < 1:
            raise BadInput(f"--d-transcoder {self.d_transcoder}: must be >= 1")
        if self.lr <= 0 or self.l1_coefficient < 0:
            raise BadInput("--lr must be > 0 and --l1-coefficient >= 0")
        if not 0 <= self.held_out < 1:
            raise BadInput(f"--held-out {self.held_out}: must be at least 0 and below 1")

    def training_windows(self, corpus: Corpus) -> int:
        """How many of the corpus's windows (its first) are trained on; the rest are held out,
        and the set's quality is measured on them."""
        n = len(corpus.windows)
        held = math.ceil(n * self.held_out)
        if n - held < 1 or (self.held_out > 0 and held < 1):
            raise BadInput(
                f"corpus {corpus.name}: {n} window(s) of {corpus.context_size} tokens, too few "
                f"to hold out {self.held_out:g} of them: give more --corpus-tokens"
            )
        return n - held


def hooks_for(model: Any) -> tuple[str, str]:
    """The MLP's input and output hooks of a block: after the MLP's normalisation, where the
    model has one, else the residual stream after attention."""
    hook_in = (
        DEFAULT_HOOK_IN if f"blocks.0.{DEFAULT_HOOK_IN}" in model.hook_dict else "hook_resid_mid"
    )
    return hook_in, DEFAULT_HOOK_OUT


def _counted(loaded: LoadedModel, windows: Int[torch.Tensor, "batch pos"]) -> torch.Tensor:
    """The positions a transcoder is trained and measured on: neither a window's first nor a
    BOS token."""
    keep = torch.ones_like(windows, dtype=torch.bool)
    if loaded.prepend_bos and loaded.bos_token_id is not None:
        keep = windows != int(loaded.bos_token_id)
    keep[:, 0] = False
    return keep


def _pairs(
    loaded: LoadedModel, tset: TranscoderSet, windows: Int[torch.Tensor, "batch pos"]
) -> tuple[list[torch.Tensor], list[torch.Tensor], Bool[torch.Tensor, "batch pos"]]:
    """Each layer's (MLP input, MLP output) on `windows`, and which positions count: neither a
    window's first nor a BOS token."""
    model = loaded.model
    n_layers = model.cfg.n_layers
    names = [tset.input_hook(i) for i in range(n_layers)] + [
        tset.output_hook(i) for i in range(n_layers)
    ]
    windows = windows.to(model_device(model))
    with torch.no_grad():
        _, cache = model.run_with_cache(windows, names_filter=names, stop_at_layer=n_layers)
    keep = _counted(loaded, windows)
    xs = [cache[tset.input_hook(i)].float() for i in range(n_layers)]
    ys = [cache[tset.output_hook(i)].float() for i in range(n_layers)]
    return xs, ys, keep


def train_transcoders(
    loaded: LoadedModel, corpus: Corpus, cfg: TranscoderTraining
) -> TranscoderSet:
    """A transcoder for every layer of `loaded`, trained on `corpus`."""
    cfg.check()
    model = loaded.model
    if model.cfg.attn_only or model.cfg.d_mlp is None:
        raise BadInput(f"model {loaded.info.model_id} is attention-only: it has no MLPs")
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    d_tc = cfg.d_transcoder or cfg.expansion * d
    device = model_device(model)
    hook_in, hook_out = hooks_for(model)
    shape = TranscoderSet([], hook_in, hook_out)
    g = torch.Generator().manual_seed(cfg.seed)
    ctx = corpus.context_size
    per_step = max(1, cfg.batch_size_tokens // ctx)
    n_steps = max(1, math.ceil(cfg.training_tokens / (per_step * ctx)))
    order = torch.randperm(cfg.training_windows(corpus), generator=g)

    def windows_for(step: int) -> torch.Tensor:
        idx = torch.arange(step * per_step, (step + 1) * per_step) % len(order)
        return corpus.windows[order[idx]]

    xs, ys, keep = _pairs(loaded, shape, windows_for(0))
    x_scale = [float(x[keep].pow(2).mean().sqrt().clamp(min=1e-8)) for x in xs]
    y_scale = [float(y[keep].pow(2).mean().sqrt().clamp(min=1e-8)) for y in ys]
    params = []
    for _ in range(n_layers):
        w_dec = torch.randn(d_tc, d, generator=g)
        w_dec = 0.1 * w_dec / w_dec.norm(dim=1, keepdim=True)
        init = {
            "W_enc": w_dec.T.clone() * math.sqrt(d),
            "b_enc": torch.zeros(d_tc),
            "W_dec": w_dec,
            "b_dec": torch.zeros(d),
            "W_skip": torch.zeros(d, d),
        }
        if not cfg.skip:
            del init["W_skip"]
        params.append({k: v.to(device).requires_grad_(True) for k, v in init.items()})
    optimiser = torch.optim.Adam([p for ps in params for p in ps.values()], lr=cfg.lr)
    warm = max(1, n_steps // 20)
    progress = tqdm(range(n_steps), desc="transcoders", unit="step")
    for step in progress:
        if step > 0:
            xs, ys, keep = _pairs(loaded, shape, windows_for(step))
        lam = cfg.l1_coefficient * min(1.0, (step + 1) / warm)
        loss = torch.zeros((), device=device)
        for layer, p in enumerate(params):
            x = xs[layer][keep] / x_scale[layer]
            y = ys[layer][keep] / y_scale[layer]
            f = torch.relu(x @ p["W_enc"] + p["b_enc"])
            y_hat = f @ p["W_dec"] + p["b_dec"]
            if "W_skip" in p:
                y_hat = y_hat + x @ p["W_skip"].T
            variance = (y - y.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-8)
            mse = (y - y_hat).pow(2).sum(-1).mean() / variance
            sparsity = (f * p["W_dec"].norm(dim=1)).sum(-1).mean() / math.sqrt(d)
            loss = loss + mse + lam * sparsity
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{float(loss.detach()) / n_layers:.4f}")
    transcoders = []
    for layer, trained in enumerate(params):
        sx, sy = x_scale[layer], y_scale[layer]
        w = {k: v.detach() for k, v in trained.items()}
        transcoders.append(
            Transcoder(
                W_enc=w["W_enc"] / sx,
                b_enc=w["b_enc"],
                W_dec=w["W_dec"] * sy,
                b_dec=w["b_dec"] * sy,
                W_skip=w["W_skip"] * (sy / sx) if "W_skip" in w else None,
            )
        )
    logger.info("trained %d transcoders (%d features each) in %d steps", n_layers, d_tc, n_steps)
    return TranscoderSet(transcoders, hook_in, hook_out, "trained")


@dataclass
class LayerQuality:
    """Totals over the tokens counted (neither BOS nor a window's first), for one layer's
    transcoder: the quality over the held-out windows (`update`), which features fire over all
    of them (`saw`)."""

    n_tokens: int = 0
    active: float = 0.0
    sq_error: float = 0.0
    sq_norm: float = 0.0
    sum_y: torch.Tensor | None = None
    fired: torch.Tensor | None = None

    def update(self, y: torch.Tensor, y_hat: torch.Tensor, f: torch.Tensor) -> None:
        y, y_hat, f = y.double().cpu(), y_hat.double().cpu(), f.cpu()
        self.n_tokens += len(y)
        self.active += float((f > 0).sum())
        self.sq_error += float((y - y_hat).pow(2).sum())
        self.sq_norm += float(y.pow(2).sum())
        total = y.sum(0)
        self.sum_y = total if self.sum_y is None else self.sum_y + total

    def saw(self, f: torch.Tensor) -> None:
        """Features' activations on tokens the dead fraction counts."""
        fired = (f > 0).any(0).cpu()
        self.fired = fired if self.fired is None else self.fired | fired

    @property
    def l0(self) -> float:
        return self.active / max(self.n_tokens, 1)

    @property
    def explained_variance(self) -> float:
        assert self.sum_y is not None
        variance = self.sq_norm - float(self.sum_y.pow(2).sum()) / max(self.n_tokens, 1)
        return 1.0 - self.sq_error / variance if variance > 0 else float("nan")

    @property
    def mse(self) -> float:
        assert self.sum_y is not None
        return self.sq_error / max(self.n_tokens * len(self.sum_y), 1)

    @property
    def dead_fraction(self) -> float:
        assert self.fired is not None
        return 1.0 - float(self.fired.float().mean())


@dataclass
class SetQuality:
    """A set measured on a corpus: per layer its feature statistics and examples (over every
    token) and its quality (over the tokens counted), and the replacement model's
    cross-entropy."""

    stats: list[FeatureStats]
    layers: list[LayerQuality]
    ce_loss_clean: float
    ce_loss_replaced: float
    ce_loss_zero: float

    @property
    def ce_loss_recovered(self) -> float | None:
        gap = self.ce_loss_zero - self.ce_loss_clean
        return (self.ce_loss_zero - self.ce_loss_replaced) / gap if gap > 1e-6 else None


def measure(
    loaded: LoadedModel,
    tset: TranscoderSet,
    corpus: Corpus,
    *,
    top_k: int = 10,
    batch_size: int = 32,
    ce_windows: int = 64,
    quality_from: int = 0,
) -> SetQuality:
    """One pass over `corpus`: the features' statistics and examples over every window, the
    per-layer quality over the windows from index `quality_from` on (the held-out ones of a
    trained set), and the cross-entropies on the first `ce_windows` of those."""
    model = loaded.model
    device = model_device(model)
    tset = tset.to(device, torch.float32)
    stats = [FeatureStats(tc.d_transcoder, top_k) for tc in tset.transcoders]
    layers = [LayerQuality() for _ in tset.transcoders]
    n_batches = -(-len(corpus.windows) // batch_size)
    for first, windows in tqdm(
        corpus.batches(batch_size), total=n_batches, desc="transcoder features", leave=False
    ):
        xs, ys, keep = _pairs(loaded, tset, windows)
        with torch.no_grad():
            for layer, tc in enumerate(tset.transcoders):
                f = tc.encode(xs[layer]) * keep[..., None]
                y_hat = tc.decode(f) + tc.skip(xs[layer])
                stats[layer].update(first, ys[layer], f, y_hat)
                layers[layer].saw(f[keep])
                part = slice(max(0, quality_from - first), None)
                counted = keep[part]
                if counted.any():
                    layers[layer].update(
                        ys[layer][part][counted], y_hat[part][counted], f[part][counted]
                    )
    held = slice(quality_from, quality_from + ce_windows)
    windows = corpus.windows[held]
    mask = None if corpus.loss_mask is None else corpus.loss_mask[held]
    counted = _counted(loaded, windows.to(device))[..., None]

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(act)

    def replaced(part: slice) -> list[tuple[str, Any]]:
        keep = counted[part]

        def spliced(layer: int, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
            # the uncounted positions keep the MLP's own output, as a graph's position 0 does
            return torch.where(keep, tset[layer](x.float()).to(act.dtype), act)

        return tset.splice_hooks(spliced)

    zeroed = [(tset.output_hook(i), zero) for i in range(model.cfg.n_layers)]
    losses = mean_next_token_losses(
        model, windows, mask, [lambda _: [], replaced, lambda _: zeroed]
    )
    return SetQuality(stats, layers, *losses)
