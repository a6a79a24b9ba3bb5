"""The zoo checkpoint directory format (see DESIGN.md, "Model sources").

A checkpoint directory holds `config.json` (keyword arguments of `HookedTransformerConfig`),
`model.safetensors` (the HookedTransformer `state_dict`), a Hugging Face tokenizer
(`tokenizer.json` + `tokenizer_config.json`) and `meta.json` (task, step, seed, train loss).
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import BadInput

if TYPE_CHECKING:
    import torch

ZOO_FILES = ("config.json", "model.safetensors", "meta.json")


def is_zoo_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in ZOO_FILES)


def save_zoo_checkpoint(
    out: Path,
    *,
    cfg_kwargs: dict[str, Any],
    state_dict: "dict[str, torch.Tensor]",
    tokenizer: Any,
    meta: dict[str, Any],
) -> None:
    """Write one checkpoint directory atomically (to a temp dir, then renamed)."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg_kwargs, indent=2, sort_keys=True))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise BadInput(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return data


def load_zoo_weights(path: Path) -> "dict[str, torch.Tensor]":
    from safetensors.torch import load_file

    try:
        return load_file(str(path / "model.safetensors"))
    except Exception as err:  # safetensors raises its own error types
        raise BadInput(f"{path / 'model.safetensors'}: cannot read weights ({err})") from err
