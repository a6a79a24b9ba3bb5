"""Jobs as plain values, and the local runner that executes them.

A `Job` is (pipeline, method, checkpoint, task, params) plus where to compute it: serialisable
to JSON, runnable in another process from its value alone (`Job.from_json(text)`). The runner
loads each checkpoint once, prepares its task once, and makes each method's runs: the run key is
a hash of (pipeline, method, checkpoint sha256, task sha256, the method's keyed params); a
finished run with that key is skipped unless `force`. A method that raises is recorded as a
failed run with its error. Bad input (a wrong path, a malformed task file) raises `BadInput`
before anything is written for that checkpoint.

Two runners may compute the same run at once: the store keeps the first one written (the
other is reported `skipped`, with the stored run's id). A runner waits for the database lock
rather than fail (`lock_wait`; see `workbench.store.session`). It leaves no queue row behind
on any way out: an exception, Ctrl-C, or SIGTERM (handled as Ctrl-C when nothing else handles
it, as `workbench watch` does).
"""

import json
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from tqdm.auto import tqdm

from workbench import records, registry
from workbench.core import METRICS
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models.base import CheckpointRef, LoadedModel
from workbench.registry import Method, PlanContext, Planned, RunInputs, StoreReader
from workbench.results import RunResult
from workbench.store import RunRecord
from workbench.store.session import StoreSession
from workbench.tasks.spec import Task

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Options every run has, whatever its pipeline."""

    model: str
    task: str
    checkpoint: str = "latest"  # all, latest or a step
    db: str | None = None
    force: bool = False
    n_prompts: int | None = None
    max_batch: int = 64
    batch_tokens: int | None = None  # and at most this many tokens a batch
    device: str = "auto"  # auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps
    dtype: str = "float32"  # float32, bfloat16, float16
    metric: str | None = None  # None: the task's own (logit_diff unless its file names one)
    executor: str = "local"  # local or ray: where jobs compute (never part of a run key)
    address: str | None = None  # the Ray cluster (ray only; default: a new local instance)
    # how long to wait for the database lock (None: $WORKBENCH_LOCK_WAIT, else 3600 s; 0: ever)
    lock_wait: float | None = None


@dataclass(frozen=True)
class Job:
    """One method on one checkpoint and task, with the method's params (a plain dict)."""

    pipeline: str
    method: str
    checkpoint: CheckpointRef
    task: str  # a built-in task name or a JSONL path
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    n_prompts: int | None = None
    max_batch: int = 64
    device: str = "auto"
    dtype: str = "float32"
    metric: str | None = None
    batch_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def make(
        cls, method: Method, ref: CheckpointRef, options: "RunOptions", params: dict[str, Any]
    ) -> "Job":
        """The job of `method` on checkpoint `ref` with the run `options` and option values
        `params` (by field name; those the method lacks are ignored)."""
        return cls(
            pipeline=method.pipeline,
            method=method.name,
            checkpoint=ref,
            task=options.task,
            params=asdict(method.make_params(params)),
            n_prompts=options.n_prompts,
            max_batch=options.max_batch,
            device=options.device,
            dtype=options.dtype,
            metric=options.metric,
            batch_tokens=options.batch_tokens,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        data = dict(data)
        data["checkpoint"] = CheckpointRef(**data["checkpoint"])
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls.from_dict(json.loads(text))

    @property
    def job_id(self) -> str:
        return sha256_json(self.to_dict())[:16]


class Stopped(Exception):
    """`run_jobs` stopped early because `should_stop()` said so; `outcomes` are the runs made."""

    def __init__(self, outcomes: list["RunOutcome"]):
        super().__init__(f"stopped after {len(outcomes)} runs")
        self.outcomes = outcomes


@dataclass(frozen=True)
class RunOutcome:
    checkpoint_id: str
    method: str
    status: Literal["done", "skipped", "failed"]
    run_id: str | None = None
    error: str | None = None


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# Parameters added after runs were first stored, with the value that reproduces those runs'
# numbers: at that value a parameter is left out of the run key, so a stored run keeps its key
# (and is skipped, not repeated) while `runs.params` still records the value.
KEY_DEFAULTS: dict[str, Any] = {"ig_rule": "right", "dtype": "float32"}
# Recorded in `runs.params` but never part of the run key: where a run computed does not change
# what it computes (up to float order), so a run made on a GPU is not repeated on a CPU.
KEY_EXCLUDED = {"device"}


def run_key(
    pipeline: str, method: str, ckpt_sha: str, task_sha: str, params: dict[str, Any]
) -> str:
    keyed = {
        k: v
        for k, v in params.items()
        if k not in KEY_EXCLUDED and (k not in KEY_DEFAULTS or KEY_DEFAULTS[k] != v)
    }
    return sha256_json(
        {
            "pipeline": pipeline,
            "method": method,
            "checkpoint": ckpt_sha,
            "task": task_sha,
            "params": keyed,
        }
    )


def plan_jobs(
    pipeline: str,
    options: RunOptions,
    methods: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
) -> list[Job]:
    """The jobs of one `workbench run PIPELINE`: each chosen method (default: the pipeline's
    default methods) on each selected checkpoint. `params` are option values by field name;
    one that no chosen method takes is an error, as is an unknown method."""
    from workbench.models import resolve_checkpoints, select_checkpoints

    p = registry.pipeline(pipeline)
    if options.max_batch < 1 or (options.batch_tokens is not None and options.batch_tokens < 1):
        raise BadInput("--max-batch and --batch-tokens must be at least 1")
    if options.metric is not None and options.metric not in METRICS:
        raise BadInput(f"--metric {options.metric}: choose from {', '.join(METRICS)}")
    chosen = [p.method(m) for m in (methods or p.default_methods)]
    params = params or {}
    check_applies(pipeline, chosen, params)
    for m in chosen:
        m.check(m.make_params(params))
    refs = select_checkpoints(resolve_checkpoints(options.model), options.checkpoint)
    return [Job.make(m, ref, options, params) for ref in refs for m in chosen]


def plan_all(
    names: Sequence[str],
    options: RunOptions,
    methods: Sequence[str] | None,
    params: dict[str, Any],
) -> list[Job]:
    """`workbench run PIPELINE` (one name) or `workbench run all` (several): with several, each
    pipeline runs the `methods` that are its own (all its defaults when none is named) with the
    `params` its methods take, and a pipeline none of whose methods or options was asked for is
    left out only when it needs options to run (sae without --hook or --sae)."""
    if len(names) == 1:
        return plan_jobs(names[0], options, methods, params)
    known = registry.pipelines()
    taken = set().union(*(known[n].options() for n in names))
    for name in params:
        if name not in taken:
            raise BadInput(f"{_flag(name)}: not an option of any pipeline")
    all_methods = {m for n in names for m in known[n].method_names}
    for m in methods or []:
        if m not in all_methods:
            raise BadInput(f"--method {m}: not a method of any pipeline")
    plans: list[list[Job]] = []
    for n in names:
        p = known[n]
        own = [m for m in methods or [] if m in p.method_names]
        if methods and not own:
            continue
        mine = {k: v for k, v in params.items() if k in p.options()}
        chosen = own or list(p.default_methods)
        try:
            for m in chosen:
                p.method(m).check(p.method(m).make_params(mine))
        except BadInput:
            if methods:
                raise
            continue  # a default pipeline that needs options it was not given (sae)
        plans.append(plan_jobs(n, options, chosen, mine))
    # checkpoint by checkpoint, so that each is loaded once for every pipeline
    order = {
        ref: i for i, ref in enumerate(dict.fromkeys(j.checkpoint for js in plans for j in js))
    }
    return sorted((j for js in plans for j in js), key=lambda j: order[j.checkpoint])


def demo_jobs(options: RunOptions) -> list[Job]:
    """`workbench demo` on one zoo run: every registered method, checkpoint by checkpoint, as
    each method's `demo` and `demo_params` say."""
    from workbench.models import resolve_checkpoints

    refs = resolve_checkpoints(options.model)
    jobs = []
    for ref in refs:
        for p in registry.pipelines().values():
            for m in p.methods:
                if m.demo == "all" or (m.demo == "latest" and ref == refs[-1]):
                    jobs.append(Job.make(m, ref, options, m.demo_params))
    return jobs


def check_applies(pipeline: str, chosen: Sequence[Method], params: dict[str, Any]) -> None:
    """Every given option is taken by at least one chosen method."""
    p = registry.pipeline(pipeline)
    known = p.options()
    for name in params:
        if name not in known:
            raise BadInput(f"{_flag(name)}: not an option of the {pipeline} pipeline")
        if not any(name in m.option_names for m in chosen):
            takers = [m.name for m in p.methods if name in m.option_names]
            raise BadInput(
                f"{_flag(name)} applies to {', '.join(takers)}, not to "
                f"{', '.join(m.name for m in chosen)}"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
