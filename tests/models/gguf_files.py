"""Small GGUF files for tests, written with the `gguf` package the way llama.cpp's converter
lays out a Llama model (tensor names, the rotary permutation of query and key rows, a
byte-level BPE tokenizer), so that `workbench model import` can be checked against the
Hugging Face model they were made from; and hostile ones, byte by byte, whose header claims
more than the file holds."""

import struct
from pathlib import Path

import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter, quantize

# a byte-level BPE vocabulary: three specials, then single characters (`Ġ` is a space)
SPECIALS = ["<unk>", "<s>", "</s>"]
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
VOCAB = SPECIALS + LETTERS + ["Ġ" + c for c in LETTERS] + ["Ġ", ".", ","]


def tiny_llama(
    *, hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2
) -> transformers.LlamaForCausalLM:
    """A random Llama over `VOCAB` (seed 0) with grouped heads: 4 query heads, 2 key/value."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(VOCAB), max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ordering of the rotary halves in query and key rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_llama_gguf(
    model: torch.nn.Module,
    path: Path,
    *,
    quantisation: GGMLQuantizationType = GGMLQuantizationType.F32,
    architecture: str = "llama",
    header: dict[str, int] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a transformers `LlamaForCausalLM` (vocabulary `VOCAB`) as a GGUF file.

    `header` overrides sizes the header declares (`block_count`, `embedding_length`,
    `feed_forward_length`, `head_count`, `head_count_kv`, `vocab_size`) while the tensors stay
    the model's; `extra_tensors` are written as well, under their GGUF names."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    sizes = {
        "block_count": cfg.num_hidden_layers, "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size, "head_count": n_head,
        "head_count_kv": n_kv, "vocab_size": len(VOCAB),
    }  # fmt: skip
    sizes.update(header or {})
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(sizes["embedding_length"])
    writer.add_block_count(sizes["block_count"])
    writer.add_feed_forward_length(sizes["feed_forward_length"])
    writer.add_head_count(sizes["head_count"])
    writer.add_head_count_kv(sizes["head_count_kv"])
    writer.add_rope_dimension_count(cfg.hidden_size // n_head)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(sizes["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(VOCAB)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(VOCAB) - len(SPECIALS)))
    writer.add_token_merges(["Ġ a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for layer in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{gg}.weight"
    for hf_name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        kind = quantisation if data.ndim == 2 else GGMLQuantizationType.F32
        if kind == GGMLQuantizationType.F32:
            writer.add_tensor(names[hf_name], data)
        else:
            writer.add_tensor(names[hf_name], quantize(data, kind), raw_dtype=kind)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Hostile files, byte by byte (little-endian GGUF version 3). Value types of the format:
UINT8, UINT32, STRING, ARRAY, UINT64 = 0, 4, 8, 9, 10


def gguf_string(text: str | bytes) -> bytes:
    """A GGUF string: its length (uint64), then its bytes."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_kv(key: str, value_type: int, payload: bytes) -> bytes:
    """A key/value pair: the key, the value's type, then `payload` (the value's bytes)."""
    return gguf_string(key) + struct.pack("<I", value_type) + payload


def gguf_array_header(item_type: int, length: int) -> bytes:
    """The start of an array value: its item type and its (claimed) length."""
    return struct.pack("<IQ", item_type, length)


def gguf_tensor_info(name: str, dims: tuple[int, ...], *, kind: int = 0, offset: int = 0) -> bytes:
    """A tensor's entry in the header (kind 0 is F32; `offset` is from the data section)."""
    return (
        gguf_string(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", kind, offset)
    )


def hostile_gguf(
    path: Path,
    *,
    kvs: tuple[bytes, ...] = (),
    tensors: tuple[bytes, ...] = (),
    tensor_count: int | None = None,
    kv_count: int | None = None,
    tail: bytes = b"",
) -> Path:
    """Write a GGUF file from raw parts: the header declares `tensor_count`/`kv_count` (by default
    the numbers given), then the Llama architecture key, `kvs`, `tensors` and `tail`."""
    arch = gguf_kv("general.architecture", STRING, gguf_string("llama"))
    n_kv = 1 + len(kvs) if kv_count is None else kv_count
    n_tensors = len(tensors) if tensor_count is None else tensor_count
    header = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)
    path.write_bytes(header + arch + b"".join(kvs) + b"".join(tensors) + tail)
    return path
