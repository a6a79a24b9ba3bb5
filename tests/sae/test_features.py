"""Stored SAE quality, feature statistics and examples, recomputed independently: the SAE
reloaded with SAELens, activations from TransformerLens, everything held in memory at once."""

import json

import pytest
import torch
from sae_lens import SAE

from tests.sae.conftest import CORPUS_TOKENS, HOOKS, query
from workbench.memory import Scratch
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.sae import features
from workbench.sae.corpus import load_corpus
from workbench.sae.saes import load_sae
from workbench.tasks import load_task


@pytest.fixture(scope="module")
def model(induction_dir):
    return load_checkpoint(resolve_checkpoints(str(induction_dir))[-1])


@pytest.fixture(scope="module")
def corpus(model):
    return load_corpus("task", model, load_task("induction", model), n_tokens=CORPUS_TOKENS)


def all_features(model, sae, hook, windows):
    """Every feature activation of the corpus at once: [window, pos, d_sae]."""
    with torch.no_grad():
        _, cache = model.model.run_with_cache(windows, names_filter=[hook])
        return sae.encode(cache[hook])


@pytest.mark.parametrize("hook", HOOKS)
def test_reloaded_sae_recomputes_stored_examples_and_statistics(sae_run, model, corpus, hook):
    row = sae_run.saes[hook]
    sae = SAE.load_from_disk(row["path"], device="cpu")  # SAELens's own loader and encoder
    assert sae.cfg.metadata.hook_name == hook and sae.cfg.d_in == model.info.d_model
    acts = all_features(model, sae, hook, corpus.windows)
    sae_id = row["sae_id"]

    examples = query(
        sae_run.db,
        "SELECT * FROM feature_examples WHERE sae_id = ? ORDER BY feature, rank",
        [sae_id],
    )
    assert examples
    for ex in examples:  # the stored context, fed to the model again
        with torch.no_grad():
            tokens = torch.tensor([ex["token_ids"]])
            _, cache = model.model.run_with_cache(tokens, names_filter=[hook])
            value = sae.encode(cache[hook])[0, ex["position"], ex["feature"]]
        assert float(value) == pytest.approx(ex["activation"], abs=1e-4)
        assert ex["tokens"] == model.token_strs(ex["token_ids"])

    # top-k windows per feature by the maximum over positions, from all activations at once
    window_max = acts.max(dim=1).values  # [window, d_sae]
    stored = {}
    for ex in examples:
        stored.setdefault(ex["feature"], []).append(ex["activation"])
    for feat, values in stored.items():
        expected = window_max[:, feat].topk(len(values)).values
        assert torch.allclose(torch.tensor(values), expected, atol=1e-4)
    k = max(len(v) for v in stored.values())
    assert k == 10
    firing = (window_max > 0).sum(0)
    assert {f for f in range(sae.cfg.d_sae) if firing[f] > 0} == set(stored)

    flat = acts.reshape(-1, sae.cfg.d_sae)
    feats = query(sae_run.db, "SELECT * FROM features WHERE sae_id = ? ORDER BY feature", [sae_id])
    density = torch.tensor([f["density"] for f in feats])
    assert torch.allclose(density, (flat > 0).double().mean(0).float(), atol=1e-6)
    maxima = torch.tensor([f["max_activation"] for f in feats])
    assert torch.allclose(maxima, flat.max(0).values, atol=1e-4)
    fired = flat > 0
    mean_active = torch.where(
        fired.any(0), (flat * fired).sum(0) / fired.sum(0).clamp(min=1), torch.tensor(0.0)
    )
    stored_mean = torch.tensor([f["mean_activation"] for f in feats])
    assert torch.allclose(stored_mean, mean_active, atol=1e-4)
    assert [f["dead"] for f in feats] == (~fired.any(0)).tolist()
    assert [f["dense"] for f in feats] == ((flat > 0).double().mean(0) > 0.1).tolist()
    for f in feats:
        assert sum(f["histogram"]) == int(fired[:, f["feature"]].sum())
    assert row["n_tokens"] == flat.shape[0]
    assert row["dead_fraction"] == pytest.approx(float((~fired.any(0)).double().mean()))


@pytest.mark.parametrize("hook", HOOKS)
def test_quality_metrics_match_sae_lens_forward_and_tl_loss(sae_run, model, corpus, hook):
    row = sae_run.saes[hook]
    sae = SAE.load_from_disk(row["path"], device="cpu")
    with torch.no_grad():
        _, cache = model.model.run_with_cache(corpus.windows, names_filter=[hook])
        x = cache[hook].reshape(-1, sae.cfg.d_in)
        f = sae.encode(x)
        x_hat = sae(x)  # SAELens's forward: decode(encode(x))
    assert row["l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()), rel=1e-5)
    resid = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    assert row["explained_variance"] == pytest.approx(float(1 - resid / total), abs=1e-4)
    assert row["explained_variance"] > 0.5

    windows = corpus.windows[:64]
    mask = corpus.loss_mask[:64]  # the zoo's own loss positions
    assert mask.any() and not mask.all()

    def loss(hooks):
        with torch.no_grad():
            per_token = model.model.run_with_hooks(
                windows, return_type="loss", loss_per_token=True, fwd_hooks=hooks
            )
        return per_token[mask].mean()

    clean = loss([])
    spliced = loss([(hook, lambda a, hook: sae(a))])
    zero = loss([(hook, lambda a, hook: torch.zeros_like(a))])
    assert row["ce_loss_clean"] == pytest.approx(float(clean), abs=1e-4)
    assert row["ce_loss_sae"] == pytest.approx(float(spliced), abs=1e-4)
    assert row["ce_loss_zero"] == pytest.approx(float(zero), abs=1e-4)
    expected = float((zero - spliced) / (zero - clean))
    assert row["ce_loss_recovered"] == pytest.approx(expected, abs=1e-4)
    assert row["ce_loss_recovered"] > 0.5


def test_logit_effects_match_an_intervention_on_the_final_residual_stream(sae_run, model):
    """Adding a feature's decoder direction to the final residual stream, with the final
    LayerNorm's scale frozen (the direct path, as in direct logit attribution), moves the stored
    most-promoted token up most and the most-suppressed token down most."""
    hook = "blocks.1.hook_resid_post"  # the final residual stream of the 2-layer model
    row = sae_run.saes[hook]
    sae = load_sae(row["path"], model)
    feats = query(
        sae_run.db,
        "SELECT feature, top_logits, bottom_logits FROM features WHERE sae_id = ? AND NOT dead",
        [row["sae_id"]],
    )
    tokens = torch.tensor([[model.bos_token_id or 0, 5, 6, 7]])
    with torch.no_grad():
        base, cache = model.model.run_with_cache(tokens, names_filter=["ln_final.hook_scale"])
    base = base[0, -1]
    frozen = (
        "ln_final.hook_scale",
        lambda act, hook: cache["ln_final.hook_scale"],
    )
    agree = 0
    for f in feats:
        direction = sae.sae.W_dec[f["feature"]]

        def add(act, hook, d=direction):
            return act + d

        with torch.no_grad():
            moved = model.model.run_with_hooks(tokens, fwd_hooks=[(hook, add), frozen])[0, -1]
        change = moved - base
        top = json.loads(f["top_logits"])
        bottom = json.loads(f["bottom_logits"])
        assert len(top) == features.N_LOGITS and top[0]["value"] >= top[-1]["value"]
        agree += int(change.argmax()) == top[0]["id"] and int(change.argmin()) == bottom[0]["id"]
    assert agree >= 0.95 * len(feats)


def test_streaming_in_small_batches_equals_one_batch(sae_run, model, corpus):
    sae = load_sae(sae_run.saes[HOOKS[0]]["path"], model)
    small = features.scan(model, sae, corpus, batch_size=7)
    whole = features.scan(model, sae, corpus, batch_size=len(corpus.windows))
    assert torch.equal(small.counts, whole.counts)
    assert torch.equal(small.histogram, whole.histogram)
    assert torch.allclose(small.maxima, whole.maxima)
    assert torch.allclose(small.top_values, whole.top_values)
    assert small.quality().explained_variance == pytest.approx(whole.quality().explained_variance)


def test_sparse_reconstruction_equals_sae_lens_decode(sae_run, model, corpus):
    for hook in HOOKS:
        sae = load_sae(sae_run.saes[hook]["path"], model)
        with torch.no_grad():
            _, cache = model.model.run_with_cache(corpus.windows[:16], names_filter=[hook])
            f = sae.sae.encode(cache[hook])
            assert torch.allclose(features.reconstruct(sae, f), sae.sae.decode(f), atol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_active_features_are_sae_lens_encode_without_its_dense_result(architecture):
    """The extraction reads active features straight from the pre-activations; they and every
    statistic built from them equal SAELens's dense `encode` followed by a scan for non-zeros."""
    from benchmarks.bench_sae_features import make_sae

    sae = make_sae(architecture, 32, 512)
    torch.manual_seed(3)
    x = torch.randn(4, 12, 32)
    with torch.no_grad():
        f = sae.sae.encode(x).reshape(-1, 512)
        active = features.encode_active(sae, x)
        rows, cols = f.nonzero(as_tuple=True)
        assert 0 < len(rows) < f.numel() / 4  # sparse, and something fires
        assert torch.equal(active.rows, rows) and torch.equal(active.cols, cols)
        assert torch.equal(active.values, f[rows, cols])
        # into reused buffers, left larger and holding another batch's numbers: the same
        scratch = Scratch()
        features.encode_active(sae, torch.randn(6, 12, 32), scratch)
        reused = features.encode_active(sae, x, scratch)
        for name in ("rows", "cols", "values"):
            assert torch.equal(getattr(reused, name), getattr(active, name)), name
        x_hat = features.reconstruct_active(sae, active, 48).view(x.shape)
        dense, sparse = features.FeatureStats(512, 5), features.FeatureStats(512, 5)
        dense.update(0, x, f.view(4, 12, 512), features.reconstruct(sae, f.view(4, 12, 512)))
        sparse.update_sparse(0, x, active, x_hat)
    for name in ("counts", "sums", "maxima", "histogram", "top_values", "top_windows"):
        assert torch.equal(getattr(dense, name), getattr(sparse, name)), name
    assert dense.sq_error == sparse.sq_error


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_active_features_follow_a_hook_on_the_pre_activations(architecture):
    """A hook on SAELens's `hook_sae_acts_pre` (here: shift every pre-activation) changes which
    features fire; the extraction sees it as SAELens's `encode` does."""
    from benchmarks.bench_sae_features import make_sae

    sae = make_sae(architecture, 32, 512)
    torch.manual_seed(4)
    x = torch.randn(3, 10, 32)
    handle = sae.sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, out: out + 0.5)
    try:
        with torch.no_grad():
            f = sae.sae.encode(x).reshape(-1, 512)
            active = features.encode_active(sae, x)
            unhooked = features.encode_active(sae, x, Scratch())
    finally:
        handle.remove()
    rows, cols = f.nonzero(as_tuple=True)
    assert torch.equal(active.rows, rows) and torch.equal(active.cols, cols)
    assert torch.equal(active.values, f[rows, cols])
    assert torch.equal(unhooked.values, active.values)
    with torch.no_grad():
        plain = features.encode_active(sae, x)
    assert len(plain.rows) != len(rows) or not torch.equal(plain.values, active.values)


def test_next_token_losses_do_not_depend_on_how_the_windows_are_sliced(model, corpus):
    """Run a window at a time or all at once: the same means, and a hook set that depends on
    the windows (here: scale the residual by each window's own factor) gets its slice."""
    windows, mask = corpus.windows[:12], corpus.loss_mask[:12]
    scale = torch.linspace(0.5, 1.5, len(windows))[:, None, None]
    hook = "blocks.0.hook_resid_post"

    def scaled(part):
        return [(hook, lambda act, hook: act * scale[part])]

    sets = [lambda _: [], scaled]
    whole = features.mean_next_token_losses(model.model, windows, mask, sets, batch_tokens=10**9)
    one = features.mean_next_token_losses(
        model.model, windows, mask, sets, batch_tokens=windows.shape[1]
    )
    assert one == pytest.approx(whole, abs=1e-6)
    with torch.no_grad():
        per_token = model.model.run_with_hooks(
            windows,
            return_type="loss",
            loss_per_token=True,
            fwd_hooks=[(hook, lambda act, hook: act * scale)],
        )
    assert one[1] == pytest.approx(float(per_token[mask].mean()), abs=1e-5)
    assert one[1] != pytest.approx(one[0], abs=1e-3)


FORKED = """
import os, sys, torch
from benchmarks.bench_sae_features import make_sae
from workbench.sae import features

sae = make_sae("standard", 32, 512)
x = torch.randn(4, 12, 32)
with torch.no_grad():
    parent = features.encode_active(sae, x)  # the parent's scan threads now exist
    pid = os.fork()
    if pid == 0:  # the child inherits the pool without its threads: it must make its own
        torch.set_num_threads(1)  # (torch's own OpenMP pool does not survive a fork either)
        child = features.encode_active(sae, x)
        os._exit(0 if torch.equal(child.values, parent.values) else 1)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_finds_the_active_features_too():
    """The script waits for its forked child's exit; should the child hang (the failure this
    guards against), the guard ends the script and its child together, as one session."""
    import os
    import signal
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-c", FORKED], stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as script:
        try:
            _, err = script.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(script.pid, signal.SIGKILL)
            script.communicate()
            raise
    assert script.returncode == 0, err
