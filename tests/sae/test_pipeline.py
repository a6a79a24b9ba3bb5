"""`workbench run sae` end to end: what it stores, re-runs, other architectures and hooks, user
corpora, and bad input (exit 2, one sentence, nothing stored changes)."""

import json
import shutil

import pytest
from sae_lens import SAE

from tests.conftest import SEED
from tests.sae.conftest import HOOKS, query
from tests.store.test_store import counts
from workbench.cli import cli


def test_stores_saes_features_examples_and_a_feature_circuit(sae_run):
    runs = query(sae_run.db, "SELECT method, status, params FROM runs ORDER BY method")
    assert [(r["method"], r["status"]) for r in runs] == [
        ("sae_attr", "done"),
        ("sae_features", "done"),
        ("sae_features", "done"),
    ]
    sae_ids = {row["sae_id"] for row in sae_run.saes.values()}
    assert set(json.loads(runs[0]["params"])["saes"]) == sae_ids
    for hook, row in sae_run.saes.items():
        assert row["path"] == str(sae_run.sae_dir / row["sae_id"])
        assert SAE.load_from_disk(row["path"]).cfg.metadata.hook_name == hook
        assert row["architecture"] == "topk" and row["d_sae"] == 4 * row["d_in"]
    kinds = query(
        sae_run.db,
        "SELECT kind, count(*) AS n FROM nodes WHERE sae_id IS NOT NULL GROUP BY kind ORDER BY 1",
    )
    d_sae = sum(r["d_sae"] for r in sae_run.saes.values())
    assert kinds == [{"kind": "feature", "n": d_sae}, {"kind": "sae_error", "n": 2}]

    attr = query(sae_run.db, "SELECT run_id FROM runs WHERE method = 'sae_attr'")[0]["run_id"]
    edges = query(sae_run.db, "SELECT src, dst FROM edges WHERE run_id = ?", [attr])
    early, late = (f"f:{sae_run.saes[h]['sae_id']}:" for h in HOOKS)
    assert any(e["src"] == "input" and e["dst"].startswith(early) for e in edges)
    assert any(e["src"].startswith(early) and e["dst"].startswith(late) for e in edges)
    assert any(e["src"].startswith(late) and e["dst"] == "logits" for e in edges)
    assert any(e["src"].startswith("a1.h") and e["dst"].startswith(late) for e in edges)
    assert not any(e["src"].startswith("a1.h") and e["dst"].startswith(early) for e in edges)
    scored = query(sae_run.db, "SELECT node_id FROM node_scores WHERE run_id = ?", [attr])
    assert {early + "err", late + "err"} <= {r["node_id"] for r in scored}
    circuit = query(sae_run.db, "SELECT * FROM circuits WHERE run_id = ?", [attr])[0]
    assert circuit["faithfulness"] >= 0.8
    curve = query(
        sae_run.db,
        "SELECT faithfulness FROM faithfulness_curves WHERE run_id = ? ORDER BY requested_edges",
        [attr],
    )
    assert curve[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)


def test_rerun_skips_and_force_replaces(sae_run, induction_dir, tmp_path, capsys):
    db = tmp_path / "copy.duckdb"
    shutil.copy(sae_run.db, db)
    argv = ["run", "sae", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    argv += ["--hook", HOOKS[0], "--training-tokens", "200000", "--corpus-tokens", "24000"]
    argv += ["--sae-dir", str(sae_run.sae_dir), "--method", "sae_features", "--seed", str(SEED)]
    before = counts(db)
    capsys.readouterr()
    assert cli(argv) == 0
    assert capsys.readouterr().out.startswith("skipped")
    assert counts(db) == before
    assert cli([*argv, "--force", "--sae-dir", str(tmp_path / "saes")]) == 0
    assert counts(db) == before
    assert (tmp_path / "saes" / sae_run.saes[HOOKS[0]]["sae_id"] / "cfg.json").is_file()


def test_attr_alone_uses_the_stored_saes(sae_run, induction_dir, tmp_path):
    db = tmp_path / "copy.duckdb"
    shutil.copy(sae_run.db, db)
    argv = ["run", "sae", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    assert cli([*argv, "--method", "sae_attr", "--n-nodes", "4", "--ig-steps", "2"]) == 0
    params = query(db, "SELECT params FROM runs WHERE method = 'sae_attr' ORDER BY finished_at")
    assert set(json.loads(params[-1]["params"])["saes"]) == {
        r["sae_id"] for r in sae_run.saes.values()
    }
    assert json.loads(params[-1]["params"])["ig_rule"] == "midpoint"  # the default
    argv += ["--method", "sae_attr", "--n-nodes", "4", "--ig-steps", "2", "--ig-rule", "left"]
    assert cli(argv) == 0  # another rule is another run
    # each SAE's completeness is the sum of its nodes' stored scores
    rows = query(
        db,
        """SELECT r.params->>'ig_rule' AS rule, m.metric, m.value,
                  (SELECT sum(score) FROM node_scores s WHERE s.run_id = r.run_id
                     AND s.node_id LIKE 'f:' || split_part(m.metric, ':', 2) || ':%') AS total
           FROM runs r JOIN run_metrics m USING (run_id)
           WHERE r.method = 'sae_attr' AND m.metric LIKE 'ig_completeness:%'""",
    )
    # the stored run of the fixture, the one above and the left-rule one: two SAEs each
    assert sorted({r["rule"] for r in rows}) == ["left", "midpoint"] and len(rows) == 6
    for row in rows:
        assert row["value"] == pytest.approx(row["total"], abs=1e-6)


def test_standard_sae_on_hook_z_of_a_hugging_face_model_with_a_corpus_file(tiny_hf_dirs, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "\n".join(json.dumps({"tokens": [(7 * i + j) % 97 for j in range(40)]}) for i in range(50))
    )
    task = tmp_path / "task.jsonl"
    task.write_text(
        json.dumps(
            {"clean_ids": [1, 2, 3], "corrupt_ids": [1, 4, 3], "answer_id": 5, "wrong_id": 6}
        )
    )
    db = tmp_path / "w.duckdb"
    hook = "blocks.1.attn.hook_z"
    argv = ["run", "sae", "--model", str(tiny_hf_dirs["gpt2"]), "--task", str(task)]
    argv += ["--db", str(db), "--hook", hook, "--architecture", "standard", "--corpus", str(corpus)]
    argv += ["--training-tokens", "20000", "--context-size", "32", "--method", "sae_features"]
    assert cli(argv) == 0
    row = query(db, "SELECT * FROM saes")[0]
    assert (row["hook"], row["architecture"], row["d_in"]) == (hook, "standard", 32)
    assert row["n_tokens"] == 2000 // 32 * 32 and row["corpus"] == str(corpus.resolve())
    sae = SAE.load_from_disk(row["path"])
    assert sae.cfg.architecture() == "standard" and sae.cfg.d_in == 32
    logits = query(db, "SELECT top_logits FROM features WHERE NOT dead LIMIT 1")
    assert len(json.loads(logits[0]["top_logits"])) == 10  # through W_O and W_U


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hook", "blocks.7.hook_resid_post"], "hook 'blocks.7.hook_resid_post' is not a hook"),
        (["--sae", "{tmp}/nowhere"], "nowhere: no SAE directory here"),
        (["--sae", "{tmp}"], "not a SAELens SAE directory (no cfg.json)"),
        (["--sae", "{gpt2_sae}"], "the SAE reads 32-dimensional inputs at blocks.1.attn.hook_z"),
        (["--sae", "pretrained:no-such-release/x"], "'no-such-release' is not a SAELens"),
        (
            ["--sae", "pretrained:gpt2-small-res-jb/blocks.0.hook_resid_pre"],
            "could not be downloaded: the hub is offline",
        ),
        (["--hook", HOOKS[0], "--corpus", "{tmp}/bad.jsonl"], "bad.jsonl:2: not valid JSON"),
        (
            ["--hook", HOOKS[0], "--corpus", "{tmp}/ids.jsonl"],
            "ids.jsonl:1: field 'tokens' has 100000",
        ),
        (
            ["--hook", HOOKS[0], "--corpus", "{tmp}/missing.txt"],
            "missing.txt: corpus file not found",
        ),
        (["--hook", HOOKS[0], "--architecture", "gated"], "--architecture gated: not one of"),
        (["--hook", HOOKS[0], "--context-size", "4096"], "--context-size 4096: must be between"),
        (["--method", "sae_nothing"], "--method sae_nothing: not an sae method"),
    ],
)
def test_bad_input_exits_2_and_changes_nothing(
    sae_run, induction_dir, tiny_hf_dirs, tmp_path, capsys, args, message, tmp_path_factory
):
    _write(tmp_path / "bad.jsonl", [json.dumps({"text": "river stone"}), "{oops"])
    _write(tmp_path / "ids.jsonl", [json.dumps({"tokens": [1, 100000]})])
    gpt2_sae = _gpt2_hook_z_sae(tiny_hf_dirs, tmp_path_factory)
    argv = ["run", "sae", "--model", str(induction_dir), "--task", "induction"]
    argv += ["--db", str(sae_run.db)]
    argv += [a.format(tmp=tmp_path, gpt2_sae=gpt2_sae) for a in args]
    before = counts(sae_run.db)
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and message in err[-1]
    assert counts(sae_run.db) == before


_SAE_CACHE: dict[str, str] = {}


def _gpt2_hook_z_sae(tiny_hf_dirs, tmp_path_factory) -> str:
    """A standard SAE saved by SAELens for the tiny GPT-2's blocks.1.attn.hook_z (d_in 32)."""
    if "gpt2" not in _SAE_CACHE:
        from sae_lens import StandardSAE, StandardSAEConfig
        from sae_lens.saes.sae import SAEMetadata

        cfg = StandardSAEConfig(
            d_in=32, d_sae=64, metadata=SAEMetadata(hook_name="blocks.1.attn.hook_z")
        )
        out = tmp_path_factory.mktemp("gpt2_sae")
        StandardSAE(cfg).save_model(str(out))
        _SAE_CACHE["gpt2"] = str(out)
    return _SAE_CACHE["gpt2"]
