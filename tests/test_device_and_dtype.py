"""Device and precision: every method makes its tensors on the model's device, and runs record
where and in what precision they computed.

No GPU here, so device-cleanliness is tested on the CPU: with PyTorch's default device set to
`meta` (a device without data), any tensor a method creates without naming a device lands there
and the method fails or returns meta tensors. Each method must return the same numbers, on the
CPU, as it does without that default.
"""

import json

import pytest
import torch

from tests.sae.conftest import HOOKS
from workbench import circuits
from workbench.attribution import edges, heads, patching
from workbench.attribution.batches import make_batches, model_device
from workbench.cli import cli
from workbench.sae import attribution as sae_attribution
from workbench.sae import features
from workbench.sae.corpus import load_corpus
from workbench.sae.saes import load_sae


def _methods(loaded, task, sae_run):
    model = loaded.model
    graph = edges.model_graph(model)

    def batches():
        return make_batches(task, device=model_device(model))

    def spliced():
        saes = [load_sae(sae_run.saes[h]["path"], loaded) for h in HOOKS]
        return sae_attribution.SplicedModel(model, saes, ["early", "late"], batches())

    def feature_stats():
        corpus = load_corpus("task", loaded, task, n_tokens=2000, context_size=None)
        stats = features.scan(loaded, load_sae(sae_run.saes[HOOKS[0]]["path"], loaded), corpus)
        return torch.cat([stats.density.float(), stats.maxima, stats.top_values.flatten()])

    def sae_scores():
        model_saes = spliced()
        scores = sae_attribution.feature_circuit(model_saes, ig_steps=2, n_nodes=4)[0].node_scores
        every = [n for k in range(len(model_saes.saes)) for n in model_saes.node_ids(k)]
        return values(scores.get(n, 0.0) for n in every)  # unscored (exactly 0) nodes too

    def values(pairs):
        return torch.tensor([float(v) for v in pairs], device="cpu")

    return {
        "dla": lambda: heads.direct_logit_attribution(model, batches()).scores,
        "act_patch_noise": lambda: (
            heads.head_out_patching(model, batches(), direction="noise").scores
        ),
        "head_importance": lambda: heads.head_importance(model, batches()).scores,
        "attr_patch": lambda: heads.attribution_patching(model, batches()).scores,
        "patch_by_position": lambda: (
            patching.patch_sweep(
                model, batches(), component="head_out", direction="denoise", by_position=True
            ).scores
        ),
        "patch_resid_mean": lambda: (
            patching.patch_sweep(
                model, batches(), component="resid", direction="noise", ablation="mean"
            ).scores
        ),
        "eap_ig": lambda: edges.edge_attribution(model, batches(), ig_steps=2).scores,
        "exact_edge": lambda: edges.exact_edge_patching(model, batches()).scores,
        "faithfulness_curve": lambda: values(
            f
            for _, _, f in circuits.faithfulness_curve(
                model, batches(), graph, edges.edge_attribution(model, batches()).edges()
            )
        ),
        "acdc": lambda: values(
            e[2]
            for e in circuits.acdc(circuits.EdgeAblator(model, batches(), graph), threshold=0.05)[0]
        ),
        "sae_attr": sae_scores,
        "sae_features": feature_stats,
    }


METHODS = [
    "dla", "act_patch_noise", "head_importance", "attr_patch", "patch_by_position",
    "patch_resid_mean", "eap_ig", "exact_edge", "faithfulness_curve", "acdc", "sae_attr",
    "sae_features",
]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_no_tensor_is_made_off_the_models_device(induction_final, induction_task, sae_run, method):
    compute = _methods(induction_final, induction_task, sae_run)[method]
    expected = compute()
    torch.set_default_device("meta")
    try:
        got = compute()
    finally:
        torch.set_default_device(None)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_runs_record_device_and_dtype_and_dtype_keys_the_run(tmp_path, induction_dir, capsys):
    db = tmp_path / "w.duckdb"
    argv = ["run", "heads", "--model", str(induction_dir), "--task", "induction", "--db", str(db)]
    argv += ["--method", "dla", "--method", "act_patch_denoise"]
    assert cli([*argv, "--device", "cpu"]) == 0
    assert cli([*argv, "--device", "auto"]) == 0  # the same runs: the device is not in the key
    assert capsys.readouterr().out.count("skipped") == 2
    assert cli([*argv, "--dtype", "bfloat16"]) == 0  # another precision is another run
    from tests.sae.conftest import query

    rows = query(db, "SELECT method, params, metric_clean FROM runs ORDER BY method, params")
    placements = {(r["method"], json.loads(r["params"])["dtype"]) for r in rows}
    assert placements == {
        (m, d) for m in ("dla", "act_patch_denoise") for d in ("float32", "bfloat16")
    }
    assert {json.loads(r["params"])["device"] for r in rows} == {"cpu"}
    # bfloat16 keeps about 3 significant digits: the same metric, roughly
    by_dtype = {json.loads(r["params"])["dtype"]: r["metric_clean"] for r in rows}
    assert by_dtype["bfloat16"] == pytest.approx(by_dtype["float32"], rel=0.05)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--device", "cuda", "--device cuda: CUDA is not available on this machine"),
        ("--device", "tpu", "--device tpu: expected auto, cpu, cuda, cuda:N or mps"),
        ("--dtype", "float64", "--dtype float64: expected one of float32, bfloat16, float16"),
    ],
)
def test_a_device_or_dtype_that_is_not_there_is_bad_input(
    tmp_path, induction_dir, capsys, option, value, message
):
    if value == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["run", "heads", "--model", str(induction_dir), "--task", "induction"]
    assert cli([*argv, "--db", str(tmp_path / "w.duckdb"), option, value]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def half(request, induction_dir):
    from workbench.models import load_checkpoint, resolve_checkpoints

    loaded = load_checkpoint(resolve_checkpoints(str(induction_dir))[-1], dtype=request.param)
    assert loaded.model.cfg.dtype == getattr(torch, request.param)
    return loaded


HALF_SPREAD = {"bfloat16": 0.1, "float16": 0.02}  # 3x and 8x the measured maxima (below)
# a TopK SAE keeps its k largest features: in half precision near-ties flip which features fire,
# which moves densities and top examples (measured 0.058-0.095 bfloat16, 0.045-0.055 float16)
SAE_FEATURES_SPREAD = {"bfloat16": 0.3, "float16": 0.15}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_in_half_precision(
    half, induction_final, induction_task, sae_run, method, measured
):
    """The same scores as in float32, up to the precision: bfloat16 keeps 8 bits of mantissa,
    float16 11. Max |difference| to float32 on the zoo over the avx512, avx2 and default
    kernels: bfloat16 0.0003-0.032 (the faithfulness curve under the default kernels the
    largest), float16 0.0000-0.0024; sae_features below."""
    reference = _methods(induction_final, induction_task, sae_run)[method]()
    got = _methods(half, induction_task, sae_run)[method]()
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    difference = measured("max_abs_difference", float((got - reference).abs().max()))
    dtype = str(half.model.cfg.dtype).removeprefix("torch.")
    bounds = SAE_FEATURES_SPREAD if method == "sae_features" else HALF_SPREAD
    assert difference <= bounds[dtype]


def test_the_zoo_trains_in_another_precision_and_its_checkpoints_load(tmp_path, capsys):
    argv = ["zoo", "train", "induction", "--out", str(tmp_path), "--steps", "4"]
    assert cli([*argv, "--save-every", "4", "--dtype", "bfloat16"]) == 0
    from workbench.models import load_checkpoint, resolve_checkpoints

    refs = resolve_checkpoints(str(tmp_path / "induction"))
    assert [r.step for r in refs] == [0, 4]
    loaded = load_checkpoint(refs[-1])  # loads as float32, like every checkpoint
    assert loaded.model.cfg.dtype == torch.float32
    if not torch.cuda.is_available():
        assert cli([*argv, "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available" in capsys.readouterr().err
