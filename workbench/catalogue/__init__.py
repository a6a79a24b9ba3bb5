"""What each attention head of a checkpoint does, with no task: `workbench run catalogue`.

`scores` computes the scores (from attention patterns on repeated random tokens and from the
weights alone); `run` is the command, which computes them at each chosen checkpoint and stores
them (tables `catalogues`, `head_catalogue`, `head_composition`).

Like `workbench run prompt`, the command is not a registered pipeline (`workbench.registry`):
a catalogue needs no task and is keyed by `catalogue_id` (checkpoint, dtype and the generated
sequences' parameters), not by a run key. `workbench watch` runs it on each new checkpoint when
its config has a `[catalogue]` table.
"""

from workbench.catalogue.scores import (
    COMPOSITIONS,
    PATTERN_SCORES,
    composition_scores,
    copying_scores,
    detection_patterns,
    pattern_scores,
    repeated_tokens,
)

__all__ = [
    "COMPOSITIONS",
    "PATTERN_SCORES",
    "composition_scores",
    "copying_scores",
    "detection_patterns",
    "pattern_scores",
    "repeated_tokens",
]
