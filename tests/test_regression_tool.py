"""The demo regression check (`make regress`) finds a difference in any stored number beyond its
tolerance, and a run whose key changed."""

import shutil

import duckdb

from tools.regression import compare


def test_identical_databases_agree_and_any_change_is_found(heads_db, tmp_path):
    base, new = tmp_path / "base.duckdb", tmp_path / "new.duckdb"
    shutil.copy(heads_db, base)
    shutil.copy(heads_db, new)
    assert compare(base, new) == []
    con = duckdb.connect(str(new))
    run_id, node = con.execute("SELECT run_id, node_id FROM node_scores LIMIT 1").fetchone()
    con.execute(
        "UPDATE node_scores SET score = score + 2e-6 WHERE run_id = ? AND node_id = ?",
        [run_id, node],
    )
    con.close()
    assert compare(base, new, tolerance=1e-5) == []
    diffs = compare(base, new, tolerance=1e-6)
    assert len(diffs) >= 1 and all(d.startswith("node_scores: run ") for d in diffs)
    con = duckdb.connect(str(new))
    con.execute("UPDATE runs SET run_key = 'changed' WHERE run_id = ?", [run_id])
    con.close()
    assert any("only in new" in d for d in compare(base, new, tolerance=1e-5))
