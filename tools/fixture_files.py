"""What every reference-fixture tool (`tools/*_fixture.py`, each run once in an environment of
its own) writes into its README: the versions of the packages it ran with, and the table of the
files it wrote with their sizes and hashes. Standard library only."""

import hashlib
from importlib import metadata
from pathlib import Path


def dist_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def file_table(outdir: Path) -> str:
    """A Markdown table of the files under `outdir` but its README: path, bytes, the first 16
    hex digits of its sha256, under its header."""
    files = sorted(p for p in outdir.rglob("*") if p.is_file() and p.name != "README.md")
    rows = [
        f"| `{p.relative_to(outdir)}` | {p.stat().st_size} | "
        f"`{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}` |"
        for p in files
    ]
    return "\n".join(["| file | bytes | sha256 (first 16) |", "|---|---|---|", *rows])
