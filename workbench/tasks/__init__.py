"""Tasks: clean/corrupt prompt pairs with answer and wrong tokens, and the metric.

`load_task(name_or_path, model)` gives a `Task` (`workbench.tasks.spec`) whose prompts are
tokenized for `model`: a built-in task by name (`induction`, `ioi`: `workbench.tasks.builtin`)
or a JSONL task file by path (`workbench.tasks.jsonl`; the format is in docs/tasks.md).
Whatever is wrong with a path (not found, a name too long for the file system, unreadable) is
`BadInput` naming it.
"""

from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.core import METRICS
from workbench.errors import BadInput
from workbench.models.base import LoadedModel
from workbench.tasks.spec import PromptPair, Task


def load_task(
    name_or_path: str,
    model: LoadedModel,
    *,
    n_prompts: int | None = None,
    metric: str | None = None,
) -> Task:
    """A built-in task by name, or a JSONL task file, tokenized for `model`; `metric` replaces
    the task's own (part of the task's identity: another metric is another task_id)."""
    if metric is not None and metric not in METRICS:
        raise BadInput(f"--metric {metric}: choose from {', '.join(METRICS)}")
    task = _load(name_or_path, model, n_prompts)
    return replace(task, metric=metric) if metric and metric != task.metric else task


def _load(name_or_path: str, model: LoadedModel, n_prompts: int | None) -> Task:
    from workbench.tasks import builtin, jsonl

    if name_or_path in builtin.BUILTIN_TASKS:
        return builtin.BUILTIN_TASKS[name_or_path](model, n_prompts=n_prompts)
    path = _expand(name_or_path)
    if path.suffix in {".jsonl", ".json"} or "/" in name_or_path or _may_exist(path):
        return jsonl.read_task_file(path, model)
    known = ", ".join(sorted(builtin.BUILTIN_TASKS))
    raise BadInput(
        f"unknown task '{jsonl.shown_path(name_or_path)}': not a built-in task ({known}) or a "
        "JSONL file"
    )


def _expand(name_or_path: str) -> Path:
    from workbench.tasks.jsonl import shown_path

    try:
        return Path(name_or_path).expanduser()
    except RuntimeError as err:  # `~user/...` of a user this system does not know
        raise BadInput(f"{shown_path(name_or_path)}: cannot expand the path ({err})") from None


def _may_exist(path: Path) -> bool:
    """Whether `path` names a file; a path the system refuses to look up (a name too long)
    counts, so that reading it says why."""
    try:
        return path.exists()
    except OSError:
        return True


def known_circuit(task: Task, model: LoadedModel) -> set[tuple[str, str]] | None:
    """The (src, dst) edges of the circuit known to solve `task` in `model`, where the task
    knows one (a built-in task on the zoo model trained for it); None otherwise."""
    from workbench.tasks.builtin import KNOWN_CIRCUITS

    provider = KNOWN_CIRCUITS.get(task.source)
    return provider(model) if provider else None


def known_circuit_metrics(
    task: Task, model: LoadedModel, edges: list[tuple[str, str, float]]
) -> dict[str, float]:
    """`roc_auc_known_circuit`: the ROC AUC of |edge score| against the circuit known to solve
    `task` in `model`, where the task knows one (`known_circuit`); no metric otherwise."""
    known = known_circuit(task, model)
    if known is None:
        return {}
    from workbench.zoo.ground_truth import roc_auc

    auc = roc_auc(edges, known)
    return {} if auc is None else {"roc_auc_known_circuit": auc}


def training_corpus(task: Task, model: LoadedModel, *, n_tokens: int, seed: int) -> Any:
    """(windows, loss mask) of the sequences `model` was trained on for `task`, where the task
    knows them (a built-in task on its zoo model); None otherwise."""
    import torch

    from workbench.tasks.builtin import TRAINING_CORPORA

    provider = TRAINING_CORPORA.get(task.source)
    return provider(model, n_tokens, torch.Generator().manual_seed(seed)) if provider else None


__all__ = [
    "PromptPair",
    "Task",
    "known_circuit",
    "known_circuit_metrics",
    "load_task",
    "training_corpus",
]
