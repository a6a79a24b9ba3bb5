"""Demo regression: run `workbench demo` with the code of another git revision and with this
tree, on the same zoo checkpoints, and compare every stored number.

    python -m tools.regression BASE_REV [--tolerance 1e-6]     (make regress BASE=<rev>)

Runs are matched by run key, so the check also proves that run keys did not change: a run
present in one database and not the other is a difference. Options whose defaults changed on
purpose are pinned to their old values in both demos (`PINNED`, where a method takes the option),
so that the same computations are compared; a run metric the base never records (a quantity
added since) is listed as an addition, not a difference. Compared: each run's parameters and
clean/corrupt metrics, node scores, edges, faithfulness curves, run metrics, circuits and their
edges, SAEs and their features, and the graph's nodes. Exit status 0 when all agree within the
tolerance, 1 otherwise (each difference printed).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parent.parent

# (table, its key columns joined through runs.run_key, compared value columns)
COMPARED = [
    ("node_scores", ["node_id", "coalesce(position, -1)"], ["score"]),
    ("edges", ["src", "dst"], ["score"]),
    ("faithfulness_curves", ["requested_edges"], ["n_edges", "faithfulness"]),
    ("run_metrics", ["metric"], ["value"]),  # those the base records (`added_metrics`)
    ("saes", ["hook"], ["l0", "explained_variance", "mse", "ce_loss_recovered", "d_sae"]),
]


def tree_metadata(tree: Path, into: Path) -> Path:
    """A distribution record of `tree` (its name, version and `workbench.methods` entry points,
    read from its own pyproject.toml) in `into`: first on the path, it stands for the installed
    one, whose entry points name this tree's modules, not the other revision's."""
    project = tomllib.loads((tree / "pyproject.toml").read_text())["project"]
    info = into / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    groups = project.get("entry-points", {})
    lines = [
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
        for group, eps in groups.items()
    ]
    (info / "entry_points.txt").write_text("\n".join(lines))
    return into


# Run a tree's code and only its code: without the editable install's import hook (which would
# serve modules this tree lacks from the checkout) and with this project's first distribution
# record on the path (the tree's own, from `tree_metadata`) standing for it in entry points.
TREE_ONLY = """import importlib.metadata as md, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
_all = md.distributions
def _first_of_project(**kw):
    seen = False
    for d in _all(**kw):
        if (d.metadata["Name"] or "").lower() == "circuit-workbench":
            if seen:
                continue
            seen = True
        yield d
md.distributions = _first_of_project
"""


# option -> the value it had before its default changed (applied where a method takes it)
PINNED = {"spot_checks": 0, "ig_rule": "right"}

# (`Job.make` ignores the options a method does not take, in every revision that has it)
PIN_OPTIONS = f"""import workbench.jobs as _jobs
_make = _jobs.Job.make.__func__
def _pinned(cls, method, ref, options, params):
    return _make(cls, method, ref, options, {{**params, **{PINNED!r}}})
_jobs.Job.make = classmethod(_pinned)
"""


def run_demo(tree: Path, db: Path, zoo: Path) -> None:
    meta = tree_metadata(tree, db.parent / f"{db.stem}-meta")
    path = os.pathsep.join([str(meta), str(tree)])
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["WORKBENCH_LOG"] = "WARNING"
    code = TREE_ONLY + PIN_OPTIONS + "from workbench.cli import cli; sys.exit(cli(sys.argv[1:]))"
    argv = ["demo", "--no-app", "--db", str(db), "--zoo-dir", str(zoo)]
    subprocess.run([sys.executable, "-c", code, *argv], cwd=tree, env=env, check=True)


def compare(base: Path, new: Path, tolerance: float = 1e-6) -> list[str]:
    """Every difference between two demo databases (empty: they agree)."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{base}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{new}' AS b (READ_ONLY)")
    diffs: list[str] = []
    missing = con.execute(
        """SELECT coalesce(x.run_key, y.run_key), x.run_key IS NULL
           FROM a.runs x FULL OUTER JOIN b.runs y ON x.run_key = y.run_key
           WHERE x.run_key IS NULL OR y.run_key IS NULL"""
    ).fetchall()
    diffs += [f"run {key} only in {'new' if only_new else 'base'}" for key, only_new in missing]
    runs = con.execute(
        """SELECT x.run_key, x.method, x.status, y.status, x.params, y.params,
                  x.metric_clean, y.metric_clean, x.metric_corrupt, y.metric_corrupt
           FROM a.runs x JOIN b.runs y USING (run_key)"""
    ).fetchall()
    for key, method, s1, s2, p1, p2, c1, c2, r1, r2 in runs:
        if (s1, p1) != (s2, p2):
            diffs.append(f"run {key} ({method}): status/params {s1} {p1} != {s2} {p2}")
        for name, x, y in (("metric_clean", c1, c2), ("metric_corrupt", r1, r2)):
            if not _close(x, y, tolerance):
                diffs.append(f"run {key} ({method}): {name} {x} != {y}")
    for table, keys, values in COMPARED:
        diffs += _compare_table(con, table, keys, values, tolerance)

    diffs += _compare_circuits(con, tolerance)
    nodes = con.execute(
        """SELECT count(*) FROM (
             (SELECT model_id, node_id, kind, layer, head, sae_id, feature, label FROM a.nodes
              EXCEPT SELECT model_id, node_id, kind, layer, head, sae_id, feature, label
              FROM b.nodes)
             UNION ALL
             (SELECT model_id, node_id, kind, layer, head, sae_id, feature, label FROM b.nodes
              EXCEPT SELECT model_id, node_id, kind, layer, head, sae_id, feature, label
              FROM a.nodes))"""
    ).fetchone()
    if nodes and nodes[0]:
        diffs.append(f"nodes: {nodes[0]} rows differ")
    con.close()
    return diffs


def added_metrics(base: Path, new: Path) -> list[str]:
    """Run metrics the new database records and the base never does: quantities added since."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{base}' AS a (READ_ONLY)")
    con.execute(f"ATTACH '{new}' AS b (READ_ONLY)")
    rows = con.execute(
        "SELECT DISTINCT metric FROM b.run_metrics EXCEPT SELECT metric FROM a.run_metrics "
        "ORDER BY 1"
    ).fetchall()
    con.close()
    return [m for (m,) in rows]


def _close(x: float | None, y: float | None, tolerance: float) -> bool:
    if x is None or y is None:
        return x is None and y is None
    return abs(float(x) - float(y)) <= tolerance


def _compare_table(
    con: duckdb.DuckDBPyConnection,
    table: str,
    keys: list[str],
    values: list[str],
    tolerance: float,
) -> list[str]:
    def side(db: str) -> str:
        cols = ", ".join([*(f"{k} AS k{i}" for i, k in enumerate(keys)), *values])
        base_only = " WHERE metric IN (SELECT metric FROM a.run_metrics)"
        only = base_only if table == "run_metrics" else ""
        return f"SELECT r.run_key, {cols} FROM {db}.{table} t JOIN {db}.runs r USING (run_id){only}"

    on = " AND ".join(["x.run_key = y.run_key", *(f"x.k{i} = y.k{i}" for i in range(len(keys)))])
    differs = " OR ".join(
        f"x.run_key IS NULL OR y.run_key IS NULL OR NOT (abs(x.{v} - y.{v}) <= {tolerance} "
        f"OR (x.{v} IS NULL AND y.{v} IS NULL))"
        for v in values
    )
    rows = con.execute(
        f"""SELECT coalesce(x.run_key, y.run_key), {", ".join(f"x.{v}, y.{v}" for v in values)},
                   {", ".join(f"coalesce(x.k{i}, y.k{i})" for i in range(len(keys)))}
            FROM ({side("a")}) x FULL OUTER JOIN ({side("b")}) y ON {on}
            WHERE {differs}"""
    ).fetchall()
    out = [f"{table}: run {r[0]} at {r[1 + 2 * len(values) :]}: {r[1 : 1 + 2 * len(values)]}"
           for r in rows[:20]]  # fmt: skip
    if len(rows) > 20:
        out.append(f"{table}: {len(rows) - 20} more differences")
    return out


def _compare_circuits(con: duckdb.DuckDBPyConnection, tolerance: float) -> list[str]:
    def side(db: str) -> str:
        return f"""SELECT r.run_key, c.rule, c.n_nodes, c.n_edges, c.faithfulness,
                          list(e.src || '>' || e.dst || '=' || round(e.score, 6)
                               ORDER BY e.src, e.dst) AS edges
                   FROM {db}.circuits c JOIN {db}.runs r USING (run_id)
                   LEFT JOIN {db}.circuit_edges e USING (circuit_id)
                   GROUP BY ALL"""

    rows = con.execute(
        f"""SELECT coalesce(x.run_key, y.run_key), x.rule, y.rule, x.n_nodes, y.n_nodes,
                   x.n_edges, y.n_edges, x.faithfulness, y.faithfulness, x.edges = y.edges
            FROM ({side("a")}) x FULL OUTER JOIN ({side("b")}) y USING (run_key)"""
    ).fetchall()
    out = []
    for key, r1, r2, n1, n2, e1, e2, f1, f2, same_edges in rows:
        if (r1, n1, e1) != (r2, n2, e2) or not _close(f1, f2, tolerance) or not same_edges:
            out.append(f"circuit of run {key}: {r1}/{n1}/{e1}/{f1} != {r2}/{n2}/{e2}/{f2}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="git revision to compare against")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--keep", help="directory for the databases (default: a temp dir)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="workbench-regress-"))
    work.mkdir(parents=True, exist_ok=True)
    base_tree = work / "base-tree"
    if not base_tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True
        )
    try:
        zoo = work / "zoo"
        for name, tree in (("base", base_tree), ("new", ROOT)):
            db = work / f"{name}.duckdb"
            if not db.exists():
                print(f"demo with the {name} code ({tree}) ...", flush=True)
                run_demo(tree, db, zoo)
        diffs = compare(work / "base.duckdb", work / "new.duckdb", args.tolerance)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT)
    con = duckdb.connect(str(work / "new.duckdb"), read_only=True)
    n_runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]  # type: ignore[index]
    n_scores = con.execute(
        "SELECT (SELECT count(*) FROM node_scores) + (SELECT count(*) FROM edges)"
    ).fetchone()[0]  # type: ignore[index]
    con.close()
    added = added_metrics(work / "base.duckdb", work / "new.duckdb")
    if added:
        print(f"run metrics added since {args.base} (not compared): {', '.join(added)}")
    for line in diffs:
        print(line)
    verdict = "agree" if not diffs else f"differ in {len(diffs)} places"
    print(
        f"{n_runs} runs, {n_scores} node and edge scores: {args.base} and this tree {verdict} "
        f"(tolerance {args.tolerance})"
    )
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
