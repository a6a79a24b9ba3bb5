"""Where a run's time and memory go: named stages, each with its wall time and the process's
resident memory before it, at its peak and after it.

Off unless something records: `stage(name)` is then a no-op context. Inside `recording()`
every stage entered (in any module, nested or not) is collected, in the order the stages end,
and logged at debug level; `benchmarks/bench_stored_run.py` prints them beside the run's
bound. The peak comes from a thread sampling `/proc/self/statm` every few milliseconds (Linux;
elsewhere the process's lifetime peak, which is a bound rather than the stage's own).

    from workbench import profiling
    with profiling.recording() as stages:
        cli(["run", "edges", "--model", "my-gpt2", "--task", "induction"])
    logger.info("where the run went:\n%s", profiling.table(stages))
"""

import logging
import os
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_INTERVAL = 0.004


@dataclass(frozen=True)
class Stage:
    name: str
    depth: int  # stages open around it
    seconds: float
    rss_before: int  # bytes
    rss_peak: int
    rss_after: int


def rss() -> int:
    """The process's resident memory now, in bytes (its peak so far where /proc is absent)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return peak_rss()


def peak_rss() -> int:
    """The process's largest resident memory so far, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Recorder:
    def __init__(self) -> None:
        self.stages: list[Stage] = []
        self.open: list[list[int]] = []  # per open stage: [its peak so far]
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, name="profiling", daemon=True)

    def _sample(self) -> None:
        while not self.done.wait(_INTERVAL):
            now = rss()
            with self.lock:
                for peak in self.open:
                    peak[0] = max(peak[0], now)


_recorders: list[_Recorder] = []


@contextmanager
def recording() -> Iterator[list[Stage]]:
    """Collect every stage that ends inside the block into the yielded list."""
    recorder = _Recorder()
    recorder.thread.start()
    _recorders.append(recorder)
    try:
        yield recorder.stages
    finally:
        _recorders.remove(recorder)
        recorder.done.set()
        recorder.thread.join()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block and its resident memory, for every `recording()` around it."""
    if not _recorders:
        yield
        return
    before = rss()
    peaks = [[before] for _ in _recorders]
    depths = []
    for recorder, peak in zip(_recorders, peaks, strict=True):
        with recorder.lock:
            depths.append(len(recorder.open))
            recorder.open.append(peak)
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        after = rss()
        for recorder, peak, depth in zip(_recorders, peaks, depths, strict=True):
            with recorder.lock:
                # by identity: two open stages' peaks may be equal lists
                del recorder.open[next(i for i, p in enumerate(recorder.open) if p is peak)]
                recorder.stages.append(
                    Stage(name, depth, seconds, before, max(peak[0], after), after)
                )
        logger.debug(
            "%s: %.2f s, resident memory %.2f GB before, %.2f GB at its peak, %.2f GB after",
            name, seconds, before / 1e9, max(p[0] for p in peaks) / 1e9, after / 1e9,
        )  # fmt: skip


def table(stages: list[Stage]) -> str:
    """The stages as a text table, nested stages indented under the stage that holds them."""
    rows = [f"{'stage':<34} {'s':>8} {'GB before':>10} {'GB peak':>9} {'GB after':>9}"]
    for s in _in_start_order(stages):
        name = "  " * s.depth + s.name
        rows.append(
            f"{name:<34} {s.seconds:>8.2f} {s.rss_before / 1e9:>10.2f} "
            f"{s.rss_peak / 1e9:>9.2f} {s.rss_after / 1e9:>9.2f}"
        )
    return "\n".join(rows)


def _in_start_order(stages: list[Stage]) -> list[Stage]:
    """Stages are recorded as they end (inner before outer): list each before those it holds."""
    out: list[Stage] = []
    pending: list[tuple[int, list[Stage]]] = []  # (depth, a stage and its nested ones, in order)
    for s in stages:
        first_held = len(pending)  # a stage's nested stages ended just before it
        while first_held and pending[first_held - 1][0] > s.depth:
            first_held -= 1
        subtree = [s] + [t for _, held in pending[first_held:] for t in held]
        del pending[first_held:]
        if s.depth == 0:
            out += subtree
        else:
            pending.append((s.depth, subtree))
    return out + [t for _, held in pending for t in held]
