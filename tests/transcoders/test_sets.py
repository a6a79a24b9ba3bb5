"""Transcoder sets on disk: written in SAELens's format they load in SAELens (and back), sets in
circuit-tracer's format load, and what cannot be read is one sentence naming the file."""

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from workbench.errors import BadInput
from workbench.transcoders.sets import (
    Transcoder,
    TranscoderSet,
    load_transcoder_set,
    save_circuit_tracer,
    save_saelens,
)


def make_set(n_layers=2, d=12, d_tc=20, *, skip=True, jumprelu=False, seed=0) -> TranscoderSet:
    g = torch.Generator().manual_seed(seed)
    tcs = [
        Transcoder(
            W_enc=torch.randn(d, d_tc, generator=g),
            b_enc=torch.randn(d_tc, generator=g) - 0.5,
            W_dec=torch.randn(d_tc, d, generator=g),
            b_dec=torch.randn(d, generator=g),
            W_skip=torch.randn(d, d, generator=g) if skip else None,
            threshold=torch.rand(d_tc, generator=g) if jumprelu else None,
            activation="jumprelu" if jumprelu else "relu",
        )
        for _ in range(n_layers)
    ]
    return TranscoderSet(tcs, "ln2.hook_normalized", "hook_mlp_out", "test")


KINDS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize(("skip", "jumprelu"), KINDS)
def test_a_set_written_for_saelens_loads_in_saelens_and_back(tmp_path, skip, jumprelu):
    from sae_lens import SAE

    tset = make_set(skip=skip, jumprelu=jumprelu)
    save_saelens(tset, tmp_path / "set", model_name="zoo-ioi")
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
    for layer, tc in enumerate(tset.transcoders):
        sae = SAE.load_from_disk(str(tmp_path / "set" / f"layer_{layer}"), device="cpu")
        assert sae.cfg.architecture() == tc.architecture
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln2.hook_normalized"
        assert sae.cfg.metadata.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        with torch.no_grad():
            assert torch.allclose(sae.encode(x), tc.encode(x), atol=1e-5)
            assert torch.allclose(sae(x), tc(x), atol=1e-4)
    back = load_transcoder_set(tmp_path / "set")
    assert (back.hook_in, back.hook_out, len(back)) == (tset.hook_in, tset.hook_out, 2)
    for a, b in zip(back.transcoders, tset.transcoders, strict=True):
        assert torch.allclose(a(x), b(x), atol=1e-5)
        assert a.architecture == b.architecture


@pytest.mark.parametrize(("skip", "jumprelu"), KINDS)
def test_circuit_tracer_sets_load_with_its_orientation(tmp_path, skip, jumprelu):
    """A set written as circuit-tracer writes one (W_enc and W_dec feature-major) computes what
    the transcoders compute: encoder rows are features."""
    tset = make_set(skip=skip, jumprelu=jumprelu)
    save_circuit_tracer(tset, tmp_path / "ct")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "ct" / "layer_0.safetensors"))
    assert on_disk["W_enc"].shape == (20, 12) and on_disk["W_dec"].shape == (20, 12)
    x = torch.randn(5, 12)
    pre = x @ on_disk["W_enc"].T + on_disk["b_enc"]  # circuit-tracer: F.linear(x, W_enc, b_enc)
    assert torch.allclose(pre, tset[0].pre(x), atol=1e-5)
    back = load_transcoder_set(tmp_path / "ct")
    for a, b in zip(back.transcoders, tset.transcoders, strict=True):
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_circuit_tracer_hooks_around_the_mlp_read_as_transformer_lens_hooks(tmp_path):
    tset = make_set()
    save_circuit_tracer(tset, tmp_path / "ct")
    config = {"model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in",
              "feature_output_hook": "mlp.hook_out",
              "transcoders": ["layer_0.safetensors", "layer_1.safetensors"]}  # fmt: skip
    (tmp_path / "ct" / "config.yaml").write_text(yaml.safe_dump(config))
    back = load_transcoder_set(tmp_path / "ct")
    assert (back.input_hook(1), back.output_hook(1)) == (
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
    )


def test_a_circuit_tracer_0_1_file_with_an_output_major_decoder_loads(tmp_path):
    tset = make_set(n_layers=1)
    tc = tset[0]
    (tmp_path / "old").mkdir()
    save_file(
        {"W_enc": tc.W_enc.T.contiguous(), "W_dec": tc.W_dec.T.contiguous(), "b_enc": tc.b_enc,
         "b_dec": tc.b_dec, "W_skip": tc.W_skip},
        str(tmp_path / "old" / "layer_0.safetensors"),
    )  # fmt: skip
    config = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    (tmp_path / "old" / "config.yaml").write_text(yaml.safe_dump(config))
    back = load_transcoder_set(tmp_path / "old")
    x = torch.randn(3, 12)
    assert torch.allclose(back[0](x), tc(x), atol=1e-5)


def _broken(tmp_path, what):
    tset = make_set()
    root = tmp_path / what
    save_circuit_tracer(tset, root)
    layer0 = root / "layer_0.safetensors"
    if what == "missing_layer":
        layer0.unlink()
    elif what == "bad_shape":
        save_file({"W_enc": torch.zeros(20, 12), "W_dec": torch.zeros(20, 11),
                   "b_enc": torch.zeros(20), "b_dec": torch.zeros(12)}, str(layer0))  # fmt: skip
    elif what == "missing_tensor":
        save_file({"W_enc": torch.zeros(20, 12), "b_enc": torch.zeros(20),
                   "b_dec": torch.zeros(12)}, str(layer0))  # fmt: skip
    elif what == "not_safetensors":
        layer0.write_bytes(b"\x00" * 40)
    elif what == "bad_yaml":
        (root / "config.yaml").write_text("feature_input_hook: [\n")
    elif what == "no_hook":
        (root / "config.yaml").write_text("model_kind: transcoder_set\n")
    elif what == "remote":
        (root / "config.yaml").write_text(
            yaml.safe_dump(
                {
                    "feature_input_hook": "a",
                    "feature_output_hook": "b",
                    "transcoders": ["hf://org/repo/layer_0.safetensors"],
                }
            )  # fmt: skip
        )
    return root


@pytest.mark.parametrize(
    ("what", "says"),
    [
        ("missing_layer", "layer_0.safetensors is missing"),
        ("bad_shape", "'W_dec' has shape (20, 11), expected (20, 12)"),
        ("missing_tensor", "tensor 'W_dec' is missing"),
        ("not_safetensors", "not a readable safetensors file"),
        ("bad_yaml", "not valid YAML"),
        ("no_hook", "field 'feature_input_hook' is missing"),
        ("remote", "only local files"),
    ],
)
def test_a_broken_circuit_tracer_set_is_one_sentence(tmp_path, what, says):
    with pytest.raises(BadInput, match=None) as err:
        load_transcoder_set(_broken(tmp_path, what))
    assert says in str(err.value)
    assert "\n" not in str(err.value)


def test_a_saelens_folder_that_is_not_a_transcoder_is_named(tmp_path):
    tset = make_set()
    save_saelens(tset, tmp_path / "set")
    cfg_file = tmp_path / "set" / "layer_1" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architecture"] = "standard"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="layer_1/cfg.json: field 'architecture' is 'standard'"):
        load_transcoder_set(tmp_path / "set")
    cfg["architecture"] = "skip_transcoder"
    cfg["metadata"]["hook_name"] = "blocks.0.ln2.hook_normalized"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="must name hooks of one block"):
        load_transcoder_set(tmp_path / "set")
    cfg["metadata"]["hook_name_out"] = "blocks.0.hook_mlp_out"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="two transcoders for layer 0"):
        load_transcoder_set(tmp_path / "set")
    with pytest.raises(BadInput, match="not a transcoder set"):
        load_transcoder_set(tmp_path)


def test_a_set_that_does_not_fit_the_model_is_one_sentence(norm_dirs):
    from workbench.models import load_checkpoint, resolve_checkpoints

    model = load_checkpoint(resolve_checkpoints(str(norm_dirs["LN"]))[-1]).model
    with pytest.raises(BadInput, match="12-dimensional inputs, the model's d_model is 32"):
        make_set(d=12).check_fits(model, "set")
    with pytest.raises(BadInput, match="3 transcoders for a model of 2 layers"):
        make_set(n_layers=3, d=32).check_fits(model, "set")
    wrong_hook = make_set(d=32)
    wrong_hook.hook_in = "hook_nothing"
    with pytest.raises(BadInput, match="hook 'blocks.0.hook_nothing' is not a hook"):
        wrong_hook.check_fits(model, "set")
    make_set(d=32).check_fits(model, "set")
