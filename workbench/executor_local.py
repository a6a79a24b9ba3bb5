"""The local executor (`--executor local`, the default): jobs computed in this process.

It loads each checkpoint once for the consecutive jobs on it, prepares each task once, and makes
each method's runs; a finished run with the same run key is skipped unless `force`. A method
that raises is recorded as a failed run with its error. Bad input (a wrong path, a malformed
task file) raises `BadInput` before anything is written for that checkpoint.

Two processes may compute the same run at once: the store keeps the first one written (the
other is reported `skipped`, with the stored run's id). The executor waits for the database lock
rather than fail (`lock_wait`; see `workbench.store.session`) and leaves no queue row behind on
any way out (an exception, an interrupt).
"""

from collections.abc import Callable, Iterable
from typing import Any

from tqdm.auto import tqdm

from workbench import memory, profiling, registry
from workbench.compute import (
    compute_run,
    queue_row,
    registry_rows,
    run_row_for,
    skipped,
    store_run,
)
from workbench.jobs import Job, RunOutcome, Stopped
from workbench.models.base import CheckpointRef, LoadedModel
from workbench.registry import Method, PlanContext, Planned, RunInputs
from workbench.store.session import StoreSession
from workbench.token_text import decode_pending_of


def run_local(
    jobs: Iterable[Job],
    *,
    db: str | None,
    force: bool,
    hold: bool = False,
    should_stop: Callable[[], bool] | None = None,
    lock_wait: float | None = None,
) -> list[RunOutcome]:
    """Compute and store `jobs` in order, loading each checkpoint once for the consecutive jobs
    on it (`workbench.runner.run_jobs` documents the arguments)."""
    groups: list[tuple[tuple[CheckpointRef, str, str], list[Job]]] = []
    for job in jobs:
        where = (job.checkpoint, job.device, job.dtype)
        if groups and groups[-1][0] == where:
            groups[-1][1].append(job)
        else:
            groups.append((where, [job]))
    outcomes: list[RunOutcome] = []
    names = sorted({j.pipeline for _, group in groups for j in group})
    every = [j for _, group in groups for j in group]
    with StoreSession(db, hold=hold, lock_wait=lock_wait) as session:
        with session.held():
            decode_pending_of(session)
            session.enqueue([queue_row(j) for j in every])
        ctx = PlanContext(store=session, db=db)
        try:
            for (ref, device, dtype), group in tqdm(
                groups, desc=f"{'+'.join(names)} checkpoints", disable=len(groups) < 2
            ):
                outcomes += _run_checkpoint(
                    session, ctx, ref, device, dtype, group, force, should_stop, outcomes
                )
        finally:  # done, or stopped early (bad input, an interrupt): nothing stays queued
            session.clear([j.job_id for j in every])
    return outcomes


def _run_checkpoint(
    store: StoreSession,
    ctx: PlanContext,
    ref: CheckpointRef,
    device: str,
    dtype: str,
    jobs: list[Job],
    force: bool,
    should_stop: Callable[[], bool] | None = None,
    before: list[RunOutcome] | None = None,
) -> list[RunOutcome]:
    from workbench.models import load_checkpoint

    with profiling.stage("load checkpoint"), memory.loading_frozen():
        loaded = load_checkpoint(ref, device=device, dtype=dtype)
    try:
        return _run_jobs_on(store, ctx, ref, loaded, jobs, force, should_stop, before)
    finally:
        memory.thaw()


def _run_jobs_on(
    store: StoreSession,
    ctx: PlanContext,
    ref: CheckpointRef,
    loaded: LoadedModel,
    jobs: list[Job],
    force: bool,
    should_stop: Callable[[], bool] | None,
    before: list[RunOutcome] | None,
) -> list[RunOutcome]:
    from workbench.tasks import load_task

    prepared: dict[tuple[Any, ...], tuple[RunInputs, dict[str, Any]]] = {}
    outcomes: list[RunOutcome] = []
    # a bar per checkpoint when attached to a terminal (tqdm's disable=None)
    for job in tqdm(jobs, desc=ref.checkpoint_id, unit="job", leave=False, disable=None):
        where = (job.task, job.n_prompts, job.max_batch, job.batch_tokens, job.metric)
        if where not in prepared:
            with profiling.stage("task"):
                task = load_task(job.task, loaded, n_prompts=job.n_prompts, metric=job.metric)
                prepared[where] = (
                    RunInputs(loaded, task, max_batch=job.max_batch, batch_tokens=job.batch_tokens),
                    registry_rows(loaded, task),
                )
        inputs, rows = prepared[where]
        method = registry.method(job.pipeline, job.method)
        params = method.make_params(job.params)
        for planned in method.runs(params, inputs, ctx):
            if should_stop is not None and should_stop():
                raise Stopped([*(before or []), *outcomes])
            outcomes.append(_run_one(store, job, method, planned, inputs, rows, force))
        store.finish(job.job_id)
    return outcomes


def _run_one(
    store: StoreSession,
    job: Job,
    method: Method,
    planned: Planned,
    inputs: RunInputs,
    rows: dict[str, Any],
    force: bool,
) -> RunOutcome:
    run = run_row_for(job, method, planned, inputs)
    existing = store.start(job.job_id, run.run_id, run.run_key, force)
    if existing:
        return skipped(run, existing)
    with profiling.stage(f"{method.name}"):
        result = compute_run(method, planned, inputs, run)  # (the session keeps the heartbeat)
    with profiling.stage("store"):
        return store_run(store, run, rows, result, force)
