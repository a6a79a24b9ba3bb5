"""`workbench run seeds`: how much of a circuit survives a change of training seed.

Several training runs of one model that differ only in their seed (the zoo trains any seed) are
declared a seed group (table `seed_groups`). At each training step every member has, the edge
method runs on each member's checkpoint (cached where a done run has its key), and each member's
circuit is evaluated at every other member's checkpoint of that step, as cross-recovery
evaluates a circuit at another checkpoint of its own run (`workbench.crossrecovery`): stored in
`cross_recovery`. The view `seed_stability` then gives, per pair of members, task, method and
step, how much their circuits share (edges, nodes, and the edges' layer profile, which does not
change when the heads of a layer are numbered differently), the rank correlation of all their
edge scores, and each circuit's faithfulness on the other seed's model.

The circuits compared are the newest done run's at each step, as cross-recovery and the app
pick them.
"""

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from tqdm.auto import tqdm

from workbench.core import utc_now
from workbench.crossrecovery import evaluate_at, stored_circuits
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.jobs import RunOptions, RunOutcome, check_batching_and_metric, plan_jobs
from workbench.models import resolve_checkpoints
from workbench.models.base import CheckpointRef
from workbench.runner import run_planned
from workbench.store import Store

logger = logging.getLogger(__name__)

GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class SeedsResult:
    """What `run_seeds` did: the group, each edge run's outcome, and per member checkpoint
    whether the circuits were evaluated there (`done`) or had all been (`cached`)."""

    group_id: str
    outcomes: list[RunOutcome]
    evaluated: list[tuple[str, str]]


def default_group(model_ids: list[str]) -> str:
    """`seeds-` and 8 hex digits of the sorted members' ids."""
    return "seeds-" + sha256_json(sorted(model_ids))[:8]


def common_steps(members: dict[str, list[CheckpointRef]], which: str) -> list[int]:
    """The steps every member has a checkpoint at, chosen by `which` (all, latest or a step)
    as `--checkpoint` chooses; BadInput where there is none."""
    shared = set.intersection(*({r.step for r in refs} for refs in members.values()))
    if not shared:
        listed = "; ".join(
            f"{model}: {', '.join(str(r.step) for r in refs)}" for model, refs in members.items()
        )
        raise BadInput(f"no training step has a checkpoint in every model (steps: {listed})")
    steps = sorted(shared)
    if which == "all":
        return steps
    if which == "latest":
        return steps[-1:]
    if not which.isdigit() or int(which) not in shared:
        raise BadInput(
            f"--checkpoint {which}: choose all, latest or a step every model has "
            f"({', '.join(map(str, steps))})"
        )
    return [int(which)]


def run_seeds(
    models: list[str],
    options: RunOptions,
    *,
    method: str = "eap",
    group: str | None = None,
    **params: Any,
) -> SeedsResult:
    """Declare `models` (each a training run of one seed) a seed group, run `method` (an edge
    method, with `params`) on each at the steps `options.checkpoint` chooses among those every
    model has, and evaluate every member's circuit at every member's checkpoint of its step."""
    if len(models) < 2:
        raise BadInput("--model: give two or more training runs (one per seed)")
    if group is not None and not GROUP_NAME.match(group):
        raise BadInput(
            f"--group {group!r}: letters, digits, '.', '_' and '-', starting with a letter or "
            "digit, at most 64 characters"
        )
    check_batching_and_metric(options)
    members = {model: resolve_checkpoints(model) for model in models}
    ids = {model: refs[0].model_id for model, refs in members.items()}
    if len(set(ids.values())) < len(ids):
        twice = [m for m in models if list(ids.values()).count(ids[m]) > 1]
        raise BadInput(f"--model: {twice[0]} is the same training run as another --model")
    steps = set(common_steps(members, options.checkpoint))
    every = [replace(options, model=model, checkpoint="all") for model in models]
    jobs = [
        job
        for member in every
        for job in plan_jobs("edges", member, [method], params)
        if job.checkpoint.step in steps
    ]
    outcomes = run_planned(jobs, options)
    # the group is declared once its runs are made: bad input on the way stores no group
    group_id = group or default_group(list(ids.values()))
    with Store(options.db, lock_wait=options.lock_wait) as store:
        store.save_seed_group(
            [
                {"group_id": group_id, "model_id": ids[m], "source": m, "added_at": utc_now()}
                for m in models
            ]
        )
    for o in outcomes:
        if o.status == "failed":
            logger.warning("%s at %s failed: %s", method, o.checkpoint_id, o.error)
    ran = {o.checkpoint_id: o.run_id for o in outcomes if o.status != "failed" and o.run_id}
    evaluated = []
    for step in tqdm(sorted(steps), desc="seeds: steps", disable=len(steps) < 2):
        refs = [next(r for r in members[m] if r.step == step) for m in models]
        circuits = _circuits_at(refs, ran, options, method)
        if len(circuits) < 2:
            logger.warning("step %d: fewer than two members have a %s circuit", step, method)
            continue
        for ref in tqdm(refs, desc=f"seeds: step {step}", leave=False):
            evaluated.append(evaluate_at(ref, None, circuits, options))
    return SeedsResult(group_id, outcomes, evaluated)


def _circuits_at(
    refs: list[CheckpointRef], ran: dict[str, str], options: RunOptions, method: str
) -> list[dict]:
    """The newest done circuit of `method`, on the task of the run just made or found
    (`ran`: run_id by checkpoint), at each of `refs` that has one, with its edges."""
    found = []
    with Store(options.db, lock_wait=options.lock_wait) as store:
        for ref in refs:
            if ref.checkpoint_id not in ran:
                continue
            task_id = store.query(
                "SELECT task_id FROM runs WHERE run_id = ?", [ran[ref.checkpoint_id]]
            )["task_id"][0].as_py()
            found += stored_circuits(store, ref.model_id, task_id, method, ref.checkpoint_id)
    return found
