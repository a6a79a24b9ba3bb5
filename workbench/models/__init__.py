"""Model sources behind one interface: zoo checkpoints, Hugging Face directories, Trainer
output directories and TransformerLens model names, all loaded as `HookedTransformer`s.

Use `resolve_checkpoints` to turn a `--model` argument into checkpoint references and
`load_checkpoint` to load one; only `workbench.models.engine` touches TransformerLens loading.
"""

from workbench.models.base import CheckpointInfo, CheckpointRef, LoadedModel, ModelInfo
from workbench.models.sources import load_checkpoint, resolve_checkpoints, select_checkpoints

__all__ = [
    "CheckpointInfo",
    "CheckpointRef",
    "LoadedModel",
    "ModelInfo",
    "load_checkpoint",
    "resolve_checkpoints",
    "select_checkpoints",
]
