"""Stable content hashes for checkpoints, tasks and run keys."""

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj` (sorted keys, no whitespace)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of `paths`, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
