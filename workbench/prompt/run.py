"""`workbench run prompt`: compute one prompt's views (`workbench.prompt.views`) at each chosen
checkpoint without holding the database, then store them in one short transaction. Cached by
prompt_id (checkpoint, tokens, tau), not by run key: a prompt already stored is not computed
again unless `force`.

A prompt longer than the model's context (`n_ctx` in its config) is BadInput before the model
runs; attention flow taking longer than `flow_seconds` (`--flow-seconds`, 300 by default, 0 for
no limit) is BadInput too, and in both cases nothing is stored."""

import logging

from tqdm.auto import tqdm

from workbench.errors import BadInput
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.base import LoadedModel
from workbench.models.sources import select_checkpoints
from workbench.prompt.views import (
    DEFAULT_FLOW_SECONDS,
    DEFAULT_TAU,
    lens_ids,
    prompt_id,
    prompt_views,
    view_rows,
)
from workbench.rows import loaded_rows
from workbench.store import Store
from workbench.tasks import load_task

logger = logging.getLogger(__name__)


def run_prompt(
    model: str,
    *,
    text: str | None = None,
    task: str | None = None,
    index: int = 0,
    checkpoint: str = "latest",
    tau: float = DEFAULT_TAU,
    device: str = "cpu",
    dtype: str = "float32",
    db: str | None = None,
    force: bool = False,
    flow_seconds: float = DEFAULT_FLOW_SECONDS,
) -> list[tuple[str, str]]:
    """[(prompt_id, 'done' or 'cached')] per checkpoint; `flow_seconds` 0: no limit."""
    if (text is None) == (task is None):
        raise BadInput("give the prompt as --text TEXT, or as --task NAME_OR_JSONL --index I")
    if not 0 < tau < 1:
        raise BadInput(f"--tau {tau}: must be between 0 and 1")
    if index < 0:
        raise BadInput(f"--index {index}: must be 0 or more")
    if not flow_seconds >= 0:
        raise BadInput(f"--flow-seconds {flow_seconds}: must be 0 (no limit) or more")
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    done: list[tuple[str, str]] = []
    for ref in tqdm(refs, desc="prompt checkpoints", disable=len(refs) < 2):
        loaded = load_checkpoint(ref, device=device, dtype=dtype)
        ids, shown = prompt_ids(loaded, text=text, task=task, index=index)
        if len(ids) < 2:
            raise BadInput(f"the prompt is {len(ids)} token long: it needs at least 2")
        checkpoint_id = loaded.checkpoint.checkpoint_id
        pid = prompt_id(checkpoint_id, ids, tau)
        if not force:
            with Store(db) as store:
                if store.has_prompt_views(pid):
                    logger.info("prompt %s at %s: stored already", pid, checkpoint_id)
                    done.append((pid, "cached"))
                    continue
        views = prompt_views(loaded.model, ids, tau, flow_seconds=flow_seconds or None)
        named = lens_ids(views)
        table = view_rows(
            views,
            pid=pid,
            checkpoint_id=checkpoint_id,
            text=shown,
            tokens=loaded.token_strs(ids),
            names=dict(zip(named, loaded.token_strs(named), strict=True)),
            tau=tau,
        )
        registry = loaded_rows(loaded)
        with Store(db) as store:
            store.save_prompt_views(table, registry)
        logger.info("prompt %s at %s: stored", pid, checkpoint_id)
        done.append((pid, "done"))
    return done


def prompt_ids(
    loaded: LoadedModel, *, text: str | None, task: str | None, index: int
) -> tuple[list[int], str]:
    """The token ids of the prompt given as `--text`, or as prompt `index` of `--task`, and its
    text; BadInput when it is empty, the task has no such prompt, or it is longer than the
    model's context."""
    if text is not None:
        if not text.strip():
            raise BadInput("--text: empty")
        ids, shown = loaded.encode(text), text
    else:
        pairs = load_task(str(task), loaded).pairs
        if index >= len(pairs):
            raise BadInput(f"--index {index}: task {task} has {len(pairs)} prompts")
        ids = list(pairs[index].clean_tokens)
        shown = pairs[index].clean_text or " ".join(loaded.token_strs(ids))
    _check_length(ids, loaded.model.cfg.n_ctx, text=text, task=task, index=index)
    return ids, shown


def _check_length(
    ids: list[int], n_ctx: int, *, text: str | None, task: str | None, index: int
) -> None:
    """BadInput when the prompt has more tokens than the model's context."""
    if len(ids) <= n_ctx:
        return
    what = "the prompt (--text)" if text is not None else f"prompt {index} of task {task}"
    raise BadInput(
        f"{what} is {len(ids)} tokens long, more than the model's context of {n_ctx} tokens "
        "(n_ctx in its config): shorten it"
    )
