"""SAE quality metrics and feature statistics, streamed over a corpus.

One pass over the corpus, a batch of windows at a time: the model runs up to the SAE's hook
(`stop_at_layer`), the SAE encodes, and running totals are updated. Memory holds the totals
(`d_sae` counts, sums and maxima, a `d_sae x n_bins` histogram and a `k x d_sae` top-k table),
never the corpus's activations, so it does not grow with the corpus.

Per SAE (table `saes`):
* `l0` — mean number of active features per token;
* `explained_variance` — `1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2` over all corpus tokens;
* `ce_loss_recovered` — `(CE_zero - CE_sae) / (CE_zero - CE_clean)`: next-token cross-entropy
  with the SAE's reconstruction spliced in at its hook, between zero-ablating the hook (0) and
  the unmodified model (1), on the first `ce_windows` windows (at the positions of the corpus's
  loss mask: for a zoo corpus, the tokens the zoo model was trained to predict). Undefined
  (NULL) when zero-ablating does not raise the loss.

Per feature (table `features`): `density` (fraction of tokens where it fires), `max_activation`,
`mean_activation` (mean over the tokens where it fires), `dead` (never fires on the corpus),
`dense` (fires on more than `DENSE_DENSITY` of tokens), `histogram` (counts of its non-zero
activations in the bins `HISTOGRAM_EDGES`, log-spaced), and logit effects: the tokens its decoder
direction promotes and suppresses most through the unembedding (the direct path, `W_dec W_U`, with
`W_O` or `W_out` first for `hook_z` and `mlp.hook_post` SAEs, centred as the final LayerNorm
centres the residual stream; logits are centred over the vocabulary).

Per feature, its top-k windows (table `feature_examples`): the windows where its maximum
activation is largest, each with the position of that maximum.
"""

import functools
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from workbench.attribution.batches import model_device
from workbench.attribution.metrics import frozen_final_norm
from workbench.core import Hook
from workbench.memory import Scratch
from workbench.models.base import LoadedModel
from workbench.sae.corpus import Corpus
from workbench.sae.saes import LoadedSae, hook_activations

logger = logging.getLogger(__name__)

DENSE_DENSITY = 0.1
HISTOGRAM_EDGES: list[float] = torch.logspace(-4, 3, 43).tolist()  # 42 bins, 1e-4 .. 1e3
N_LOGITS = 10


@dataclass
class Quality:
    l0: float
    explained_variance: float
    mse: float
    ce_loss_recovered: float | None
    ce_loss_clean: float | None = None
    ce_loss_sae: float | None = None
    ce_loss_zero: float | None = None


@dataclass
class FeatureStats:
    """Running totals over the corpus, and the result once the pass is done."""

    d_sae: int
    top_k: int
    n_tokens: int = 0
    counts: torch.Tensor = field(init=False)
    sums: torch.Tensor = field(init=False)
    maxima: torch.Tensor = field(init=False)
    histogram: torch.Tensor = field(init=False)
    top_values: torch.Tensor = field(init=False)
    top_windows: torch.Tensor = field(init=False)
    top_positions: torch.Tensor = field(init=False)
    # for the quality metrics
    sq_error: float = 0.0
    sq_norm: float = 0.0
    l0_total: float = 0.0
    x_sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n_bins = len(HISTOGRAM_EDGES) - 1
        cpu = torch.device("cpu")  # the statistics are bookkeeping, kept on the CPU
        self.counts = torch.zeros(self.d_sae, dtype=torch.long, device=cpu)
        self.sums = torch.zeros(self.d_sae, dtype=torch.float64, device=cpu)
        self.maxima = torch.zeros(self.d_sae, device=cpu)
        self.histogram = torch.zeros(self.d_sae * n_bins, dtype=torch.long, device=cpu)
        self.top_values = torch.zeros(0, self.d_sae, device=cpu)
        self.top_windows = torch.zeros(0, self.d_sae, dtype=torch.long, device=cpu)
        self.top_positions = torch.zeros(0, self.d_sae, dtype=torch.long, device=cpu)

    def update(
        self,
        first_window: int,
        x: Float[torch.Tensor, "batch pos d_in"],
        f: Float[torch.Tensor, "batch pos d_sae"],
        x_hat: Float[torch.Tensor, "batch pos d_in"],
    ) -> None:
        """Add a batch of windows given their dense feature activations `f`."""
        flat = f.detach().reshape(-1, f.shape[-1])
        # every statistic comes from the active entries only: one dense pass finds them
        rows, cols = flat.nonzero(as_tuple=True)
        self.update_sparse(first_window, x, Active(rows, cols, flat[rows, cols]), x_hat)

    def update_sparse(
        self,
        first_window: int,
        x: Float[torch.Tensor, "batch pos d_in"],
        active: "Active",
        x_hat: Float[torch.Tensor, "batch pos d_in"],
    ) -> None:
        """Add a batch of windows given their active features only (`encode_active`)."""
        # on the CPU, like the statistics, whatever device the model runs on
        x, x_hat = (t.detach().float().cpu() for t in (x, x_hat))
        rows, cols = active.rows.cpu(), active.cols.cpu()
        values = active.values.detach().float().cpu()
        batch, pos = x.shape[0], x.shape[1]
        d_sae = self.d_sae
        self.n_tokens += batch * pos
        self.l0_total += rows.numel()
        self.counts += torch.bincount(cols, minlength=d_sae)
        self.sums.index_add_(0, cols, values.double())
        self.maxima = self.maxima.scatter_reduce(0, cols, values, reduce="amax")
        n_bins = len(HISTOGRAM_EDGES) - 1
        bins = (
            torch.bucketize(values, torch.tensor(HISTOGRAM_EDGES, device=values.device)) - 1
        ).clamp(0, n_bins - 1)
        self.histogram.index_add_(0, cols * n_bins + bins, torch.ones_like(bins))
        # each window's maximum per feature, and its first position
        key = (rows // pos) * d_sae + cols
        window_max = values.new_zeros(batch * d_sae).scatter_reduce(0, key, values, reduce="amax")
        # the first position at the maximum: other entries offer `pos`, past every position
        at_max = torch.where(values == window_max[key], rows % pos, pos)
        window_pos = rows.new_full((batch * d_sae,), pos).scatter_reduce(
            0, key, at_max, reduce="amin"
        )
        window_pos = torch.where(window_pos == pos, 0, window_pos)
        window_max, window_pos = window_max.view(batch, d_sae), window_pos.view(batch, d_sae)
        # merge into the running top-k windows
        windows = torch.arange(first_window, first_window + batch, device=values.device)
        windows = windows[:, None].expand(-1, d_sae)
        merged = torch.cat([self.top_values, window_max])
        keep = min(self.top_k, merged.shape[0])
        self.top_values, order = merged.topk(keep, dim=0)
        self.top_windows = torch.cat([self.top_windows, windows]).gather(0, order)
        self.top_positions = torch.cat([self.top_positions, window_pos]).gather(0, order)
        # reconstruction
        xf = x.reshape(-1, x.shape[-1]).double()
        error = (xf - x_hat.reshape(xf.shape).double()).view(-1)
        self.sq_error += float(torch.dot(error, error))
        self.sq_norm += float(torch.dot(xf.view(-1), xf.view(-1)))
        xs = xf.sum(0)
        self.x_sum = xs if self.x_sum is None else self.x_sum + xs

    @property
    def density(self) -> torch.Tensor:
        return self.counts.double() / max(self.n_tokens, 1)

    @property
    def mean_when_active(self) -> torch.Tensor:
        return torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), 0.0)

    def quality(self) -> Quality:
        assert self.x_sum is not None
        n = max(self.n_tokens, 1)
        total_var = self.sq_norm - float((self.x_sum**2).sum()) / n
        ev = 1.0 - self.sq_error / total_var if total_var > 0 else float("nan")
        d_in = int(self.x_sum.numel())
        return Quality(
            l0=self.l0_total / n,
            explained_variance=ev,
            mse=self.sq_error / (n * d_in),
            ce_loss_recovered=None,
        )

    def examples(self) -> list[tuple[int, int, int, int, float]]:
        """(feature, rank, window, position, activation) for every stored example that fires."""
        out = []
        for rank in range(self.top_values.shape[0]):
            for feat in (self.top_values[rank] > 0).nonzero().flatten().tolist():
                out.append(
                    (
                        feat,
                        rank,
                        int(self.top_windows[rank, feat]),
                        int(self.top_positions[rank, feat]),
                        float(self.top_values[rank, feat]),
                    )
                )
        return out


def scan(
    loaded: LoadedModel,
    sae: LoadedSae,
    corpus: Corpus,
    *,
    top_k: int = 10,
    batch_size: int = 32,
) -> FeatureStats:
    """Statistics of every feature and the reconstruction totals, in one pass over the corpus."""
    stats = FeatureStats(sae.d_sae, top_k)
    n_batches = -(-len(corpus.windows) // batch_size)
    scratch = Scratch()
    with torch.no_grad():
        for first, windows in tqdm(
            corpus.batches(batch_size), total=n_batches, desc="features", leave=False
        ):
            x = hook_activations(loaded, sae.hook, windows)
            active = encode_active(sae, x, scratch)
            x_hat = reconstruct_active(sae, active, x.shape[0] * x.shape[1]).view(x.shape)
            stats.update_sparse(first, x, active, x_hat)
    return stats


LINEAR_DECODERS = ("standard", "topk", "batchtopk", "jumprelu", "gated")


@dataclass(frozen=True)
class Active:
    """The active (non-zero) features of a batch of tokens: token row, feature, activation,
    ordered by row, then feature."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor


def encode_active(
    sae: LoadedSae, x: Float[torch.Tensor, "... d_in"], scratch: Scratch | None = None
) -> Active:
    """The SAE's active features on `x` (its tokens flattened to rows), the numbers SAELens's
    `encode` gives. For a standard (ReLU) or TopK SAE they are read straight from the
    pre-activations (the positive ones, or the top k made non-negative, as SAELens selects
    them), never building the dense `[tokens, d_sae]` result; other architectures go through
    SAELens's `encode`. The pre-activations are written into the buffers of `scratch` (new
    ones without it): the same numbers either way."""
    model_sae = sae.sae
    flat = x.reshape(-1, x.shape[-1])
    activation = type(getattr(model_sae, "activation_fn", None)).__name__
    direct = (
        sae.architecture in ("standard", "topk")
        and activation in ("ReLU", "TopK")
        and not getattr(model_sae.cfg, "rescale_acts_by_decoder_norm", False)
    )
    if not direct:
        f = sae.encode(flat)
        rows, cols = f.nonzero(as_tuple=True)
        return Active(rows, cols, f[rows, cols])
    sae_in = model_sae.process_sae_in(flat.to(sae.dtype))
    work = scratch if scratch is not None else Scratch()
    w_enc = model_sae.W_enc
    shape = (len(sae_in), w_enc.shape[1])
    pre = torch.mm(sae_in, w_enc, out=work.take("pre", shape, w_enc.dtype, w_enc.device))
    b_enc = model_sae.b_enc
    # SAELens's `relu(pre + b_enc)` fires where the rounded sum is positive, which is exactly
    # where `pre > -b_enc`: without a hook on the pre-activations to run, the bias is added to
    # the firing entries only, each the same rounded sum as SAELens's
    bias_later = activation == "ReLU" and not model_sae.hook_sae_acts_pre._forward_hooks
    if not bias_later:
        pre += b_enc  # in place: the sums SAELens's `+` makes
        pre = model_sae.hook_sae_acts_pre(pre)
    if activation == "ReLU":
        flat_index = _entries_above(pre, -b_enc if bias_later else torch.zeros_like(b_enc), work)
        rows, cols = flat_index // shape[1], flat_index % shape[1]
        values = pre.view(-1).index_select(0, flat_index)
        return Active(rows, cols, values + b_enc.index_select(0, cols) if bias_later else values)
    values, cols = torch.topk(pre, k=model_sae.activation_fn.k, dim=-1, sorted=False)
    values = values.relu()
    rows = torch.arange(len(pre), device=pre.device)[:, None].expand_as(cols)
    fires = values > 0
    rows, cols, values = rows[fires], cols[fires], values[fires]
    order = (rows * pre.shape[1] + cols).argsort()  # by row, then feature, as nonzero gives
    return Active(rows[order], cols[order], values[order])


def _entries_above(
    pre: Float[torch.Tensor, "rows d_sae"], floor: Float[torch.Tensor, " d_sae"], work: Scratch
) -> Int[torch.Tensor, " active"]:
    """The flat indices, in order, of the entries of `pre` above their column's `floor`
    (`pre > floor`, then `nonzero`). On the CPU, numpy's comparison and scan, a block of rows
    per thread, run about four times as fast as torch's on a batch of pre-activations (25
    million entries at GPT-2-small size), with the same indices."""
    fires = work.take("fires", tuple(pre.shape), torch.bool, pre.device)
    if pre.device.type != "cpu" or pre.dtype not in (torch.float32, torch.float64):
        return torch.gt(pre, floor, out=fires).view(-1).nonzero().flatten()
    values, mask, low, width = pre.numpy(), fires.numpy(), floor.numpy(), pre.shape[1]

    def scan(span: tuple[int, int]) -> np.ndarray:
        first, end = span
        np.greater(values[first:end], low, out=mask[first:end])
        return np.flatnonzero(mask[first:end]) + first * width

    pool, threads = _scan_pool()
    cuts = np.linspace(0, len(pre), threads + 1).astype(int).tolist()
    spans = list(zip(cuts[:-1], cuts[1:], strict=True))
    return torch.from_numpy(np.concatenate(list(pool.map(scan, spans))))


@functools.cache
def _scan_pool() -> tuple[ThreadPoolExecutor, int]:
    """Threads for `_entries_above` (numpy releases the GIL), one per torch thread; a forked
    child, which inherits the pool without its threads, makes its own."""
    threads = max(1, torch.get_num_threads())
    return ThreadPoolExecutor(threads, thread_name_prefix="sae-scan"), threads


os.register_at_fork(after_in_child=_scan_pool.cache_clear)


def reconstruct(sae: LoadedSae, f: Float[torch.Tensor, "... d_sae"]) -> torch.Tensor:
    """`sae.decode(f)` from the active features only (`reconstruct_active`)."""
    cfg = sae.sae.cfg
    if sae.architecture not in LINEAR_DECODERS or cfg.normalize_activations != "none":
        return sae.decode(f)
    flat = f.reshape(-1, f.shape[-1])
    rows, cols = flat.nonzero(as_tuple=True)
    out = reconstruct_active(sae, Active(rows, cols, flat[rows, cols]), len(flat))
    return out.reshape(*f.shape[:-1], out.shape[-1])


def reconstruct_active(sae: LoadedSae, active: Active, n_rows: int) -> torch.Tensor:
    """`sae.decode` of the features `active` ([n_rows, d_in]): per token the sum of its active
    features' `W_dec` rows weighted by their activations, so decoding costs L0 rows of `W_dec`
    per token rather than all `d_sae` (SAELens's dense decode is used where the decoder is not
    the plain `f @ W_dec + b_dec`)."""
    cfg = sae.sae.cfg
    w_dec = sae.sae.W_dec
    if sae.architecture not in LINEAR_DECODERS or cfg.normalize_activations != "none":
        dense = w_dec.new_zeros(n_rows, sae.d_sae)
        dense[active.rows, active.cols] = active.values
        return sae.decode(dense)
    values = active.values
    if getattr(cfg, "rescale_acts_by_decoder_norm", False):
        values = values / w_dec.norm(dim=-1)[active.cols]
    # each row's active features are consecutive (`Active` is ordered by row): a weighted sum
    # of `W_dec` rows per bag, the sum a sparse product takes, a third of its time here
    starts = torch.zeros(n_rows, dtype=torch.long, device=w_dec.device)
    starts[1:] = torch.bincount(active.rows, minlength=n_rows)[:-1].cumsum(0)
    decoded = F.embedding_bag(
        active.cols, w_dec, starts, mode="sum", per_sample_weights=values.to(w_dec.dtype)
    )
    return decoded + sae.sae.b_dec


# Next-token losses run the model this many tokens at a time: the logits ([tokens, vocabulary],
# float32) and the log-softmax cross-entropy makes of them are the largest buffers, 2 x 0.1 GB
# for a 49,152-token vocabulary.
CE_BATCH_TOKENS = 512

HookSet = Callable[[slice], list[tuple[str, Callable[..., Any]]]]


@torch.no_grad()
def mean_next_token_losses(
    model: Any,
    windows: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch prediction"] | None,
    hook_sets: Sequence[HookSet],
    *,
    batch_tokens: int = CE_BATCH_TOKENS,
) -> list[float]:
    """Per hook set, the model's mean next-token cross-entropy over `windows` at the positions in
    `mask` (all if None), with that set's forward hooks; a hook set is called with the slice of
    windows a pass runs (so hooks that depend on the windows can take their part). The windows
    run `batch_tokens` tokens at a time, so memory holds one slice's logits rather than all of
    them; the mean is over every counted position, as one pass over all windows gives."""
    device = model_device(model)
    rows = max(1, batch_tokens // windows.shape[1])
    losses: list[list[torch.Tensor]] = [[] for _ in hook_sets]
    for start in range(0, len(windows), rows):
        part = slice(start, start + rows)
        tokens = windows[part].to(device)
        counted = None if mask is None else mask[part].to(device)
        for out, hooks in zip(losses, hook_sets, strict=True):
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks(part))
            out.append(_next_token_losses(logits, tokens, counted))
            del logits
    return [float(torch.cat(out).mean()) for out in losses]


def ce_losses(
    loaded: LoadedModel,
    sae: LoadedSae,
    windows: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch prediction"] | None = None,
) -> tuple[float, float, float]:
    """Next-token cross-entropy: unmodified, with the SAE spliced in, with the hook zeroed."""

    def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = act.reshape(act.shape[0], act.shape[1], -1)
        return sae.decode(sae.encode(flat)).reshape(act.shape).to(act.dtype)

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.zeros_like(act)

    clean, spliced, zeroed = mean_next_token_losses(
        loaded.model,
        windows,
        mask,
        [lambda _: [], lambda _: [(sae.hook, splice)], lambda _: [(sae.hook, zero)]],
    )
    return clean, spliced, zeroed


def _next_token_losses(
    logits: Float[torch.Tensor, "batch pos vocab"],
    tokens: Int[torch.Tensor, "batch pos"],
    mask: Bool[torch.Tensor, "batch prediction"] | None,
) -> Float[torch.Tensor, " counted"]:
    """Next-token cross-entropy at each position in `mask` (all if None), flattened."""
    losses = F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none"
    )
    return losses.flatten() if mask is None else losses[mask]


def quality(
    loaded: LoadedModel, sae: LoadedSae, corpus: Corpus, stats: FeatureStats, ce_windows: int = 64
) -> Quality:
    result = stats.quality()
    mask = None if corpus.loss_mask is None else corpus.loss_mask[:ce_windows]
    clean, spliced, zeroed = ce_losses(loaded, sae, corpus.windows[:ce_windows], mask)
    result.ce_loss_clean, result.ce_loss_sae, result.ce_loss_zero = clean, spliced, zeroed
    if zeroed - clean > 1e-6:
        result.ce_loss_recovered = (zeroed - spliced) / (zeroed - clean)
    return result


def residual_directions(
    loaded: LoadedModel, sae: LoadedSae
) -> Float[torch.Tensor, "d_sae d_model"] | None:
    """Each feature's decoder direction as a write to the residual stream (None if the hook is
    not one whose output is a residual-stream write)."""
    model = loaded.model
    w_dec = sae.sae.W_dec.detach()
    hook = sae.hook
    layer = Hook.layer(hook)
    if hook.endswith("attn.hook_z") and layer is not None:
        w_o = model.blocks[layer].attn.W_O.detach()  # [head_index, d_head, d_model]
        return torch.einsum("fhd,hdm->fm", w_dec.reshape(len(w_dec), *w_o.shape[:2]), w_o)
    if hook.endswith("mlp.hook_post") and layer is not None:
        return w_dec @ model.blocks[layer].mlp.W_out.detach()
    residual = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out")
    if hook.endswith(residual) or hook.endswith("hook_mlp_out") or hook == "hook_embed":
        return w_dec if w_dec.shape[1] == model.cfg.d_model else None
    return None


def logit_effects(
    loaded: LoadedModel, sae: LoadedSae, n: int = N_LOGITS, chunk: int = 1024
) -> list[tuple[list[tuple[int, float]], list[tuple[int, float]]]] | None:
    """Per feature, the `n` tokens most promoted and most suppressed (token id, logit per unit
    of activation) through `W_dec W_U`."""
    directions = residual_directions(loaded, sae)
    if directions is None:
        return None
    return direction_logit_effects(loaded, directions, n, chunk)


def direction_logit_effects(
    loaded: LoadedModel,
    directions: Float[torch.Tensor, "n d_model"],
    n: int = N_LOGITS,
    chunk: int = 1024,
) -> list[tuple[list[tuple[int, float]], list[tuple[int, float]]]]:
    """`logit_effects` of residual-stream write directions (one per feature)."""
    directions = frozen_final_norm(loaded.model, directions)  # per unit: no run's scale
    w_u = loaded.model.W_U.detach()
    out = []
    for start in range(0, len(directions), chunk):
        logits = directions[start : start + chunk] @ w_u
        logits = logits - logits.mean(-1, keepdim=True)
        k = min(n, logits.shape[-1])
        top, top_ids = logits.topk(k, dim=-1)
        bottom, bottom_ids = (-logits).topk(k, dim=-1)
        for i in range(len(logits)):
            out.append(
                (
                    list(zip(top_ids[i].tolist(), top[i].tolist(), strict=True)),
                    list(zip(bottom_ids[i].tolist(), (-bottom[i]).tolist(), strict=True)),
                )
            )
    return out
