"""What every pipeline does around its methods: resolve checkpoints, load, key, skip, store.

For each selected checkpoint and each method: the run key is a hash of (pipeline, method,
checkpoint sha256, task sha256, params); a finished run with that key is skipped unless
`force`. A method that raises is recorded as a failed run with its error. Bad input (a wrong
path, a malformed task file) raises `BadInput` before anything is written for that checkpoint.
"""

import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Self

import pyarrow as pa
from tqdm.auto import tqdm

from workbench import records
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.models import LoadedModel, load_checkpoint, resolve_checkpoints, select_checkpoints
from workbench.store import RunRecord, Store
from workbench.tasks import Task, load_task

logger = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    """Options every pipeline has; each pipeline's config adds its own `methods` and more."""

    model: str
    task: str
    checkpoint: str = "latest"
    db: str | None = None
    force: bool = False
    n_prompts: int | None = None
    max_batch: int = 64
    device: str = "auto"  # auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N, mps
    dtype: str = "float32"  # float32, bfloat16, float16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class MethodResult:
    metric_clean: float | None
    metric_corrupt: float | None
    rows: dict[str, pa.Table] = field(default_factory=dict)
    # rows that refer to the run by id but carry their own keys (circuits), built once known
    linked: Callable[[str], dict[str, pa.Table]] | None = None
    # more registry rows (e.g. the nodes of an SAE's features), inserted where their keys are new
    registry: dict[str, pa.Table] = field(default_factory=dict)


def link_circuit(
    name: str, rule: str, edges: list[tuple[str, str, float]], faithfulness: float
) -> Callable[[str], dict[str, pa.Table]]:
    """`MethodResult.linked` for a run that stores one circuit."""
    from workbench.circuits import Circuit

    n_nodes = len(Circuit(rule, edges).nodes)

    def linked(run_id: str) -> dict[str, pa.Table]:
        return records.circuit_rows(
            run_id, name=name, rule=rule, edges=edges, n_nodes=n_nodes, faithfulness=faithfulness
        )

    return linked


@dataclass(frozen=True)
class RunOutcome:
    checkpoint_id: str
    method: str
    status: Literal["done", "skipped", "failed"]
    run_id: str | None = None
    error: str | None = None


MethodFn = Callable[[LoadedModel, Task], MethodResult]


@dataclass(frozen=True)
class RunSpec:
    """One run to make on a checkpoint: a method, its parameters and how to compute it."""

    method: str
    params: dict[str, Any]
    compute: MethodFn


Planner = Callable[[LoadedModel, Task], Iterable[RunSpec]]


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


def graph_nodes(loaded: LoadedModel) -> pa.Table:
    cfg = loaded.model.cfg
    has_mlp = not cfg.attn_only
    return records.model_graph_nodes(loaded.info.model_id, cfg.n_layers, cfg.n_heads, has_mlp)


def run_pipeline(
    *,
    pipeline: str,
    model: str,
    task: str,
    checkpoint: str,
    plan: Planner,
    db: str | None = None,
    force: bool = False,
    n_prompts: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> list[RunOutcome]:
    refs = select_checkpoints(resolve_checkpoints(model), checkpoint)
    outcomes: list[RunOutcome] = []
    with Store(db) as store:
        for ref in tqdm(refs, desc=f"{pipeline} checkpoints", disable=len(refs) < 2):
            loaded = load_checkpoint(ref, device=device, dtype=dtype)
            the_task = load_task(task, loaded, n_prompts=n_prompts)
            registry = {
                "models": records.model_rows(loaded.info),
                "checkpoints": records.checkpoint_rows(loaded.checkpoint),
                "tasks": records.task_rows(the_task),
                "prompts": records.prompt_rows(the_task),
                "nodes": graph_nodes(loaded),
            }
            for spec in plan(loaded, the_task):
                outcomes.append(_run_one(store, pipeline, spec, loaded, the_task, registry, force))
    return outcomes


def _run_one(
    store: Store,
    pipeline: str,
    spec: RunSpec,
    loaded: LoadedModel,
    task: Task,
    registry: dict[str, pa.Table],
    force: bool,
) -> RunOutcome:
    ckpt = loaded.checkpoint
    placement = {"device": str(loaded.model.cfg.device), "dtype": _dtype_name(loaded)}
    method, params = spec.method, {**spec.params, **placement}
    key = run_key(pipeline, method, ckpt.sha256, task.sha256, params)
    existing = store.done_run(key)
    if existing and not force:
        logger.info(
            "skip %s %s on %s: identical run %s exists",
            pipeline,
            method,
            ckpt.checkpoint_id,
            existing,
        )
        return RunOutcome(ckpt.checkpoint_id, method, "skipped", existing)
    run = RunRecord(
        key, pipeline, method, ckpt.checkpoint_id, task.task_id, params, started_at=now()
    )
    try:
        result = spec.compute(loaded, task)
    except BadInput:
        raise
    except Exception as err:  # a failed run is recorded, not raised
        logger.exception("%s %s failed on %s", pipeline, method, ckpt.checkpoint_id)
        run.error = f"{type(err).__name__}: {err}"
        run_id = store.record_failed_run(run, registry=registry)
        return RunOutcome(ckpt.checkpoint_id, method, "failed", run_id, run.error)
    run.metric_clean, run.metric_corrupt = result.metric_clean, result.metric_corrupt
    for table, extra in result.registry.items():
        registry = registry | {
            table: pa.concat_tables([registry[table], extra]) if table in registry else extra
        }
    linked = result.linked(run.run_id) if result.linked else None
    run_id = store.write_run(run, registry=registry, rows=result.rows, linked=linked, replace=force)
    logger.info("%s %s on %s: run %s", pipeline, method, ckpt.checkpoint_id, run_id)
    return RunOutcome(ckpt.checkpoint_id, method, "done", run_id)


def run_configured(pipeline: str, cfg: PipelineConfig, plan: Planner) -> list[RunOutcome]:
    """`run_pipeline` with the options every pipeline config has (model, task, checkpoint,
    db, force, n_prompts)."""
    return run_pipeline(
        pipeline=pipeline,
        model=cfg.model,
        task=cfg.task,
        checkpoint=cfg.checkpoint,
        plan=plan,
        db=cfg.db,
        force=cfg.force,
        n_prompts=cfg.n_prompts,
        device=cfg.device,
        dtype=cfg.dtype,
    )


def _dtype_name(loaded: LoadedModel) -> str:
    return str(loaded.model.cfg.dtype).removeprefix("torch.")


def pipeline_main(pipeline: str, argv: list[str] | None) -> None:
    """`python -m pipelines.<name> ...`: the options of `workbench run <name>`."""
    import sys

    from workbench.cli import cli

    sys.exit(cli(["run", pipeline, *(sys.argv[1:] if argv is None else argv)]))
