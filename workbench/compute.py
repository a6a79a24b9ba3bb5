"""Computing a job's runs and storing them: what every executor does, wherever it computes.

A planned run gets its `runs` row (`run_row_for`: its params with where it computes, and its
run key), is computed (`compute_run`: a method that raises is a failed run, bad input raises), and
is stored in its one transaction (`store_run`: a run another writer stored first is skipped).
`compute_job` does a whole job without the store, as a remote worker does; `ingest` stores what
it returns. `queue_row` is a job's row in the run queue.
"""

import logging
from dataclasses import dataclass
from typing import Any

from workbench import registry
from workbench.core import utc_now
from workbench.errors import BadInput
from workbench.jobs import Job, RunOutcome, dtype_name, run_key
from workbench.models.base import LoadedModel
from workbench.registry import Method, PlanContext, Planned, RunInputs, StoreReader
from workbench.results import RunResult
from workbench.rows import RunRow, loaded_rows, prompt_rows, task_rows
from workbench.store.session import StoreSession
from workbench.tasks.spec import Task

logger = logging.getLogger(__name__)


def queue_row(job: Job) -> dict[str, Any]:
    """The job's row in the run queue (`StoreSession.enqueue`)."""
    return {
        "job_id": job.job_id,
        "pipeline": job.pipeline,
        "method": job.method,
        "checkpoint_id": job.checkpoint.checkpoint_id,
        "task": job.task,
    }


def registry_rows(loaded: LoadedModel, task: Task) -> dict[str, Any]:
    """The rows a run refers to: its model, checkpoint, task, prompts and graph nodes."""
    return loaded_rows(loaded) | {"tasks": task_rows(task), "prompts": prompt_rows(task)}


def run_row_for(job: Job, method: Method, planned: Planned, inputs: RunInputs) -> RunRow:
    """The `runs` row of one planned run: its params (with where it computes) and run key."""
    loaded, task = inputs.loaded, inputs.task
    ckpt = loaded.checkpoint
    placement = {"device": str(loaded.model.cfg.device), "dtype": dtype_name(loaded)}
    params = {**planned.key, **placement}
    key = run_key(job.pipeline, method.name, ckpt.sha256, task.sha256, params)
    started = utc_now()
    return RunRow(
        key, job.pipeline, method.name, ckpt.checkpoint_id, task.task_id, params, started_at=started
    )


def compute_run(
    method: Method, planned: Planned, inputs: RunInputs, run: RunRow
) -> RunResult | None:
    """The method's result, or None with `run.error` set when it raised (bad input raises)."""
    try:
        return method.compute(inputs, planned.params)
    except BadInput:
        raise
    except Exception as err:  # a failed run is recorded, not raised
        logger.exception("%s %s failed on %s", run.pipeline, run.method, run.checkpoint_id)
        run.error = f"{type(err).__name__}: {err}"
        return None


def skipped(run: RunRow, existing: str) -> RunOutcome:
    """The outcome of a run not made because the stored run `existing` has its run key."""
    logger.info(
        "skip %s %s on %s: identical run %s exists",
        run.pipeline,
        run.method,
        run.checkpoint_id,
        existing,
    )
    return RunOutcome(run.checkpoint_id, run.method, "skipped", existing)


def store_run(
    store: StoreSession,
    run: RunRow,
    rows: dict[str, Any],
    result: RunResult | None,
    force: bool,
) -> RunOutcome:
    """Write a computed run (or record it as failed) in its one transaction; a run another
    writer stored first, while this one computed, is skipped."""
    if result is None:
        run_id = store.record_failed_run(run, registry=rows)
        return RunOutcome(run.checkpoint_id, run.method, "failed", run_id, run.error)
    run_id = store.write_result(run, registry=rows, result=result, replace=force)
    if run_id != run.run_id:
        return skipped(run, run_id)
    logger.info("%s %s on %s: run %s", run.pipeline, run.method, run.checkpoint_id, run_id)
    return RunOutcome(run.checkpoint_id, run.method, "done", run_id)


# --- a job computed away from the store (a remote worker), then stored -----------------------
@dataclass
class Computed:
    """One planned run of a job, computed without the store: its `runs` row and its result (None
    when it failed, with `run.error`; or when an identical run was stored: `existing`)."""

    run: RunRow
    result: RunResult | None = None
    existing: str | None = None


@dataclass
class JobComputed:
    """What a worker returns for a job: the rows its runs refer to and each run computed."""

    job: Job
    registry: dict[str, Any]
    runs: list[Computed]


def compute_job(
    job: Job, loaded: LoadedModel, reader: StoreReader, *, db: str | None, force: bool
) -> JobComputed:
    """Plan and compute one job on its loaded checkpoint, writing nothing: `reader` answers the
    planner's questions and says which runs are stored already (skipped unless `force`)."""
    from workbench.tasks import load_task

    task = load_task(job.task, loaded, n_prompts=job.n_prompts, metric=job.metric)
    inputs = RunInputs(loaded, task, max_batch=job.max_batch, batch_tokens=job.batch_tokens)
    method = registry.method(job.pipeline, job.method)
    params = method.make_params(job.params)
    computed = []
    for planned in method.runs(params, inputs, PlanContext(store=reader, db=db)):
        run = run_row_for(job, method, planned, inputs)
        existing = None if force else reader.done_run(run.run_key)
        if existing:
            computed.append(Computed(run, existing=existing))
            continue
        computed.append(Computed(run, compute_run(method, planned, inputs, run)))
    return JobComputed(job, registry_rows(loaded, task), computed)


def ingest(store: StoreSession, computed: JobComputed, force: bool) -> list[RunOutcome]:
    """Store a job computed elsewhere: each run in its own transaction (a run stored in the
    meantime with the same key is skipped), then the job leaves the queue."""
    outcomes = []
    for c in computed.runs:
        existing = c.existing or store.start(
            computed.job.job_id, c.run.run_id, c.run.run_key, force
        )
        if existing:
            outcomes.append(skipped(c.run, existing))
        else:
            outcomes.append(store_run(store, c.run, computed.registry, c.result, force))
    store.finish(computed.job.job_id)
    return outcomes
