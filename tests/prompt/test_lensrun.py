"""`workbench run tuned-lens` trains and stores a tuned lens like an SAE (its directory moved into
place in the transaction that stores its rows), `workbench run prompt` then stores its
predictions on the prompt, equal to the lens applied directly; a crash while storing leaves
neither rows nor directories; bad input is one sentence, exit status 2."""

from pathlib import Path

import pytest

from tests.db import rows
from workbench.cli import cli
from workbench.prompt.tunedlens import load_tuned_lens, tuned_lens_predictions

TRAIN = ["--steps", "30", "--tokens-per-step", "4096", "--corpus-tokens", "20000"]


@pytest.fixture(scope="module")
def lens_db(induction_dir, tmp_path_factory) -> tuple[Path, list[str]]:
    db = tmp_path_factory.mktemp("lens") / "w.duckdb"
    argv = ["run", "tuned-lens", "--model", str(induction_dir), "--task", "induction"]
    argv += [*TRAIN, "--db", str(db)]
    assert cli(argv) == 0
    return db, argv


@pytest.mark.numerics
def test_the_stored_lens_beats_the_logit_lens_on_held_out_windows(lens_db, measured):
    db, _ = lens_db
    ((lid, path, n_tokens),) = rows(db, "SELECT lens_id, path, n_tokens FROM tuned_lenses")
    assert Path(path).is_dir() and Path(path).name == lid
    assert not list(Path(path).parent.glob(".*partial*"))
    assert n_tokens > 0
    kl = dict(rows(db, "SELECT metric || layer, value FROM lens_metrics WHERE lens_id = ?", [lid]))
    for layer in range(2):
        ratio = measured(
            f"tuned / logit lens KL, layer {layer}",
            kl[f"kl_tuned{layer}"] / kl[f"kl_logit_lens{layer}"],
        )
        # measured 0.85-0.90 (seeds 0-1, avx2 and default kernels); 30 steps of 4096 tokens
        assert ratio < 0.97


def test_run_prompt_stores_the_lens_on_the_prompt(lens_db, induction_final, induction_task):
    db, _ = lens_db
    ((lid, path),) = rows(db, "SELECT lens_id, path FROM tuned_lenses")
    model_dir = rows(db, "SELECT source FROM models")[0][0]
    argv = ["run", "prompt", "--model", model_dir, "--task", "induction", "--index", "2"]
    assert cli([*argv, "--attribution", "none", "--no-patchscope", "--db", str(db)]) == 0
    lens, provenance = load_tuned_lens(path)
    assert provenance["checkpoint_id"] == induction_final.checkpoint.checkpoint_id
    ids = list(induction_task.pairs[2].clean_tokens)
    direct = tuned_lens_predictions(induction_final.model, lens, ids)
    stored = rows(
        db,
        "SELECT layer, position, rank, token_id, prob FROM prompt_tuned_lens "
        "WHERE lens_id = ? AND rank IS NOT NULL ORDER BY layer, position, rank",
        [lid],
    )
    assert [r[:4] for r in stored] == [r[:4] for r in direct.lens]
    assert [r[4] for r in stored] == pytest.approx([r[4] for r in direct.lens], abs=1e-6)


def test_a_second_run_is_cached(lens_db, capsys):
    db, argv = lens_db
    before = rows(db, "SELECT lens_id, created_at FROM tuned_lenses")
    assert cli(argv) == 0
    assert "cached" in capsys.readouterr().out
    assert rows(db, "SELECT lens_id, created_at FROM tuned_lenses") == before


def test_a_crash_while_storing_leaves_nothing(induction_dir, tmp_path, monkeypatch):
    from workbench.store import db as store_db

    real = store_db.Store._insert

    def failing(self, con, table, data, **kw):  # type: ignore[no-untyped-def]
        if table == "lens_metrics":
            raise RuntimeError("disk full")
        return real(self, con, table, data, **kw)

    monkeypatch.setattr(store_db.Store, "_insert", failing)
    db = tmp_path / "w.duckdb"
    argv = ["run", "tuned-lens", "--model", str(induction_dir), "--task", "induction"]
    assert cli([*argv, "--steps", "2", "--tokens-per-step", "512", "--db", str(db)]) == 1
    assert rows(db, "SELECT count(*) FROM tuned_lenses") == [(0,)]
    assert rows(db, "SELECT count(*) FROM lens_metrics") == [(0,)]
    assert list((tmp_path / "lenses").iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--corpus", "task"], "--corpus task needs --task"),
        (["--task", "induction", "--steps", "0"], "tuned lens steps 0"),
        (["--task", "induction", "--corpus", "/nonexistent.txt"], "corpus file not found"),
    ],
)
def test_bad_input_is_one_sentence(induction_dir, tmp_path, capsys, extra, message):
    argv = ["run", "tuned-lens", "--model", str(induction_dir), "--db", str(tmp_path / "w.db")]
    assert cli([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
