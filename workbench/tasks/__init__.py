"""Tasks: clean/corrupt prompt pairs with answer and wrong tokens, and the metric.

`load_task(name_or_path, model)` gives a `Task` whose prompts are tokenized for `model`:
a built-in task name (`induction`) or a JSONL task file (DESIGN.md, "Task files").
"""

from workbench.tasks.spec import PromptPair, Task, load_task

__all__ = ["PromptPair", "Task", "load_task"]
