"""The task data model: prompt pairs (clean and corrupt prompts with answer and wrong tokens)
and the task they form, with its metric. The loaders (`workbench.tasks.load_task`, through
`workbench.tasks.builtin` and `workbench.tasks.jsonl`) make tasks; nothing here loads one.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from workbench.core import DEFAULT_METRIC
from workbench.hashing import sha256_json

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
