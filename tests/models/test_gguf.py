"""`workbench model import`: GGUF files become Hugging Face directories whose logits are the
original model's (exactly for float32 tensors, within the quantisation error for Q8_0), and
files that cannot be imported are bad input naming the file."""

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from tests.models import gguf_files
from tests.models.gguf_files import VOCAB, write_llama_gguf
from workbench.cli import cli
from workbench.models import load_checkpoint, resolve_checkpoints


@pytest.fixture(scope="module")
def tiny_llama():
    return gguf_files.tiny_llama()


# max |logit difference| to the original model: float32 is exact up to float error; Q8_0's
# error is fixed by the weights (no training involved), measured 0.006 on this model
@pytest.mark.parametrize(("kind", "atol"), [("F32", 1e-4), ("Q8_0", 0.02)])
def test_import_gives_the_models_logits(tmp_path, tiny_llama, kind, atol):
    gguf_file = write_llama_gguf(
        tiny_llama, tmp_path / "tiny.gguf", quantisation=GGMLQuantizationType[kind]
    )
    out = tmp_path / "imported"
    assert cli(["model", "import", str(gguf_file), "--out", str(out)]) == 0
    assert not (tmp_path / "imported.partial").exists()
    loaded = load_checkpoint(resolve_checkpoints(str(out))[0])
    assert loaded.info.architecture == "LlamaForCausalLM"
    assert loaded.model.cfg.n_key_value_heads == 2
    tokens = torch.randint(3, len(VOCAB), (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = loaded.model(tokens), tiny_llama(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    # the tokenizer came along: its vocabulary is the file's, and it adds no BOS of its own,
    # so neither do task prompts
    assert loaded.tokenizer.convert_ids_to_tokens([3, 29]) == ["a", "Ġa"]
    assert not loaded.prepend_bos


def test_a_file_that_is_not_gguf_is_bad_input(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all")
    assert cli(["model", "import", str(path), "--out", str(tmp_path / "out")]) == 2
    assert f"{path}: not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _minimal_gguf(path, architecture: str, kind: GGMLQuantizationType):
    writer = GGUFWriter(str(path), architecture)
    block, size = GGML_QUANT_SIZES[kind]
    writer.add_tensor("token_embd.weight", np.zeros((4, size * 64 // block), np.uint8),
                      raw_dtype=kind)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("architecture", "kind", "message"),
    [
        ("mamba", GGMLQuantizationType.Q8_0, "architecture 'mamba' is not supported"),
        ("llama", GGMLQuantizationType.Q8_1, "is quantised as Q8_1, which the gguf package"),
    ],
)
def test_unsupported_architecture_or_quantisation_is_bad_input(
    tmp_path, capsys, architecture, kind, message
):
    path = _minimal_gguf(tmp_path / "m.gguf", architecture, kind)
    assert cli(["model", "import", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


# GPT-2's Conv1D weights are stored [in, out] in transformers, and transposed in GGUF
GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3", "gpt2", "bloom"])
def test_the_checked_layout_is_the_one_transformers_maps(architecture):
    """Every tensor the import requires, with the dimensions it requires, is one transformers'
    GGUF reader maps onto a parameter of that shape, and every parameter it maps is required
    (but `output.weight`, which is optional: without it the output is tied to the embedding)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    from workbench.models.gguf_check import LAYOUTS, QWEN3_HEAD_SIZE

    small = {"num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 50}
    config = transformers.AutoConfig.for_model(
        architecture, hidden_size=64, n_embd=64, intermediate_size=128, num_key_value_heads=2,
        n_layer=2, n_head=4, **small,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    mapped = get_gguf_hf_weights_map(model, TENSOR_PROCESSORS.get(architecture, TensorProcessor)())
    head = QWEN3_HEAD_SIZE if architecture == "qwen3" else 16
    fused = architecture in ("gpt2", "bloom")
    sizes = {
        "E": 64, "3E": 192, "V": 50, "F": 256 if fused else 128, "Q": 4 * head,
        "K": (4 if fused else 2) * head, "D": head, "P": 1024,
    }  # fmt: skip
    top, layer = LAYOUTS[architecture]
    required = dict(top) | {f"blk.{i}.{s}": d for i in range(2) for s, d in layer.items()}
    assert set(mapped) - set(required) == {"output.weight"}
    parameters = model.state_dict()
    for name, dims in required.items():
        want = tuple(sizes[d] for d in dims)
        shape = tuple(parameters[mapped[name]].shape)
        transposed = architecture == "gpt2" and name.endswith(GPT2_TRANSPOSED)
        assert (shape if transposed else shape[::-1]) == want, name
