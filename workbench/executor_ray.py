"""The Ray executor (`--executor ray [--address ADDR]`): jobs computed on a Ray cluster.

What runs where:

* The driver (the `workbench run` or `workbench watch` process) plans the jobs, keeps the run
  queue and is the only writer: it stores what the workers return, one run transaction at a
  time, exactly as the local executor stores what it computes (`workbench.compute`).
* A worker task takes one job (checkpoint x task x method). It loads the checkpoint (and keeps it
  loaded for its next job on the same one), plans and computes the job's runs, and returns them:
  each run's record, the rows it refers to and its result (the table parts as Arrow tables).
  Files a run made (a trained SAE) travel back as bytes, so a worker needs no storage shared with
  the driver: only the checkpoints at the same paths, and the workbench installed.
* What the planner reads from the store (runs stored already, the newest SAEs) goes to the
  worker as a snapshot taken when the job is sent. A method that reads another's results
  (`Method.after`: `sae_attr` after `sae_features`) is sent only once those are stored, and
  those are sent first.
* A job asks Ray for one CPU, and for one GPU when its `--device` is `cuda`/`cuda:N`, or `auto`
  on a cluster that has GPUs: GPU workers take the GPU jobs.
* A worker that dies mid-job (killed, out of memory, its node lost) has the job retried by Ray,
  up to `MAX_RETRIES` times; since only the driver writes, a retried job stores its runs once. A
  method that raises is a failed run, stored as such with its error.

Joining a cluster (`--address HOST:PORT`) is bounded: before Ray is asked, the address must
accept a connection and answer an HTTP/2 connection preface the way a gRPC server (Ray's GCS, or
the Ray Client server of `ray://`) does, with a SETTINGS frame, within
`WORKBENCH_RAY_CONNECT_SECONDS` (default 10); then Ray gets one attempt (unless
`RAY_gcs_server_port_wait_time_s` says otherwise) of at most that many seconds
(`RAY_py_gcs_connect_timeout_s`, where Ray is not yet loaded) to fetch the cluster's id. Anything
else listening there (a web server, a database, a port that says nothing) is one sentence, exit 2,
instead of Ray's minutes of retries. With `RAY_USE_TLS` set the preface is not sent (the port
speaks TLS first) and only the connection is checked.
"""

import io
import logging
import os
import shutil
import socket
import tarfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import registry
from workbench.compute import JobComputed, compute_job, ingest, queue_row
from workbench.errors import BadInput
from workbench.jobs import Job, RunOutcome, Stopped
from workbench.models.base import LoadedModel
from workbench.store import default_db_path
from workbench.store.session import HEARTBEAT_SECONDS, StoreSession
from workbench.token_text import decode_pending_of

logger = logging.getLogger(__name__)

MAX_RETRIES = 3  # Ray re-runs a job whose worker died this many times before it counts as failed
POLL_SECONDS = 0.5  # how often the driver checks for finished jobs (and for a stop request)
CONNECT_SECONDS = 10.0  # bound on joining a cluster at --address (seconds); overridden by:
CONNECT_SECONDS_ENV = "WORKBENCH_RAY_CONNECT_SECONDS"
# what an HTTP/2 client sends first (RFC 9113, 3.4): the preface and an empty SETTINGS frame
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
H2_SETTINGS = 4  # the frame type a server's first frame has


@dataclass
class Snapshot:
    """The store's reads a worker's planner makes, taken when the job is sent."""

    saes: list[tuple[str, str]]
    done: dict[str, str]  # run key -> run id of the checkpoint's stored runs

    def latest_saes(self, checkpoint_id: str) -> list[tuple[str, str]]:
        return list(self.saes)

    def done_run(self, run_key: str) -> str | None:
        return self.done.get(run_key)

    @classmethod
    def read(cls, session: StoreSession, checkpoint_id: str) -> "Snapshot":
        with session.store() as store:
            done = store.query(
                "SELECT run_key, run_id FROM runs WHERE checkpoint_id = ? AND status = 'done'",
                [checkpoint_id],
            ).to_pylist()
            saes = store.latest_saes(checkpoint_id)
        return cls(saes, {r["run_key"]: r["run_id"] for r in done})


@dataclass
class WorkerReply:
    """A job's result as it comes back: computed runs (with their files packed), or the
    sentence of a bad input."""

    computed: JobComputed | None = None
    bad_input: str | None = None
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # run id -> final -> tar


# --- on a worker ------------------------------------------------------------------------------
_LOADED: dict[tuple[Any, ...], LoadedModel] = {}  # the worker's current checkpoint


def _load(job: Job) -> LoadedModel:
    from workbench.models import load_checkpoint

    where = (job.checkpoint, job.device, job.dtype)
    if where not in _LOADED:
        _LOADED.clear()
        _LOADED[where] = load_checkpoint(job.checkpoint, device=job.device, dtype=job.dtype)
    return _LOADED[where]


def work(job_json: str, snapshot: Snapshot, db: str, force: bool) -> WorkerReply:
    """A Ray task: compute one job (given as JSON) and return it; nothing is written."""
    job = Job.from_json(job_json)
    try:
        computed = compute_job(job, _load(job), snapshot, db=db, force=force)
    except BadInput as err:
        return WorkerReply(bad_input=str(err))
    reply = WorkerReply(computed)
    for c in computed.runs:
        if c.result is not None and c.result.files:
            reply.files[c.run.run_id] = {
                final: _pack(Path(staged)) for staged, final in c.result.files.items()
            }
            c.result.files = {}
    return reply


def _pack(path: Path) -> bytes:
    """A staged file or directory as a tar archive (its one top entry named `run`); the staged
    copy goes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname="run")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return buf.getvalue()


def _unpack(data: bytes, final: str) -> str:
    """Unpack a run's file or directory beside its final place (the store moves it there when
    the run commits); returns the staged path."""
    target = Path(final)
    holder = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    holder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(holder, filter="data")
    return str(holder / "run")


# --- on the driver ----------------------------------------------------------------------------
def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput(
            "--executor ray needs Ray: pip install 'circuit-workbench[ray]' (or '.[ray]')"
        ) from None
    return ray


def connect(address: str | None) -> Any:
    """Ray, connected: to the cluster at `address`, to the instance this process already
    joined, or to a new local instance. Joining `address` gives up after a bounded time."""
    if address and address != "auto":
        seconds = connect_seconds()
        _reachable(address, timeout=seconds)
        # one bounded attempt at the cluster's id instead of Ray's 20 of 30 s each (these are
        # read when Ray loads; a value set in the environment wins)
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(max(1, round(seconds))))
        # a cluster started with `ray start` asks for its token (Ray >= 2.5x); given an
        # address, Ray's client sends it only when told (before Ray is imported) that the
        # cluster uses tokens
        if "RAY_AUTH_MODE" not in os.environ and (
            "RAY_AUTH_TOKEN" in os.environ or (Path.home() / ".ray" / "auth_token").is_file()
        ):
            os.environ["RAY_AUTH_MODE"] = "token"
    ray = _ray()
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise BadInput(f"--address {address}: cannot join a Ray cluster there ({err})") from None
    logger.info("Ray: %s", ray.cluster_resources())
    return ray


def connect_seconds() -> float:
    """The bound on joining a cluster: `$WORKBENCH_RAY_CONNECT_SECONDS`, else 10 s."""
    value = os.environ.get(CONNECT_SECONDS_ENV, "").strip()
    if not value:
        return CONNECT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise BadInput(f"{CONNECT_SECONDS_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def _reachable(address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Fail fast, as BadInput, on an address nothing listens at, or where what listens does not
    answer as a gRPC server does (Ray itself would keep trying for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in {"0", "false", ""}:
                reply = _h2_reply(sock, time.monotonic() + timeout)
                if not _is_settings(reply):
                    raise BadInput(f"--address {address}: {_not_ray(reply, timeout)}")
    except OSError as err:
        raise BadInput(f"--address {address}: no Ray cluster answers there ({err})") from None


def _h2_reply(sock: socket.socket, deadline: float) -> bytes:
    """The first 9 bytes (a frame header) of the answer to the HTTP/2 preface, or fewer: what
    came before the peer closed the connection or the deadline passed."""
    sock.sendall(H2_PREFACE)
    reply = b""
    while len(reply) < 9 and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(9 - len(reply))
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        reply += chunk
    return reply


def _is_settings(header: bytes) -> bool:
    """Whether `header` is that of a SETTINGS frame on stream 0."""
    return len(header) == 9 and header[3] == H2_SETTINGS and header[5:9] == b"\0\0\0\0"


def _not_ray(reply: bytes, timeout: float) -> str:
    if not reply:
        return (
            "something listens there but is not a Ray cluster (it sent nothing back within "
            f"{timeout:g} s, or closed the connection; {CONNECT_SECONDS_ENV} sets how long to "
            "wait)"
        )
    shown = reply.decode("ascii", "replace")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return f"something listens there but is not a Ray cluster (it answered {shown!r}...)"


def _gpus(job: Job, resources: dict[str, float]) -> float:
    if job.device.startswith("cuda"):
        return 1.0
    return 1.0 if job.device == "auto" and resources.get("GPU", 0) > 0 else 0.0


def _waits_for(job: Job, others: list[Job]) -> bool:
    """Whether a job must wait for one of `others` (a method whose results it reads)."""
    after = registry.method(job.pipeline, job.method).after
    return bool(after) and any(
        o.method in after
        and o.pipeline == job.pipeline
        and o.checkpoint == job.checkpoint
        and o.task == job.task
        for o in others
    )


def run_jobs_ray(
    jobs: list[Job],
    *,
    db: str | None,
    force: bool,
    address: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    lock_wait: float | None = None,
) -> list[RunOutcome]:
    """Compute `jobs` on Ray and store them here as they come back (in any order), each write
    waiting up to `lock_wait` seconds for the database lock (`run_lock_wait`)."""
    ray = connect(address)
    # workers log (Ray forwards their lines here) but draw no progress bars of their own
    remote = ray.remote(
        num_cpus=1, max_retries=MAX_RETRIES, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}}
    )(work)
    resources = ray.cluster_resources()
    slots = max(1, int(resources.get("CPU", 1)))  # jobs in flight: the queue shows them running
    db_path = str(default_db_path(db).resolve())
    # jobs that others wait for go first: they are on the critical path
    awaited = [j for j in jobs if any(_waits_for(o, [j]) for o in jobs)]
    pending = awaited + [j for j in jobs if j not in awaited]
    in_flight: dict[Any, Job] = {}
    outcomes: list[RunOutcome] = []
    with StoreSession(db_path, lock_wait=lock_wait) as session:
        with session.held():
            decode_pending_of(session)
            session.enqueue([queue_row(j) for j in jobs])
        beat = time.monotonic()
        try:
            while pending or in_flight:
                if should_stop is not None and should_stop():
                    raise Stopped(outcomes)
                for job in list(pending):
                    if len(in_flight) >= slots:
                        break
                    if _waits_for(job, [*pending, *in_flight.values()]):
                        continue
                    snapshot = Snapshot.read(session, job.checkpoint.checkpoint_id)
                    ref = remote.options(
                        num_gpus=_gpus(job, resources),
                        name=f"workbench {job.method} {job.checkpoint.checkpoint_id}",
                    ).remote(job.to_json(), snapshot, db_path, force)
                    session.running(job.job_id)
                    in_flight[ref] = job
                    pending.remove(job)
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    outcomes += _receive(ray, session, in_flight.pop(ref), ref, force)
                if time.monotonic() - beat > HEARTBEAT_SECONDS:
                    session.beat([j.job_id for j in in_flight.values()])
                    beat = time.monotonic()
        except BaseException:  # stopped, bad input, interrupted: abandon what is in flight
            for ref in in_flight:
                ray.cancel(ref, force=True)
            raise
        finally:
            session.clear([j.job_id for j in jobs])
    return outcomes


def _receive(ray: Any, session: StoreSession, job: Job, ref: Any, force: bool) -> list[RunOutcome]:
    try:
        reply: WorkerReply = ray.get(ref)
    except ray.exceptions.RayError as err:  # the worker died MAX_RETRIES + 1 times
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        logger.error("%s %s on %s failed: %s", job.pipeline, job.method, job.checkpoint, error)
        session.finish(job.job_id)
        return [RunOutcome(job.checkpoint.checkpoint_id, job.method, "failed", None, error)]
    if reply.bad_input is not None:
        raise BadInput(reply.bad_input)
    assert reply.computed is not None
    for c in reply.computed.runs:
        packed = reply.files.get(c.run.run_id, {})
        if c.result is not None and packed:
            c.result.files = {_unpack(data, final): final for final, data in packed.items()}
    try:
        return ingest(session, reply.computed, force)
    finally:  # what is left staged (a run stored meanwhile, a failed write) goes
        for c in reply.computed.runs:
            for staged in c.result.files if c.result is not None else {}:
                shutil.rmtree(Path(staged).parent, ignore_errors=True)
