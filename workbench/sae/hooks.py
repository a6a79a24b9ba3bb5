"""Where a TransformerLens hook reads, in layers along the forward pass (no torch needed: the
app lays out feature circuits with it)."""

import re

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Where, within a block, each hook reads: a fraction of the way through the layer.
_WITHIN_BLOCK = {
    "hook_resid_pre": 0.0,
    "ln1.hook_normalized": 0.05,
    "attn.hook_z": 0.3,
    "hook_attn_out": 0.35,
    "hook_resid_mid": 0.5,
    "ln2.hook_normalized": 0.55,
    "mlp.hook_pre": 0.6,
    "mlp.hook_post": 0.7,
    "hook_mlp_out": 0.8,
    "hook_resid_post": 1.0,
}


def hook_depth(hook: str, n_layers: int) -> float:
    """Position of a hook along the forward pass, in layers: `blocks.L.hook_resid_pre` is L,
    `blocks.L.hook_resid_post` is L + 1, the final residual stream is n_layers."""
    if hook in {"hook_embed", "hook_pos_embed"}:
        return 0.0
    if hook.startswith("ln_final"):
        return float(n_layers)
    match = _BLOCK_HOOK.match(hook)
    if not match:
        return 0.0
    layer, rest = int(match.group(1)), match.group(2)
    return layer + _WITHIN_BLOCK.get(rest, 0.5)


def hook_layer(hook: str) -> int | None:
    match = _BLOCK_HOOK.match(hook)
    return int(match.group(1)) if match else None


def stop_layer(hook: str) -> int | None:
    """The `stop_at_layer` that still computes `hook` (None: the whole model)."""
    layer = hook_layer(hook)
    return None if layer is None else layer + 1
