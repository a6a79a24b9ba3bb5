"""What `workbench demo` stores besides the pipelines' runs, so that every page of the app has
something on first open: for each zoo task, the prompt views of its first prompt at the final
checkpoint (the Prompt page) and, on a model with MLPs, a transcoder set trained on the final
checkpoint (the Features page lists its features) and the attribution graph of that prompt
(the Graph page). The transcoders are trained briefly (`DEMO_TRANSCODERS`: enough for a graph
to look at, not the default training). Everything is keyed as when run by hand, so a second
demo finds it stored."""

import logging
from typing import Any

from workbench.jobs import RunOptions, plan_jobs
from workbench.prompt.run import run_prompt
from workbench.runner import run_jobs
from workbench.store import Store
from workbench.transcoders.run import run_graph

logger = logging.getLogger(__name__)

DEMO_TRANSCODERS: dict[str, Any] = {"training_tokens": 100_000, "corpus_tokens": 12_000}


def prompt_extras(model: str, task: str, db: str | None, *, has_mlps: bool) -> list[str]:
    """Store the prompt views (and, with MLPs, transcoders and a graph) of `task`'s first
    prompt on the final checkpoint of `model`; one line per thing stored or found stored."""
    lines = [f"{status:<8} prompt {pid}"
             for pid, status in run_prompt(model, task=task, index=0, db=db)]  # fmt: skip
    if not has_mlps:
        return lines
    options = RunOptions(model=model, task=task, checkpoint="latest", db=db)
    jobs = plan_jobs("transcoders", options, params=DEMO_TRANSCODERS)
    (outcome,) = run_jobs(jobs, db=db, hold=True)
    lines.append(f"{outcome.status:<8} transcoders {outcome.run_id}")
    if outcome.status == "failed" or outcome.run_id is None:
        return lines
    with Store(db, read_only=True) as store:
        found = store.query(
            "SELECT set_id FROM transcoder_sets WHERE run_id = ?", [outcome.run_id]
        )["set_id"].to_pylist()
    if not found:
        logger.warning("transcoders run %s stored no set", outcome.run_id)
        return lines
    for gid, status in run_graph(model, found[0], task=task, index=0, db=db):
        lines.append(f"{status:<8} graph {gid}")
    return lines
