"""The lock and pyproject.toml agree, and the Makefile's environment is the locked one."""

import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tools.lockfile import LOCK, ROOT, normalise, read_lock, requirements_hash, unlocked


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_lock_was_made_from_the_current_pyproject():
    recorded, _ = read_lock()
    assert recorded == requirements_hash(), (
        "pyproject.toml's requirements changed since requirements.lock was made: run `make lock`"
    )


def test_every_requirement_is_pinned_within_its_range():
    _, pins = read_lock()
    for req in _requirements():
        if unlocked(req.name):
            continue
        assert normalise(req.name) in pins, f"{req.name} is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[normalise(req.name)], prereleases=True), (
            f"{LOCK.name} pins {req.name}=={pins[normalise(req.name)]}, outside {req}"
        )


def test_transformer_lens_stays_below_4():
    """TransformerLens 4 removed HookedTransformer; sae-lens 6 needs it below 4."""
    (req,) = [r for r in _requirements() if normalise(r.name) == "transformer-lens"]
    assert not req.specifier.contains("4.0.0")
    _, pins = read_lock()
    assert int(pins["transformer-lens"].split(".")[0]) < 4


def installed_closure(project: str = "circuit-workbench", extras=("dev", "ray")) -> dict[str, str]:
    """{name: version} of every distribution the project requires, transitively, on this machine.

    Requirements are followed with their markers evaluated here (so `colorama; platform_system ==
    "Windows"` is not followed on Linux) and with the extras each requirement asks for. Anything
    else on the path was not installed by the Makefile's resolve and is not the lock's business.
    """
    found: dict[str, str] = {}
    # the project, and the installers the Makefile upgrades before it
    todo: list[tuple[str, tuple[str, ...]]] = [(project, tuple(extras))]
    todo += [(tool, ()) for tool in ("pip", "setuptools", "wheel")]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, wanted = todo.pop()
        if (normalise(name), wanted) in seen:
            continue
        seen.add((normalise(name), wanted))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise AssertionError(f"{name} is required but not installed: run `make test`") from None
        found[dist.metadata["Name"]] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in ("", *wanted)]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, tuple(sorted(req.extras))))
    return found


in_make_venv = pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="checks the Makefile's .venv (make test)",
)


@in_make_venv
def test_the_environment_is_the_locked_one():
    _, pins = read_lock()
    installed = installed_closure()
    off = {
        name: (version, pins.get(normalise(name)))
        for name, version in installed.items()
        if not unlocked(name) and pins.get(normalise(name)) != version
    }
    assert not off, f"installed vs locked (name: (installed, locked)): {off}; run `make lock`"


@in_make_venv
def test_the_closure_follows_markers_and_extras():
    """The walk behind the check above: it reaches packages only an extra brings (ray through
    the `ray` extra, msgpack through ray) and skips Windows-only ones (tqdm's colorama)."""
    closure = {normalise(n) for n in installed_closure()}
    assert {
        "torch",
        "transformer-lens",
        "sae-lens",
        "duckdb",
        "ray",
        "msgpack",
        "pytest",
    } <= closure
    assert "colorama" not in closure
    _, pins = read_lock()
    assert set(pins) <= closure, "every pin is something the Makefile installs"
