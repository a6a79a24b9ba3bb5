"""`--address` of a port where no Ray cluster is: one sentence and exit 2 in a bounded time, from
`workbench run` and `workbench watch`, whatever listens there (a server that accepts and says
nothing, a web server, a gRPC-speaking server that is not Ray); and the check lets a real Ray
GCS through."""

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import query

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

ENDED = 120  # seconds: the command ended rather than hung (Ray alone retries for 13+ minutes)
SETTINGS_FRAME = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # an HTTP/2 server's first frame


def _silent(conn: socket.socket) -> None:
    conn.recv(1024)  # takes what the client sends, answers nothing, keeps the connection open


def _http1(conn: socket.socket) -> None:
    conn.recv(1024)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def _grpc_like(conn: socket.socket) -> None:
    conn.sendall(SETTINGS_FRAME)  # what any HTTP/2 (gRPC) server says first, and nothing more
    while conn.recv(65536):
        pass


@pytest.fixture()
def server() -> Iterator[Callable[..., int]]:
    """Starts a TCP server on a free port whose connections `behaviour` handles; its port."""
    sockets: list[socket.socket] = []

    def start(behaviour: Callable[[socket.socket], None], host: str = "127.0.0.1") -> int:
        listener = socket.create_server((host, 0))
        sockets.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # closed at the end of the test
                    return
                sockets.append(conn)
                threading.Thread(target=_quietly, args=(behaviour, conn), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for sock in sockets:
        sock.close()


def _quietly(behaviour: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # the client went away
        behaviour(conn)


def _env(seconds: str) -> dict[str, str]:
    env = {**os.environ, "WORKBENCH_LOG": "WARNING", "TQDM_DISABLE": "1"}
    env["WORKBENCH_RAY_CONNECT_SECONDS"] = seconds
    for name in ("RAY_ADDRESS", "RAY_gcs_server_port_wait_time_s", "RAY_py_gcs_connect_timeout_s"):
        env.pop(name, None)
    return env


def _run(tmp_path: Path, induction_dir: Path, address: str, seconds: str = "2"):
    db = tmp_path / "w.duckdb"
    argv = [sys.executable, "-m", "workbench", "run", "heads", "--model", str(induction_dir)]
    argv += ["--task", "induction", "--method", "dla", "--checkpoint", "latest", "--db", str(db)]
    argv += ["--executor", "ray", "--address", address]
    return subprocess.run(
        argv, capture_output=True, text=True, env=_env(seconds), timeout=ENDED, cwd=tmp_path
    )


def _error_line(stderr: str) -> str:
    (line,) = [line for line in stderr.splitlines() if line.startswith("error: ")]
    return line


def test_a_port_that_says_nothing_is_refused_within_the_bound(server, tmp_path, induction_dir):
    port = server(_silent)
    done = _run(tmp_path, induction_dir, f"127.0.0.1:{port}", seconds="1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert _error_line(done.stderr) == (
        f"error: --address 127.0.0.1:{port}: something listens there but is not a Ray cluster "
        "(it sent nothing back within 1 s, or closed the connection; "
        "WORKBENCH_RAY_CONNECT_SECONDS sets how long to wait)"
    )
    assert "Traceback" not in done.stderr


def test_a_web_server_is_refused_by_run_and_by_watch(server, tmp_path, induction_dir):
    port = server(_http1)
    sentence = f"--address 127.0.0.1:{port}: something listens there but is not a Ray cluster "
    sentence += "(it answered 'HTTP/1.1 '...)"
    done = _run(tmp_path, induction_dir, f"127.0.0.1:{port}")
    assert done.returncode == 2 and _error_line(done.stderr) == f"error: {sentence}", done.stderr
    config = tmp_path / "watch.toml"
    config.write_text('[[job]]\npipeline = "heads"\ntask = "induction"\nmethods = ["dla"]\n')
    watch = [sys.executable, "-m", "workbench", "watch", str(induction_dir), "--once"]
    watch += ["--config", str(config), "--db", str(tmp_path / "watch.duckdb")]
    watch += ["--executor", "ray", "--address", f"127.0.0.1:{port}"]
    done = subprocess.run(watch, capture_output=True, text=True, env=_env("2"), timeout=ENDED)
    assert done.returncode == 2 and _error_line(done.stderr) == f"error: {sentence}", done.stderr


def test_a_grpc_server_that_is_not_ray_gives_up_within_the_bound(server, tmp_path, induction_dir):
    # on all interfaces: Ray dials a loopback address at this machine's own IP address
    port = server(_grpc_like, "0.0.0.0")
    done = _run(tmp_path, induction_dir, f"127.0.0.1:{port}", seconds="2")
    assert done.returncode == 2, done.stderr[-2000:]
    line = _error_line(done.stderr)
    assert line.startswith(f"error: --address 127.0.0.1:{port}: cannot join a Ray cluster there")
    assert (
        not (tmp_path / "w.duckdb").exists()
        or query(tmp_path / "w.duckdb", "SELECT * FROM runs") == []
    )


def test_a_real_ray_gcs_passes_the_check(tmp_path):
    """A local Ray instance's GCS answers the check the way a cluster's head does."""
    script = (
        "import logging, ray\n"
        "from workbench.executor_ray import _reachable\n"
        "ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)\n"
        "try:\n"
        "    _reachable(ray.get_runtime_context().gcs_address, timeout=30)\n"
        "    print('reachable')\n"
        "finally:\n"
        "    ray.shutdown()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env("10"),
        timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "reachable", done.stderr[-2000:]
