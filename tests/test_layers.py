"""Layer rules as import contracts over whole packages (every module, found by walking the tree):

* the library (`workbench` but its `app` and `pipelines` packages) never imports
  `workbench.pipelines` or `workbench.app`: pipelines register through entry points, the app
  is started as a script;
* compute (`workbench.attribution`, `.sae`, `.circuits`, `.zoo`, `.models`, `.tasks`) never
  imports duckdb or streamlit;
* the store side (`workbench.store`, `.rows`, `.results`, `.registry`) never imports torch or
  model code, nor does the app; `workbench.core` imports nothing outside the standard library;
* no module of `workbench` (app and pipelines included) imports itself back through others
  (`import_graph` says how packages count).

Each module's imports are read from its source, function-level imports included (those under
`if TYPE_CHECKING:` excepted); a contract on what must not be *loaded* also follows module-level
imports transitively through the project's own modules. A fresh interpreter then confirms the
loaded-modules view for the entry modules.
"""

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench",)  # the app and the pipelines are workbench.app, workbench.pipelines
MODEL_CODE = ["torch", "transformer_lens", "sae_lens", "transformers"]
UI_AND_DB = ["duckdb", "streamlit"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


@cache
def imports(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """(every import of the module, those at module level), as absolute names: `import a.b`
    gives `a.b`, `from a import b` gives `a.b` (the module `a.b`, or the name `b` of `a`)."""
    path = modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    every: set[str] = set()
    top: set[str] = set()

    def visit(node: ast.AST, at_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit_stmt(stmt, at_top)
                continue
            visit_stmt(child, at_top)

    def visit_stmt(stmt: ast.AST, at_top: bool) -> None:
        names: list[str] = []
        if isinstance(stmt, ast.Import):
            names = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            base = stmt.module or ""
            if stmt.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - stmt.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names = [base if a.name == "*" else f"{base}.{a.name}" for a in stmt.names]
        for name in names:
            every.add(name)
            if at_top:
                top.add(name)
        inner_top = at_top and not isinstance(
            stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
        )
        visit(stmt, inner_top)

    visit(tree, True)
    return frozenset(every), frozenset(top)


def _own(name: str) -> str | None:
    """The project module an import names (a module, or the module a name is imported from)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


def loaded_at_import(module: str) -> set[str]:
    """Every import that runs when `module` is imported: module-level imports, followed
    through the project's own modules (and their parent packages)."""
    seen: set[str] = set()
    found: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parent = current.rpartition(".")[0]
        if parent in modules():
            todo.append(parent)
        for name in imports(current)[1]:
            found.add(name)
            own = _own(name)
            if own:
                todo.append(own)
    return found


def _matches(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def members(*prefixes: str) -> list[str]:
    found = [m for m in modules() if _matches(m, list(prefixes))]
    assert found, f"no modules under {prefixes}"
    return found


APP, PIPELINES = ["workbench.app"], ["workbench.pipelines"]

CONTRACTS = [
    # (contract, modules, forbidden prefixes, also what their import loads)
    (
        "library never imports pipelines or app",
        [m for m in members("workbench") if not _matches(m, [*PIPELINES, *APP])],
        [*PIPELINES, *APP],
        True,
    ),
    (
        "compute never imports duckdb or streamlit",
        members(
            "workbench.attribution",
            "workbench.sae",
            "workbench.circuits",
            "workbench.zoo",
            "workbench.models",
            "workbench.tasks",
            "workbench.prompt.views",
            "workbench.transcoders.sets",
            "workbench.transcoders.graph",
            "workbench.transcoders.train",
            "workbench.transcoders.plan",
            "workbench.transcoders.compute",
        ),
        UI_AND_DB,
        False,
    ),
    (
        "the store never imports model code",
        members("workbench.store", "workbench.rows", "workbench.results", "workbench.registry"),
        MODEL_CODE,
        True,
    ),
    ("the app never imports model code", members(*APP), MODEL_CODE, True),
    (
        "the vocabulary needs nothing but the standard library",
        ["workbench.core"],
        ["torch", "duckdb", "streamlit", "pyarrow", "numpy", "pandas", "networkx"],
        True,
    ),
    ("pipelines never import the app", members(*PIPELINES), [*APP, "streamlit"], True),
]


@pytest.mark.parametrize(
    ("modules_", "forbidden", "transitive"),
    [c[1:] for c in CONTRACTS],
    ids=[c[0] for c in CONTRACTS],
)
def test_import_contract(modules_, forbidden, transitive):
    broken = []
    for module in modules_:
        direct = {n for n in imports(module)[0] if _matches(n, forbidden)}
        broken += [f"{module} imports {n}" for n in sorted(direct)]
        if transitive:
            loads = {n for n in loaded_at_import(module) if _matches(n, forbidden)}
            broken += [f"importing {module} loads {n}" for n in sorted(loads - direct)]
    assert not broken, "\n".join(broken)


def test_the_contract_checker_sees_function_level_and_transitive_imports():
    """The checker is not blind: the local executor reaches model code only inside functions and
    loads the store (and so duckdb) at import, and so does the runner through it; the prompt
    batches load torch."""
    every, top = imports("workbench.executor_local")
    assert "workbench.store.session.StoreSession" in top
    assert "workbench.models.load_checkpoint" in every - top
    assert "duckdb" in loaded_at_import("workbench.executor_local")
    assert "duckdb" in loaded_at_import("workbench.runner")
    assert "torch" in loaded_at_import("workbench.attribution.batches")
    assert "torch" not in loaded_at_import("workbench.registry")


def import_graph() -> dict[str, set[str]]:
    """Each project module and the project modules it imports, anywhere in its file.

    `import a.b` imports the module `a.b`; so does `from a import b` when `a.b` is a module,
    else it imports the package `a` (its `__init__`, where the name `b` is defined or
    re-exported). The parent packages Python runs first are not counted: a package importing
    its own submodules is no cycle by itself, nor is a submodule importing a sibling
    (`from workbench.tasks import builtin` counts as `import workbench.tasks.builtin`); a
    submodule taking a name from its package (`from workbench.tasks import load_task`) while
    the package imports the submodule is one."""
    graph: dict[str, set[str]] = {}
    for module in modules():
        targets = {_own(name) for name in imports(module)[0]}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (its modules in import order, the first repeated at the end) for each group
    of modules that import one another."""
    import networkx as nx

    g = nx.DiGraph([(m, t) for m, ts in graph.items() for t in ts])
    found = []
    for group in nx.strongly_connected_components(g):
        if len(group) > 1:
            edges = nx.find_cycle(g.subgraph(group), source=min(group))
            found.append([e[0] for e in edges] + [edges[0][0]])
    return sorted(found)


def test_no_import_cycles():
    """Module A importing B while B imports A (directly or through others, at module level or
    inside a function) is a cycle."""
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_import_graph_counts_imports_as_its_docstring_says():
    graph = import_graph()
    # a package importing its submodules, which import a sibling: no edge back to the package
    assert {"workbench.tasks.spec", "workbench.tasks.jsonl"} <= graph["workbench.tasks"]
    assert "workbench.tasks.spec" in graph["workbench.tasks.jsonl"]
    assert "workbench.tasks" not in graph["workbench.tasks.jsonl"]
    # `from workbench.models import zoo_format` is the submodule, not the package
    assert "workbench.models.zoo_format" in graph["workbench.models.sources"]
    assert "workbench.models" not in graph["workbench.models.sources"]
    # a name from a package is the package, imported inside a function here
    every, top = imports("workbench.executor_local")
    assert {"workbench.tasks.load_task", "workbench.models.load_checkpoint"} <= every - top
    assert {"workbench.tasks", "workbench.models"} <= graph["workbench.executor_local"]
    # imports under `if TYPE_CHECKING:` are left out
    assert "workbench.tasks.spec" not in graph["workbench.registry"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


LOADS_NOTHING_OF = [
    ("workbench.core", ["torch", "duckdb", "streamlit", "pyarrow"]),
    ("workbench.store", MODEL_CODE + ["streamlit"]),
    ("workbench.rows", MODEL_CODE + UI_AND_DB),
    ("workbench.registry", MODEL_CODE + UI_AND_DB),
    ("workbench.attribution.edges", UI_AND_DB),
    ("workbench.sae.attribution", UI_AND_DB),
    ("workbench.transcoders.graph", UI_AND_DB),
    ("workbench.app.views.circuit", MODEL_CODE),
]


def test_modules_do_not_load_what_they_must_not():
    """Each module imported alone, in a fresh interpreter of its own (all started at once),
    loads none of its forbidden packages."""
    procs = []
    for module, forbidden in LOADS_NOTHING_OF:
        code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append((module, subprocess.Popen([sys.executable, "-c", code], **pipes)))
    loads = {}
    for module, proc in procs:
        out, err = proc.communicate()
        assert proc.returncode == 0, f"import {module} failed: {err.strip()[-500:]}"
        if out.strip() != "[]":
            loads[module] = out.strip()
    assert not loads, f"modules load what they must not: {loads}"


def test_the_app_writes_only_saved_subgraphs():
    """The app is read-only but for one write: saving a curated subgraph, through the store's
    API (`Store.save_subgraph`), in the curation view."""
    import re

    app_dir = ROOT / "app"
    sources = {p.relative_to(ROOT).as_posix(): p.read_text() for p in app_dir.rglob("*.py")}
    assert not [name for name, text in sources.items() if "write_run" in text]
    writers = sorted(name for name, text in sources.items() if "Store(" in text)
    assert writers == ["app/views/curate.py"]
    calls = set(re.findall(r"\bstore\.(\w+)\(", sources["app/views/curate.py"]))
    assert calls == {"save_subgraph"}
