"""Patchscope (Ghandeharioun et al. 2024, "Patchscopes: A Unifying Framework for Inspecting
Hidden Representations of Language Models") with the same model: decode what a hidden state
holds by patching it into an inspection prompt and letting the model continue.

For the source prompt's position `source_position` (the last by default) and each residual
stream s = 0 … n_layers (the stream before block s: 0 is the embeddings, n_layers the final
residual, the convention of the prompt tables), the hidden state h_s is copied into the inspection
prompt's last token (the placeholder) at stream `target_layer` (the same s by default), replacing
what the inspection prompt computed there; the model then runs on from that stream and decodes
`new_tokens` tokens greedily, the patch kept in place at every step (the placeholder's later
streams are recomputed from it, as the paper's patched forward pass does).

The inspection prompt is the paper's identity prompt by default,
"cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?", whose few-shot pattern asks the model to repeat
the token at the placeholder, so the continuation reads out what h_s encodes. A model without a
tokenizer takes the template as token ids (`ids:1 1 2 2 3 3 0`, the same repeat pattern by
default). Every source stream is one row of one batch: `new_tokens` forward passes in all.

Across two models (`--patchscope-model`, the paper's cross-model patching with the identity map):
the hidden states of the source model are patched into another model of the same width, such as
another checkpoint of the same training run, which then decodes them; the inspection prompt is
that model's tokens, and with a different number of layers the target stream must be given.
"""

import logging
from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from workbench.core import Hook
from workbench.errors import BadInput
from workbench.hashing import sha256_json

logger = logging.getLogger(__name__)

IDENTITY_TEMPLATE = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
IDENTITY_IDS = "ids:1 1 2 2 3 3 0"
DEFAULT_NEW_TOKENS = 6


@dataclass(frozen=True)
class PatchscopeParams:
    template: str | None = None  # None: the identity prompt (text, or ids without a tokenizer)
    source_position: int = -1
    target_layer: int | None = None  # None: the source's own stream
    new_tokens: int = DEFAULT_NEW_TOKENS
    model: str | None = None  # the inspection model (a path or name); None: the same model
    checkpoint: str = "latest"  # the inspection model's checkpoint


def stream_hook(stream: int, n_layers: int) -> str:
    """The hook of residual stream `stream` (the stream before block `stream`)."""
    return Hook.resid_pre(stream) if stream < n_layers else Hook.resid_post(n_layers - 1)


def template_ids(template: str, encode, d_vocab: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The inspection prompt's token ids: `ids:…` as given, or the text through `encode` (None
    when the model has no tokenizer); BadInput naming what is wrong."""
    if template.startswith("ids:"):
        try:
            ids = [int(part) for part in template[4:].split()]
        except ValueError:
            raise BadInput(
                f"--patchscope-template {template!r}: after 'ids:' give token ids separated by "
                "spaces"
            ) from None
        bad = [i for i in ids if not 0 <= i < d_vocab]
        if bad:
            raise BadInput(
                f"--patchscope-template: token id {bad[0]} is outside the vocabulary of "
                f"{d_vocab} tokens"
            )
    else:
        if encode is None:
            raise BadInput(
                "--patchscope-template: the model has no tokenizer; give the template as "
                "token ids ('ids:1 1 2 2 3 3 0')"
            )
        ids = encode(template)
    if len(ids) < 2:
        raise BadInput(f"--patchscope-template {template!r}: needs at least 2 tokens")
    return ids


def patchscope_id(checkpoint_id: str, ids: list[int], inspect: list[int], params: dict) -> str:
    found = sha256_json(
        {"checkpoint": checkpoint_id, "tokens": ids, "template": inspect, "params": params}
    )
    return "ps-" + found[:16]


def check_inspector(
    model: HookedTransformer, reader: HookedTransformer, target_layer: int | None
) -> None:
    """BadInput when `reader` cannot decode `model`'s hidden states: another width, or another
    depth with no target stream given."""
    if reader.cfg.d_model != model.cfg.d_model:
        raise BadInput(
            f"--patchscope-model: its d_model is {reader.cfg.d_model}, the source model's "
            f"{model.cfg.d_model}; Patchscope across models needs the same width"
        )
    if target_layer is None and reader.cfg.n_layers != model.cfg.n_layers:
        raise BadInput(
            f"--patchscope-model has {reader.cfg.n_layers} layers and the source model "
            f"{model.cfg.n_layers}: choose the stream to patch into with --patchscope-layer"
        )


def patchscope(
    model: HookedTransformer,
    ids: list[int],
    inspect: list[int],
    *,
    source_position: int = -1,
    target_layer: int | None = None,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    inspector: HookedTransformer | None = None,
) -> list[tuple[int, int, list[int]]]:
    """[(source stream, target stream, decoded token ids)] for every stream 0 … n_layers of
    `model`, decoded by `inspector` (another model with the same d_model; `model` itself by
    default), whose token ids `inspect` and the decoded ids are."""
    reader = inspector if inspector is not None else model
    check_inspector(model, reader, target_layer)
    n_layers, n_read = model.cfg.n_layers, reader.cfg.n_layers
    n_ctx = reader.cfg.n_ctx
    if not -len(ids) <= source_position < len(ids):
        raise BadInput(f"--patchscope-position {source_position}: the prompt has {len(ids)} tokens")
    if target_layer is not None and not 0 <= target_layer <= n_read:
        raise BadInput(
            f"--patchscope-layer {target_layer}: choose a stream from 0 to {n_read} "
            "(the stream before that block; the last is the final residual)"
        )
    if new_tokens < 1:
        raise BadInput(f"--patchscope-tokens {new_tokens}: must be 1 or more")
    if len(inspect) + new_tokens > n_ctx:
        raise BadInput(
            f"the Patchscope template ({len(inspect)} tokens) and {new_tokens} new tokens do "
            f"not fit the model's context of {n_ctx} tokens"
        )
    sources = list(range(n_layers + 1))
    targets = [s if target_layer is None else target_layer for s in sources]
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.tensor([ids], device=model.W_U.device),
            names_filter=lambda name: name in {stream_hook(s, n_layers) for s in sources},
        )
        device = reader.W_U.device
        states = torch.stack(
            [cache[stream_hook(s, n_layers)][0, source_position] for s in sources]
        ).to(device)  # [rows, d_model]
        placeholder = len(inspect) - 1
        rows_at: dict[int, list[int]] = {}
        for row, target in enumerate(targets):
            rows_at.setdefault(target, []).append(row)

        def patcher(rows: list[int]):  # type: ignore[no-untyped-def]
            index = torch.tensor(rows, device=device)

            def patch(value: torch.Tensor, hook: object) -> torch.Tensor:
                value = value.clone()
                value[index, placeholder] = states[index].to(value.dtype)
                return value

            return patch

        hooks = [(stream_hook(t, n_read), patcher(rows)) for t, rows in rows_at.items()]
        tokens = torch.tensor([inspect], device=device).expand(len(sources), -1)
        for _ in range(new_tokens):
            logits = reader.run_with_hooks(tokens, fwd_hooks=hooks)
            step = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], dim=1)
    decoded = tokens[:, len(inspect) :].tolist()
    return [(s, t, [int(i) for i in d]) for s, t, d in zip(sources, targets, decoded, strict=True)]
