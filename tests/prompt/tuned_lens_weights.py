"""The inputs of the tuned-lens fixture (`tests/prompt/data/tuned_lens/`), made from seeded NumPy
generators so that every machine makes the same bytes: the fixture keeps only the reference's
outputs and the small configuration files, and the tests write the model weights, the
translators and the token batches again (`tools/tuned_lens_fixture.py` makes them the same way
before the reference runs). NumPy and safetensors only: imported by the tool in an environment
of its own as well as by the tests.

Models, in transformers' names:

* `gpt2/`: a `GPT2LMHeadModel` (tied unembedding). Token and position embeddings, attention and
  MLP weights N(0, σ²) with the σ below, biases N(0, BIAS²), LayerNorm weights
  `1 + NORM_NOISE · N(0, 1)` and biases `NORM_NOISE · N(0, 1)`;
* `gpt2_centred/`: the same arrays, except that everything written into the residual stream
  (token and position embeddings, both output projections and their biases) is centred over
  the model dimension, so that the transformers model's hidden states have zero mean per token
  and equal TransformerLens's residual stream (which `center_writing_weights` centres);
* `llama/`: a `LlamaForCausalLM` (no biases, untied unembedding): N(0, LLAMA_INIT²) weights,
  the unembedding times 2, RMSNorm weights `1 + NORM_NOISE · N(0, 1)`.

Translators (`translators`): per layer an affine map in `torch.nn.Linear`'s convention (weight
[out, in]), weight N(0, (TRANSLATOR_SCALE² / d_model)), bias N(0, TRANSLATOR_BIAS²). Token
batches (`token_batch`): uniform token ids.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tests.transcoders.circuit_tracer_weights import INIT_RANGE
from tests.transcoders.circuit_tracer_weights import (
    write_model_weights as write_model_weights_llama,
)

NORM_NOISE = 0.3
EMBED_STD, POS_STD, WEIGHT_STD, BIAS = 0.5, 0.2, 0.125, 0.05
LLAMA_INIT = INIT_RANGE  # the transcoder tests' Llama, whose weights are reused
TRANSLATOR_SCALE, TRANSLATOR_BIAS = 0.5, 0.3

# model directory -> (architecture, weight seed, centred writes)
MODELS = {
    "gpt2": ("gpt2", 0, False),
    "gpt2_centred": ("gpt2", 0, True),
    "llama": ("llama", 1, False),
}


def _centre(x: np.ndarray) -> np.ndarray:
    """Centred over the last axis (the model dimension of every residual write)."""
    return (x - x.mean(-1, keepdims=True)).astype(np.float32)


def write_gpt2_weights(model_dir: Path, *, seed: int, centred: bool) -> None:
    """`model.safetensors` for the GPT-2 `config.json` in `model_dir` (Conv1D weights are
    [in, out])."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, vocab, n_pos = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"]
    d_mlp = cfg.get("n_inner") or 4 * d
    rng = np.random.default_rng(seed)
    norms = np.random.default_rng(seed + 100)

    def normal(std: float, *shape: int) -> np.ndarray:
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def writes(x: np.ndarray) -> np.ndarray:
        return _centre(x) if centred else x

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {
            prefix + ".weight": (1 + NORM_NOISE * norms.standard_normal(d)).astype(np.float32),
            prefix + ".bias": (NORM_NOISE * norms.standard_normal(d)).astype(np.float32),
        }

    w = {
        "transformer.wte.weight": writes(normal(EMBED_STD, vocab, d)),
        "transformer.wpe.weight": writes(normal(POS_STD, n_pos, d)),
    }
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        w |= norm(p + "ln_1")
        w[p + "attn.c_attn.weight"] = normal(WEIGHT_STD, d, 3 * d)
        w[p + "attn.c_attn.bias"] = normal(BIAS, 3 * d)
        w[p + "attn.c_proj.weight"] = writes(normal(WEIGHT_STD, d, d))
        w[p + "attn.c_proj.bias"] = writes(normal(BIAS, d))
        w |= norm(p + "ln_2")
        w[p + "mlp.c_fc.weight"] = normal(WEIGHT_STD, d, d_mlp)
        w[p + "mlp.c_fc.bias"] = normal(BIAS, d_mlp)
        w[p + "mlp.c_proj.weight"] = writes(normal(WEIGHT_STD, d_mlp, d))
        w[p + "mlp.c_proj.bias"] = writes(normal(BIAS, d))
    w |= norm("transformer.ln_f")
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def write_llama_weights(model_dir: Path, *, seed: int) -> None:
    """`model.safetensors` for the Llama `config.json` in `model_dir`: the transcoder tests' own
    seeded Llama weights (the same initial scale, unembedding scale and norm noise)."""
    write_model_weights_llama(model_dir, seed=seed, norm_noise=NORM_NOISE)


def write_model_weights(model_dir: Path) -> None:
    """The weights of one of `MODELS`, named by its directory."""
    arch, seed, centred = MODELS[model_dir.name]
    if arch == "gpt2":
        write_gpt2_weights(model_dir, seed=seed, centred=centred)
    else:
        write_llama_weights(model_dir, seed=seed)


def translators(n_layers: int, d_model: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight [n_layers, d_model, d_model] as [layer, out, in], bias [n_layers, d_model])."""
    rng = np.random.default_rng(seed)
    weight = TRANSLATOR_SCALE / d_model**0.5 * rng.standard_normal((n_layers, d_model, d_model))
    bias = TRANSLATOR_BIAS * rng.standard_normal((n_layers, d_model))
    return weight.astype(np.float32), bias.astype(np.float32)


def token_batch(n: int, ctx: int, vocab: int, *, seed: int) -> np.ndarray:
    """[n, ctx] uniform token ids (int64)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(n, ctx), dtype=np.int64)


def write_all(root: Path) -> None:
    """Every model's weights, into a copy of the fixture's kept files at `root`."""
    for name in MODELS:
        write_model_weights(root / name)
