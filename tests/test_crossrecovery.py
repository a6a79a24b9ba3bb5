"""Cross-recovery on the zoo's induction run: every checkpoint's stored `eap` circuit evaluated at
every checkpoint. Exact on the diagonal (a circuit at its own checkpoint is its stored
faithfulness); the last checkpoint's circuit fails before the induction mechanism forms and holds
after it."""

import duckdb
import pytest

from workbench.cli import cli
from workbench.crossrecovery import evenly_spaced


def _rows(db, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


MATRIX = """SELECT ka.step AS circuit_step, kb.step AS at_step, x.faithfulness,
                  c.faithfulness AS stored
           FROM cross_recovery x JOIN circuits c USING (circuit_id) JOIN runs r USING (run_id)
           JOIN checkpoints ka ON ka.checkpoint_id = r.checkpoint_id
           JOIN checkpoints kb ON kb.checkpoint_id = x.checkpoint_id
           ORDER BY circuit_step, at_step"""


@pytest.fixture(scope="module")
def recovered(induction_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("cross") / "w.duckdb"
    base = ["--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    assert cli(["run", "edges", *base, "--checkpoint", "all", "--method", "eap"]) == 0
    assert cli(["run", "cross-recovery", *base]) == 0
    return db, base


def test_every_circuit_at_every_checkpoint_exact_on_the_diagonal(recovered):
    db, _ = recovered
    rows = _rows(db, MATRIX)
    steps = sorted({r[0] for r in rows})
    assert len(steps) == 11 and len(rows) == 11 * 11
    diagonal = [(r[2], r[3]) for r in rows if r[0] == r[1]]
    assert len(diagonal) == 11
    assert all(value == stored for value, stored in diagonal)  # the same passes, bit for bit


def test_the_last_circuit_fails_before_formation_and_holds_after(recovered):
    """Along the last checkpoint's circuit, faithfulness crosses 0.8 once, upward, and not
    before the training loss's largest drop (where the induction head forms: within one
    checkpoint interval, tests/test_timeline.py). Measured on this machine: at most 0.17 up to
    step 300, 0.32 at 400, 0.58 at 500, 0.92-0.97 from step 600."""
    db, _ = recovered
    rows = _rows(db, MATRIX)
    last = max(r[0] for r in rows)
    along = [(at, value) for circuit, at, value, _ in rows if circuit == last]
    holds = [value >= 0.8 for _, value in along]
    first = holds.index(True)
    assert all(holds[first:]) and not any(holds[:first])
    assert along[0][1] < 0.5 and along[1][1] < 0.5  # steps 0 and 100
    losses = _rows(
        db, "SELECT step, train_loss FROM checkpoints WHERE train_loss IS NOT NULL ORDER BY step"
    )
    drops = [(a[1] - b[1], b[0]) for a, b in zip(losses, losses[1:], strict=False)]
    assert along[first][0] >= max(drops)[1]


def test_stored_rows_are_not_computed_again_and_bad_input_exits_2(recovered, tmp_path, capsys):
    db, base = recovered
    capsys.readouterr()
    assert cli(["run", "cross-recovery", *base]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 11 and all(line.startswith("cached ") for line in out)
    before = _rows(db, "SELECT count(*) FROM cross_recovery")
    assert cli(["run", "cross-recovery", *base, "--max-checkpoints", "4", "--force"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert _rows(db, "SELECT count(*) FROM cross_recovery") == before  # replaced, not added
    empty = tmp_path / "empty.duckdb"
    for argv, message in (
        ([*base[:4], "--db", str(empty)], "0 checkpoint(s) with a stored eap circuit"),
        ([*base, "--max-checkpoints", "1"], "--max-checkpoints 1: must be 2 or more"),
        ([*base, "--method", "eap_ig"], "0 checkpoint(s) with a stored eap_ig circuit"),
    ):
        assert cli(["run", "cross-recovery", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert _rows(db, "SELECT count(*) FROM cross_recovery") == before


def test_evenly_spaced_keeps_the_first_and_the_last():
    assert evenly_spaced(list(range(5)), 12) == list(range(5))
    picked = evenly_spaced(list(range(30)), 12)
    assert len(picked) == 12 and picked[0] == 0 and picked[-1] == 29
    gaps = {b - a for a, b in zip(picked, picked[1:], strict=False)}
    assert gaps <= {2, 3}
