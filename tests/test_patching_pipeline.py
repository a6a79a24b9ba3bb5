"""The `patching` pipeline end to end: runs per component, scores by position, bad options."""

import json

import duckdb
import pytest

from tests.conftest import write_jsonl
from workbench.cli import cli


def test_patching_pipeline_stores_every_component(tmp_path, tiny_hf_dirs):
    db = tmp_path / "w.duckdb"
    model = str(tiny_hf_dirs["gpt2"])
    args = ["run", "patching", "--model", model, "--task", "induction", "--n-prompts", "4"]
    assert cli([*args, "--db", str(db)]) == 0
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute(
        "SELECT json_extract_string(params, '$.component') AS c, count(*) FROM runs GROUP BY c"
    ).fetchall()
    assert {c for c, _ in runs} == {
        "resid", "attn_out", "mlp_out", "head_out", "head_q", "head_k", "head_v", "head_pattern",
    }  # fmt: skip
    assert all(n == 2 for _, n in runs)  # denoise and noise
    resid_rows = con.execute(
        """SELECT count(*), count(DISTINCT position) FROM node_scores JOIN runs USING (run_id)
           WHERE json_extract_string(params, '$.component') = 'resid'
             AND method = 'act_patch_denoise'"""
    ).fetchone()
    n_positions = 8 + 5  # no tokenizer, so no BOS: a period of 8, then 5 tokens repeated
    assert resid_rows == (2 * n_positions, n_positions)  # 2 layers x every position
    assert (
        con.execute("SELECT count(*) FROM node_scores WHERE NOT isfinite(score)").fetchone()[0] == 0
    )
    con.close()


def test_by_position_head_out_and_mean_ablation(tmp_path, tiny_hf_dirs):
    db = tmp_path / "w.duckdb"
    model = str(tiny_hf_dirs["gpt2"])
    argv = ["run", "patching", "--model", model, "--task", "induction", "--n-prompts", "4",
            "--component", "head_out", "--by-position", "--method", "act_patch_noise",
            "--ablation", "mean", "--db", str(db)]  # fmt: skip
    assert cli(argv) == 0
    con = duckdb.connect(str(db), read_only=True)
    params = json.loads(con.execute("SELECT params FROM runs").fetchone()[0])
    assert params == {"component": "head_out", "positions": "each", "ablation": "mean"} | {
        "device": "cpu",  # where and in what precision the run computed (every run records it)
        "dtype": "float32",
    }
    n = con.execute("SELECT count(*) FROM node_scores").fetchone()[0]
    con.close()
    assert n == 2 * 4 * 13  # layers x heads x positions


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--component", "mlp_out"], "--component mlp_out: the model is attention-only"),
        (["--component", "nope"], "--component nope: unknown component"),
        (["--ablation", "noise"], "--ablation noise: choose from"),
        (["--method", "dla"], "--method dla: not a patching method"),
    ],
)
def test_bad_patching_options_exit_2(tmp_path, induction_dir, capsys, extra, message):
    argv = ["run", "patching", "--model", str(induction_dir), "--task", "induction"]
    assert cli([*argv, "--db", str(tmp_path / "w.duckdb"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_by_position_needs_one_prompt_length(tmp_path, induction_dir, capsys):
    task = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"clean": "apple river apple", "corrupt": "stone river apple",
                        "answer": " river", "wrong": " stone"}),
            json.dumps({"clean": "apple river tiger apple", "corrupt": "stone river tiger apple",
                        "answer": " river", "wrong": " stone"}),
        ],
    )  # fmt: skip
    argv = ["run", "patching", "--model", str(induction_dir), "--task", str(task)]
    assert cli([*argv, "--component", "resid", "--db", str(tmp_path / "w.duckdb")]) == 2
    assert "needs prompts of one length" in capsys.readouterr().err
    assert cli([*argv, "--component", "head_out", "--db", str(tmp_path / "w.duckdb")]) == 0
