"""Tasks: clean/corrupt prompt pairs with answer and wrong tokens, and the metric.

`load_task(name_or_path, model)` gives a `Task` whose prompts are tokenized for `model`:
a built-in task name (`induction`) or a JSONL task file (DESIGN.md, "Task files").
"""

from typing import Any

from workbench.models.base import LoadedModel
from workbench.tasks.spec import PromptPair, Task, load_task


def known_circuit(task: Task, model: LoadedModel) -> set[tuple[str, str]] | None:
    """The (src, dst) edges of the circuit known to solve `task` in `model`, where the task
    knows one (a built-in task on the zoo model trained for it); None otherwise."""
    from workbench.tasks.builtin import KNOWN_CIRCUITS

    provider = KNOWN_CIRCUITS.get(task.source)
    return provider(model) if provider else None


def training_corpus(task: Task, model: LoadedModel, *, n_tokens: int, seed: int) -> Any:
    """(windows, loss mask) of the sequences `model` was trained on for `task`, where the task
    knows them (a built-in task on its zoo model); None otherwise."""
    import torch

    from workbench.tasks.builtin import TRAINING_CORPORA

    provider = TRAINING_CORPORA.get(task.source)
    return provider(model, n_tokens, torch.Generator().manual_seed(seed)) if provider else None


__all__ = ["PromptPair", "Task", "known_circuit", "load_task", "training_corpus"]
