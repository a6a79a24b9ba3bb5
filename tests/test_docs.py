"""The documentation stays true: README.md and the pages of docs/.

* every SQL example runs against a store the pipelines filled;
* every command of a shell block is checked as far as it can be without computing: a
  `workbench` command parses with the real command line, its `--help` works, and a `workbench
  run PIPELINE` command plans its jobs; a `make` target exists (`make -n`), a `python -m`
  module is found, a `git` command runs;
* the TOML, JSON and Python examples read (the `watch.toml` example as a watch config);
* every `workbench` command named in the text has a working `--help`, and every repository path
  named in code exists;
* every docstring and comment in `workbench/` that names a `.md` document names one that exists;
* the documentation site builds strictly.

A code block whose first line is `# needs: smollm2` (or `ray`, `gpu`; `-- needs: ...` in SQL)
needs what a test machine does not have, and is not run (docs/development.md, "The
documentation is tested").
"""

import ast
import importlib.util
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tokenize
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main

from workbench import registry
from workbench.cli import app, cli
from workbench.store.query import run_readonly_query

ROOT = Path(__file__).resolve().parent.parent
# `workbench run` commands of their own, not pipelines (keyed by prompt, not by run key)
RUN_COMMANDS = ("prompt", "graph", "catalogue", "cross-recovery", "seeds", "tuned-lens")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NEEDS = {"smollm2", "ray", "gpu"}
SHELL = {"sh", "bash", "shell"}
# a path named in code that lies in the repository (generated directories aside)
REPO_PATH = re.compile(r"^(?:workbench|tests|benchmarks|tools|docs|app|pipelines)/[\w./-]*$")
GENERATED = ("benchmarks/results/", "docs/_build/")
# the strict build of the site: any warning (a broken link or anchor, a missing image, a bad
# reference) fails it
STRICT = ["-W", "--keep-going", "-n", "-q", "-b", "html"]


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page."""

    page: Path
    line: int  # of the opening fence
    lang: str
    text: str

    @property
    def needs(self) -> set[str]:
        first = next((ln for ln in self.text.splitlines() if ln.strip()), "")
        found = re.match(r"^\s*(?:#|--)\s*needs:\s*(.+)$", first)
        return {n.strip() for n in found.group(1).split(",")} if found else set()

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
            line = text.count("\n", 0, m.start()) + 1
            found.append(Block(page, line, m.group(1).strip(), m.group(2)))
    return found


BLOCKS = _blocks()


def blocks(*langs: str) -> list[Block]:
    return [b for b in BLOCKS if b.lang in langs and not b.needs]


def _ids(items: list[tuple[Block, str]]) -> list[str]:
    return [f"{b.where} {s.strip().splitlines()[0][:60]}" for b, s in items]


def test_needs_markers_name_known_needs():
    unknown = {f"{b.where}: {n}" for b in BLOCKS for n in b.needs if n not in NEEDS}
    assert not unknown, f"unknown needs (use {', '.join(sorted(NEEDS))}): {sorted(unknown)}"
    assert any(b.needs for b in BLOCKS), "no block is marked: the marker check is not reading"


# --- SQL ------------------------------------------------------------------------------------


def _sql_statements() -> list[tuple[Block, str]]:
    statements = []
    for block in blocks("sql"):
        for statement in block.text.split(";"):
            lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
            if "\n".join(lines).strip():
                statements.append((block, statement.strip()))
    return statements


STATEMENTS = _sql_statements()


def test_the_docs_have_sql_examples():
    assert len(STATEMENTS) >= 20
    assert {b.page.name for b, _ in STATEMENTS} >= {"README.md", "schema.md"}


@pytest.mark.parametrize(("block", "sql"), STATEMENTS, ids=_ids(STATEMENTS))
def test_docs_sql_runs(heads_db, block, sql):
    run_readonly_query(sql, db=str(heads_db))  # raises BadInput on any SQL error


# --- shell commands --------------------------------------------------------------------------


def _commands(block: Block) -> Iterator[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped, a
    quoted argument spanning lines kept whole."""
    pending = ""
    for line in block.text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        pending = ""
        if words:
            yield words
    assert not pending.strip(), f"{block.where}: unfinished command {pending!r}"


def _shell_commands() -> list[tuple[Block, str]]:
    return [(b, shlex.join(words)) for b in blocks(*SHELL) for words in _commands(b)]


COMMANDS = _shell_commands()


def test_the_docs_have_shell_commands():
    assert len(COMMANDS) >= 10
    assert any(shlex.split(c)[0] == "make" for _, c in COMMANDS)


def _parse(argv: list[str]) -> list[str]:
    """Parse `workbench ARGV` with the real command line, as far as the command it names (every
    option, value and argument); its path of command names."""
    command = typer.main.get_command(app)
    name, args, ctx, path = "workbench", list(argv), None, []
    while True:
        ctx = command.make_context(name, args, parent=ctx)
        if not hasattr(command, "resolve_command"):
            return path
        protected = getattr(ctx, "_protected_args", None)
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        name, command, args = command.resolve_command(ctx, rest)
        path.append(name)


def _plan_only(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make `workbench run` plan its jobs on a stand-in checkpoint and compute none of them."""
    import workbench.models
    import workbench.runner
    from workbench.models.base import CheckpointRef

    planned: list = []

    def resolve(model: str) -> list[CheckpointRef]:
        return [CheckpointRef("zoo", model, "docs-example", 1000)]

    def run_jobs(jobs, **options):
        planned.extend(jobs)
        return []

    monkeypatch.setattr(workbench.models, "resolve_checkpoints", resolve)
    monkeypatch.setattr(workbench.models, "select_checkpoints", lambda refs, which: refs)
    monkeypatch.setattr(workbench.runner, "run_jobs", run_jobs)
    return planned


def _check_workbench(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = _parse(argv)
    assert cli([*path, "--help"]) == 0, f"workbench {' '.join(path)} --help failed"
    if path[:1] == ["run"] and path[1] in {*registry.pipelines(), "all"}:
        planned = _plan_only(monkeypatch)
        assert cli(argv) == 0, "planning failed (see the error above)"
        assert planned, "no job planned"
        assert all(type(job).from_json(job.to_json()) == job for job in planned)


@pytest.mark.parametrize(("block", "command"), COMMANDS, ids=_ids(COMMANDS))
def test_docs_command_runs(block, command, monkeypatch, capsys):
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before the command
        words = words[1:]
    program, args = words[0], words[1:]
    if program == "workbench" or program.endswith("/workbench"):
        _check_workbench(args, monkeypatch)
    elif program == "make":
        if shutil.which("make") is None:
            pytest.skip("make is not installed")
        out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"{block.where}: make -n {' '.join(args)}: {out.stderr}"
    elif (program == "python" or program.endswith("/python")) and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"{block.where}: no {args[1]}"
    elif program == "sphinx-build" or program.endswith("/sphinx-build"):
        # built by test_the_docs_build_strictly, with these flags
        assert args[:-2] == STRICT and args[-2] == "docs", f"{block.where}: not the strict build"
    elif program == "git":
        if shutil.which("git") is None or not (ROOT / ".git").exists():
            pytest.skip("not a git checkout")
        out = subprocess.run(["git", "--no-pager", *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"{block.where}: {command}: {out.stderr}"
    else:
        pytest.fail(
            f"{block.where}: no check for `{program}`; mark the block "
            f"`# needs: ...` if it cannot run on a test machine"
        )


def _inline_commands() -> set[tuple[str, str | None]]:
    text = "\n".join(page.read_text() for page in PAGES)
    return set(re.findall(r"`workbench ([a-z]+)(?: ([a-z_][a-z_-]*))?", text))


def test_docs_commands_exist(capsys):
    commands = _inline_commands()
    assert {"run", "sql", "demo", "app", "migrate", "export", "zoo", "model", "watch"} <= {
        c for c, _ in commands
    }
    runnable = {*registry.pipelines(), "all", *RUN_COMMANDS}
    for command, sub in sorted(commands, key=lambda c: (c[0], c[1] or "")):
        if command == "run" and sub and sub.startswith("my_"):
            continue  # a plugin's pipeline, named as an example
        with_sub = command in ("zoo", "model", "export") or (command == "run" and sub)
        argv = [command, sub, "--help"] if with_sub and sub else [command, "--help"]
        if command == "run" and sub:
            assert sub in runnable, f"`workbench run {sub}`: no such pipeline"
        assert cli(argv) == 0, f"workbench {' '.join(argv)} failed"


# --- other examples -------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks("toml"), ids=lambda b: b.where)
def test_docs_toml_reads(block, tmp_path):
    data = tomllib.loads(block.text)
    if block.text.lstrip().startswith("# watch.toml"):
        from workbench.watch import read_config

        path = tmp_path / "watch.toml"
        path.write_text(block.text)
        config = read_config(path)  # BadInput on an unknown field, method or option
        assert len(config.jobs) == len(data["job"])


@pytest.mark.parametrize("block", blocks("json"), ids=lambda b: b.where)
def test_docs_json_lines_read(block):
    for line in block.text.splitlines():
        if line.strip():
            assert isinstance(json.loads(line), dict)


@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.where)
def test_docs_python_compiles(block):
    compile(block.text, block.where, "exec")


def test_every_repository_path_named_in_the_docs_exists():
    missing = []
    for page in PAGES:
        for span in re.findall(r"`([^`\s]+)`", page.read_text()):
            path = span.rstrip(".,:;")
            named = REPO_PATH.match(path) and not path.startswith(GENERATED)
            if named and not (ROOT / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
    assert not missing, "\n".join(missing)


# --- documents named in the code ------------------------------------------------------------


def _headings(doc: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.M | re.S)
    return {
        m.group(1).replace("`", "").strip().lower()
        for m in re.finditer(r"^#{1,6} +(.+)$", text, flags=re.M)
    }


def _docstrings_and_comments(path: Path) -> Iterator[tuple[int, str]]:
    source = path.read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None and node.body:
                yield node.body[0].lineno, doc
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def test_documents_named_in_the_code_exist():
    """`(docs/cli.md)` or `(docs/models.md, "Model sources")`: the document exists, relative to
    the repository's root, and a section named in quotes after it is one of its headings."""
    wrong = []
    named = re.compile(r"([\w./-]+\.md)\b(?:,?\s+\"([^\"]+)\")?")
    for path in sorted((ROOT / "workbench").rglob("*.py")):
        for start, text in _docstrings_and_comments(path):
            for m in named.finditer(text):
                where = f"{path.relative_to(ROOT)}:{start + text.count(chr(10), 0, m.start())}"
                doc, section = ROOT / m.group(1), m.group(2)
                if not doc.is_file():
                    wrong.append(f"{where}: {m.group(1)} does not exist")
                    continue
                if section:  # a section name may wrap onto the next line
                    section = re.sub(r"-\s*\n\s*#?\s*", "-", section)
                    section = re.sub(r"\s*\n\s*#?\s*", " ", section).strip()
                    if section.lower() not in _headings(doc):
                        wrong.append(f"{where}: {m.group(1)} has no section {section!r}")
    assert not wrong, "\n".join(wrong)


# --- the site -------------------------------------------------------------------------------


def test_the_docs_build_strictly(tmp_path):
    """A broken link between pages, a missing anchor or image, a bad reference: each fails."""
    here = Path(sys.executable).parent
    sphinx = shutil.which("sphinx-build", path=str(here)) or shutil.which("sphinx-build")
    if sphinx is None:
        pytest.skip("sphinx-build is not installed")
    argv = [
        sphinx,
        *STRICT,
        "-d",
        str(tmp_path / "doctrees"),
        str(ROOT / "docs"),
        str(tmp_path / "html"),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "html" / "index.html").is_file()


def _cli_commands() -> dict[tuple[str, ...], set[str]]:
    """Every command of the real command line, by its path, with its options."""
    found: dict[tuple[str, ...], set[str]] = {}

    def walk(command, path: tuple[str, ...]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))
        if not hasattr(command, "commands"):
            found[path] = {
                o for p in command.params if p.param_type_name == "option" for o in p.opts
            } - {"--help"}

    walk(typer.main.get_command(app), ())
    return found


def test_the_command_line_page_lists_every_option():
    """Each row of docs/cli.md's table names a command (`workbench run patching ...`) and its
    options; a pipeline's options are on its row or on the `workbench run PIPELINE` row."""
    rows: dict[tuple[str, ...], set[str]] = {}
    for cell in re.findall(r"^\| `workbench ([^`]*)`", (ROOT / "docs/cli.md").read_text(), re.M):
        path = tuple(re.match(r"^((?:[a-z][a-z-]* ?)*)", cell).group(1).split())
        rows.setdefault(path, set()).update(re.findall(r"--[a-z][a-z0-9-]*", cell))
    missing = []
    for path, options in sorted(_cli_commands().items()):
        listed = set(rows.get(path, set()))
        own = {("run", c) for c in RUN_COMMANDS}
        if path[:1] == ("run",) and path not in own:
            runs = [r for r in rows if r[:1] == ("run",) and r not in own]
            mine = runs if path == ("run", "all") else [("run",), path]
            listed = set().union(*(rows.get(r, set()) for r in mine))
        missing += [f"workbench {' '.join(path)} {o}" for o in sorted(options - listed)]
    assert not missing, "not in docs/cli.md's table:\n" + "\n".join(missing)
