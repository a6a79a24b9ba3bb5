"""The tuned lens (`workbench.prompt.tunedlens`) against tuned-lens 0.2.0's own: on a tiny random
GPT-2 (plain, and with every residual write centred) and a tiny random Llama, tuned-lens decoded a
lens with seeded translators and trained lenses step by step; its outputs are kept in
`tests/prompt/data/tuned_lens/` (made by `tools/tuned_lens_fixture.py` in an environment of its
own; its README lists how). The workbench loads the same models as TransformerLens models and
must find the same logits and, step by step, the same translators. Also: the zero lens is the
logit lens of `workbench.prompt.views` bit for bit, training lowers the held-out KL on the zoo's
induction model, and saved lenses load back (bad files: one sentence naming the file)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.prompt import tuned_lens_weights
from workbench.errors import BadInput
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.prompt import tunedlens
from workbench.prompt.tunedlens import (
    TunedLens,
    TunedLensConfig,
    lens_kl,
    lens_provenance,
    load_tuned_lens,
    save_tuned_lens,
    train_tuned_lens,
    tuned_lens_predictions,
)
from workbench.prompt.views import prompt_views
from workbench.sae.corpus import Corpus, load_corpus

DATA = Path(__file__).parent / "data" / "tuned_lens"
FIXTURE = json.loads((DATA / "fixture.json").read_text())
# Applying a lens: the transformers and TransformerLens models compute the same hidden states
# and logits in another order; the largest difference seen was 2.7e-6 (logits up to 7.7).
APPLY_ATOL = 1e-4
# Training in float32: the translators after each of 6 steps within 8.1e-8 of tuned-lens's (up
# to 0.19), each step's KL within 5.4e-7, under the native, avx2 and default kernels.
TRAIN_ATOL, LOSS_ATOL = 1e-6, 2e-6
# With tuned-lens's bfloat16 autocast the two decode through bfloat16 products of different (but
# equal in exact arithmetic) matrices: TransformerLens folds the final norm's weights into W_U.
# Seen (native, avx2 and default kernels): translators within 6.0e-4 (weights up to 0.19) and
# 8.1e-4 (biases), KL within 3.1e-3; tuned-lens's bfloat16 run is itself 4.9e-4 and 9.2e-4 from
# its float32 one.
BF16_ATOL, BF16_LOSS_ATOL = 3e-3, 1e-2
# The zoo's induction model, 50 steps of 2048 tokens: the tuned lens's held-out KL over the
# logit lens's was 0.852-0.895 per layer over zoo seeds 0-2 (lens seeds 0-2 on zoo seed 0:
# 0.859-0.891 under the native, avx2 and default kernels); the logit lens's is 3.0-3.3 nats.
HELD_OUT_RATIO_MAX = 0.95


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fixture's models loaded by the workbench, the weights written beside copies of the
    kept files (the same bytes on every machine)."""
    root = tmp_path_factory.mktemp("tuned_lens") / "data"
    shutil.copytree(DATA, root)
    tuned_lens_weights.write_all(root)
    return {
        name: load_checkpoint(resolve_checkpoints(str(root / name))[-1]).model
        for name in tuned_lens_weights.MODELS
    }


def _seeded_lens() -> TunedLens:
    a, b = tuned_lens_weights.translators(
        FIXTURE["n_layers"], FIXTURE["d_model"], seed=FIXTURE["apply"]["translator_seed"]
    )
    lens = TunedLens(FIXTURE["n_layers"], FIXTURE["d_model"])
    with torch.no_grad():
        lens.weight.copy_(torch.from_numpy(a))
        lens.bias.copy_(torch.from_numpy(b))
    return lens


@torch.no_grad()
def _resid(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hooks = tunedlens.resid_hooks(model.cfg.n_layers)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n in hooks)
    return logits, torch.stack([cache[h] for h in hooks])


@pytest.mark.parametrize("name", list(tuned_lens_weights.MODELS))
def test_lens_matches_tuned_lens(models: dict, name: str) -> None:
    """Seeded translators on each model's residual stream give tuned-lens's logits (for GPT-2
    tuned-lens held the translator weight W·C on transformers' uncentred hidden states)."""
    theirs = np.load(DATA / "apply.npz")
    ids = torch.from_numpy(theirs[f"{name}__ids"])
    assert torch.equal(
        ids,
        torch.from_numpy(
            tuned_lens_weights.token_batch(
                *ids.shape, FIXTURE["vocab"], seed=FIXTURE["apply"]["seed"]
            )
        ),
    )
    model = models[name]
    logits, resid = _resid(model, ids)
    np.testing.assert_allclose(logits.numpy(), theirs[f"{name}__final_logits"], atol=APPLY_ATOL)
    with torch.no_grad():
        ours = _seeded_lens().logits(model, resid)
        zero = TunedLens.zeros_for(model).logits(model, resid)
    np.testing.assert_allclose(ours.numpy(), theirs[f"{name}__tuned_lens"], atol=APPLY_ATOL)
    np.testing.assert_allclose(zero.numpy(), theirs[f"{name}__logit_lens"], atol=APPLY_ATOL)
    # the translators move the prediction: the comparison is not of two logit lenses
    assert (ours - zero).abs().max() > 1.0


def _config(run: dict, ctx: int) -> TunedLensConfig:
    opt = run["optimizer"]
    train = FIXTURE["train"]
    return TunedLensConfig(
        steps=train["steps"],
        tokens_per_step=train["windows_per_step"] * ctx,
        micro_batch_tokens=ctx,  # tuned-lens's per_gpu_batch_size 1: one window a pass
        optimizer=opt.get("optimizer", "sgd"),
        lr_scale=opt.get("lr_scale", 1.0),
        warmup_steps=opt.get("warmup_steps", 0),
        bf16_autocast=run["bf16"],
        shuffle=False,  # tuned-lens read the windows in order
    )


def _train_steps(model, windows: torch.Tensor, config: TunedLensConfig) -> dict[str, np.ndarray]:
    steps: dict[str, list] = {"weight": [], "bias": [], "loss": [], "lr": []}

    def record(rec: tunedlens.StepRecord) -> None:
        steps["weight"].append(rec.lens.weight.detach().cpu().numpy().copy())
        steps["bias"].append(rec.lens.bias.detach().cpu().numpy().copy())
        steps["loss"].append(rec.losses)
        steps["lr"].append(rec.lr)

    train_tuned_lens(model, windows, config, on_step=record, progress=False)
    return {k: np.asarray(v) for k, v in steps.items()}


TRAINED = [(m, r) for m in FIXTURE["trained_models"] for r in FIXTURE["runs"]]


@pytest.mark.numerics
@pytest.mark.parametrize(("name", "run"), TRAINED, ids=[f"{m}-{r}" for m, r in TRAINED])
def test_training_matches_tuned_lens_step_by_step(
    models: dict, name: str, run: str, measured
) -> None:
    """The same windows in the same order, the same settings: after every step the same
    translators and the same KL as tuned-lens's own training loop. `gpt2_centred` writes only
    centred vectors into the residual stream, so transformers' hidden states are
    TransformerLens's residual stream and both train the same lens; Llama is not centred."""
    theirs = np.load(DATA / "train.npz")
    windows = torch.from_numpy(theirs["windows"])
    spec = FIXTURE["train"]
    assert torch.equal(
        windows,
        torch.from_numpy(
            tuned_lens_weights.token_batch(
                spec["windows"], spec["ctx"], FIXTURE["vocab"], seed=spec["seed"]
            )
        ),
    )
    ours = _train_steps(models[name], windows, _config(FIXTURE["runs"][run], spec["ctx"]))
    key = f"{name}__{run}__"
    np.testing.assert_allclose(ours["lr"], theirs[key + "lr"], rtol=1e-6, atol=1e-9)
    bf16 = FIXTURE["runs"][run]["bf16"]
    atol, loss_atol = (BF16_ATOL, BF16_LOSS_ATOL) if bf16 else (TRAIN_ATOL, LOSS_ATOL)
    for part in ("weight", "bias"):
        deviation = np.abs(ours[part] - theirs[key + part]).max()
        measured(f"{part} deviation", deviation)
        assert deviation <= atol, (part, deviation)
    loss_deviation = np.abs(ours["loss"] - theirs[key + "loss"]).max()
    measured("loss deviation", loss_deviation)
    assert loss_deviation <= loss_atol
    assert np.abs(theirs[key + "weight"][-1]).max() > 0.01  # the lens did move


def test_schedule_is_tuned_lens_linear_warmup() -> None:
    """The learning-rate factor: linear warm-up, then linear decay over `steps − warmup` steps
    counted from 0, as tuned-lens 0.2 hands them to its schedule."""
    none = TunedLensConfig(steps=4)
    assert [none.schedule(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    warm = TunedLensConfig(steps=6, warmup_steps=2)
    assert [warm.schedule(s) for s in range(6)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert TunedLensConfig().lr() == pytest.approx(0.1)
    assert TunedLensConfig(optimizer="adam", lr_scale=10.0).lr() == pytest.approx(0.01)


def test_training_is_deterministic_and_seeded(models: dict) -> None:
    """The same seed trains the same lens; another seed reads the windows in another order."""
    windows = torch.from_numpy(tuned_lens_weights.token_batch(8, 8, FIXTURE["vocab"], seed=3))
    cfg = TunedLensConfig(steps=3, tokens_per_step=16, micro_batch_tokens=8, seed=1)
    model = models["llama"]
    first = train_tuned_lens(model, windows, cfg, progress=False)
    again = train_tuned_lens(model, windows, cfg, progress=False)
    other = train_tuned_lens(
        model, windows, TunedLensConfig(**{**cfg.to_dict(), "seed": 2}), progress=False
    )
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    assert not torch.equal(first.weight, other.weight)
    assert first.weight.device.type == "cpu" and not first.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_micro_batching_does_not_change_the_step(models: dict, measured) -> None:
    """The gradient is the mean over the step's tokens, however many windows a pass holds."""
    windows = torch.from_numpy(tuned_lens_weights.token_batch(8, 8, FIXTURE["vocab"], seed=4))
    model = models["gpt2"]
    lenses = [
        train_tuned_lens(
            model,
            windows,
            TunedLensConfig(steps=2, tokens_per_step=32, micro_batch_tokens=m, shuffle=False),
            progress=False,
        )
        for m in (8, 16, 32)
    ]
    for lens in lenses[1:]:
        deviation = float((lens.weight - lenses[0].weight).abs().max())
        assert deviation <= measured("micro-batch deviation", deviation) <= 1e-6


def test_zero_lens_is_the_logit_lens(induction_final) -> None:
    """With zero translators, row l + 1 of the predictions is the views' logit lens at layer l,
    bit for bit (the same top tokens and probabilities, the same target probability)."""
    model = induction_final.model
    ids = [int(t) for t in torch.arange(1, 13) % model.cfg.d_vocab]
    views = prompt_views(model, ids, flow_seconds=None)
    ours = tuned_lens_predictions(model, TunedLens.zeros_for(model), ids)
    assert ours.predicted_id == views.predicted_id
    shifted = [(layer - 1, pos, rank, tid, p) for layer, pos, rank, tid, p in ours.lens if layer]
    assert shifted == views.lens
    assert torch.equal(ours.target[1:], views.lens_target)
    n_layers = model.cfg.n_layers
    assert ours.target.shape == (n_layers + 1, len(ids))
    assert float(ours.kl[-1].abs().max()) < 1e-5  # the last row is the model's own prediction
    assert {layer for layer, *_ in ours.lens} == set(range(n_layers + 1))


@pytest.mark.numerics
def test_training_lowers_held_out_kl(induction_final, induction_task, measured) -> None:
    """On the zoo's induction model and its own training distribution, a lens trained on half
    the windows has a lower KL to the model's distribution than the logit lens on the other
    half, at every layer."""
    corpus = load_corpus("task", induction_final, induction_task, n_tokens=2**14)
    half = len(corpus.windows) // 2
    train, held = corpus.windows[:half], corpus.windows[half:]
    model = induction_final.model
    cfg = TunedLensConfig(steps=50, tokens_per_step=2048, seed=0)
    lens = train_tuned_lens(model, train, cfg, progress=False)
    ratio = lens_kl(model, lens, held) / lens_kl(model, None, held)
    for layer, value in enumerate(ratio.tolist()):
        measured(f"held-out KL ratio layer {layer}", value)
    assert float(ratio.max()) < HELD_OUT_RATIO_MAX


def test_save_load_round_trip(tmp_path: Path, models: dict) -> None:
    lens = _seeded_lens()
    windows = torch.from_numpy(tuned_lens_weights.token_batch(4, 8, FIXTURE["vocab"], seed=5))
    corpus = Corpus(name="fixture windows", windows=windows)
    provenance = lens_provenance("llama@0", corpus, TunedLensConfig(steps=3), note="test")
    out = save_tuned_lens(lens, tmp_path / "lens", provenance)
    loaded, prov = load_tuned_lens(out)
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    assert prov == json.loads(json.dumps(provenance))
    assert prov["corpus"]["sha256"] == corpus.sha256 and prov["training"]["steps"] == 3
    loaded.check_fits(models["llama"], "lens")
    with pytest.raises(BadInput, match="3 layers of width 16, but the model has"):
        TunedLens(3, 16).check_fits(_other_width_model(), "lens")


def _other_width_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=8, n_ctx=8, d_head=4, d_vocab=11,
                                  act_fn="relu", normalization_type="LN")  # fmt: skip
    return HookedTransformer(cfg)


def _write_bad(path: Path, case: str) -> None:
    save_tuned_lens(TunedLens(2, 4), path, {"checkpoint_id": "x"})
    cfg_path, w_path = path / tunedlens.CONFIG_FILE, path / tunedlens.WEIGHTS_FILE
    cfg = json.loads(cfg_path.read_text())
    tensors = {"weight": torch.zeros(2, 4, 4), "bias": torch.zeros(2, 4)}
    if case == "no config":
        cfg_path.unlink()
    elif case == "bad json":
        cfg_path.write_text("{not json")
    elif case == "format":
        cfg_path.write_text(json.dumps({**cfg, "format": "other"}))
    elif case == "version":
        cfg_path.write_text(json.dumps({**cfg, "version": 99}))
    elif case == "n_layers":
        cfg_path.write_text(json.dumps({**cfg, "n_layers": "two"}))
    elif case == "shape":
        cfg_path.write_text(json.dumps({**cfg, "n_layers": 3}))
    elif case == "missing tensor":
        save_file({"weight": tensors["weight"]}, str(w_path))
    elif case == "non-finite":
        save_file({**tensors, "bias": torch.full((2, 4), float("nan"))}, str(w_path))
    elif case == "not safetensors":
        w_path.write_bytes(b"garbage")
    elif case == "provenance":
        cfg_path.write_text(json.dumps({**cfg, "provenance": [1]}))


BAD = {
    "no config": "not a tuned lens directory \\(no config.json\\)",
    "bad json": "config.json: not valid JSON",
    "format": "config.json: field 'format'",
    "version": "config.json: field 'version'",
    "n_layers": "config.json: field 'n_layers'",
    "shape": "tuned_lens.safetensors: tensor 'weight' has shape",
    "missing tensor": "tuned_lens.safetensors: tensor 'bias' is missing",
    "non-finite": "tuned_lens.safetensors: tensor 'bias' has non-finite values",
    "not safetensors": "tuned_lens.safetensors: not a readable safetensors file",
    "provenance": "config.json: field 'provenance'",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lens_files(tmp_path: Path, case: str) -> None:
    path = tmp_path / "lens"
    _write_bad(path, case)
    with pytest.raises(BadInput, match=BAD[case]) as err:
        load_tuned_lens(path)
    assert str(path) in str(err.value)


def test_missing_directory_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no tuned lens directory here"):
        load_tuned_lens(tmp_path / "absent")
    with pytest.raises(BadInput, match="warmup_steps 5: must be at least 0 and below steps"):
        TunedLensConfig(steps=5, warmup_steps=5).check()
    with pytest.raises(BadInput, match="momentum 0.0: must be in"):
        TunedLensConfig(momentum=0.0).check()
    with pytest.raises(BadInput, match="optimizer 'lbfgs'"):
        TunedLensConfig(optimizer="lbfgs").check()  # type: ignore[arg-type]
    with pytest.raises(BadInput, match="windows"):
        train_tuned_lens(_other_width_model(), torch.zeros(0, 4, dtype=torch.long))
