"""The local runner that executes jobs (`workbench.jobs`).

The runner loads each checkpoint once, prepares its task once, and makes each method's runs; a
finished run with the same run key is skipped unless `force`. A method that raises is recorded as a
failed run with its error. Bad input (a wrong path, a malformed task file) raises `BadInput`
before anything is written for that checkpoint.

Two runners may compute the same run at once: the store keeps the first one written (the
other is reported `skipped`, with the stored run's id). A runner waits for the database lock
rather than fail (`lock_wait`; see `workbench.store.session`). It leaves no queue row behind
on any way out: an exception, Ctrl-C, or SIGTERM (handled as Ctrl-C when nothing else handles
it, as `workbench watch` does).
"""

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from workbench import records, registry
from workbench.errors import BadInput
from workbench.jobs import (  # noqa: F401  (the names callers have imported from here)
    KEY_DEFAULTS,
    KEY_EXCLUDED,
    Job,
    RunOptions,
    RunOutcome,
    Stopped,
    check_applies,
    demo_jobs,
    now,
    plan_all,
    plan_jobs,
    run_key,
)
from workbench.models.base import CheckpointRef, LoadedModel
from workbench.registry import Method, PlanContext, Planned, RunInputs, StoreReader
from workbench.results import RunResult
from workbench.store import RunRecord
from workbench.store.session import StoreSession
from workbench.tasks.spec import Task

logger = logging.getLogger(__name__)


def run(
    pipeline: str,
    options: RunOptions,
    methods: Sequence[str] | None = None,
    **params: Any,
) -> list[RunOutcome]:
    """Plan and run a pipeline locally: the Python form of `workbench run PIPELINE ...`."""
    jobs = plan_jobs(pipeline, options, methods, params)
    return run_jobs(
        jobs,
        db=options.db,
        force=options.force,
        executor=options.executor,
        address=options.address,
        lock_wait=options.lock_wait,
    )


def run_jobs(
    jobs: Iterable[Job],
    *,
    db: str | None = None,
    force: bool = False,
    hold: bool = False,
    should_stop: Callable[[], bool] | None = None,
    executor: str = "local",
    address: str | None = None,
    lock_wait: float | None = None,
) -> list[RunOutcome]:
    """Execute jobs in order, loading each checkpoint once for the consecutive jobs on it.
    The database is opened only for each short operation (readers get in between runs), or
    held for the whole call with `hold` (faster for many tiny runs). `should_stop` is asked
    before each run; when it says so, `Stopped` is raised with the runs made so far.
    `lock_wait`: seconds to wait for the database lock (`run_lock_wait`).

    `executor="ray"` computes the jobs on a Ray cluster instead (`address`, else a local Ray
    instance) and stores what its workers return here, one run transaction at a time."""
    if executor not in ("local", "ray"):
        raise BadInput(f"--executor {executor}: choose local or ray")
    if address is not None and executor != "ray":
        raise BadInput("--address applies to --executor ray")
    with _sigterm_interrupts():
        if executor == "ray":
            from workbench.executor_ray import run_jobs_ray

            return run_jobs_ray(
                list(jobs),
                db=db,
                force=force,
                address=address,
                should_stop=should_stop,
                lock_wait=lock_wait,
            )
        return _run_local(jobs, db, force, hold, should_stop, lock_wait)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does: the run in progress
    is abandoned (its transaction never commits) and the runner's queue rows go. Only in the
    main thread, and only where SIGTERM has no handler yet (`workbench watch` has its own)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        logger.info("signal %d: stopping", signum)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_local(
    jobs: Iterable[Job],
    db: str | None,
    force: bool,
    hold: bool,
    should_stop: Callable[[], bool] | None,
    lock_wait: float | None,
) -> list[RunOutcome]:
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
        session.enqueue([_queue_row(j) for j in every])
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


def _queue_row(job: Job) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "pipeline": job.pipeline,
        "method": job.method,
        "checkpoint_id": job.checkpoint.checkpoint_id,
        "task": job.task,
    }


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
    from workbench.tasks import load_task

    loaded = load_checkpoint(ref, device=device, dtype=dtype)
    prepared: dict[tuple[Any, ...], tuple[RunInputs, dict[str, Any]]] = {}
    outcomes: list[RunOutcome] = []
    # a bar per checkpoint when attached to a terminal (tqdm's disable=None)
    for job in tqdm(jobs, desc=ref.checkpoint_id, unit="job", leave=False, disable=None):
        where = (job.task, job.n_prompts, job.max_batch, job.batch_tokens, job.metric)
        if where not in prepared:
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


def registry_rows(loaded: LoadedModel, task: Task) -> dict[str, Any]:
    """The rows a run refers to: its model, checkpoint, task, prompts and graph nodes."""
    cfg = loaded.model.cfg
    return {
        "models": records.model_rows(loaded.info),
        "checkpoints": records.checkpoint_rows(loaded.checkpoint),
        "tasks": records.task_rows(task),
        "prompts": records.prompt_rows(task),
        "nodes": records.model_graph_nodes(
            loaded.info.model_id, cfg.n_layers, cfg.n_heads, not cfg.attn_only
        ),
    }


def _run_one(
    store: StoreSession,
    job: Job,
    method: Method,
    planned: Planned,
    inputs: RunInputs,
    rows: dict[str, Any],
    force: bool,
) -> RunOutcome:
    run = _record_for(job, method, planned, inputs)
    existing = store.start(job.job_id, run.run_id, run.run_key, force)
    if existing:
        return _skipped(run, existing)
    result = _compute(method, planned, inputs, run)  # (the session keeps the heartbeat)
    return _store(store, run, rows, result, force)


def _record_for(job: Job, method: Method, planned: Planned, inputs: RunInputs) -> RunRecord:
    """The run record of one planned run: its params (with where it computes) and run key."""
    loaded, task = inputs.loaded, inputs.task
    ckpt = loaded.checkpoint
    placement = {"device": str(loaded.model.cfg.device), "dtype": _dtype_name(loaded)}
    params = {**planned.key, **placement}
    key = run_key(job.pipeline, method.name, ckpt.sha256, task.sha256, params)
    return RunRecord(
        key, job.pipeline, method.name, ckpt.checkpoint_id, task.task_id, params, started_at=now()
    )


def _compute(
    method: Method, planned: Planned, inputs: RunInputs, run: RunRecord
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


def _skipped(run: RunRecord, existing: str) -> RunOutcome:
    logger.info(
        "skip %s %s on %s: identical run %s exists",
        run.pipeline,
        run.method,
        run.checkpoint_id,
        existing,
    )
    return RunOutcome(run.checkpoint_id, run.method, "skipped", existing)


def _store(
    store: StoreSession,
    run: RunRecord,
    rows: dict[str, Any],
    result: RunResult | None,
    force: bool,
) -> RunOutcome:
    """Write a computed run (or record it as failed) in its one transaction; a run another
    runner stored first, while this one computed, is skipped."""
    if result is None:
        run_id = store.record_failed_run(run, registry=rows)
        return RunOutcome(run.checkpoint_id, run.method, "failed", run_id, run.error)
    run_id = store.write_result(run, registry=rows, result=result, replace=force)
    if run_id != run.run_id:
        return _skipped(run, run_id)
    logger.info("%s %s on %s: run %s", run.pipeline, run.method, run.checkpoint_id, run_id)
    return RunOutcome(run.checkpoint_id, run.method, "done", run_id)


# --- computing a job away from the store (a remote executor's worker) ----------------------
@dataclass
class Computed:
    """One planned run of a job, computed without the store: its record and its result (None
    when it failed, with `run.error`; or when an identical run was stored: `existing`)."""

    run: RunRecord
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
        run = _record_for(job, method, planned, inputs)
        existing = None if force else reader.done_run(run.run_key)
        if existing:
            computed.append(Computed(run, existing=existing))
            continue
        computed.append(Computed(run, _compute(method, planned, inputs, run)))
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
            outcomes.append(_skipped(c.run, existing))
        else:
            outcomes.append(_store(store, c.run, computed.registry, c.result, force))
    store.finish(computed.job.job_id)
    return outcomes


def _dtype_name(loaded: LoadedModel) -> str:
    return str(loaded.model.cfg.dtype).removeprefix("torch.")
