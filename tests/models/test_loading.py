"""Model sources: our HookedTransformers against the Hugging Face models they came from."""

import json
import time

import pytest
import torch

from workbench.errors import BadInput
from workbench.models import load_checkpoint, resolve_checkpoints, select_checkpoints


@pytest.mark.parametrize("kind", ["gpt2", "gpt2_no_n_ctx", "gpt_neox"])
def test_hf_directory_logits_match_hf_model(tiny_hf_dirs, kind):
    from transformers import AutoModelForCausalLM

    path = tiny_hf_dirs[kind]
    if kind == "gpt2_no_n_ctx":
        assert "n_ctx" not in json.loads((path / "config.json").read_text())
    (ref,) = resolve_checkpoints(str(path))
    assert ref.kind == "hf"
    loaded = load_checkpoint(ref)
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokens = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = loaded.model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert loaded.info.architecture in {"GPT2LMHeadModel", "GPTNeoXForCausalLM"}
    assert loaded.info.n_layers == 2 and loaded.info.n_heads == 4


def test_trainer_directory_lists_checkpoints(trainer_dir):
    refs = resolve_checkpoints(str(trainer_dir))
    assert [r.step for r in refs] == [10, 20]
    assert len({r.model_id for r in refs}) == 1
    assert select_checkpoints(refs, "latest")[0].step == 20
    assert select_checkpoints(refs, "10")[0].step == 10
    with pytest.raises(BadInput, match="no checkpoint at that step"):
        select_checkpoints(refs, "15")
    first, second = (load_checkpoint(r) for r in refs)
    assert first.checkpoint.sha256 != second.checkpoint.sha256


def test_zoo_directory_and_checkpoint_dir_share_model_id(induction_dir):
    refs = resolve_checkpoints(str(induction_dir))
    (single,) = resolve_checkpoints(str(induction_dir / "step_500"))
    assert single.model_id == refs[0].model_id and single.step == 500


def test_zoo_checkpoint_logits_survive_weight_processing(induction_dir):
    """Folding layer norms must not change what the trained model computes."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from workbench.models.zoo_format import read_json

    path = induction_dir / "step_1000"
    raw = HookedTransformer(HookedTransformerConfig(**read_json(path / "config.json")))
    raw.load_state_dict(load_file(str(path / "model.safetensors")))
    loaded = load_checkpoint(resolve_checkpoints(str(path))[0])
    tokens = torch.randint(3, 60, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), raw(tokens), atol=1e-4, rtol=0)


def test_unknown_model_name_is_bad_input():
    with pytest.raises(BadInput, match="unknown model 'no-such-model'"):
        resolve_checkpoints("no-such-model")


def test_missing_directory_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such directory"):
        resolve_checkpoints(str(tmp_path / "absent" / "model"))


def test_directory_without_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not a model directory"):
        resolve_checkpoints(str(tmp_path))


def test_hub_model_offline_fails_fast_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (ref,) = resolve_checkpoints("gpt2-small")
    started = time.monotonic()
    with pytest.raises(BadInput, match="gpt2-small.*offline"):
        load_checkpoint(ref)
    assert time.monotonic() - started < 60  # fails, does not hang on the network


def test_directory_name_does_not_choose_the_architecture(tmp_path, tiny_hf_dirs):
    """TransformerLens picks some architectures by substrings of a name: a GPT-2 fine-tune
    in a directory called `my-llama-finetune` still loads from its own config.json."""
    import shutil

    path = tmp_path / "my-llama-finetune"
    shutil.copytree(tiny_hf_dirs["gpt2_no_n_ctx"], path)
    loaded = load_checkpoint(resolve_checkpoints(str(path))[0])
    assert loaded.info.architecture == "GPT2LMHeadModel"
    assert loaded.model.cfg.original_architecture == "GPT2LMHeadModel"
    assert loaded.model.cfg.n_ctx == 64
