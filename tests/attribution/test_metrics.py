"""Task metrics other than the logit difference: each metric against its textbook formula, its
residual form against its full-logits form, exact patching under it against
`transformer_lens.patching`, DLA under it against an autograd gradient, and the CLI and task-file
ways of choosing one."""

import dataclasses
import json

import duckdb
import pytest
import torch
from transformer_lens import patching

from tests.conftest import write_jsonl
from workbench.attribution import edges, heads
from workbench.attribution.batches import make_batches
from workbench.attribution.metrics import task_metric
from workbench.cli import cli
from workbench.core import METRICS
from workbench.tasks import load_task

OTHER = ["prob_diff", "logprob", "kl"]


def _reference(name, logits, clean_logits, batch):
    """The metric per prompt, written out from its definition."""
    last, ref = logits[:, -1].double(), clean_logits[:, -1].double()
    a, w = batch.answer, batch.wrong
    if name == "logit_diff":
        return last.gather(1, a[:, None])[:, 0] - last.gather(1, w[:, None])[:, 0]
    p = torch.softmax(last, -1)
    if name == "prob_diff":
        return p.gather(1, a[:, None])[:, 0] - p.gather(1, w[:, None])[:, 0]
    if name == "logprob":
        return torch.log(p.gather(1, a[:, None])[:, 0])
    q = torch.softmax(ref, -1)
    return (q * (torch.log(q) - torch.log(p))).sum(-1)


def _batches(loaded, task, metric):
    return make_batches(dataclasses.replace(task, metric=metric), model=loaded.model)


@pytest.mark.parametrize("name", list(METRICS))
@torch.no_grad()
def test_metric_matches_its_definition_in_both_forms(induction_final, induction_task, name):
    model = induction_final.model
    (batch,) = _batches(induction_final, induction_task, name)
    assert batch.metric.name == name
    clean_logits = model(batch.clean)
    for tokens in (batch.clean, batch.corrupt):
        logits, cache = model.run_with_cache(tokens)
        expected = _reference(name, logits, clean_logits, batch)
        full = batch.metric(logits, batch.target)
        resid = batch.metric.final(model, cache["resid_post", model.cfg.n_layers - 1], batch.target)
        torch.testing.assert_close(full.double(), expected, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(resid.double(), expected, atol=2e-5, rtol=1e-5)
    if name == "kl":  # against itself, the clean run is at zero
        assert float(batch.metric(clean_logits, batch.target).abs().max()) < 1e-5


@pytest.mark.parametrize("name", OTHER)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_exact_patching_under_other_metrics_matches_transformer_lens(
    induction_final, induction_task, name, direction
):
    model = induction_final.model
    (batch,) = _batches(induction_final, induction_task, name)
    ours = heads.head_out_patching(model, [batch], direction=direction, max_rows=7)
    with torch.no_grad():
        clean_logits = model(batch.clean)

        def m(logits):
            return _reference(name, logits, clean_logits, batch).mean()

        m_clean, m_corr = float(m(clean_logits)), float(m(model(batch.corrupt)))
        gap = m_clean - m_corr
        source, base = (batch.clean, batch.corrupt) if direction == "denoise" else (
            batch.corrupt, batch.clean
        )  # fmt: skip
        _, cache = model.run_with_cache(source)
        sign = 1 if direction == "denoise" else -1
        origin = m_corr if direction == "denoise" else m_clean

        def normalised(logits):
            return sign * (m(logits) - origin) / gap

        reference = patching.get_act_patch_attn_head_out_all_pos(model, base, cache, normalised)
    assert ours.metric_clean == pytest.approx(m_clean, abs=1e-5)
    assert ours.metric_corrupt == pytest.approx(m_corr, abs=1e-5)
    torch.testing.assert_close(ours.scores, reference.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", OTHER)
def test_dla_under_other_metrics_is_the_gradient_at_the_clean_run(
    induction_final, induction_task, name
):
    """DLA of head h = (its last-position output, centred and divided by the clean run's final
    scale) . d metric / d (normalised final residual), the gradient taken by autograd here."""
    model = induction_final.model
    (batch,) = _batches(induction_final, induction_task, name)
    ours = heads.direct_logit_attribution(model, [batch])
    _, cache = model.run_with_cache(batch.clean)
    x = cache["ln_final.hook_normalized"][:, -1].detach().double().requires_grad_(True)
    logits = x @ model.W_U.double() + model.b_U.double()
    with torch.no_grad():
        clean_logits = model(batch.clean)
    _reference(name, logits[:, None, :], clean_logits, batch).sum().backward()
    grad = x.grad
    scale = cache["ln_final.hook_scale"][:, -1].double()  # [b, 1]
    expected = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        out = torch.einsum("bhe,hed->bhd", cache["z", layer][:, -1], model.W_O[layer]).double()
        out = (out - out.mean(-1, keepdim=True)) / scale[:, None, :]
        expected[layer] = torch.einsum("bhd,bd->h", out, grad) / batch.size
    torch.testing.assert_close(ours.scores.double(), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", OTHER)
def test_eap_under_other_metrics_is_complete_with_integrated_gradients(
    induction_final, induction_task, name
):
    """Integrated gradients along the input embeddings, under any metric: the `input` edges'
    normalised scores add up to about 1 (the whole gap) as the steps grow."""
    (batch,) = _batches(induction_final, induction_task, name)
    result = edges.edge_attribution(induction_final.model, [batch], ig_steps=32, ig_rule="midpoint")
    assert result.completeness == pytest.approx(1.0, abs=0.02)


def test_metric_from_the_cli_and_from_a_task_file(tmp_path, induction_dir, capsys):
    db = tmp_path / "w.duckdb"
    argv = ["run", "heads", "--model", str(induction_dir), "--db", str(db), "--method", "dla"]
    assert cli([*argv, "--task", "induction", "--metric", "prob_diff"]) == 0
    assert cli([*argv, "--task", "induction"]) == 0  # the default metric: another task id
    line = {"clean_ids": [1, 5, 6, 7, 1, 5], "corrupt_ids": [1, 8, 9, 7, 1, 5]}
    line |= {"answer_id": 6, "wrong_id": 9}
    task_file = write_jsonl(
        tmp_path / "t.jsonl",
        [json.dumps(line | {"metric": "logprob"}), json.dumps(line)],
    )
    assert cli([*argv, "--task", str(task_file)]) == 0
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute(
        "SELECT t.name, t.metric, r.metric_clean FROM runs r JOIN tasks t USING (task_id) "
        "ORDER BY t.name, t.metric"
    ).fetchall()
    con.close()
    assert [(r[0], r[1]) for r in rows] == [
        ("induction", "logit_diff"),
        ("induction", "prob_diff"),
        ("t", "logprob"),
    ]
    assert -1 <= rows[1][2] <= 1 and rows[2][2] <= 0  # a probability difference; a log-prob
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [json.dumps(line | {"metric": "logprob"}), json.dumps(line | {"metric": "kl"})],
    )
    capsys.readouterr()
    assert cli([*argv, "--task", str(bad)]) == 2
    assert "bad.jsonl:2: field 'metric' is 'kl', but" in capsys.readouterr().err
    assert cli([*argv, "--task", "induction", "--metric", "accuracy"]) == 2
    assert "--metric accuracy: choose from" in capsys.readouterr().err


def test_kl_needs_its_reference(induction_task):
    with pytest.raises(ValueError, match="needs the model"):
        make_batches(dataclasses.replace(induction_task, metric="kl"))
    assert task_metric("kl").needs_reference and not task_metric("prob_diff").needs_reference


def test_another_metric_is_another_task(induction_final):
    default = load_task("induction", induction_final)
    other = load_task("induction", induction_final, metric="kl")
    assert other.metric == "kl" and other.pairs == default.pairs
    assert other.task_id != default.task_id and other.sha256 != default.sha256
