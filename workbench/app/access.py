"""What the app may do on behalf of whoever uses it: write, start processes, read task files,
and how it shows what people typed.

The policy comes from the server's environment (`workbench app` sets it from its options):

* `WORKBENCH_APP_READ_ONLY` (`1` or `true`; unset, `0` or `false` for off): nothing is saved
  and no process is started; the controls that would are replaced by a caption saying why.
* `WORKBENCH_APP_MAX_PROCESSES` (default 2): processes the app runs at once, across every
  session of the server; one more is refused with a sentence and nothing starts.
* `WORKBENCH_APP_PROCESS_TIMEOUT` (seconds, default 600): a process still running after it is
  stopped (terminated, killed after a short grace) and the page says so.
* `WORKBENCH_APP_TASK_DIRS` (directories separated by `os.pathsep`; default none): where task
  files may be read from. A task is a built-in task's name or a file whose real path (symlinks
  resolved) lies inside one of them; nothing else reaches a process.

A value that cannot be read is one sentence on the page, and the app then does the safe thing:
a bad read-only flag keeps it read-only, a bad process limit or timeout starts nothing, bad task
directories allow no task file.

Every write and every process goes through `require_writable` (the one place that says why
not); processes go through `launch`, which also holds the server-wide bound (`launcher`, one per
server) and the timeout. A child's stdout and stderr are drained by threads of their own as it
writes (their last `OUTPUT_KEPT` bytes are kept), so a child writing without end never blocks.

Text people typed (names, labels, notes, link values, a child's error) is shown through
`literal` (an inline code span: nothing inside is Markdown) or `plain` (Markdown's markup
escaped and bare addresses broken, so no link, image, colour or formula comes of it).
"""

import atexit
import logging
import math
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import streamlit as st

from workbench.errors import BadInput

logger = logging.getLogger(__name__)

READ_ONLY_ENV = "WORKBENCH_APP_READ_ONLY"
MAX_PROCESSES_ENV = "WORKBENCH_APP_MAX_PROCESSES"
PROCESS_TIMEOUT_ENV = "WORKBENCH_APP_PROCESS_TIMEOUT"
TASK_DIRS_ENV = "WORKBENCH_APP_TASK_DIRS"
DEFAULT_MAX_PROCESSES = 2
DEFAULT_PROCESS_TIMEOUT = 600.0  # seconds
BUILTIN_TASKS = ("induction", "ioi")  # workbench.tasks.builtin's names (a test keeps them equal)
OUTPUT_KEPT = 64 * 1024  # bytes of a child's stdout and of its stderr kept for the page
KILL_GRACE = 5.0  # seconds between asking a timed-out child to end and killing it
POLL_SECONDS = 0.5  # how often a page waiting on a child updates its elapsed time
SHOWN_CHARS = 200  # a typed value quoted in a sentence is cut to this many characters

_TRUE, _FALSE = ("1", "true"), ("", "0", "false")


# -- the policy ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """The server's settings, read from its environment; `problems`: env var -> the sentence
    saying what is wrong with its value (the setting then takes its safe value)."""

    read_only: bool
    max_processes: int
    process_timeout: float
    task_dirs: tuple[Path, ...]
    problems: dict[str, str]


def policy() -> Policy:
    """The policy as the environment sets it now (cheap: read on every use)."""
    problems: dict[str, str] = {}
    return Policy(
        read_only=_flag(READ_ONLY_ENV, problems),
        max_processes=_count(MAX_PROCESSES_ENV, DEFAULT_MAX_PROCESSES, problems),
        process_timeout=_seconds(PROCESS_TIMEOUT_ENV, DEFAULT_PROCESS_TIMEOUT, problems),
        task_dirs=_dirs(TASK_DIRS_ENV, problems),
        problems=problems,
    )


def _flag(name: str, problems: dict[str, str]) -> bool:
    raw = os.environ.get(name, "")
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    problems[name] = f"{name}={raw!r} is not 1, true, 0 or false, so the app stays read-only"
    return True


def _count(name: str, default: int, problems: dict[str, str]) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    problems[name] = f"{name}={raw!r} is not a whole number of at least 1, so nothing starts"
    return 0


def _seconds(name: str, default: float, problems: dict[str, str]) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds) and seconds > 0:
        return seconds
    problems[name] = f"{name}={raw!r} is not a positive number of seconds, so nothing starts"
    return 0.0


def _dirs(name: str, problems: dict[str, str]) -> tuple[Path, ...]:
    found = []
    for entry in os.environ.get(name, "").split(os.pathsep):
        if not entry.strip():
            continue
        path = Path(entry.strip()).expanduser()
        if not path.is_dir():
            problems[name] = f"{name}: {entry!r} is not a directory, so no task file is read"
            return ()
        found.append(Path(os.path.realpath(path)))
    return tuple(found)


def read_only() -> bool:
    """Whether this server saves nothing and starts no process."""
    return policy().read_only


def problems() -> list[str]:
    """A sentence for each setting whose value cannot be read (for a notice on every page)."""
    return list(policy().problems.values())


def require_writable(what: str, *, where: Any = None) -> bool:
    """Whether `what` (a write, or a process started) may happen; when not, a caption says why
    (`where`: the container to write it in). Every write and process of the app asks here."""
    current = policy()
    if not current.read_only:
        return True
    why = current.problems.get(READ_ONLY_ENV) or f"this app is read-only ({READ_ONLY_ENV})"
    (where or st).caption(plain(f"{what} is off: {why}."))
    return False


# -- task files ------------------------------------------------------------------------------


def check_task(value: str) -> str:
    """What to pass as `--task`: a built-in task's name as it is, or the real path (symlinks
    resolved) of a task file inside one of the allowed directories. Anything else raises
    `BadInput` (one sentence), before anything starts."""
    name = value.strip()
    if not name:
        raise BadInput("task: empty; name a built-in task or a task file")
    if name in BUILTIN_TASKS:
        return name
    current = policy()
    shown = f"task {_cut(name)!r}: not a built-in task ({', '.join(BUILTIN_TASKS)})"
    if TASK_DIRS_ENV in current.problems:
        raise BadInput(f"{shown}, and {current.problems[TASK_DIRS_ENV]}")
    if not current.task_dirs:
        raise BadInput(f"{shown}, and this app reads no task file (set {TASK_DIRS_ENV})")
    allowed = ", ".join(str(d) for d in current.task_dirs)
    try:
        inside = _inside(name, current.task_dirs)
    except ValueError:
        raise BadInput(f"{shown} nor a file path") from None
    if not inside:
        raise BadInput(f"{shown} nor a file inside {allowed} ({TASK_DIRS_ENV})")
    for real in inside:
        if real.is_file():
            return str(real)
    raise BadInput(f"{shown} nor a file: nothing by that name in {allowed}")


def _inside(name: str, dirs: tuple[Path, ...]) -> list[Path]:
    """The real paths `name` may mean (a relative name in each allowed directory) that lie
    inside an allowed directory; ValueError for a name no path can have (a NUL byte)."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in dirs]
    reals = [Path(os.path.realpath(c)) for c in candidates]
    return [r for r in reals if any(r != d and r.is_relative_to(d) for d in dirs)]


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


# -- processes -------------------------------------------------------------------------------


class _Tail:
    """A child's stream, read by a thread of its own as the child writes; keeps the last
    `keep` bytes."""

    def __init__(self, stream: IO[bytes], keep: int) -> None:
        self._keep = keep
        self._data = bytearray()
        self._lock = threading.Lock()
        self.total = 0  # bytes read in all
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        with stream:
            while chunk := os.read(stream.fileno(), 1 << 16):
                with self._lock:
                    self.total += len(chunk)
                    self._data += chunk
                    if len(self._data) > 2 * self._keep:
                        del self._data[: -self._keep]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        with self._lock:
            return bytes(self._data[-self._keep :]).decode("utf-8", errors="replace")


class Job:
    """A child process the app started: drained as it runs, stopped at its timeout. `done` is
    set once it has ended and its output is read."""

    def __init__(
        self, proc: subprocess.Popen, *, what: str, timeout: float, on_end: Callable[["Job"], None]
    ) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc, self.what, self.timeout = proc, what, timeout
        self.started = time.monotonic()
        self.ended: float | None = None
        self.timed_out = False
        self.done = threading.Event()
        self._out = _Tail(proc.stdout, OUTPUT_KEPT)
        self._err = _Tail(proc.stderr, OUTPUT_KEPT)
        self._on_end = on_end
        threading.Thread(target=self._watch, daemon=True, name=f"job {proc.pid}").start()

    def _watch(self) -> None:
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            logger.warning(
                "%s (pid %d): stopped after %g s", self.what, self.proc.pid, self.timeout
            )
            stop(self.proc)
        self.ended = time.monotonic()
        self._out.join(KILL_GRACE)  # (a grandchild holding the pipe must not hold us)
        self._err.join(KILL_GRACE)
        self._on_end(self)
        self.done.set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def stdout(self) -> str:
        return self._out.text()

    def stderr(self) -> str:
        return self._err.text()

    def stderr_bytes(self) -> int:
        return self._err.total

    def failure(self) -> str | None:
        """Once done: None when the child succeeded, else one sentence saying why not."""
        if self.timed_out:
            return (
                f"{self.what} was stopped after {self.timeout:g} s, the longest a process "
                f"started by this app may run ({PROCESS_TIMEOUT_ENV})."
            )
        if self.proc.returncode == 0:
            return None
        lines = [line.strip() for line in self.stderr().splitlines() if line.strip()]
        return (
            _cut(lines[-1]) if lines else f"{self.what} exited with status {self.proc.returncode}."
        )


def stop(proc: subprocess.Popen) -> None:
    """Ask a child to end; kill it if it has not after `KILL_GRACE` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Launcher:
    """The processes this server's sessions started: at most `limit` live at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[Job] = set()
        self.started = 0  # processes started in all

    def start(self, cmd: list[str], *, limit: int, timeout: float, what: str) -> Job | None:
        """Start `cmd` unless `limit` processes are live (then None); OSError when it cannot
        be started at all."""
        with self._lock:
            if len(self._live) >= limit:
                return None
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self.started += 1
            job = Job(proc, what=what, timeout=timeout, on_end=self._ended)
            self._live.add(job)
        logger.info("%s: started pid %d", what, proc.pid)
        return job

    def _ended(self, job: Job) -> None:
        with self._lock:
            self._live.discard(job)

    def live(self) -> list[Job]:
        with self._lock:
            return list(self._live)

    def stop_all(self) -> None:
        """Stop every live child (the server is going away)."""
        for job in self.live():
            if job.proc.poll() is None:
                stop(job.proc)


@st.cache_resource(show_spinner=False)
def launcher() -> Launcher:
    """The server's one launcher, shared by every session."""
    made = Launcher()
    atexit.register(made.stop_all)
    return made


def launch(cmd: list[str], *, what: str) -> Job | None:
    """Start `cmd` for a page within the policy; when it may not start, one sentence on the
    page says why and None is returned."""
    if not require_writable(what):
        return None
    current = policy()
    bad = current.problems.get(MAX_PROCESSES_ENV) or current.problems.get(PROCESS_TIMEOUT_ENV)
    if bad:
        st.error(plain(f"{what} did not start: {bad}."))
        return None
    try:
        job = launcher().start(
            cmd, limit=current.max_processes, timeout=current.process_timeout, what=what
        )
    except (OSError, ValueError) as err:  # (too long an argument, a NUL byte in one)
        st.error(plain(f"{what} could not start: {getattr(err, 'strerror', None) or err}."))
        return None
    if job is None:
        st.warning(
            plain(
                f"{what} did not start: {current.max_processes} processes started by this app "
                f"are running, the most it runs at once ({MAX_PROCESSES_ENV}); try again when "
                "one has ended."
            )
        )
    return job


def wait(job: Job, *, label: str) -> bool:
    """Show `job`'s progress until it ends; True when it succeeded, else its failure is one
    sentence on the page."""
    with st.status(f"{label}…", expanded=False) as status:
        while not job.done.wait(POLL_SECONDS):
            status.update(label=f"{label}… {job.elapsed():.0f} s")
        failure = job.failure()
        if failure is None:
            status.update(label=f"{label}: done in {job.elapsed():.1f} s", state="complete")
            return True
        status.update(label=f"{label}: {'stopped' if job.timed_out else 'failed'}", state="error")
    st.error(plain(failure))
    return False


# -- text people typed -----------------------------------------------------------------------

_MARKUP = re.compile(r"([\\`*_\[\]{}<>!#~$|^])|:(?=\S)")
_LINE_START = re.compile(r"^(\s*)([-+=]|\d+(?=[.)]))")
_ZERO_WIDTH = "\u200b"


def plain(text: object) -> str:
    """`text` as Markdown that shows exactly it as one line: markup characters escaped, bare
    addresses (`http://`, `www.`, `a@b`) broken with a zero-width space so none becomes a
    link, no line starting a list or heading."""
    line = " ".join(str(text).split())
    line = line.replace("://", ":" + _ZERO_WIDTH + "//").replace("@", "@" + _ZERO_WIDTH)
    line = re.sub(r"(?i)\b(www)\.", r"\1" + _ZERO_WIDTH + ".", line)
    line = _MARKUP.sub(lambda m: "\\" + (m.group(1) or ":"), line)
    return _LINE_START.sub(lambda m: m.group(1) + _escape_start(m.group(2)), line)


def _escape_start(marker: str) -> str:
    return "\\" + marker if not marker.isdigit() else marker + "\\"


def literal(text: object) -> str:
    """`text` as an inline code span: shown as it is, nothing in it read as Markdown."""
    line = " ".join(str(text).splitlines())
    if not line.strip():
        return "` `"
    fence = "`" * (1 + max((len(run) for run in re.findall(r"`+", line)), default=0))
    pad = " " if line[0] in "` " or line[-1] in "` " else ""
    return f"{fence}{pad}{line}{pad}{fence}"
