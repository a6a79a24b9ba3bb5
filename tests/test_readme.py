"""The README stays true: every SQL example in it runs against a store the pipelines filled, and
the commands it names exist."""

import re
from pathlib import Path

import pytest

from workbench.cli import cli
from workbench.store.query import run_readonly_query

README = Path(__file__).resolve().parent.parent / "README.md"


def _sql_statements() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(), flags=re.S)
    statements = []
    for block in blocks:
        for statement in block.split(";"):
            lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
            if "\n".join(lines).strip():
                statements.append(statement.strip())
    return statements


STATEMENTS = _sql_statements()


def test_the_readme_has_sql_examples():
    assert len(STATEMENTS) >= 10


@pytest.mark.parametrize("sql", STATEMENTS, ids=[s.splitlines()[0][:60] for s in STATEMENTS])
def test_readme_sql_runs(heads_db, sql):
    run_readonly_query(sql, db=str(heads_db))  # raises BadInput on any SQL error


def test_readme_commands_exist(capsys):
    text = README.read_text()
    commands = set(re.findall(r"`workbench ([a-z]+)(?: ([a-z]+))?", text))
    assert {"run", "sql", "demo", "app", "migrate", "export", "zoo", "model"} <= {
        c for c, _ in commands
    }
    for command, sub in sorted(commands):
        argv = [command, sub, "--help"] if command in ("zoo", "model", "export") and sub else None
        argv = argv or [command, "--help"]
        assert cli(argv) == 0, f"workbench {' '.join(argv)} failed"
