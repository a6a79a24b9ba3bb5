"""The weights of the circuit-tracer fixture (`tests/transcoders/data/circuit_tracer/`), made
from seeded NumPy generators, so that every machine makes the same bytes: the fixture keeps
only circuit-tracer's outputs and the small configuration files, and the tests write the
weights next to copies of those (`tools/circuit_tracer_fixture.py` writes them the same way
before circuit-tracer runs). NumPy and safetensors only: imported by the tool in an environment
of its own as well as by the tests.

The model is a `LlamaForCausalLM` in transformers' names (no biases, untied unembedding);
every weight is N(0, INIT_RANGE²), the unembedding times UNEMBED_SCALE, the RMSNorm weights 1
or `1 + norm_noise · N(0, 1)`. A transcoder has unit encoder rows (pre-activations about
N(0, 1) on RMSNorm outputs), an encoder bias that gives each feature a firing rate of 10-30 %
under that approximation, random decoders and, with a skip connection, a random `W_skip`; a
JumpReLU set has thresholds 0.05-0.3.
"""

import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
from safetensors.numpy import save_file

INIT_RANGE = 0.125
UNEMBED_SCALE = 2.0
D_TRANSCODER = 32
DECODER_SCALE = 4.0


def write_model_weights(model_dir: Path, *, seed: int, norm_noise: float) -> None:
    """`model.safetensors` for the `config.json` in `model_dir`."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, d_mlp, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head = d // n_heads
    rng = np.random.default_rng(seed)
    norms = np.random.default_rng(seed + 100)

    def normal(*shape: int) -> np.ndarray:
        return (INIT_RANGE * rng.standard_normal(shape)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + norm_noise * norms.standard_normal(d)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(vocab, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = normal(n_heads * head, d)
        w[p + "self_attn.k_proj.weight"] = normal(n_kv * head, d)
        w[p + "self_attn.v_proj.weight"] = normal(n_kv * head, d)
        w[p + "self_attn.o_proj.weight"] = normal(d, n_heads * head)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = normal(d_mlp, d)
        w[p + "mlp.up_proj.weight"] = normal(d_mlp, d)
        w[p + "mlp.down_proj.weight"] = normal(d, d_mlp)
    w["model.norm.weight"] = norm()
    w["lm_head.weight"] = (UNEMBED_SCALE * normal(vocab, d)).astype(np.float32)
    save_file(w, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def write_transcoders(out: Path, *, d_model: int, n_layers: int, seed: int, jumprelu: bool,
                      skip: bool) -> None:  # fmt: skip
    """`layer_{i}.safetensors` of a set in circuit-tracer's local format (its `config.yaml`
    is written by the caller)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        w_enc = rng.standard_normal((D_TRANSCODER, d_model))
        w_enc /= np.linalg.norm(w_enc, axis=1, keepdims=True)
        rate = 0.1 + 0.2 * rng.random(D_TRANSCODER)
        cut = np.array([NormalDist().inv_cdf(1 - float(r)) for r in rate])
        tensors = {
            "W_enc": w_enc,
            "W_dec": rng.standard_normal((D_TRANSCODER, d_model))
            * DECODER_SCALE
            / D_TRANSCODER**0.5,
            "b_dec": 0.1 * rng.standard_normal(d_model),
        }
        if jumprelu:
            threshold = 0.05 + 0.25 * rng.random(D_TRANSCODER)
            tensors["b_enc"] = threshold - cut  # fires where pre + b_enc > threshold
            tensors["activation_function.threshold"] = threshold
        else:
            tensors["b_enc"] = -cut
        if skip:
            w_skip = rng.standard_normal((d_model, d_model))
            tensors["W_skip"] = w_skip * DECODER_SCALE / d_model**0.5
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
            str(out / f"layer_{layer}.safetensors"),
        )


# what the fixture's directories hold: model directory -> RMSNorm weight noise (seed 0), and
# set directory -> its seed and kind (`tools/circuit_tracer_fixture.py` checks its own match)
MODELS = {"model": 0.0, "model_norm_weights": 0.3}
SETS = {
    "transcoders": {"seed": 1, "jumprelu": False, "skip": False},
    "transcoders_skip": {"seed": 2, "jumprelu": True, "skip": True},
    "transcoders_norm_weights": {"seed": 3, "jumprelu": False, "skip": False},
}


def write_all(root: Path) -> None:
    """Every weight file of the fixture, into a copy of its kept files at `root`."""
    for name, noise in MODELS.items():
        write_model_weights(root / name, seed=0, norm_noise=noise)
    cfg = json.loads((root / "model" / "config.json").read_text())
    for name, kind in SETS.items():
        write_transcoders(root / name, d_model=cfg["hidden_size"],
                          n_layers=cfg["num_hidden_layers"], **kind)  # fmt: skip
