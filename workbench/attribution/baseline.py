"""The baseline of a checkpoint x task: the task's metric on the clean and on the corrupt prompts.

Computed once (`RunInputs.baseline`) and handed to every method; those that need the metric
only as a reference (`dla`'s and `head_importance`'s corrupt run) take it from here instead of
running the prompts again. It sums per-batch values in the same order as the methods do, so the
numbers are the same to the last bit.
"""

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from workbench.attribution.batches import PromptBatch


@dataclass(frozen=True)
class Baseline:
    metric_clean: float
    metric_corrupt: float

    @property
    def gap(self) -> float:
        return self.metric_clean - self.metric_corrupt


@torch.no_grad()
def compute_baseline(model: HookedTransformer, batches: list[PromptBatch]) -> Baseline:
    n = sum(b.size for b in batches)
    clean = corrupt = 0.0
    for batch in batches:
        clean += float(batch.metric(model(batch.clean), batch.target).sum())
        corrupt += float(batch.metric(model(batch.corrupt), batch.target).sum())
    return Baseline(clean / n, corrupt / n)
