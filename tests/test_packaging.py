"""The package as users install it: a wheel built from this tree (not an editable install),
installed apart from the source checkout, registers its pipelines through entry points and
serves the app with `workbench app` from another directory."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.test_browser import (
    CHROMEDRIVER,
    CHROMIUM,
    _free_port,
    _wait_for_text,
    chromium_driver,
    wait_until_healthy,
)
from tests.test_app_server import WAIT, alive, listening, owner, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """`pip wheel .` then the wheel installed into a directory of its own (its dependencies
    are the test environment's); returns that directory."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a clean copy: no build/ or egg-info left from earlier builds
    skip = shutil.ignore_patterns(".*", "data", "build", "*.egg-info", "__pycache__", "tests")
    shutil.copytree(ROOT, source, ignore=skip, symlinks=True)  # app/ and pipelines/ as in git
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), "."],
        check=True,
        cwd=source,
    )
    (wheel,) = (work / "dist").glob("circuit_workbench-*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    return site


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "WORKBENCH_LOG": "ERROR"}


def test_the_installed_wheel_has_its_pipelines_and_app(installed, tmp_path):
    """Under the one name `workbench`: the wheel adds no other top-level module (no `app`,
    no `pipelines` to collide with another distribution's)."""
    modules = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info")}
    modules.discard("bin")  # the `workbench` console script, not a module
    assert modules == {"workbench"}, modules
    code = (
        "import importlib.util as u; assert u.find_spec('app') is None, 'app'; "
        "assert u.find_spec('pipelines') is None, 'pipelines'; "
        "import workbench.app, workbench.pipelines; "
        "from workbench.registry import pipelines as p; "
        "from workbench.cli import _app_main; "
        "print(workbench.__file__); print(_app_main()); print(','.join(p()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=_env(installed),
        cwd=tmp_path,
        check=True,
    ).stdout.splitlines()
    assert Path(out[0]).is_relative_to(installed)  # not the source checkout
    assert Path(out[1]) == installed / "workbench" / "app" / "main.py"
    assert out[2].split(",")[:4] == ["heads", "patching", "edges", "sae"]


@pytest.mark.browser
@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="Debian chromium and chromium-driver are not installed (make browser)",
)
def test_workbench_app_from_another_directory_serves_the_app(installed, heads_db, tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench", "app", "--db", str(heads_db), "--port", str(port)],
        env=_env(installed),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"  # where `workbench app` listens by default
    server = None
    try:
        wait_until_healthy(url, proc)
        server = owner(listening(port)[0][1])
        with chromium_driver() as driver:
            driver.get(url)
            _wait_for_text(driver, "Circuit Workbench")
            _wait_for_text(driver, "Checkpoints")  # the overview read the database
    finally:
        proc.terminate()  # passed on to the server: nothing is left listening after the suite
        proc.wait(timeout=WAIT)
    assert server is not None and server != proc.pid
    wait_for(lambda: not alive(server), f"the app server (pid {server}) to end")
    assert listening(port) == []
