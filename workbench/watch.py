"""`workbench watch DIR --config FILE`: analyse every checkpoint a training run writes.

A scan walks DIR for checkpoint directories (zoo `step_N/`, Hugging Face Trainer
`checkpoint-N/`, plain Hugging Face directories, at any depth: nested runs), registers each one
only once it is complete, and runs the configured jobs on it that are not stored yet.

* Complete means: its files stopped changing (none modified for `settle` seconds) and its
  weights open (each safetensors file is as long as its header says; a `.bin` is a readable
  zip). A half-written checkpoint is skipped and looked at again on the next scan; it never
  produces a failed run.
* What a scan has seen is kept in `watched_checkpoints`, keyed by path, with a fingerprint of
  the directory's files (names, sizes, modification times): a rescan of processed checkpoints
  costs one `stat` per file and one query. A checkpoint that fails (it cannot be loaded: a
  corrupt one) is recorded as failed runs with the error, and not retried until its files
  change (or `--retry-failed`).
* No checkpoint stops the watcher: a safetensors header that is not one (checked for its
  structure, `zoo_format.check_safetensors`), a broken config.json or meta.json, an unreadable
  file, a model that does not load, and any error nobody anticipated (its traceback in the
  debug log) are that checkpoint's failed runs, one sentence naming the file; the scan goes on.
  Only SIGTERM/SIGINT, or a database another process holds, end a scan early.
* One watcher per database: a lock file beside it (`<db>.watch.lock`) names the holder.
* SIGTERM / SIGINT: the run in progress finishes (a second signal abandons it; either way no
  partial rows: a run's rows are one transaction) and the watcher exits.
"""

import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from workbench import registry
from workbench.core import utc_now
from workbench.errors import BadInput
from workbench.hashing import sha256_json
from workbench.jobs import Job, RunOptions, RunOutcome, Stopped, check_applies, run_key
from workbench.models import zoo_format
from workbench.models.base import CheckpointRef
from workbench.rows import RunRow
from workbench.runner import run_jobs
from workbench.store import DatabaseBusy, Store, default_db_path
from workbench.store.db import run_lock_wait

logger = logging.getLogger(__name__)

RUN_OPTIONS = ("n_prompts", "max_batch", "batch_tokens", "device", "dtype", "metric")
JOB_KEYS = {"pipeline", "task", "methods", *RUN_OPTIONS}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class JobSpec:
    """One `[[job]]` of the config: a pipeline's methods on a task, with their options."""

    pipeline: str
    task: str
    methods: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    def jobs(self, ref: CheckpointRef) -> list[Job]:
        p = registry.pipeline(self.pipeline)
        opts = RunOptions(model=ref.location, task=self.task, **self.options)
        return [Job.make(p.method(m), ref, opts, self.params) for m in self.methods]


@dataclass(frozen=True)
class CatalogueSpec:
    """The config's `[catalogue]` table: the head catalogue (`workbench run catalogue`) of each
    checkpoint, with its options."""

    sequences: int = 16
    length: int | None = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    needle_context: int | None = None
    relations: str | None = None  # a JSONL file of relations (`workbench.catalogue.maps`)


CATALOGUE_KEYS = {f.name for f in dataclasses.fields(CatalogueSpec)}


@dataclass(frozen=True)
class WatchConfig:
    db: str | None
    jobs: tuple[JobSpec, ...]
    settle: float = 2.0  # seconds a checkpoint's files must stay unchanged
    catalogue: CatalogueSpec | None = None


def read_config(path: Path) -> WatchConfig:
    """The watch config (TOML); every error names the file and the field."""
    if not path.is_file():
        raise BadInput(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise BadInput(f"{path}: not valid TOML ({err})") from err
    unknown = set(data) - {"db", "job", "settle_seconds", "catalogue"}
    if unknown:
        raise BadInput(
            f"{path}: unknown field {sorted(unknown)[0]!r} "
            "(db, settle_seconds, [[job]], [catalogue])"
        )
    db = data.get("db")
    if db is not None and not isinstance(db, str):
        raise BadInput(f"{path}: field 'db' must be a path")
    settle = data.get("settle_seconds", 2.0)
    if not isinstance(settle, int | float) or settle < 0:
        raise BadInput(f"{path}: field 'settle_seconds' must be a number >= 0")
    catalogue = _catalogue_spec(path, data["catalogue"]) if "catalogue" in data else None
    entries = data.get("job", [])
    if not isinstance(entries, list) or not (entries or catalogue):
        raise BadInput(
            f"{path}: no [[job]] tables (each names a pipeline and a task) and no [catalogue]"
        )
    jobs = tuple(_job_spec(path, i, e) for i, e in enumerate(entries))
    return WatchConfig(db, jobs, settle, catalogue)


def _catalogue_spec(path: Path, entry: Any) -> CatalogueSpec:
    from workbench.catalogue.maps import read_relations
    from workbench.catalogue.run import option_problem

    where = f"{path}: [catalogue]"
    if not isinstance(entry, dict):
        raise BadInput(f"{where}: must be a table")
    unknown = set(entry) - CATALOGUE_KEYS
    if unknown:
        raise BadInput(
            f"{where}: unknown field {sorted(unknown)[0]!r} ({', '.join(sorted(CATALOGUE_KEYS))})"
        )
    for name in ("sequences", "length", "seed", "needle_context"):
        if name in entry and (type(entry[name]) is not int):
            raise BadInput(f"{where}: field {name!r} must be an integer")
    for name in ("device", "dtype", "relations"):
        if name in entry and not isinstance(entry[name], str):
            raise BadInput(f"{where}: field {name!r} must be a string")
    spec = CatalogueSpec(**entry)
    problem = option_problem(spec.sequences, spec.length, spec.seed, spec.needle_context)
    if problem is not None:
        raise BadInput(f"{where}: field {problem[0].replace('-', '_')!r} {problem[2]}")
    if spec.relations is not None:
        read_relations(spec.relations)  # a bad file is the config's error, found now
    return spec


def _job_spec(path: Path, index: int, entry: dict[str, Any]) -> JobSpec:
    where = f"{path}: job[{index}]"
    for name in ("pipeline", "task"):
        if not isinstance(entry.get(name), str):
            raise BadInput(f"{where}: field {name!r} is missing or not a string")
    try:
        p = registry.pipeline(entry["pipeline"])
        methods = entry.get("methods", list(p.default_methods))
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise BadInput("field 'methods' must be a list of method names")
        chosen = [p.method(m) for m in methods]
        params = {k: v for k, v in entry.items() if k not in JOB_KEYS}
        check_applies(p.name, chosen, params)
        for m in chosen:
            m.check(m.make_params(params))
        options = {k: entry[k] for k in RUN_OPTIONS if k in entry}
        RunOptions(model="", task="", **options)
    except BadInput as err:
        raise BadInput(f"{where}: {err}") from err
    except TypeError as err:
        raise BadInput(f"{where}: {err}") from err
    return JobSpec(p.name, entry["task"], tuple(methods), params, options)


# --- discovery ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A directory that looks like a checkpoint, and the run directory it belongs to."""

    path: Path
    run_dir: Path
    step: int | None


def discover(root: Path) -> list[Candidate]:
    """Every checkpoint directory under `root` (any depth, hidden directories skipped)."""
    from workbench.models.sources import STEP_DIR, TRAINER_DIR

    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "config.json" not in files:
            continue
        path = Path(here)
        match = STEP_DIR.match(path.name) or TRAINER_DIR.match(path.name)
        if match:
            found.append(Candidate(path, path.parent, int(match.group(1))))
        elif any(f.endswith(WEIGHT_SUFFIXES) for f in files) or "meta.json" in files:
            found.append(Candidate(path, path, None))
    return sorted(found, key=lambda c: (str(c.run_dir), c.step or 0, str(c.path)))


def fingerprint(path: Path) -> tuple[str, float]:
    """(hash of the directory's file names, sizes and modification times; the newest mtime)."""
    entries = []
    newest = 0.0
    for child in sorted(path.iterdir()):
        if child.is_file():
            st = child.stat()
            entries.append((child.name, st.st_size, st.st_mtime_ns))
            newest = max(newest, st.st_mtime)
    return sha256_json(entries), newest


def weights_incomplete(path: Path) -> str | None:
    """Why the directory's weights are not (yet) whole, or None if every file is. Weights that
    are whole but can never load (a safetensors header that is not one) are a `BadInput`
    naming the file."""
    try:
        weights = [p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    except FileNotFoundError:
        return "the directory was removed"
    except OSError as err:
        raise BadInput(f"{path}: cannot list the directory ({err.strerror or err})") from err
    if not weights:
        return "no weights file yet"
    for file in sorted(weights):
        if file.suffix == ".bin":
            if not zipfile.is_zipfile(file):
                return f"{file.name} is not a complete archive yet"
            continue
        try:
            why = zoo_format.check_safetensors(file)
        except BadInput:
            if not file.exists():  # removed while we looked: the directory is changing
                return f"{file.name} was removed"
            raise
        if why:
            return f"{file.name} {why}"
    return None


# --- the watcher --------------------------------------------------------------------------


@dataclass
class ScanReport:
    seen: int = 0
    processed: int = 0
    skipped_incomplete: int = 0
    failed: int = 0
    outcomes: list[RunOutcome] = field(default_factory=list)


class Stop:
    """Set by SIGTERM/SIGINT: finish the run in progress, then stop; a second signal abandons
    the run (a KeyboardInterrupt: its transaction never commits)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        logger.info("signal %d: stopping after the run in progress", signum)
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()


class Watcher:
    def __init__(
        self,
        root: Path,
        config: WatchConfig,
        *,
        db: str | None = None,
        retry_failed: bool = False,
        stop: Stop | None = None,
        executor: str = "local",
        address: str | None = None,
        lock_wait: float | None = None,
    ):
        if not root.is_dir():
            raise BadInput(f"{root}: no such directory to watch")
        self.root = root
        self.config = config
        self.db = str(default_db_path(db or config.db))
        self.retry_failed = retry_failed
        self.stop = stop or Stop()
        if executor not in ("local", "ray"):
            raise BadInput(f"--executor {executor}: choose local or ray")
        if address is not None and executor != "ray":
            raise BadInput("--address applies to --executor ray")
        self.executor, self.address = executor, address
        # every write waits this long for another process's lock (a long console query, a
        # second runner); still busy, the scan stops and the next one tries again
        self.lock_wait = run_lock_wait(lock_wait)

    def known(self) -> dict[str, tuple[str, str]]:
        with Store(self.db, lock_wait=self.lock_wait, purpose="read its checkpoints") as store:
            rows = store.query("SELECT path, fingerprint, status FROM watched_checkpoints")
        return {r["path"]: (r["fingerprint"], r["status"]) for r in rows.to_pylist()}

    def scan(self) -> ScanReport:
        """One pass: register and process every new or changed complete checkpoint. A
        checkpoint that fails in any way is recorded as failed and the pass goes on; only a
        stop request (SIGTERM/SIGINT) or a busy database ends it early."""
        report = ScanReport()
        try:
            known = self.known()
        except DatabaseBusy as err:
            logger.warning("%s; trying again on the next scan", err)
            return report
        for cand in discover(self.root):
            if self.stop.requested:
                break
            report.seen += 1
            try:
                self._visit(cand, known, report)
            except Stopped as stopped:  # not finished: the next watcher resumes it
                report.outcomes += stopped.outcomes
                break
            except DatabaseBusy as err:  # not the checkpoint's fault: the next scan retries
                logger.warning("%s; trying again on the next scan", err)
                break
        return report

    def _visit(
        self, cand: Candidate, known: dict[str, tuple[str, str]], report: ScanReport
    ) -> None:
        """Process one candidate if it is new or changed, complete, and not failed before."""
        key = str(cand.path.resolve())
        try:
            print_, newest = fingerprint(cand.path)
        except FileNotFoundError:  # removed since discovered (a trainer rotating checkpoints)
            logger.debug("%s: changed while scanning; looking again next scan", cand.path)
            return
        except OSError as err:  # unreadable: failed, until the error (its fingerprint) changes
            unreadable = f"{err.filename or cand.path}: cannot read ({err.strerror or err})"
            print_ = sha256_json(["unreadable", unreadable])
            if not self._unchanged(known.get(key), print_):
                self._failed(cand, key, print_, unreadable, report)
            return
        if self._unchanged(known.get(key), print_):
            return
        if time.time() - newest < self.config.settle:
            report.skipped_incomplete += 1
            return
        try:
            why = weights_incomplete(cand.path)
        except BadInput as err:  # whole but not loadable: corrupt weights
            self._failed(cand, key, print_, str(err), report)
            return
        except Exception as err:  # a surprise: this checkpoint fails, the others go on
            self._failed(cand, key, print_, _unexpected(cand, err), report)
            return
        if why:
            logger.debug("%s: not complete (%s)", cand.path, why)
            report.skipped_incomplete += 1
            return
        outcomes, error = self.process(cand, print_)
        self._count(report, outcomes, error)
        self._record(key, print_, outcomes, error)

    def _unchanged(self, before: tuple[str, str] | None, print_: str) -> bool:
        """Seen with these files before, and done (or failed, without --retry-failed)."""
        if before is None or before[0] != print_:
            return False
        return before[1] == "done" or not self.retry_failed

    def _failed(
        self, cand: Candidate, key: str, print_: str, error: str, report: ScanReport
    ) -> None:
        outcomes = self._failed_checkpoint(cand, print_, error)
        self._count(report, outcomes, error)
        self._record(key, print_, outcomes, error)

    @staticmethod
    def _count(report: ScanReport, outcomes: list[RunOutcome], error: str | None) -> None:
        report.processed += 1
        report.outcomes += outcomes
        report.failed += error is not None or any(o.status == "failed" for o in outcomes)

    def process(self, cand: Candidate, print_: str) -> tuple[list[RunOutcome], str | None]:
        """Run the config's jobs on one checkpoint: (its runs, None), or (one failed run per
        configured method, the error) when it cannot be used. Any exception but a stop or a
        busy database fails this checkpoint alone: the watcher goes on to the next."""
        from workbench.models.sources import _single_dir_ref

        ref = None
        try:
            ref = _single_dir_ref(cand.path, cand.run_dir, cand.step)
            jobs = [job for spec in self.config.jobs for job in spec.jobs(ref)]
            logger.info("%s: %d jobs", ref.checkpoint_id, len(jobs))
            outcomes = run_jobs(
                jobs,
                db=self.db,
                should_stop=lambda: self.stop.requested,
                executor=self.executor,
                address=self.address,
                lock_wait=self.lock_wait,
            )
            if self.config.catalogue is not None:
                if self.stop.requested:
                    raise Stopped(outcomes)
                outcomes.append(self._catalogue(ref, self.config.catalogue))
        except (Stopped, DatabaseBusy):
            raise
        except BadInput as err:  # the checkpoint (or a task on it) cannot be used
            error = str(err)
        except Exception as err:  # anything else: this checkpoint fails, the others go on
            error = _unexpected(cand, err)
        else:
            return outcomes, None  # (the runner logged one line per run)
        return self._failed_checkpoint(cand, print_, error, ref), error

    def _catalogue(self, ref: CheckpointRef, spec: CatalogueSpec) -> RunOutcome:
        """The checkpoint's head catalogue, stored unless it is already: an outcome with method
        `catalogue` and the catalogue's id, `failed` with the reason if it cannot be made."""
        from workbench.catalogue.maps import read_relations
        from workbench.catalogue.run import store_catalogue
        from workbench.models import load_checkpoint

        try:
            loaded = load_checkpoint(ref, device=spec.device, dtype=spec.dtype)
            relations = read_relations(spec.relations) if spec.relations is not None else []
            cid, status = store_catalogue(
                loaded, spec.sequences, spec.length, spec.seed, spec.dtype, self.db, False,
                lock_wait=self.lock_wait, needle_context=spec.needle_context,
                relations=relations,
            )  # fmt: skip
        except DatabaseBusy:
            raise  # not the checkpoint's fault: the next scan tries again
        except BadInput as err:
            error = f"catalogue: {err}"
        except Exception as err:  # a surprise: the catalogue fails, the jobs' runs stand
            logger.debug("%s: unexpected error in the catalogue", ref.checkpoint_id, exc_info=True)
            error = f"catalogue: {type(err).__name__} while computing it ({err})"
        else:
            logger.info("%s: catalogue %s %s", ref.checkpoint_id, cid, status)
            return RunOutcome(
                ref.checkpoint_id, "catalogue", "skipped" if status == "cached" else "done", cid
            )
        logger.error("%s: %s", ref.checkpoint_id, error)
        return RunOutcome(ref.checkpoint_id, "catalogue", "failed", None, error)

    def _failed_checkpoint(
        self, cand: Candidate, print_: str, error: str, ref: CheckpointRef | None = None
    ) -> list[RunOutcome]:
        """A checkpoint that cannot be loaded: one failed run per configured method."""
        from workbench.models.sources import model_id_for

        checkpoint_id = (
            ref.checkpoint_id if ref else f"{model_id_for(cand.run_dir)}@{cand.step or 0}"
        )
        logger.error("%s: %s", cand.path, error)
        outcomes = []
        with Store(self.db, lock_wait=self.lock_wait, purpose="record a failed run") as store:
            for spec in self.config.jobs:
                for method in spec.methods:
                    key = run_key(
                        spec.pipeline, method, print_, spec.task, {"path": str(cand.path)}
                    )
                    run = RunRow(
                        key, spec.pipeline, method, checkpoint_id, spec.task,
                        {"path": str(cand.path.resolve())}, started_at=utc_now(), error=error,
                    )  # fmt: skip
                    run_id = store.record_failed_run(run, registry={})
                    outcomes.append(RunOutcome(checkpoint_id, method, "failed", run_id, error))
        return outcomes

    def _record(
        self, path: str, print_: str, outcomes: list[RunOutcome], error: str | None
    ) -> None:
        failed = [o for o in outcomes if o.status == "failed"]
        status = "failed" if error or failed else "done"
        message = error or (failed[0].error if failed else None)
        checkpoint_id = outcomes[0].checkpoint_id if outcomes else None
        with Store(self.db, lock_wait=self.lock_wait, purpose="record a checkpoint") as store:
            store.con.execute("DELETE FROM watched_checkpoints WHERE path = ?", [path])
            store.con.execute(
                "INSERT INTO watched_checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                [path, print_, checkpoint_id, status, message, utc_now()],
            )

    def run(self, *, every: float, once: bool) -> int:
        """Scan until stopped (or once); exit status 0, or 1 if a run failed (with `once`)."""
        failed = 0
        while True:
            started = time.monotonic()
            report = self.scan()
            failed += report.failed
            quiet = not (report.processed or report.skipped_incomplete or report.failed)
            logger.log(
                logging.DEBUG if quiet else logging.INFO,
                "scan of %s: %d checkpoints, %d processed, %d not complete yet, %d failed "
                "(%.2f s)",
                self.root, report.seen, report.processed, report.skipped_incomplete,
                report.failed, time.monotonic() - started,
            )  # fmt: skip
            if once or self.stop.requested:
                break
            self.stop.event.wait(every)
            if self.stop.requested:
                break
        return 1 if once and failed else 0


def _unexpected(cand: Candidate, err: Exception) -> str:
    """The sentence recorded for an error nobody anticipated (its traceback at debug)."""
    logger.debug("%s: unexpected error", cand.path, exc_info=True)
    return f"{cand.path}: {type(err).__name__} while processing this checkpoint ({err})"


@contextmanager
def watch_lock(db: str) -> Iterator[None]:
    """One watcher per database: an exclusive lock on `<db>.watch.lock`, which names its
    holder; a second watcher gets one sentence naming it."""
    path = Path(f"{db}.watch.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = path.open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except ValueError:
            holder = {}
        fh.close()
        raise BadInput(
            f"{db}: another watcher is running on this database (pid {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}, since {holder.get('since', '?')})"
        ) from None
    fh.seek(0)
    fh.truncate()
    since = datetime.now(UTC).isoformat(timespec="seconds")
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
    fh.flush()
    try:
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@contextmanager
def signals_stop(stop: Stop) -> Iterator[None]:
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
