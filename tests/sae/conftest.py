"""SAE fixtures: two SAEs trained once per session on the induction zoo model through the CLI."""

from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from tests.conftest import SEED
from workbench.cli import cli

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
CORPUS_TOKENS = 24_000


@dataclass(frozen=True)
class SaeRun:
    db: Path
    sae_dir: Path
    saes: dict[str, dict]  # hook -> saes row


def query(db: Path, sql: str, params: list | None = None) -> list[dict]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


@pytest.fixture(scope="session")
def sae_run(tmp_path_factory: pytest.TempPathFactory, induction_dir: Path) -> SaeRun:
    root = tmp_path_factory.mktemp("sae")
    db = root / "w.duckdb"
    argv = ["run", "sae", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    for hook in HOOKS:
        argv += ["--hook", hook]
    argv += ["--training-tokens", "200000", "--corpus-tokens", str(CORPUS_TOKENS)]
    argv += ["--seed", str(SEED)]
    assert cli(argv) == 0
    rows = query(db, "SELECT * FROM saes")
    return SaeRun(db=db, sae_dir=root / "saes", saes={r["hook"]: r for r in rows})
