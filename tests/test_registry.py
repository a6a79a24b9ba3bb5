"""The method registry, jobs as values and the CLI generated from them: each pipeline's help lists
its own options, a misapplied flag exits 2, a job runs in another process from its JSON alone,
and a method from another package registers through an entry point without touching this repo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from workbench import registry
from workbench.cli import cli
from workbench.jobs import Job, RunOptions, plan_jobs
from workbench.runner import run, run_jobs

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SITE = Path(__file__).resolve().parent / "plugin_site"


def _help(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert cli([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_each_pipeline_help_lists_only_its_own_options(capsys):
    flags = {}
    for name, p in registry.pipelines().items():
        text = _help(capsys, "run", name)
        own = {
            "--" + (f.metadata.get("flag") or n).replace("_", "-") for n, f in p.options().items()
        }
        flags[name] = own
        for flag in own | {"--model", "--task", "--checkpoint", "--method", "--device"}:
            assert flag in text, f"{flag} missing from `run {name} --help`"
        for m in p.methods:
            assert m.name in text
    assert flags["heads"] == {"--spot-checks"}  # attr_patch's
    for name, own in flags.items():
        others = set().union(*(f for n, f in flags.items() if n != name)) - own
        text = _help(capsys, "run", name)
        leaked = [flag for flag in others if f"{flag} " in text]
        assert not leaked, f"`run {name} --help` lists {leaked}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "edges", "--method", "eap", "--ig-steps", "3"], "--ig-steps applies to eap_ig"),
        (["run", "edges", "--method", "eap", "--acdc-threshold", "0.1"], "applies to acdc"),
        (
            ["run", "patching", "--method", "act_patch_denoise", "--ablation", "zero"],
            "--ablation applies to act_patch_noise, not to act_patch_denoise",
        ),
        (["run", "heads", "--component", "head_out"], "No such option: --component"),
        (["run", "heads", "--ig-steps", "2"], "No such option: --ig-steps"),
        (["run", "sae", "--method", "sae_attr", "--top-k-examples", "3", "--bogus"], "--bogus"),
    ],
)
def test_misapplied_flags_exit_2(tmp_path, induction_dir, capsys, argv, message):
    db = tmp_path / "w.duckdb"
    full = [*argv, "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    assert cli(full) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not db.exists()  # nothing was stored


def test_job_runs_in_another_process_from_its_json(tmp_path, induction_dir):
    """A job serialised to JSON, run by a fresh interpreter, stores the same run (same key) the
    local runner would: the local runner then skips it."""
    db = tmp_path / "w.duckdb"
    options = RunOptions(model=str(induction_dir), task="induction", db=str(db), n_prompts=8)
    (job,) = plan_jobs("edges", options, ["eap_ig"], {"ig_steps": 2, "ig_rule": "midpoint"})
    text = job.to_json()
    assert Job.from_json(text) == job and json.loads(text)["params"]["ig_steps"] == 2
    code = (
        "import sys; from workbench.jobs import Job; from workbench.runner import run_jobs; "
        "print(run_jobs([Job.from_json(sys.argv[1])], db=sys.argv[2])[0].status)"
    )
    env = {**os.environ, "WORKBENCH_LOG": "WARNING"}
    out = subprocess.run(
        [sys.executable, "-c", code, text, str(db)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "done"
    (again,) = run_jobs([job], db=str(db))
    assert again.status == "skipped"
    con = duckdb.connect(str(db), read_only=True)
    params = json.loads(con.execute("SELECT params FROM runs").fetchone()[0])
    con.close()
    assert params["ig_rule"] == "midpoint" and params["ig_steps"] == 2


def test_a_package_adds_a_method_through_an_entry_point(tmp_path, induction_dir, induction_final):
    """`tests/plugin_site` holds an installed-style package (a `.dist-info` with
    `entry_points.txt`) whose method the workbench has never heard of: on the path, it is a
    pipeline with its own subcommand, options, run keys and stored scores."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PLUGIN_SITE), str(ROOT)]),
        "WORKBENCH_LOG": "WARNING",
    }
    db = tmp_path / "w.duckdb"
    base = [sys.executable, "-m", "workbench", "run", "toy"]
    show = subprocess.run([*base, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert show.returncode == 0 and "--scale" in show.stdout and "resid_gap" in show.stdout
    argv = [*base, "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    done = subprocess.run([*argv, "--scale", "2"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([*argv, "--ig-steps", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "No such option: --ig-steps" in bad.stderr
    con = duckdb.connect(str(db), read_only=True)
    stored = dict(
        con.execute(
            "SELECT node_id, score FROM node_scores JOIN runs USING (run_id) "
            "WHERE method = 'resid_gap'"
        ).fetchall()
    )
    params = json.loads(con.execute("SELECT params FROM runs").fetchone()[0])
    con.close()
    assert params["scale"] == 2.0
    # the same distances computed here, straight from TransformerLens's cache
    from workbench.tasks import load_task

    model = induction_final.model
    task = load_task("induction", induction_final)
    clean = __import__("torch").tensor([p.clean_tokens for p in task.pairs])
    corrupt = __import__("torch").tensor([p.corrupt_tokens for p in task.pairs])
    _, c1 = model.run_with_cache(clean)
    _, c2 = model.run_with_cache(corrupt)
    for layer in range(model.cfg.n_layers):
        gap = c1["resid_pre", layer][:, -1] - c2["resid_pre", layer][:, -1]
        expected = 2 * float(gap.norm(dim=-1).mean())
        assert stored[f"r{layer}"] == pytest.approx(expected, rel=1e-5)
    assert "toy" not in registry.pipelines()  # not on this process's path: not registered


def test_registering_a_method_twice_or_without_a_dataclass_fails():
    (eap,) = [m for m in registry.pipeline("edges").methods if m.name == "eap"]
    with pytest.raises(ValueError, match="registered twice"):
        registry.build_pipelines([eap, eap])
    with pytest.raises(TypeError, match="must be a dataclass"):
        registry.build_pipelines([registry.Method("x", "p", dict, eap.compute, key=eap.key)])


def test_python_api_runs_what_the_cli_runs(tmp_path, induction_dir):
    db = tmp_path / "w.duckdb"
    options = RunOptions(model=str(induction_dir), task="induction", db=str(db))
    assert [o.status for o in run("heads", options, ["dla"])] == ["done"]
    argv = ["run", "heads", "--model", str(induction_dir), "--task", "induction"]
    assert cli([*argv, "--db", str(db), "--method", "dla"]) == 0  # the same run: skipped
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    con.close()


def test_batch_tokens_bounds_batches_and_keeps_the_numbers(tmp_path, induction_dir, induction_task):
    """`--batch-tokens` splits each length group so that no batch holds more tokens than the
    budget (but at least one prompt); every method sums per prompt, so the scores are those of
    one big batch up to float order, and the run is the same run (same key)."""
    length = len(induction_task.pairs[0].clean_tokens)
    groups = induction_task.length_groups(64, max_tokens=3 * length + 1)
    assert [len(g) for g in groups][:-1] == [3] * (len(groups) - 1)
    assert sorted(i for g in groups for i in g) == list(range(len(induction_task.pairs)))
    single = induction_task.length_groups(64, max_tokens=1)  # still one prompt a batch
    assert [len(g) for g in single] == [1] * len(induction_task.pairs)
    db_a, db_b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    for db, budget in ((db_a, None), (db_b, 3 * length)):
        options = RunOptions(str(induction_dir), "induction", db=str(db), batch_tokens=budget)
        assert [o.status for o in run("heads", options, ["dla", "attr_patch"])] == ["done"] * 2
    scores = []
    for db in (db_a, db_b):
        con = duckdb.connect(str(db), read_only=True)
        scores.append(
            con.execute(
                "SELECT r.run_key, s.node_id, s.score FROM node_scores s JOIN runs r "
                "USING (run_id) ORDER BY 1, 2"
            ).fetchall()
        )
        con.close()
    assert [r[:2] for r in scores[0]] == [r[:2] for r in scores[1]]  # same runs, same nodes
    for (_, _, a), (_, _, b) in zip(*scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_the_baseline_is_computed_once_and_changes_no_number(induction_final, induction_task):
    """`RunInputs.baseline` (clean and corrupt metric, once per checkpoint x task) replaces the
    extra corrupt pass of `dla` and `head_importance` with bit-identical numbers."""
    from workbench.attribution import heads
    from workbench.attribution.batches import logit_diff
    from workbench.registry import RunInputs

    inputs = RunInputs(induction_final, induction_task, max_batch=7)  # several batches
    base = inputs.baseline
    assert inputs.baseline is base  # computed once
    model = induction_final.model
    with torch.no_grad():
        clean = torch.cat([logit_diff(model(b.clean), b.answer, b.wrong) for b in inputs.batches])
        corr = torch.cat([logit_diff(model(b.corrupt), b.answer, b.wrong) for b in inputs.batches])
    assert base.metric_clean == pytest.approx(float(clean.mean()), abs=1e-6)
    assert base.metric_corrupt == pytest.approx(float(corr.mean()), abs=1e-6)
    for method in (heads.direct_logit_attribution, heads.head_importance):
        alone, shared = method(model, inputs.batches), method(model, inputs.batches, base)
        assert (alone.metric_clean, alone.metric_corrupt) == (
            shared.metric_clean,
            shared.metric_corrupt,
        )
        assert torch.equal(alone.scores, shared.scores)
