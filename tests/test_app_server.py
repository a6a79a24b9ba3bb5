"""`workbench app` as a real server: it listens on loopback unless told otherwise, passes the
app's limits to the server through its environment, makes and prints a token when it serves
others, and, told to stop, leaves no server behind. The listening sockets are read from
/proc/net/tcp and /proc/net/tcp6, the server's process from the socket's owner in /proc."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from workbench.cli import cli

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

WAIT = 120.0  # generous bound for anything a loaded machine has to start or stop
# A clean stop of streamlit takes seconds on a loaded machine (4 to 9 s measured at load 20):
# here it gets half of WAIT before the kill, so the exit status tells a clean stop from a kill.
ENV = {"WORKBENCH_APP_TOKEN": "", "WORKBENCH_LOG": "ERROR", "WORKBENCH_APP_STOP_TIMEOUT": "60"}
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ipv4(word: str) -> str:
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(word)[::-1])


def _ipv6(words: str) -> str:
    raw = b"".join(bytes.fromhex(words[i : i + 8])[::-1] for i in range(0, 32, 8))
    return socket.inet_ntop(socket.AF_INET6, raw)


def listening(port: int) -> list[tuple[str, str]]:
    """(local address, socket inode) of every TCP socket listening on `port`."""
    found = []
    for table, parse in (("/proc/net/tcp", _ipv4), ("/proc/net/tcp6", _ipv6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append((parse(address), fields[9]))
    return found


def owner(inode: str) -> int | None:
    """The pid of the process holding socket `inode` (None when none of ours does)."""
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def alive(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_for(probe: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Poll `probe` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")


def wait_listening(proc: subprocess.Popen, port: int, log: Path) -> list[tuple[str, str]]:
    """The sockets listening on `port` once there are any (fails at once if `proc` ends)."""

    def probe() -> list[tuple[str, str]]:
        if proc.poll() is not None:
            pytest.fail(f"workbench app ended with {proc.returncode}: {log.read_text()}")
        return listening(port)

    return wait_for(probe, f"a socket listening on port {port}")


def server_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode().partition("=") for item in raw if item)
    return {name: value for name, _, value in pairs}


@contextmanager
def workbench_app(args: list[str], tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`workbench app ARGS` as a real process (stdout and stderr into a file); whatever is left
    of it and its server is killed at the end."""
    log = tmp_path / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", "app", "--db", str(tmp_path / "w.duckdb"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
        )
    port = int(args[args.index("--port") + 1])
    try:
        yield proc, log
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)
        for _, inode in listening(port):
            pid = owner(inode)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)


def test_workbench_app_listens_on_loopback_and_passes_the_limits(tmp_path):
    port = free_port()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    args = ["--port", str(port), "--read-only", "--max-processes", "3"]
    args += ["--process-timeout", "1.5", "--task-dir", str(tasks)]
    with workbench_app(args, tmp_path) as (proc, log):
        sockets = wait_listening(proc, port, log)
        assert [address for address, _ in sockets] == ["127.0.0.1"]
        pid = wait_for(lambda: owner(sockets[0][1]), "the server's pid")
        assert pid is not None
        env = server_environ(pid)
        assert env["WORKBENCH_APP_READ_ONLY"] == "1"
        assert env["WORKBENCH_APP_MAX_PROCESSES"] == "3"
        assert env["WORKBENCH_APP_PROCESS_TIMEOUT"] == "1.5"
        assert env["WORKBENCH_APP_TASK_DIRS"] == str(tasks.resolve())
        assert "token=" not in log.read_text()


def test_serving_others_prints_a_token_and_terminate_leaves_nothing(tmp_path):
    port = free_port()
    with workbench_app(["--port", str(port), "--address", "0.0.0.0"], tmp_path) as (proc, log):
        sockets = wait_listening(proc, port, log)
        assert [address for address, _ in sockets] == ["0.0.0.0"]
        pid = wait_for(lambda: owner(sockets[0][1]), "the server's pid")
        assert pid is not None
        assert pid != proc.pid  # the server is the child streamlit process
        links = [line for line in log.read_text().splitlines() if "?token=" in line]
        assert len(links) == 1
        token = links[0].split("?token=", 1)[1].strip()
        assert len(token) >= 32 and server_environ(pid)["WORKBENCH_APP_TOKEN"] == token

        proc.terminate()
        # the server stopped on the signal: cleanly (0), or by it when the signal came before
        # streamlit had set up its handler (143); not killed after the stop timeout (137)
        assert proc.wait(timeout=WAIT) in (0, 128 + signal.SIGTERM)
        wait_for(lambda: not alive(pid), f"the server (pid {pid}) to end")
        assert listening(port) == []


IGNORES_SIGTERM = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(60)
"""

SERVE = """
import os, sys
from workbench.cli import _serve
child = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
sys.exit(_serve(child, dict(os.environ), stop_timeout=1.0))
"""


def test_a_server_that_ignores_the_signal_is_killed_after_the_stop_timeout(tmp_path):
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-c", SERVE, IGNORES_SIGTERM, str(pid_file)])
    try:
        wait_for(pid_file.exists, "the child to write its pid")
        child = int(pid_file.read_text())
        proc.terminate()
        assert proc.wait(timeout=WAIT) == 128 + signal.SIGKILL
        wait_for(lambda: not alive(child), f"the child (pid {child}) to end")
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)
        if pid_file.exists() and alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--max-processes", "-1"], "error: --max-processes must be 1 or more, not -1"),
        (["--max-processes", "0"], "error: --max-processes must be 1 or more, not 0"),
        (["--process-timeout", "0"], "error: --process-timeout must be a positive number"),
        (["--process-timeout", "-3"], "error: --process-timeout must be a positive number"),
        (["--task-dir", "/no/such/dir"], "error: --task-dir /no/such/dir: no such directory"),
        (["--address", ""], "error: --address must name an interface"),
        (["--port", "70000"], "error: --port must be between 1 and 65535"),
    ],
)
def test_bad_app_options_exit_2_with_a_sentence(args, sentence, tmp_path, capsys):
    assert cli(["app", "--db", str(tmp_path / "w.duckdb"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(sentence) and "\n" not in err
    assert not (tmp_path / "w.duckdb").exists()


def test_a_bad_stop_timeout_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_APP_STOP_TIMEOUT", "soon")
    assert cli(["app", "--db", str(tmp_path / "w.duckdb"), "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: WORKBENCH_APP_STOP_TIMEOUT='soon' is not a positive number of seconds"
    )
