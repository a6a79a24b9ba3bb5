"""Node-level activation patching, the least work the mathematics allows.

Activation patching (Meng et al. 2022; Wang et al. 2022; Heimersheim & Nanda 2024) replaces one
activation in one run by its value in another run and measures the metric. *Denoising* runs the
corrupt prompts with a clean activation patched in; *noising* runs the clean prompts with the
activation ablated: replaced by its value on the corrupt prompts (`resample`), by zero (`zero`),
or by its mean over the task's clean prompts of the same length (`mean`). Scores are normalised
so that 1 is the whole clean-vs-corrupt gap (docs/methods.md): denoising
`(m_patched - m_corrupt) / (m_clean - m_corrupt)`, noising `(m_clean - m_patched) / (m_clean -
m_corrupt)`.

Components (`--component`), each per layer, and per head where the activation has heads:

| component      | hook                          | node id            | by position |
|----------------|-------------------------------|--------------------|-------------|
| `resid`        | `blocks.L.hook_resid_pre`     | `r{L}`             | always      |
| `attn_out`     | `blocks.L.hook_attn_out`      | `a{L}`             | optional    |
| `mlp_out`      | `blocks.L.hook_mlp_out`       | `m{L}`             | optional    |
| `head_out`     | `blocks.L.attn.hook_z`        | `a{L}.h{H}`        | optional    |
| `head_q/k/v`   | `blocks.L.attn.hook_q/k/v`    | `a{L}.h{H}<q/k/v>` | no          |
| `head_pattern` | `blocks.L.attn.hook_pattern`  | `a{L}.h{H}<pattern>` | no        |

The numbers equal those of the matching `transformer_lens.patching` functions; the work is less:
both runs are cached once; a patch at layer L cannot change earlier layers, so each patched run
starts from the cached residual stream at layer L (`start_at_layer`); all patches of a layer run
together as one batch (chunked to `max_rows` rows); and only the last position's logits of the
answer and wrong tokens are computed.
"""

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from workbench.attribution.batches import PromptBatch, repeat_rows
from workbench.attribution.moments import PromptMoments
from workbench.core import Hook, Node

Direction = Literal["denoise", "noise"]
Ablation = Literal["resample", "zero", "mean"]


@dataclass(frozen=True)
class Component:
    name: str
    hook: Callable[[int], str]  # the hook of a layer
    unit_axis: int | None  # axis of heads in the activation without its batch axis
    pos_axis: int | None  # axis of positions (None: cannot patch by position)
    node: Callable[[int, int | None], Node]
    by_position: Literal["always", "optional", "never"]
    needs_mlp: bool = False


def _head(port: str | None = None) -> Callable[[int, int | None], Node]:
    return lambda layer, head: Node.head_of(layer, head or 0, port)


def _qkv(port: str) -> Callable[[int], str]:
    return lambda layer: Hook.qkv(layer, port)


COMPONENTS: dict[str, Component] = {
    "resid": Component(
        "resid", Hook.resid_pre, None, 0, lambda layer, _: Node.resid(layer), "always"
    ),
    "attn_out": Component(
        "attn_out", Hook.attn_out, None, 0, lambda layer, _: Node.attn(layer), "optional"
    ),
    "mlp_out": Component(
        "mlp_out",
        Hook.mlp_out,
        None,
        0,
        lambda layer, _: Node.mlp(layer),
        "optional",
        needs_mlp=True,
    ),
    "head_out": Component("head_out", Hook.z, 1, 0, _head(), "optional"),
    "head_q": Component("head_q", _qkv("q"), 1, 0, _head("q"), "never"),
    "head_k": Component("head_k", _qkv("k"), 1, 0, _head("k"), "never"),
    "head_v": Component("head_v", _qkv("v"), 1, 0, _head("v"), "never"),
    "head_pattern": Component("head_pattern", Hook.pattern, 0, None, _head("pattern"), "never"),
}


@dataclass
class PatchScores:
    """`scores[layer, unit, position]` (unit = head, or 0 for layer-level components; position
    = 0 when patching all positions at once) and the raw metrics."""

    component: str
    by_position: bool
    scores: Float[torch.Tensor, "n_layers n_units n_pos"]
    metric_clean: float
    metric_corrupt: float
    stderr: Float[torch.Tensor, "n_layers n_units n_pos"] | None = None  # over prompts

    def stderr_rows(self) -> list[float] | None:
        """Each score's standard error, in `rows()` order (None: not computed)."""
        return None if self.stderr is None else self.stderr.flatten().tolist()

    def rows(self) -> tuple[list[str], list[int | None], list[float]]:
        """(node ids, positions, scores) for the store; position None = all positions."""
        comp = COMPONENTS[self.component]
        nodes, positions, values = [], [], []
        n_layers, n_units, n_pos = self.scores.shape
        for layer in range(n_layers):
            for unit in range(n_units):
                node = comp.node(layer, unit if comp.unit_axis is not None else None).id
                for pos in range(n_pos):
                    nodes.append(node)
                    positions.append(pos if self.by_position else None)
                    values.append(float(self.scores[layer, unit, pos]))
        return nodes, positions, values


def check_component(model: HookedTransformer, component: str, by_position: bool) -> Component:
    """The component, or a ValueError naming why it does not apply to this model."""
    if component not in COMPONENTS:
        raise ValueError(f"{component}: unknown component (choose from {', '.join(COMPONENTS)})")
    comp = COMPONENTS[component]
    if comp.needs_mlp and model.cfg.attn_only:
        raise ValueError(f"{component}: the model is attention-only and has no MLPs")
    if by_position and comp.by_position == "never":
        raise ValueError(f"{component}: cannot be patched by position")
    return comp


@torch.no_grad()
def patch_sweep(
    model: HookedTransformer,
    batches: list[PromptBatch],
    *,
    component: str,
    direction: Direction,
    ablation: Ablation = "resample",
    by_position: bool = False,
    max_rows: int = 512,
) -> PatchScores:
    """Patch every unit (layer, head, position) of one component; see the module docstring."""
    comp = check_component(model, component, by_position)
    by_position = by_position or comp.by_position == "always"
    if direction == "denoise" and ablation != "resample":
        raise ValueError("zero and mean ablation apply to noising only")
    lengths = {int(b.clean.shape[1]) for b in batches}
    if by_position and len(lengths) > 1:
        raise ValueError(
            f"patching by position needs prompts of one length (lengths {sorted(lengths)})"
        )
    cfg = model.cfg
    hooks = [comp.hook(layer) for layer in range(cfg.n_layers)]
    means = _mean_activations(model, batches, hooks) if ablation == "mean" else {}
    n = sum(b.size for b in batches)
    sums: torch.Tensor | None = None
    moments: PromptMoments | None = None
    m_clean = m_corrupt = 0.0
    reuse_prefix = by_position and comp.pos_axis == 0
    kv_hooks = [Hook.qkv(layer, kv) for layer in range(cfg.n_layers) for kv in "kv"]
    cached = hooks + kv_hooks if reuse_prefix else hooks
    for batch in tqdm(batches, desc=f"patch {component}", leave=False):
        clean_resid, clean_cache = _cache(model, batch.clean, cached)
        corr_resid, corr_cache = _cache(model, batch.corrupt, cached)
        clean_each = batch.metric.final(model, clean_resid, batch.target)
        corrupt_each = batch.metric.final(model, corr_resid, batch.target)
        m_clean += float(clean_each.sum())
        m_corrupt += float(corrupt_each.sum())
        # a prompt's own effect is its patched metric less its own corrupt (denoising) or from
        # its own clean metric (noising): the standard errors are of those
        reference = corrupt_each if direction == "denoise" else clean_each
        base = corr_cache if direction == "denoise" else clean_cache
        for layer, hook in enumerate(hooks):
            if direction == "denoise" or ablation == "resample":
                source = (clean_cache if direction == "denoise" else corr_cache)[hook]
            elif ablation == "zero":
                source = torch.zeros_like(clean_cache[hook])
            else:
                source = means[(int(batch.clean.shape[1]), hook)].expand_as(clean_cache[hook])
            if reuse_prefix:
                layer_sums, each = _patch_layer_each_position(
                    model, batch, layer, base, hook, source, comp, max_rows
                )
            else:
                layer_sums, each = _patch_layer(
                    model, batch, layer, base[Hook.resid_pre(layer)], hook, source,
                    comp, by_position, max_rows,
                )  # fmt: skip
            if sums is None or moments is None:
                sums = torch.zeros(cfg.n_layers, *layer_sums.shape, device=layer_sums.device)
                moments = PromptMoments(tuple(sums.shape), layer_sums.device)
            sums[layer] += layer_sums
            moments.add(each.movedim(-1, 0) - reference.view(-1, 1, 1), layer)
    assert sums is not None and moments is not None
    m_clean, m_corrupt = m_clean / n, m_corrupt / n
    gap = metric_gap(m_clean, m_corrupt)
    patched = sums / n
    scores = (patched - m_corrupt) / gap if direction == "denoise" else (m_clean - patched) / gap
    return PatchScores(
        component, by_position, scores.float().cpu(), m_clean, m_corrupt,
        moments.stderr(n, 1 / gap),
    )  # fmt: skip


def metric_gap(m_clean: float, m_corrupt: float) -> float:
    gap = m_clean - m_corrupt
    if abs(gap) < 1e-8:
        raise ValueError(
            f"the clean and corrupt metrics are equal ({m_clean:.6g}): normalised scores are "
            "undefined for this model and task"
        )
    return gap


def _cache(
    model: HookedTransformer, tokens: torch.Tensor, hooks: list[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final residual stream and the activations patching needs, from one forward pass."""
    wanted = set(hooks) | {Hook.resid_pre(layer) for layer in range(model.cfg.n_layers)}
    resid, cache = model.run_with_cache(
        tokens, names_filter=lambda name: name in wanted, stop_at_layer=model.cfg.n_layers
    )
    return resid, {name: cache[name] for name in wanted}


@torch.no_grad()
def _mean_activations(
    model: HookedTransformer, batches: list[PromptBatch], hooks: list[str]
) -> dict[tuple[int, str], torch.Tensor]:
    """Mean over the clean prompts of each length, per hook: `[1, ...]` tensors."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[int, int] = defaultdict(int)
    for batch in batches:
        length = int(batch.clean.shape[1])
        _, cache = _cache(model, batch.clean, hooks)
        counts[length] += batch.size
        for hook in hooks:
            total = cache[hook].sum(0, keepdim=True)
            sums[(length, hook)] = sums[(length, hook)] + total if (length, hook) in sums else total
    return {key: value / counts[key[0]] for key, value in sums.items()}


def _unit_masks(
    shape: tuple[int, ...], comp: Component, by_position: bool, n_units: int, like: torch.Tensor
) -> list[torch.Tensor]:
    """One mask per patch (unit, and position if `by_position`), on `like`'s device and dtype."""
    masks = []
    units = range(n_units) if comp.unit_axis is not None else [None]
    n_pos = shape[comp.pos_axis] if by_position and comp.pos_axis is not None else 0
    for unit in units:
        for pos in range(n_pos) if by_position else [None]:
            index: list[slice | int] = [slice(None)] * len(shape)
            if unit is not None and comp.unit_axis is not None:
                index[comp.unit_axis] = unit
            if pos is not None and comp.pos_axis is not None:
                index[comp.pos_axis] = pos
            mask = torch.zeros(shape, dtype=like.dtype, device=like.device)
            mask[tuple(index)] = 1.0
            masks.append(mask)
    return masks


@torch.no_grad()
def _patch_layer(
    model: HookedTransformer,
    batch: PromptBatch,
    layer: int,
    resid_pre: torch.Tensor,
    hook: str,
    source: torch.Tensor,
    comp: Component,
    by_position: bool,
    max_rows: int,
) -> torch.Tensor:
    """Sum over prompts of the metric for every patch of `hook`: shape [n_units, n_pos]; and
    each prompt's metric, [n_units, n_pos, batch]."""
    shape = tuple(source.shape[1:])
    n_units = model.cfg.n_heads if comp.unit_axis is not None else 1
    masks = _unit_masks(shape, comp, by_position, n_units, source)
    per_chunk = max(1, max_rows // batch.size)
    sums = torch.zeros(len(masks), device=source.device)
    each = torch.zeros(len(masks), batch.size, device=source.device)
    for first in range(0, len(masks), per_chunk):
        chunk = torch.stack(masks[first : first + per_chunk]).unsqueeze(1)
        k = chunk.shape[0]

        def patch(act: torch.Tensor, hook: object, chunk: torch.Tensor = chunk, k: int = k):
            act = act.view(k, batch.size, *act.shape[1:])
            act = act * (1 - chunk) + source.unsqueeze(0) * chunk
            return act.view(k * batch.size, *act.shape[2:])

        resid_final = model.run_with_hooks(
            repeat_rows(resid_pre, k),
            start_at_layer=layer,
            stop_at_layer=model.cfg.n_layers,
            fwd_hooks=[(hook, patch)],
        )
        diffs = batch.metric.final(model, resid_final, batch.target.repeat(k))
        sums[first : first + k] = diffs.view(k, batch.size).sum(1).float()
        each[first : first + k] = diffs.view(k, batch.size)
    n_pos = len(masks) // n_units
    return sums.view(n_units, n_pos), each.view(n_units, n_pos, batch.size)


@torch.no_grad()
def _patch_layer_each_position(
    model: HookedTransformer,
    batch: PromptBatch,
    layer: int,
    base: dict[str, torch.Tensor],
    hook: str,
    source: torch.Tensor,
    comp: Component,
    max_rows: int,
) -> torch.Tensor:
    """Patching position by position, reusing the base run for earlier positions: a patch at
    position p changes nothing before p (attention is causal), so the patched run computes
    positions p.. only, from layer `layer` on, with the keys and values of positions < p taken
    from the base run (TransformerLens's key-value cache, frozen). Shapes [n_units, n_pos] (the
    sums over the batch) and [n_units, n_pos, batch] (each prompt's metric)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    cfg = model.cfg
    n_units = cfg.n_heads if comp.unit_axis is not None else 1
    n_pos = int(source.shape[1])
    resid = base[Hook.resid_pre(layer)]
    sums = torch.zeros(n_units, n_pos, device=source.device)
    each = torch.zeros(n_units, n_pos, batch.size, device=source.device)
    per_chunk = max(1, max_rows // batch.size)
    for pos in range(n_pos):
        for first in range(0, n_units, per_chunk):
            units = list(range(first, min(n_units, first + per_chunk)))
            k = len(units)
            kv_cache = TransformerLensKeyValueCache.init_cache(cfg, source.device, k * batch.size)
            for block in range(layer, cfg.n_layers):
                entry = kv_cache[block]
                entry.past_keys = repeat_rows(base[Hook.qkv(block, "k")][:, :pos], k)
                entry.past_values = repeat_rows(base[Hook.qkv(block, "v")][:, :pos], k)
            kv_cache.freeze()
            mask = torch.zeros(k, 1, *source.shape[2:], dtype=source.dtype, device=source.device)
            for row, unit in enumerate(units):
                if comp.unit_axis is not None:
                    mask[row, :, unit] = 1.0  # the head axis follows the position axis
                else:
                    mask[row] = 1.0

            def patch(act: torch.Tensor, hook: object, mask=mask, k=k, pos=pos) -> torch.Tensor:
                act = act.clone()
                first_pos = act[:, 0].view(k, batch.size, *act.shape[2:])
                src = source[:, pos].unsqueeze(0)
                act[:, 0] = (first_pos * (1 - mask) + src * mask).view(
                    k * batch.size, *act.shape[2:]
                )
                return act

            final = model.run_with_hooks(
                repeat_rows(resid[:, pos:], k),
                start_at_layer=layer,
                stop_at_layer=cfg.n_layers,
                past_kv_cache=kv_cache,
                fwd_hooks=[(hook, patch)],
            )
            diffs = batch.metric.final(model, final, batch.target.repeat(k))
            sums[units, pos] = diffs.view(k, batch.size).sum(1).float()
            each[units, pos] = diffs.view(k, batch.size).float()
    return sums, each
