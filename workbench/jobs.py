"""Jobs as plain values: what to run, its run key, and the plan of a command.

A `Job` is (pipeline, method, checkpoint, task, params) plus where to compute it: serialisable
to JSON, runnable in another process from its value alone (`Job.from_json(text)`). The run key
is a hash of (pipeline, method, checkpoint sha256, task sha256, the method's keyed params); a
finished run with that key is skipped unless `force`. Planning turns a command's options into
jobs (`plan_jobs`, `plan_all`, `demo_jobs`); `workbench.runner` runs them.
"""

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from workbench import registry
from workbench.core import DEFAULT_BATCH_TOKENS, METRICS
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models.base import CheckpointRef, LoadedModel
from workbench.registry import Method


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
    batch_tokens: int | None = DEFAULT_BATCH_TOKENS  # and at most this many (None: no bound)
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
    """What became of one run: `done`, `skipped` (a done run had its key: `run_id` is that
    run's) or `failed` (`error` says why; `run_id` is the failed run's row, if one was stored)."""

    checkpoint_id: str
    method: str
    status: Literal["done", "skipped", "failed"]
    run_id: str | None = None
    error: str | None = None


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
    """The run key: the sha256 of the pipeline, method, checkpoint and task sha256s and the
    params, less those never keyed (`KEY_EXCLUDED`) and those at their `KEY_DEFAULTS` value."""
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


def dtype_name(loaded: LoadedModel) -> str:
    """The loaded model's dtype as `runs.params` and run keys record it (`float32`, ...)."""
    return str(loaded.model.cfg.dtype).removeprefix("torch.")


def check_batching_and_metric(options: RunOptions) -> None:
    """BadInput for `--max-batch` or `--batch-tokens` below 1, or an unknown `--metric`."""
    if options.max_batch < 1 or (options.batch_tokens is not None and options.batch_tokens < 1):
        raise BadInput("--max-batch and --batch-tokens must be at least 1")
    if options.metric is not None and options.metric not in METRICS:
        raise BadInput(f"--metric {options.metric}: choose from {', '.join(METRICS)}")


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
    check_batching_and_metric(options)
    # a pipeline without default methods (one that only `workbench run all` leaves out) runs
    # all of them when it is named alone
    chosen = [p.method(m) for m in (methods or p.default_methods or p.method_names)]
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
        if not chosen:
            continue  # no default methods: only when named (transcoders)
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
