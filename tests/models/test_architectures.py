"""The architectures researchers have: each Hugging Face architecture the workbench converts,
from a directory and from a Trainer run, with logits equal to the Hugging Face model's; every
normalisation TransformerLens supports; and every method running on each kind of model."""

import json
import shutil

import pytest
import torch
import transformers

from workbench.cli import cli
from workbench.models import engine, load_checkpoint, resolve_checkpoints

SMALL = {"num_hidden_layers": 2, "vocab_size": 97}
DECODER = SMALL | {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
DECODER |= {"max_position_embeddings": 64}
GQA = DECODER | {"num_key_value_heads": 2}

# architecture -> (config class, config kwargs): tiny random models of every supported kind
CONFIGS = {
    "GPT2LMHeadModel": ("GPT2Config", {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 97}),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", DECODER | {"rotary_pct": 0.5}),
    "GPTJForCausalLM": ("GPTJConfig", {"n_layer": 2, "n_embd": 32, "n_head": 4, "rotary_dim": 4}),
    "OPTForCausalLM": (
        "OPTConfig",
        SMALL | {"hidden_size": 32, "num_attention_heads": 4, "ffn_dim": 64},
    ),
    "BloomForCausalLM": ("BloomConfig", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "LlamaForCausalLM": ("LlamaConfig", GQA),
    "MistralForCausalLM": ("MistralConfig", GQA | {"sliding_window": None}),
    "MixtralForCausalLM": (
        "MixtralConfig",
        GQA | {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "Qwen2ForCausalLM": ("Qwen2Config", GQA),
    "Qwen3ForCausalLM": ("Qwen3Config", GQA | {"head_dim": 8}),
}


def test_every_supported_architecture_has_a_case():
    assert set(CONFIGS) == set(engine.HF_ARCHITECTURES)


def _save(arch: str, out, seed: int = 0):
    config_class, kwargs = CONFIGS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**{"vocab_size": 97} | kwargs)
    model = getattr(transformers, arch)(config).eval()
    model.save_pretrained(str(out))
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_directory_and_trainer_run_logits_match_hugging_face(tmp_path, arch):
    run = tmp_path / "my-llama-run"  # the name must not choose the architecture
    hf_models = {step: _save(arch, run / f"checkpoint-{step}", seed=step) for step in (5, 10)}
    refs = resolve_checkpoints(str(run))
    assert [r.step for r in refs] == [5, 10]
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for ref in refs:
        loaded = load_checkpoint(ref)
        assert loaded.info.architecture == arch
        with torch.no_grad():
            ours, theirs = loaded.model(tokens), hf_models[ref.step](tokens).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    (single,) = resolve_checkpoints(str(run / "checkpoint-10"))
    assert single.step == 10 and single.model_id == refs[0].model_id


def test_unsupported_architecture_is_bad_input(tmp_path, capsys):
    path = tmp_path / "gemma"
    config = transformers.GemmaConfig(**GQA, head_dim=8)
    transformers.GemmaForCausalLM(config).save_pretrained(str(path))
    argv = ["run", "heads", "--model", str(path), "--task", "induction"]
    assert cli([*argv, "--db", str(tmp_path / "w.duckdb")]) == 2
    err = capsys.readouterr().err
    assert f"{path / 'config.json'}: architecture 'GemmaForCausalLM' is not supported" in err


def test_config_without_architectures_uses_its_model_type(tmp_path, tiny_hf_dirs):
    path = tmp_path / "no-architectures"
    shutil.copytree(tiny_hf_dirs["llama"], path)
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(resolve_checkpoints(str(path))[0]).info.architecture == (
        "LlamaForCausalLM"
    )


def _model_dirs(tiny_hf_dirs, norm_dirs):
    dirs = {f"norm-{norm}": path for norm, path in norm_dirs.items()}
    return dirs | {"llama-gqa": tiny_hf_dirs["llama"], "gpt-neox": tiny_hf_dirs["gpt_neox"]}


@pytest.mark.heavy
@pytest.mark.parametrize(
    "kind", ["norm-LN", "norm-LNPre", "norm-RMS", "norm-RMSPre", "norm-None", "llama-gqa"]
)
def test_every_method_runs(tmp_path, tiny_hf_dirs, norm_dirs, kind, capsys):
    """heads (every method), patching (every component) and edges (every method) store a run
    for each normalisation and for grouped-query attention."""
    model = _model_dirs(tiny_hf_dirs, norm_dirs)[kind]
    common = ["--model", str(model), "--task", "induction", "--n-prompts", "6"]
    common += ["--db", str(tmp_path / "w.duckdb")]
    assert cli(["run", "heads", *common]) == 0
    assert cli(["run", "patching", *common]) == 0
    methods = ["--method", "eap", "--method", "eap_ig", "--method", "exact_edge"]
    assert cli(["run", "edges", *common, *methods, "--method", "acdc"]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out and out.count("done") >= 5 + 2 + 4


def _tl_processed(cfg, state_dict):
    """A model loaded by TransformerLens's own `load_and_process_state_dict` (which copies the
    state dict before folding) with the workbench's processing flags: the reference."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        {k: v.clone() for k, v in state_dict.items()}, **engine.PROCESSING
    )
    return model


def _assert_linear_weights_not_copied(ours, theirs):
    """The weights TransformerLens multiplies as `F.linear(x, W.T.contiguous())` (the
    unembedding, a gated MLP's three matrices) are stored so that the call copies nothing, and
    the unembedding and every MLP give TransformerLens's own outputs to the bit."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    weights = [ours.unembed.W_U]
    for block in ours.blocks:
        if isinstance(getattr(block, "mlp", None), GatedMLP):
            weights += [block.mlp.W_in, block.mlp.W_gate, block.mlp.W_out]
    for w in weights:
        assert w.T.contiguous().data_ptr() == w.data_ptr()
    x = torch.randn(2, 3, ours.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.unembed(x), theirs.unembed(x))
        for mine, ref in zip(ours.blocks, theirs.blocks, strict=True):
            if hasattr(getattr(mine, "mlp", None), "W_in"):
                assert torch.equal(mine.mlp(x), ref.mlp(x))


def _assert_same_weights(ours, theirs, source_keys):
    """Every weight the checkpoint gave (a weight it lacks, such as Bloom's unused positional
    embedding, is left uninitialised by both) equal to the bit, and the same modules."""
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == ref.keys()
    for name, tensor in ref.items():
        if name in source_keys:
            assert torch.equal(mine[name], tensor), name
    assert ours.cfg.normalization_type == theirs.cfg.normalization_type
    for (name, module), (_, other) in zip(
        ours.named_modules(), theirs.named_modules(), strict=True
    ):
        assert type(module) is type(other), name


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_weights_processed_in_place_equal_transformer_lens(tmp_path, arch):
    """The workbench folds and centres a Hugging Face checkpoint without TransformerLens's copy
    of the whole state dict: every weight equals TransformerLens's own processing to the bit,
    with norm weights and biases made random so that folding them matters."""
    from transformer_lens import loading_from_pretrained as tl_loading

    model = _save(arch, tmp_path / "m")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(str(tmp_path / "m"))
    ours = engine.from_hf_directory(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    cfg = engine._tl_config(tmp_path / "m")
    state_dict = tl_loading.get_pretrained_state_dict(str(tmp_path / "m"), cfg, hf_model=hf)
    theirs = _tl_processed(cfg, state_dict)
    _assert_same_weights(ours, theirs, set(state_dict))
    _assert_linear_weights_not_copied(ours, theirs)


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", "None"])
def test_zoo_weights_processed_in_place_equal_transformer_lens(norm_dirs, norm):
    from transformer_lens import HookedTransformerConfig

    from workbench.models import zoo_format

    path = norm_dirs[None if norm == "None" else norm]
    cfg_kwargs = zoo_format.read_json(path / "config.json")
    state_dict = zoo_format.load_zoo_weights(path)
    ours = engine.build_from_state_dict(cfg_kwargs, dict(state_dict), source=path)
    cfg = HookedTransformerConfig(**{**cfg_kwargs, "device": "cpu"})
    theirs = _tl_processed(cfg, state_dict)
    _assert_same_weights(ours, theirs, set(state_dict))
    _assert_linear_weights_not_copied(ours, theirs)
