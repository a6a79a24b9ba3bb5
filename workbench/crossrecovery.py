"""`workbench run cross-recovery`: circuits compared by what they do across training. The
circuit an edge method stored at checkpoint A, evaluated at checkpoint B: the task's metric at
B with every graph edge outside A's circuit ablated (as the circuit's own faithfulness is
measured at A: `workbench.circuits.EdgeAblator`), as a fraction of B's clean-corrupt gap.

For one training run, one task and one method: every checkpoint with a stored circuit of that
method and task (its newest done run), or, beyond `max_checkpoints`, an evenly spaced subset
with the first and the last; every circuit is evaluated at every chosen checkpoint. Each
checkpoint B is loaded once; its clean and corrupt runs are made once and shared by every
circuit's ablated passes, several circuits per pass. Stored in `cross_recovery`, one row per
(circuit, checkpoint B, task, dtype), B's rows in one transaction; a B whose rows are all
stored is not computed again unless `force` (batching is not part of the key: like a run's, it
changes only the order of sums). On the diagonal (a circuit at its own checkpoint, the same
prompts, batches and dtype) the value is the circuit's stored faithfulness.
"""

import logging
from typing import Any

from tqdm.auto import tqdm

from workbench.core import utc_now
from workbench.errors import BadInput
from workbench.jobs import RunOptions, check_batching_and_metric
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.base import CheckpointRef, LoadedModel
from workbench.rows import loaded_rows, task_rows
from workbench.store import Store
from workbench.tasks import load_task

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHECKPOINTS = 12


def evenly_spaced(items: list[Any], most: int) -> list[Any]:
    """`items` if there are at most `most`, else `most` of them evenly spaced, first and last
    included (`most` >= 2)."""
    if len(items) <= most:
        return list(items)
    picks = sorted({round(i * (len(items) - 1) / (most - 1)) for i in range(most)})
    return [items[i] for i in picks]


def stored_circuits(
    store: Store, model_id: str, task_id: str, method: str, checkpoint_id: str | None = None
) -> list[dict]:
    """The circuit of the newest done run of `method` on `task_id` at each of the model's
    checkpoints (by step), or at `checkpoint_id` alone: circuit_id, checkpoint_id, step,
    faithfulness, and its edges."""
    rows = store.query(
        """SELECT c.circuit_id, r.checkpoint_id, k.step, c.faithfulness
           FROM circuits c JOIN runs r USING (run_id) JOIN checkpoints k USING (checkpoint_id)
           WHERE k.model_id = ? AND r.task_id = ? AND r.method = ? AND r.status = 'done'
             AND (CAST(? AS VARCHAR) IS NULL OR r.checkpoint_id = ?)
           QUALIFY row_number() OVER (
             PARTITION BY r.checkpoint_id ORDER BY r.finished_at DESC, c.created_at DESC) = 1
           ORDER BY k.step""",
        [model_id, task_id, method, checkpoint_id, checkpoint_id],
    ).to_pylist()
    for row in rows:
        edges = store.query(
            "SELECT src, dst FROM circuit_edges WHERE circuit_id = ?", [row["circuit_id"]]
        )
        row["edges"] = list(zip(edges["src"].to_pylist(), edges["dst"].to_pylist(), strict=True))
    return rows


def run_cross_recovery(
    options: RunOptions,
    *,
    method: str = "eap",
    max_checkpoints: int = DEFAULT_MAX_CHECKPOINTS,
) -> list[tuple[str, str]]:
    """[(checkpoint_id, 'done' or 'cached')] for each checkpoint the circuits are evaluated at;
    `options` gives the model (a training run), the task and how to run (prompts, batches,
    device, dtype, metric, database, force)."""
    if max_checkpoints < 2:
        raise BadInput(f"--max-checkpoints {max_checkpoints}: must be 2 or more")
    check_batching_and_metric(options)
    refs = {ref.checkpoint_id: ref for ref in resolve_checkpoints(options.model)}
    first = load_checkpoint(next(iter(refs.values())), device=options.device, dtype=options.dtype)
    task = _task(options, first)
    with Store(options.db, lock_wait=options.lock_wait) as store:
        circuits = stored_circuits(store, first.info.model_id, task.task_id, method)
    circuits = [c for c in circuits if c["checkpoint_id"] in refs]
    if len(circuits) < 2:
        raise BadInput(
            f"{options.model}: {len(circuits)} checkpoint(s) with a stored {method} circuit on "
            f"task {task.task_id}; cross-recovery needs two or more (run `workbench run edges "
            f"--method {method} --checkpoint all` on this task first)"
        )
    chosen = evenly_spaced(circuits, max_checkpoints)
    # the checkpoint loaded to find the circuits is used again if it is evaluated at, else freed
    loaded = {first.checkpoint.checkpoint_id: first}
    del first
    done = []
    for at in tqdm(chosen, desc="cross-recovery checkpoints", leave=False):
        ref = refs[at["checkpoint_id"]]
        done.append(evaluate_at(ref, loaded.pop(ref.checkpoint_id, None), chosen, options))
        loaded.clear()
    return done


def _task(options: RunOptions, loaded: Any) -> Any:
    return load_task(options.task, loaded, n_prompts=options.n_prompts, metric=options.metric)


def evaluate_at(
    ref: CheckpointRef, loaded: LoadedModel | None, circuits: list[dict], options: RunOptions
) -> tuple[str, str]:
    """Every circuit's faithfulness at checkpoint `ref` (`loaded` already, or loaded here),
    stored in one transaction."""
    from workbench.attribution.batches import make_batches, model_device
    from workbench.attribution.edges import model_graph
    from workbench.circuits import EdgeAblator

    if loaded is None:
        loaded = load_checkpoint(ref, device=options.device, dtype=options.dtype)
    task = _task(options, loaded)
    ids = [c["circuit_id"] for c in circuits]
    if not options.force:
        with Store(options.db, lock_wait=options.lock_wait) as store:
            if store.has_cross_recovery(ids, ref.checkpoint_id, task.task_id, options.dtype):
                return ref.checkpoint_id, "cached"
    model = loaded.model
    batches = make_batches(
        task,
        max_batch=options.max_batch,
        device=model_device(model),
        model=model,
        max_tokens=options.batch_tokens,
    )
    graph = model_graph(model)
    ablator = EdgeAblator(model, batches, graph)
    known = set(graph.sources), set(graph.destinations)
    for c in circuits:
        for src, dst in c["edges"]:
            if src not in known[0] or dst not in known[1]:
                raise BadInput(
                    f"circuit {c['circuit_id']}: edge {src} -> {dst} is not an edge of "
                    f"{ref.checkpoint_id}'s graph"
                )
    values = ablator.faithfulness_of_many(
        [ablator.mask(c["edges"]) for c in circuits], max_tokens=options.batch_tokens
    )
    now = utc_now()
    rows = [
        {
            "circuit_id": c["circuit_id"],
            "checkpoint_id": ref.checkpoint_id,
            "task_id": task.task_id,
            "dtype": options.dtype,
            "faithfulness": value,
            "created_at": now,
        }
        for c, value in zip(circuits, values, strict=True)
    ]
    registry = loaded_rows(loaded) | {"tasks": task_rows(task)}
    with Store(options.db, lock_wait=options.lock_wait) as store:
        store.save_cross_recovery(rows, registry)
    logger.info("cross-recovery at %s: %d circuits", ref.checkpoint_id, len(rows))
    return ref.checkpoint_id, "done"
