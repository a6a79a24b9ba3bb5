"""The task data model and `load_task`.

`load_task` takes a built-in task's name or a JSONL task file's path. Whatever is wrong with a
path (not found, a name too long for the file system, unreadable) is `BadInput` naming it, with
an absurdly long path shortened in the sentence (`shown_path`).
"""

from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from workbench.core import DEFAULT_METRIC, METRICS
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models.base import LoadedModel

SHOWN_PATH_CHARS = 120  # a longer path is shown by its start and end in error sentences

METRIC = DEFAULT_METRIC  # mean over prompts of logit(answer) - logit(wrong) at the last position


@dataclass(frozen=True)
class PromptPair:
    clean_tokens: list[int]
    corrupt_tokens: list[int]
    answer: int
    wrong: int
    clean_text: str | None = None
    corrupt_text: str | None = None


@dataclass(frozen=True)
class Task:
    name: str
    source: str
    pairs: list[PromptPair]
    metric: str = METRIC
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        tokens = [(p.clean_tokens, p.corrupt_tokens, p.answer, p.wrong) for p in self.pairs]
        return sha256_json({"metric": self.metric, "pairs": tokens})

    @property
    def task_id(self) -> str:
        return f"{self.name}-{self.sha256[:8]}"

    def length_groups(self, max_batch: int, max_tokens: int | None = None) -> list[list[int]]:
        """Prompt indices grouped by token length, in batches of at most `max_batch` prompts
        and, with `max_tokens`, at most that many tokens (but at least one prompt)."""
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, pair in enumerate(self.pairs):
            by_len[len(pair.clean_tokens)].append(i)
        groups = []
        for length in sorted(by_len):
            idx = by_len[length]
            size = max_batch if max_tokens is None else min(max_batch, max(1, max_tokens // length))
            groups += [idx[i : i + size] for i in range(0, len(idx), size)]
        return groups


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
        f"unknown task '{shown_path(name_or_path)}': not a built-in task ({known}) or a JSONL file"
    )


def _expand(name_or_path: str) -> Path:
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


def shown_path(path: Path | str) -> str:
    """`path` for an error sentence: control characters escaped, an absurdly long path by its
    start and end."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(path))
    if len(text) <= SHOWN_PATH_CHARS:
        return text
    return f"{text[:60]}...{text[-40:]} ({len(text):,} characters)"
