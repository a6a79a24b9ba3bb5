"""`workbench run prompt` stores why this token (input attribution, curves, agreement) and
Patchscope: the stored rows equal the computation run directly, a second run is cached, bad input
is one sentence with exit status 2 and stores nothing, and the Prompt page shows them.

Patchscope is held against a hand-run of its definition (the inspection prompt with the
placeholder's residual stream replaced by a hook, the next token read off the logits), and
against the exact property that patching a hidden state into the very prompt, position and stream
it came from changes nothing: the continuation is the model's own greedy one."""

from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.conftest import WHY_TARGET as TARGET
from tests.db import rows
from workbench.cli import cli
from workbench.prompt.inputattr import CAPTUM_METHODS, AttributionParams, explain
from workbench.prompt.patchscope import patchscope, stream_hook

APP = str(Path(__file__).resolve().parents[2] / "app" / "main.py")


@pytest.fixture(scope="module")
def stored(why_db) -> tuple[Path, list[str]]:
    return why_db


def test_stored_attribution_equals_the_computation(stored, induction_final, induction_task):
    db, _ = stored
    ids = list(induction_task.pairs[1].clean_tokens)
    (target,) = induction_final.encode(TARGET, prompt=False)
    ((eid, target_id, logit, params),) = rows(
        db, "SELECT explanation_id, target_id, target_logit, params FROM prompt_explanations"
    )
    assert target_id == target
    methods = [m for (m,) in rows(db, "SELECT DISTINCT method FROM prompt_attr_methods")]
    assert set(CAPTUM_METHODS) <= set(methods)
    direct = explain(induction_final.model, ids, target, AttributionParams(methods=CAPTUM_METHODS))
    assert logit == pytest.approx(direct.target_logit, abs=1e-6)
    for method in CAPTUM_METHODS:
        got = rows(
            db,
            "SELECT score FROM prompt_input_attr WHERE explanation_id = ? AND method = ? "
            "AND layer IS NULL ORDER BY position",
            [eid, method],
        )
        np.testing.assert_allclose([s for (s,) in got], direct.scores[method].tokens, atol=1e-6)
    # the curves' ends: the prompt and the all-baseline prompt
    n = len(ids)
    for (method,) in rows(db, "SELECT DISTINCT method FROM prompt_attr_curves"):
        ends = dict(
            rows(
                db,
                "SELECT kind || k, logit FROM prompt_attr_curves WHERE method = ? "
                "AND ((kind = 'deletion' AND k = 0) OR (kind = 'insertion' AND k = ?))",
                [method, n],
            )
        )
        assert ends["deletion0"] == pytest.approx(logit, abs=1e-5)
        assert ends[f"insertion{n}"] == pytest.approx(logit, abs=1e-5)
    # the areas: the trapezoid rule over k/n, of the probability and of the logit's share
    ((baseline,),) = rows(db, "SELECT baseline_logit FROM prompt_explanations")
    for method, kind, probs, logits in rows(
        db,
        "SELECT method, kind, list(prob ORDER BY k), list(logit ORDER BY k) "
        "FROM prompt_attr_curves GROUP BY ALL",
    ):
        shares = [(x - baseline) / (logit - baseline) for x in logits]
        areas = [sum((v[i] + v[i + 1]) / 2 for i in range(n)) / n for v in (probs, shares)]
        stored = rows(
            db,
            f"SELECT {kind}_auc, {kind}_logit_auc FROM prompt_attr_methods WHERE method = ?",
            [method],
        )
        assert stored[0] == pytest.approx(tuple(areas), abs=1e-9)
    pairs = rows(db, "SELECT count(*) FROM prompt_attr_agreement")[0][0]
    assert pairs == len(methods) * (len(methods) - 1) // 2


def test_a_second_run_is_cached_and_force_recomputes(stored, capsys):
    db, argv = stored
    before = rows(db, "SELECT created_at FROM prompt_explanations")
    assert cli(argv) == 0
    assert "cached" in capsys.readouterr().out
    assert rows(db, "SELECT created_at FROM prompt_explanations") == before
    assert cli([*argv, "--force"]) == 0
    assert rows(db, "SELECT count(*) FROM prompt_explanations") == [(1,)]
    assert rows(db, "SELECT created_at FROM prompt_explanations") != before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "igloo anchor"], "makes 2 tokens of it"),
        (["--target", "#100000"], "the vocabulary has"),
        (["--attribution", "saliency,lime"], "unknown method 'lime'"),
        (["--attr-baseline", "noise"], "--attr-baseline 'noise'"),
        (["--ig-steps", "1"], "--ig-steps 1"),
        (["--patchscope-layer", "9"], "--patchscope-layer 9"),
        (["--patchscope-template", "ids:1 x"], "after 'ids:'"),
        (["--patchscope-tokens", "60"], "do not fit the model's context"),
        # a method that does not apply to the model as loaded
        (["--dtype", "bfloat16", "--attribution", "attn_lrp"], "AttnLRP runs in float32"),
    ],
)
def test_bad_input_is_one_sentence_and_stores_nothing(
    induction_dir, tmp_path, capsys, extra, message
):
    db = tmp_path / "w.duckdb"
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "1"]
    assert cli([*argv, "--db", str(db), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    if db.exists():
        assert rows(db, "SELECT count(*) FROM prompt_explanations") == [(0,)]
        assert rows(db, "SELECT count(*) FROM prompt_views") == [(0,)]


def test_patchscope_equals_its_definition_by_hand(induction_final, induction_task):
    model = induction_final.model
    ids = list(induction_task.pairs[2].clean_tokens)
    inspect = [1, 1, 2, 2, 3, 3, 0]
    found = patchscope(model, ids, inspect, new_tokens=2)
    n_layers = model.cfg.n_layers
    assert [s for s, _, _ in found] == list(range(n_layers + 1))
    _, cache = model.run_with_cache(torch.tensor([ids]))
    for source, target, decoded in found:
        state = cache[stream_hook(source, n_layers)][0, -1]

        def put(value: torch.Tensor, hook: object, state=state) -> torch.Tensor:
            value = value.clone()
            value[0, len(inspect) - 1] = state
            return value

        hook = [(stream_hook(target, n_layers), put)]
        with torch.no_grad():
            first = int(
                model.run_with_hooks(torch.tensor([inspect]), fwd_hooks=hook)[0, -1].argmax()
            )
            second = int(
                model.run_with_hooks(torch.tensor([[*inspect, first]]), fwd_hooks=hook)[0, -1]
                .argmax()
            )  # fmt: skip
        assert decoded == [first, second]


def test_patchscope_into_its_own_place_changes_nothing(induction_final, induction_task):
    model = induction_final.model
    ids = list(induction_task.pairs[3].clean_tokens)
    tokens = torch.tensor([ids])
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            step = int(model(tokens)[0, -1].argmax())
            greedy.append(step)
            tokens = torch.cat([tokens, torch.tensor([[step]])], dim=1)
    for _, _, decoded in patchscope(model, ids, ids, new_tokens=3):
        assert decoded == greedy


def test_the_prompt_page_shows_why_and_patchscope(stored, monkeypatch):
    db, _ = stored
    monkeypatch.setenv("WORKBENCH_DB", str(db))
    from workbench.app import data

    data.query.clear()
    ((pid,),) = rows(db, "SELECT prompt_id FROM prompt_views")
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params.update({"view": "prompt", "prompt": pid})
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    labels = [t.label for t in at.tabs]
    assert "Why this token" in labels and "Patchscope" in labels
    methods = {m for (m,) in rows(db, "SELECT DISTINCT method FROM prompt_attr_methods")}
    (shown,) = [d.value for d in at.dataframe if "deletion_auc" in d.value.columns]
    assert set(shown["method"]) == methods
    stored_auc = dict(rows(db, "SELECT method, deletion_auc FROM prompt_attr_methods"))
    for r in shown.itertuples():
        assert r.deletion_auc == pytest.approx(stored_auc[r.method])
    (scope,) = [d.value for d in at.dataframe if "patched into" in d.value.columns]
    texts = [t for (t,) in rows(db, "SELECT text FROM prompt_patchscope ORDER BY source_layer")]
    assert scope["text"].tolist() == texts


def test_patchscope_across_two_checkpoints(induction_dir, induction_task, tmp_path):
    """The final checkpoint's hidden states decoded by the step-500 checkpoint of the same run
    (`--patchscope-model`): the stored continuations equal the definition run by hand with the
    two models, and the row names the checkpoint that decoded them."""
    from workbench.models import load_checkpoint, resolve_checkpoints

    refs = resolve_checkpoints(str(induction_dir))
    source = load_checkpoint(refs[-1]).model
    (half,) = [r for r in refs if r.step == 500]
    reader = load_checkpoint(half)
    db = tmp_path / "w.duckdb"
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "2"]
    argv += ["--attribution", "none", "--patchscope-tokens", "1", "--db", str(db)]
    assert (
        cli([*argv, "--patchscope-model", str(induction_dir), "--patchscope-checkpoint", "500"])
        == 0
    )
    ((inspector, template),) = rows(db, "SELECT inspector_id, template_ids FROM prompt_patchscopes")
    assert inspector == reader.checkpoint.checkpoint_id
    ids = list(induction_task.pairs[2].clean_tokens)
    _, cache = source.run_with_cache(torch.tensor([ids]))
    n_layers = source.cfg.n_layers
    for stream, decoded in rows(
        db, "SELECT source_layer, token_ids FROM prompt_patchscope ORDER BY source_layer"
    ):
        state = cache[stream_hook(stream, n_layers)][0, -1]

        def put(value: torch.Tensor, hook: object, state=state) -> torch.Tensor:
            value = value.clone()
            value[0, len(template) - 1] = state
            return value

        with torch.no_grad():
            logits = reader.model.run_with_hooks(
                torch.tensor([template]), fwd_hooks=[(stream_hook(stream, n_layers), put)]
            )
        assert decoded == [int(logits[0, -1].argmax())]


def test_patchscope_across_models_of_another_width_is_one_sentence(
    induction_dir, tiny_hf_dirs, tmp_path, capsys
):
    db = tmp_path / "w.duckdb"
    argv = ["run", "prompt", "--model", str(induction_dir), "--task", "induction", "--index", "2"]
    argv += ["--patchscope-model", str(tiny_hf_dirs["gpt2"]), "--db", str(db)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "Patchscope across models needs the same width" in err, err
    assert len(err.strip().splitlines()) == 1, err
    if db.exists():
        assert rows(db, "SELECT count(*) FROM prompt_views") == [(0,)]
