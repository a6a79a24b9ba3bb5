"""The `method_agreement` view against Spearman's rank correlation as SciPy computes it, on the
runs the heads, patching and edges pipelines stored at one zoo checkpoint."""

from collections import defaultdict
from itertools import combinations

import duckdb
import numpy as np
import pytest
from scipy.stats import spearmanr


def _scores(con, checkpoint_id: str) -> dict[tuple[str, str], dict[str, float]]:
    """Per (run, kind): its scores by item, read independently of the view."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for run_id, node, position, score in con.execute(
        """SELECT s.run_id, s.node_id, s.position, s.score FROM node_scores s JOIN runs r
           USING (run_id) WHERE r.status = 'done' AND r.checkpoint_id = ?""",
        [checkpoint_id],
    ).fetchall():
        out[run_id, "node"][f"{node}/{position}"] = score
    for run_id, src, dst, score in con.execute(
        """SELECT e.run_id, e.src, e.dst, e.score FROM edges e JOIN runs r USING (run_id)
           WHERE r.status = 'done' AND r.checkpoint_id = ?""",
        [checkpoint_id],
    ).fetchall():
        out[run_id, "edge"][f"{src}/{dst}"] = score
    return out


def test_method_agreement_is_spearmans_rank_correlation(heads_db):
    with duckdb.connect(str(heads_db), read_only=True) as con:
        (checkpoint_id,) = con.execute(
            "SELECT checkpoint_id FROM checkpoints WHERE step = 1000"
        ).fetchone()
        view = con.execute(
            """SELECT kind, run_a, run_b, n, spearman, spearman_abs FROM method_agreement
               WHERE checkpoint_id = ?""",
            [checkpoint_id],
        ).fetchall()
        scores = _scores(con, checkpoint_id)
        tasks = dict(con.execute("SELECT run_id, task_id FROM runs").fetchall())
    expected = {}
    for (run_a, kind_a), (run_b, kind_b) in combinations(sorted(scores), 2):
        if kind_a != kind_b or tasks[run_a] != tasks[run_b]:
            continue
        shared = sorted(scores[run_a, kind_a].keys() & scores[run_b, kind_b].keys())
        if len(shared) >= 3:
            a = np.array([scores[run_a, kind_a][i] for i in shared])
            b = np.array([scores[run_b, kind_b][i] for i in shared])
            expected[kind_a, frozenset((run_a, run_b))] = (
                len(shared),
                spearmanr(a, b).statistic,
                spearmanr(np.abs(a), np.abs(b)).statistic,
            )
    assert len(view) == len(expected) > 20  # every pair of runs, once
    for kind, run_a, run_b, n, rho, rho_abs in view:
        n_expected, rho_expected, rho_abs_expected = expected[kind, frozenset((run_a, run_b))]
        assert n == n_expected
        for got, want in ((rho, rho_expected), (rho_abs, rho_abs_expected)):
            if np.isnan(want):  # one side constant: no correlation
                assert got is None or np.isnan(got)
            else:
                assert got == pytest.approx(want, abs=1e-9)
