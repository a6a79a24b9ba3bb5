"""The lock and pyproject.toml agree, and the Makefile's environment is the locked one."""

import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.lockfile import LOCK, ROOT, normalise, read_lock, requirements_hash, unlocked


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


@pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="checks the Makefile's .venv (make test)",
)
def test_the_environment_is_the_locked_one():
    _, pins = read_lock()
    installed = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    off = {
        name: (version, pins.get(normalise(name)))
        for name, version in installed.items()
        if not unlocked(name) and pins.get(normalise(name)) != version
    }
    assert not off, f"installed vs locked (name: (installed, locked)): {off}; run `make lock`"
