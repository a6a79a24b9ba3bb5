"""The two tiny Hugging Face models of the lxt fixture (`tests/prompt/data/lxt/`), made from
seeded NumPy generators so that every machine writes the same bytes: `tools/lxt_fixture.py`
writes them for lxt (in an environment of its own, with another transformers) and the tests
write them again for the workbench's loader. NumPy and safetensors only.

* `gpt2`: a `GPT2LMHeadModel` (2 layers, width 32, 4 heads, MLP 128, GELU ("gelu_new"),
  learned positions, unembedding tied to the token embedding). Every weight and bias is
  N(0, INIT_RANGE²); the LayerNorm weights are `1 + NORM_NOISE · N(0, 1)` and their biases
  `NORM_NOISE · N(0, 1)`, so nothing is zero and every bias is exercised.
* `llama`: a `LlamaForCausalLM` (2 layers, width 32, 4 query heads sharing 2 key/value heads,
  SiLU-gated MLP 64, rotary positions, no biases, untied unembedding). Weights N(0,
  INIT_RANGE²), the unembedding times UNEMBED_SCALE, RMSNorm weights `1 + NORM_NOISE · N(0, 1)`.

`config.json` is written here as plain JSON (the fields both transformers 4.52 and 5.x read),
not by a transformers config class, so both environments read the same file.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

INIT_RANGE = 0.3
UNEMBED_SCALE = 2.0
NORM_NOISE = 0.3
VOCAB = 61
N_CTX = 32
SEEDS = {"gpt2": 0, "llama": 1}
# the fixture's prompt: token ids from a seeded generator (the models have no tokenizer)
PROMPT_SEED, PROMPT_LENGTH = 7, 12

CONFIGS: dict[str, dict] = {
    "gpt2": {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB,
        "n_positions": N_CTX,
        "n_ctx": N_CTX,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": 128,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_act": "silu",
        "max_position_embeddings": N_CTX,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
    },
}


def prompt() -> list[int]:
    """The fixture's token ids."""
    rng = np.random.default_rng(PROMPT_SEED)
    return [int(t) for t in rng.integers(1, VOCAB, size=PROMPT_LENGTH)]


def weights(kind: str) -> dict[str, np.ndarray]:
    """The model's weights in transformers' names (float32)."""
    cfg = CONFIGS[kind]
    rng = np.random.default_rng(SEEDS[kind])

    def normal(*shape: int) -> np.ndarray:
        return (INIT_RANGE * rng.standard_normal(shape)).astype(np.float32)

    def norm_weight(d: int) -> np.ndarray:
        return (1 + NORM_NOISE * rng.standard_normal(d)).astype(np.float32)

    def norm_bias(d: int) -> np.ndarray:
        return (NORM_NOISE * rng.standard_normal(d)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    if kind == "gpt2":
        d, d_mlp = cfg["n_embd"], cfg["n_inner"]
        w["transformer.wte.weight"] = normal(VOCAB, d)
        w["transformer.wpe.weight"] = normal(N_CTX, d)
        for i in range(cfg["n_layer"]):
            p = f"transformer.h.{i}."
            w[p + "ln_1.weight"], w[p + "ln_1.bias"] = norm_weight(d), norm_bias(d)
            # GPT-2's Conv1D stores [in, out]
            w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"] = normal(d, 3 * d), normal(3 * d)
            w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"] = normal(d, d), normal(d)
            w[p + "ln_2.weight"], w[p + "ln_2.bias"] = norm_weight(d), norm_bias(d)
            w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"] = normal(d, d_mlp), normal(d_mlp)
            w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"] = normal(d_mlp, d), normal(d)
        w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = norm_weight(d), norm_bias(d)
    elif kind == "llama":
        d, d_mlp = cfg["hidden_size"], cfg["intermediate_size"]
        head = cfg["head_dim"]
        n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        w["model.embed_tokens.weight"] = normal(VOCAB, d)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            w[p + "input_layernorm.weight"] = norm_weight(d)
            w[p + "self_attn.q_proj.weight"] = normal(n_heads * head, d)
            w[p + "self_attn.k_proj.weight"] = normal(n_kv * head, d)
            w[p + "self_attn.v_proj.weight"] = normal(n_kv * head, d)
            w[p + "self_attn.o_proj.weight"] = normal(d, n_heads * head)
            w[p + "post_attention_layernorm.weight"] = norm_weight(d)
            w[p + "mlp.gate_proj.weight"] = normal(d_mlp, d)
            w[p + "mlp.up_proj.weight"] = normal(d_mlp, d)
            w[p + "mlp.down_proj.weight"] = normal(d, d_mlp)
        w["model.norm.weight"] = norm_weight(d)
        w["lm_head.weight"] = (UNEMBED_SCALE * normal(VOCAB, d)).astype(np.float32)
    else:
        raise ValueError(kind)
    return w


def write_model(kind: str, out: Path) -> Path:
    """`config.json` and `model.safetensors` of `kind` in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIGS[kind], indent=2, sort_keys=True) + "\n")
    tensors = {k: np.ascontiguousarray(v) for k, v in weights(kind).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
