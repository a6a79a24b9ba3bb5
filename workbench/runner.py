"""Running jobs (`workbench.jobs`): `run` plans a pipeline's jobs and runs them, `run_jobs` runs
given jobs on the executor chosen, the local one (`workbench.executor_local`) or Ray
(`workbench.executor_ray`).

Either executor stores each run in its one transaction and leaves no queue row behind on any
way out: an exception, Ctrl-C, or SIGTERM (handled as Ctrl-C when nothing else handles it, as
`workbench watch` does).
"""

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from workbench.errors import BadInput
from workbench.executor_local import run_local
from workbench.jobs import Job, RunOptions, RunOutcome, plan_jobs

logger = logging.getLogger(__name__)


def run(
    pipeline: str,
    options: RunOptions,
    methods: Sequence[str] | None = None,
    **params: Any,
) -> list[RunOutcome]:
    """Plan and run a pipeline: the Python form of `workbench run PIPELINE ...`."""
    return run_planned(plan_jobs(pipeline, options, methods, params), options)


def run_planned(jobs: Iterable[Job], options: RunOptions) -> list[RunOutcome]:
    """Run planned jobs where and as `options` say (database, force, executor, lock wait)."""
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
        return run_local(
            jobs, db=db, force=force, hold=hold, should_stop=should_stop, lock_wait=lock_wait
        )


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt as Ctrl-C does: the run in progress
    is abandoned (its transaction never commits) and the executor's queue rows go. Only in the
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
