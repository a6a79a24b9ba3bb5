"""The one module that builds TransformerLens `HookedTransformer`s.

Everything that constructs or converts a model lives here, so that a later move from
`HookedTransformer` to TransformerLens's `TransformerBridge` touches this module only.
All models are loaded the same way: layer norms folded into the following weights and writing
weights centred (both leave the logits unchanged), the unembedding left uncentred so that logits
equal the source model's, and value biases left in place so that `hook_z` is the head's own value.
"""

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.errors import BadInput

logger = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=r".*HookedTransformer is deprecated.*")
warnings.filterwarnings("ignore", message=r".*TransformerBridge.*", category=DeprecationWarning)

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens import loading_from_pretrained as tl_loading  # noqa: E402

# Hugging Face architectures whose TransformerLens weight converters we support offline.
HF_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
}
MODEL_TYPE_TO_ARCHITECTURE = {v: k for k, v in HF_ARCHITECTURES.items()}

PROCESSING = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": False,
    "fold_value_biases": False,
    "refactor_factored_attn_matrices": False,
}


def build_from_state_dict(
    cfg_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> HookedTransformer:
    """A HookedTransformer from `HookedTransformerConfig` kwargs and its raw `state_dict`."""
    cfg = HookedTransformerConfig(**{**cfg_kwargs, "device": "cpu"})
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    model.eval()
    return model


def new_untrained(cfg_kwargs: dict[str, Any]) -> HookedTransformer:
    """A randomly initialised HookedTransformer, for training (no weight processing)."""
    cfg = HookedTransformerConfig(**{**cfg_kwargs, "device": "cpu"})
    return HookedTransformer(cfg, tokenizer=None, move_to_device=False)


def hf_architecture(config: dict[str, Any], path: Path) -> str:
    """The supported Hugging Face architecture named by a `config.json`, or a BadInput."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPE_TO_ARCHITECTURE.get(config.get("model_type", ""), "")
    if arch not in HF_ARCHITECTURES:
        supported = ", ".join(sorted(HF_ARCHITECTURES))
        raise BadInput(
            f"{path / 'config.json'}: architecture {arch or config.get('model_type')!r} is not "
            f"supported (supported: {supported})"
        )
    return arch


def from_hf_directory(path: Path) -> HookedTransformer:
    """Convert a local Hugging Face causal LM directory with TransformerLens's converters."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf_model.eval()
    try:
        cfg = tl_loading.get_pretrained_model_config(str(path), fold_ln=True, device="cpu")
        state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf_model)
    except (AttributeError, KeyError) as err:
        raise BadInput(
            f"{path / 'config.json'}: TransformerLens cannot convert it ({err})"
        ) from err
    del hf_model
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **PROCESSING)
    model.eval()
    return model


def known_tl_name(name: str) -> str | None:
    """The official Hugging Face name of a TransformerLens model name or alias, else None."""
    try:
        return str(tl_loading.get_official_model_name(name))
    except (ValueError, KeyError):
        return None


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def from_tl_name(name: str, checkpoint_index: int | None) -> tuple[HookedTransformer, Any]:
    """Load a TransformerLens named model (from the hub or the local Hugging Face cache)."""
    official = known_tl_name(name)
    if official is None:
        raise BadInput(f"unknown model {name!r}: not a directory and not a TransformerLens name")
    try:
        model = HookedTransformer.from_pretrained(
            official,
            checkpoint_index=checkpoint_index,
            device="cpu",
            **PROCESSING,
        )
    except (OSError, ValueError, ConnectionError) as err:
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else str(err)
        raise BadInput(
            f"model {name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded: {reason.splitlines()[0] if reason else 'no network'}"
        ) from err
    model.eval()
    return model, model.tokenizer


def checkpoint_labels(name: str) -> list[int]:
    """Training steps of a TransformerLens checkpointed model (e.g. Pythia), hub needed."""
    labels, _kind = tl_loading.get_checkpoint_labels(name)
    return [int(x) for x in labels]
