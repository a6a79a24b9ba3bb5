"""Prompt batches: every method evaluates its task's metric on them.

Prompts of one task may differ in length across lines; they are grouped into batches of one
length. Every method sums per-prompt quantities over batches and divides by the number of
prompts, so results equal those of one batch holding every prompt. Each batch carries its
task's metric (`workbench.attribution.metrics`) and what the metric compares against.
"""

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Int
from torch.utils.checkpoint import checkpoint

from workbench.attribution.metrics import (
    Target,
    TaskMetric,
    final_norm,
    logit_diff,
    repeat_rows,
    task_metric,
    with_reference,
)
from workbench.core import DEFAULT_METRIC
from workbench.tasks.spec import Task

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "PromptBatch",
    "final_norm",
    "logit_diff",
    "make_batches",
    "model_device",
    "repeat_rows",
]


@dataclass(frozen=True)
class PromptBatch:
    clean: Int[torch.Tensor, "batch pos"]
    corrupt: Int[torch.Tensor, "batch pos"]
    answer: Int[torch.Tensor, " batch"]
    wrong: Int[torch.Tensor, " batch"]
    metric: TaskMetric = field(default_factory=lambda: task_metric(DEFAULT_METRIC))
    target: Target = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", Target(self.answer, self.wrong))

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])


def make_batches(
    task: Task,
    *,
    max_batch: int = 64,
    device: torch.device | str = "cpu",
    model: "HookedTransformer | None" = None,
    max_tokens: int | None = None,
) -> list[PromptBatch]:
    """The task's prompts as token tensors on `device` (the model's), grouped by length into
    batches of at most `max_batch` prompts and `max_tokens` tokens, with the task's metric. A
    metric against the clean run (`kl`) needs `model`, to compute it."""
    metric = task_metric(task.metric)
    if metric.needs_reference and model is None:
        raise ValueError(f"the {metric.name} metric needs the model to compute its reference")
    batches = []
    for idx in task.length_groups(max_batch, max_tokens):
        pairs = [task.pairs[i] for i in idx]
        batch = PromptBatch(
            clean=torch.tensor([p.clean_tokens for p in pairs], device=device),
            corrupt=torch.tensor([p.corrupt_tokens for p in pairs], device=device),
            answer=torch.tensor([p.answer for p in pairs], device=device),
            wrong=torch.tensor([p.wrong for p in pairs], device=device),
            metric=metric,
        )
        if metric.needs_reference:
            assert model is not None
            with torch.no_grad():
                last = model(batch.clean)[:, -1, :]
            object.__setattr__(batch, "target", with_reference(batch.target, last))
        batches.append(batch)
    return batches


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: every tensor a method makes for it goes there."""
    return next(model.parameters()).device


@contextmanager
def frozen_weights(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters without gradients while inside (restored after): a backward pass
    then computes the activations' gradients only, the same values, and no weight's."""
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)


@contextmanager
def lean_activations(model: torch.nn.Module) -> Iterator[None]:
    """While inside, each MLP activation function written in Python as several tensor
    operations holds less, for the same numbers bit for bit:

    * for a backward pass, it keeps only its input, and its operations run again when the
      backward pass reaches them (`torch.utils.checkpoint`, which keeps the graph of the first
      run and remakes only what it saved: the same operations on the same input, so the same
      gradients). GPT-2's `gelu_new` is eight operations, which keep four tensors of the MLP's
      width (the input, its tanh term, half the input, one plus the tanh term): on the
      GPT-2-small shape, 180 MB less held at 416 tokens for a repeat of an elementwise function;
    * without gradients, TransformerLens's `gelu_new` and `gelu_fast` run as the same
      operations in the same order, in place on two tensors of the MLP's width where they made
      eight or more (`_gelu_new_in_place`, `_gelu_fast_in_place`): fewer fresh pages for every
      MLP of a pass.

    Functions that are one operation (`F.gelu`, `F.silu`) and activation modules are left as
    they are."""
    from transformer_lens.utilities import activation_functions as tl_act

    in_place = {tl_act.gelu_new: _gelu_new_in_place, tl_act.gelu_fast: _gelu_fast_in_place}
    swapped = []
    for block in getattr(model, "blocks", ()):
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            continue
        act_fn = vars(mlp).get("act_fn")
        if not isinstance(act_fn, types.FunctionType) or act_fn.__module__.startswith("torch"):
            continue
        mlp.act_fn = _lean(act_fn, in_place.get(act_fn))
        swapped.append((mlp, act_fn))
    try:
        yield
    finally:
        for mlp, act_fn in swapped:
            mlp.act_fn = act_fn


def _lean(
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    in_place: Callable[[torch.Tensor], torch.Tensor] | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`act_fn` as `lean_activations` runs it."""

    def lean(x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(act_fn, x, use_reentrant=False)
        return (in_place or act_fn)(x)

    return lean


def _gelu_new_in_place(x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's `gelu_new`, `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 *
    x^3)))`, its operations in its order (each product and sum rounds as its own does), in
    place on two new tensors; `x` is left as it was."""
    inner = torch.pow(x, 3.0)
    inner.mul_(0.044715).add_(x).mul_(np.sqrt(2.0 / np.pi)).tanh_().add_(1.0)
    return torch.mul(x, 0.5).mul_(inner)


def _gelu_fast_in_place(x: torch.Tensor) -> torch.Tensor:
    """TransformerLens's `gelu_fast`, `0.5 * x * (1 + tanh(x * 0.7978845608 * (1 + 0.044715 *
    x * x)))`, as `_gelu_new_in_place` takes `gelu_new`."""
    inner = torch.mul(x, 0.044715)
    inner.mul_(x).add_(1.0)
    outer = torch.mul(x, 0.7978845608)
    outer.mul_(inner).tanh_().add_(1.0)
    return torch.mul(x, 0.5, out=inner).mul_(outer)
