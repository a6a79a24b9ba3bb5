"""Writes an attribution-graph fixture computed by circuit-tracer 0.5.0 itself, for testing
`workbench.transcoders` (transcoder-set loading, attribution graphs, Neuronpedia graph JSON)
against an independent implementation.

circuit-tracer 0.5.0 pins transformers to <=4.57.3 and needs nnsight>=0.6, so this script runs
in an environment of its own, not in the project's `.venv`:

    python3.11 -m venv /tmp/ctvenv
    /tmp/ctvenv/bin/pip install torch==2.13.0        # the CPU build
    /tmp/ctvenv/bin/pip install circuit-tracer==0.5.0
    HF_HUB_OFFLINE=1 /tmp/ctvenv/bin/python tools/circuit_tracer_fixture.py \\
        tests/transcoders/data/circuit_tracer

Everything is made locally from fixed seeds, on the CPU in float32 with one thread (nothing is
downloaded); a second run writes identical files. OUTDIR receives:

* `model/`: a tiny random Llama (`LlamaForCausalLM`: 2 layers, d_model 64, 4 query heads sharing
  2 key/value heads, d_mlp 128, a 48-token word-level vocabulary, RMSNorm weights 1): its
  `config.json` and tokenizer (`tokenizer.json`; the tokenizer adds `<bos>` itself);
* `model_norm_weights/`: the same model with random RMSNorm weights;
* `transcoders/`, `transcoders_skip/` (for `model/`) and `transcoders_norm_weights/` (for
  `model_norm_weights/`): per-layer transcoder sets in circuit-tracer's local format, their
  `config.yaml` (layers `layer_{i}.safetensors`: `W_enc` [d_transcoder, d_model], `W_dec`
  [d_transcoder, d_model], `b_enc`, `b_dec`), 32 features per layer, reading `mlp.hook_in` and
  writing `mlp.hook_out` (circuit-tracer's hooks around each MLP). ReLU, except
  `transcoders_skip/`: JumpReLU (`activation_function.threshold`) with a skip connection
  (`W_skip` [d_model, d_model]);
* `graph.json`, `graph_skip.json`, `graph_norm_weights.json`: circuit-tracer's Neuronpedia graph
  JSON of one prompt through each set (`create_graph_files`);
* `raw_graph.npz`, `raw_graph_skip.npz`, `raw_graph_norm_weights.npz`: circuit-tracer's unpruned
  `Graph` (adjacency, active and selected features, logit targets, input tokens), its pruning
  masks and its scores;
* `README.md`: the parameters and versions used, and the files' sizes and hashes.

Every weight (`model.safetensors`, `layer_{i}.safetensors`) comes from
`tests/transcoders/circuit_tracer_weights.py`: seeded NumPy generators, the same bytes on every
machine. They are written here for circuit-tracer and then removed: the tests write them again
beside copies of the kept files.
"""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/
from tests.transcoders import circuit_tracer_weights as weights  # noqa: E402
from tools.fixture_files import dist_version, file_table  # noqa: E402

SEED = 0
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = (
    "the a cat dog bird fish mouse sat ran saw ate slept on in under near over mat rug tree "
    "house box big small red blue old and then it he she they was is park garden ball bone "
    "food water happy sad ."
).split()
N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, D_MLP, N_CTX = 2, 64, 4, 2, 128, 64
PROMPT = "the cat sat on the"
PRUNING = {"node_threshold": 0.8, "edge_threshold": 0.98}
NORM_NOISE = 0.3  # model_norm_weights/: RMSNorm weights 1 + NORM_NOISE * N(0, 1)
# model directory: the noise of its RMSNorm weights
MODELS: dict[str, float] = {"model": 0.0, "model_norm_weights": NORM_NOISE}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {
        "model": "model",
        "transcoders": "transcoders",
        "jumprelu": False,
        "skip": False,
        "graph": "graph.json",
        "raw": "raw_graph.npz",
        "slug": "tiny-llama-plt",
        "attribute": {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 16,
                      "max_feature_nodes": None, "update_interval": 4},
    },
    "skip": {
        "model": "model",
        "transcoders": "transcoders_skip",
        "jumprelu": True,
        "skip": True,
        "graph": "graph_skip.json",
        "raw": "raw_graph_skip.npz",
        "slug": "tiny-llama-plt-skip",
        # fewer feature nodes than active features: features are visited in order of their
        # influence on the logits, re-ranked every update_interval batches. 16 is below the
        # number of features of non-zero influence (layer-1 features before the last position
        # have none), so no tie between zero influences decides which features are nodes.
        "attribute": {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 8,
                      "max_feature_nodes": 16, "update_interval": 2},
    },
    "norm_weights": {
        "model": "model_norm_weights",
        "transcoders": "transcoders_norm_weights",
        "jumprelu": False,
        "skip": False,
        "graph": "graph_norm_weights.json",
        "raw": "raw_graph_norm_weights.npz",
        "slug": "tiny-llama-plt-norm-weights",
        "attribute": {"max_n_logits": 10, "desired_logit_prob": 0.95, "batch_size": 16,
                      "max_feature_nodes": None, "update_interval": 4},
    },
}  # fmt: skip
FEATURE_INPUT_HOOK, FEATURE_OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"
RESULTS_HEADER = (
    "| variant | active features | feature nodes | nodes | logit targets: token, id (p) "
    "| kept nodes / edges | JSON nodes / links | replacement / completeness |\n"
    "|---|---|---|---|---|---|---|---|"
)


def make_tokenizer(out: Path):
    """A word-level tokenizer (whitespace-split words, `<bos>` added in front) saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == len(SPECIALS) + len(WORDS), "duplicate word"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    bos = vocab["<bos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=N_CTX,
    )
    fast.save_pretrained(str(out))
    return fast


def make_model(out: Path, vocab_size: int, norm_noise: float):
    """A random Llama in `out`: its `config.json` from transformers, its weights from
    `circuit_tracer_weights` (seeded NumPy); returns it loaded (float32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=D_MODEL,
        intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=N_CTX,
        initializer_range=weights.INIT_RANGE,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=SPECIALS.index("<pad>"),
        bos_token_id=SPECIALS.index("<bos>"),
        eos_token_id=SPECIALS.index("<eos>"),
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(str(out))
    weights.write_model_weights(out, seed=SEED, norm_noise=norm_noise)
    return LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()


def make_transcoders(out: Path, *, jumprelu: bool, skip: bool, seed: int) -> None:
    """A transcoder per layer in circuit-tracer's local format (see the module docstring)."""
    import yaml

    weights.write_transcoders(
        out, d_model=D_MODEL, n_layers=N_LAYERS, seed=seed, jumprelu=jumprelu, skip=skip
    )
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "scan": out.name,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def replacement_model(model_dir: Path, hf_model, tokenizer, transcoders):
    """circuit-tracer's TransformerLens replacement model of the local Llama directory, built
    the way `TransformerLensReplacementModel.from_pretrained_and_transcoders` builds a hub
    model (`HookedTransformer.from_pretrained` with fold_ln, center_writing_weights and
    center_unembed off, then `_configure_replacement_model`), since TransformerLens's
    `from_pretrained` accepts hub names only."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformer_lens import loading_from_pretrained as loading

    with tempfile.TemporaryDirectory(prefix="tiny-model-config-") as staged:
        # a neutral path: TransformerLens picks some architectures by substrings of the path
        shutil.copy(model_dir / "config.json", Path(staged) / "config.json")
        cfg = loading.get_pretrained_model_config(
            staged,
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=False,
            device="cpu",
            dtype=torch.float32,
        )
        cfg.model_name = "tiny-llama"
        cfg.tokenizer_name = str(model_dir.resolve())  # create_graph_files loads it by this name
        state_dict = loading.get_pretrained_state_dict(staged, cfg, hf_model, dtype=torch.float32)
    model = TransformerLensReplacementModel(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=True,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    model._configure_replacement_model(transcoders)
    return model


def raw_arrays(graph, pruned, scores, tokenizer, params: dict) -> dict[str, np.ndarray]:
    n_features = len(graph.selected_features)
    n_layers, n_pos = graph.cfg.n_layers, graph.n_pos
    return {
        "input_string": np.array(graph.input_string),
        "input_tokens": graph.input_tokens.cpu().numpy().astype(np.int64),
        "input_token_strs": np.array([tokenizer.decode([t]) for t in graph.input_tokens.tolist()]),
        "n_layers": np.array(n_layers),
        "n_pos": np.array(n_pos),
        "active_features": graph.active_features.cpu().numpy().astype(np.int64),
        "activation_values": graph.activation_values.cpu().numpy().astype(np.float32),
        "selected_features": graph.selected_features.cpu().numpy().astype(np.int64),
        "logit_token_ids": np.array([t.vocab_idx for t in graph.logit_targets], dtype=np.int64),
        "logit_token_strs": np.array([t.token_str for t in graph.logit_targets]),
        "logit_probabilities": graph.logit_probabilities.cpu().numpy().astype(np.float32),
        "adjacency_matrix": graph.adjacency_matrix.cpu().numpy().astype(np.float32),
        "offsets": np.array(
            [0, n_features, n_features + n_layers * n_pos, n_features + (n_layers + 1) * n_pos],
            dtype=np.int64,
        ),
        "node_mask": pruned.node_mask.cpu().numpy(),
        "edge_mask": pruned.edge_mask.cpu().numpy(),
        "cumulative_scores": pruned.cumulative_scores.cpu().numpy().astype(np.float32),
        "replacement_score": np.array(scores[0]),
        "completeness_score": np.array(scores[1]),
        "params_json": np.array(json.dumps(params, sort_keys=True)),
    }


def main(outdir: Path) -> None:
    import circuit_tracer
    from circuit_tracer import attribute
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    models = {}
    for name, norm_noise in MODELS.items():
        model_dir = outdir / name
        make_tokenizer(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # as loaded from the directory
        models[name] = (model_dir, tokenizer, make_model(model_dir, len(tokenizer), norm_noise))
    summary: dict[str, dict] = {}
    assert weights.MODELS == MODELS and SEED == 0
    for i, (name, v) in enumerate(VARIANTS.items()):
        model_dir, tokenizer, hf_model = models[v["model"]]
        made = {"seed": SEED + 1 + i, "jumprelu": v["jumprelu"], "skip": v["skip"]}
        assert weights.SETS[v["transcoders"]] == made, "the tests would write other weights"
        tc_dir = outdir / v["transcoders"]
        make_transcoders(tc_dir, jumprelu=v["jumprelu"], skip=v["skip"], seed=SEED + 1 + i)
        transcoders, _ = load_transcoder_from_hub(
            str(tc_dir.resolve()),
            device=torch.device("cpu"),
            dtype=torch.float32,
            lazy_encoder=False,
            lazy_decoder=False,
        )
        model = replacement_model(model_dir, hf_model, tokenizer, transcoders)
        with torch.no_grad():
            ids = tokenizer(PROMPT, return_tensors="pt").input_ids
            logit_gap = float((hf_model(ids).logits[0] - model(ids)[0]).abs().max())
        assert logit_gap < 1e-4, f"TransformerLens and transformers disagree by {logit_gap}"
        graph = attribute(PROMPT, model, **v["attribute"])
        pruned = prune_graph(graph, **PRUNING)
        scores = compute_graph_scores(graph)
        with tempfile.TemporaryDirectory(prefix="ct-graph-") as tmp:
            create_graph_files(graph, slug=v["slug"], output_path=tmp, **PRUNING)
            shutil.copy(Path(tmp) / f"{v['slug']}.json", outdir / v["graph"])
        params = {**v["attribute"], **PRUNING, "prompt": PROMPT, "dtype": "float32"}
        arrays = raw_arrays(graph, pruned, scores, tokenizer, params)
        np.savez_compressed(outdir / v["raw"], **arrays)  # type: ignore[arg-type]
        document = json.loads((outdir / v["graph"]).read_text())
        ids_in_json = [n["node_id"] for n in document["nodes"]]
        duplicates = sorted({x for x in ids_in_json if ids_in_json.count(x) > 1})
        assert not duplicates, f"{v['graph']}: node ids {duplicates} appear twice"
        summary[name] = {
            **v,
            "tokens": graph.input_tokens.tolist(),
            "n_active": int(len(graph.active_features)),
            "n_selected": int(len(graph.selected_features)),
            "n_nodes": int(graph.adjacency_matrix.shape[0]),
            "logits": [(t.token_str, t.vocab_idx) for t in graph.logit_targets],
            "probs": [round(float(p), 4) for p in graph.logit_probabilities],
            "kept_nodes": int(pruned.node_mask.sum()),
            "kept_edges": int(pruned.edge_mask.sum()),
            "json_nodes": len(document["nodes"]),
            "json_links": len(document["links"]),
            "replacement_score": round(scores[0], 4),
            "completeness_score": round(scores[1], 4),
            "hf_vs_tl_max_logit_gap": logit_gap,
        }
        del model
    versions = {
        "circuit-tracer": dist_version("circuit-tracer"),
        "transformer-lens": dist_version("transformer-lens"),
        "transformers": dist_version("transformers"),
        "torch": torch.__version__,
        "tokenizers": dist_version("tokenizers"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    assert versions["circuit-tracer"] == "0.5.0", circuit_tracer.__file__
    for weight_file in outdir.rglob("*.safetensors"):  # the tests make the weights again
        weight_file.unlink()
    write_readme(outdir, summary, versions)
    print(json.dumps({"versions": versions, "variants": summary}))


def write_readme(outdir: Path, summary: dict[str, dict], versions: dict[str, str]) -> None:
    listing = file_table(outdir)

    def params(a: dict) -> str:
        return ", ".join(f"{k}={a[k]}" for k in a)

    def logits(s: dict) -> str:
        pairs = zip(s["logits"], s["probs"], strict=True)
        return ", ".join(f"`{t}` {i} ({p})" for (t, i), p in pairs)

    variants = "\n".join(
        f"| {name} | `{s['model']}/` | `{s['transcoders']}/` | "
        f"{'JumpReLU' if s['jumprelu'] else 'ReLU'}{' + skip' if s['skip'] else ''} | "
        f"`{s['graph']}` | `{s['raw']}` | `{s['slug']}` | {params(s['attribute'])} |"
        for name, s in summary.items()
    )
    results = "\n".join(
        f"| {name} | {s['n_active']} | {s['n_selected']} | {s['n_nodes']} | {logits(s)} | "
        f"{s['kept_nodes']} / {s['kept_edges']} | {s['json_nodes']} / {s['json_links']} | "
        f"{s['replacement_score']} / {s['completeness_score']} |"
        for name, s in summary.items()
    )
    tokens = next(iter(summary.values()))["tokens"]
    text = f"""# circuit-tracer 0.5.0 attribution-graph fixture

Written by `tools/circuit_tracer_fixture.py` (its docstring gives the environment and the
command). Every file here comes from fixed seeds, on the CPU, in float32. circuit-tracer's own
code loaded the transcoders (`circuit_tracer.utils.hf_utils.load_transcoder_from_hub` on the
local directory) and computed the graphs (`circuit_tracer.attribute`,
`circuit_tracer.graph.prune_graph` and `compute_graph_scores`,
`circuit_tracer.utils.create_graph_files.create_graph_files`).

## Versions

{chr(10).join(f"- {k} {v}" for k, v in versions.items())}

## Models (`model/`, `model_norm_weights/`)

Each is a `LlamaForCausalLM` (its `config.json` from transformers' `LlamaConfig`): {N_LAYERS}
layers, hidden size {D_MODEL}, {N_HEADS} query heads sharing {N_KV_HEADS} key/value heads,
intermediate size {D_MLP},
vocabulary {len(SPECIALS) + len(WORDS)}, context {N_CTX}, no biases, untied unembedding. Its
weights are not kept here: `tests/transcoders/circuit_tracer_weights.py` makes them from seeded
NumPy generators (seed {SEED}; N(0, {weights.INIT_RANGE}²), `lm_head` times
{weights.UNEMBED_SCALE}), the same bytes on every machine, and the tests write them beside
copies of these directories. In `model/` every RMSNorm weight is 1; in `model_norm_weights/`
the same weights except that every RMSNorm weight is `1 + {NORM_NOISE} * N(0, 1)` (generator
seed {SEED + 100}). The tokenizer is word-level over
whitespace-split words, with `<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3; it adds `<bos>` in front
when `add_special_tokens` is on.

circuit-tracer ran each one as a TransformerLens `HookedTransformer` with `fold_ln=False`,
`center_writing_weights=False`, `center_unembed=False` and `fold_value_biases=True`, as
`TransformerLensReplacementModel.from_pretrained_and_transcoders` loads a hub model. Its logits
match the transformers model's (largest difference below 1e-4, checked when written).

## Transcoder sets

These are in circuit-tracer's local format. `config.yaml` has `model_kind: transcoder_set`,
`feature_input_hook: {FEATURE_INPUT_HOOK}`, `feature_output_hook: {FEATURE_OUTPUT_HOOK}` and
`scan`. Each `layer_{{i}}.safetensors` (made like the models' weights, seeds {SEED + 1} to
{SEED + 3}, not kept here) has:

- `W_enc` [{weights.D_TRANSCODER}, {D_MODEL}] (pre = x @ W_enc.T + b_enc);
- `W_dec` [{weights.D_TRANSCODER}, {D_MODEL}];
- `b_enc` [{weights.D_TRANSCODER}] and `b_dec` [{D_MODEL}].

`transcoders_skip/` also has `W_skip` [{D_MODEL}, {D_MODEL}] (skip = x @ W_skip.T) and
`activation_function.threshold` [{weights.D_TRANSCODER}] (JumpReLU: pre * (pre > threshold)).

`mlp.hook_in` and `mlp.hook_out` are the hooks circuit-tracer adds around each MLP. `mlp.hook_in`
is the MLP's input: the output of `ln2`, with the RMSNorm weight applied. `mlp.hook_out` is the
MLP's output. The encoders are random unit rows, each feature's bias gives it a firing rate of
10-30 % if its pre-activation were N(0, 1), and the decoders, `b_dec` and `W_skip` are random.

## Graphs

The prompt `{PROMPT!r}` is passed as a string to `attribute`, which prepends `<bos>`: tokens
{tokens}. `prune_graph` and `create_graph_files` run with
node_threshold={PRUNING["node_threshold"]}, edge_threshold={PRUNING["edge_threshold"]}.
`create_graph_files` writes `{{slug}}.json`, which is copied here under the name below. It also
writes a `graph-metadata.json`, which is not kept.

| variant | model | set | activation | graph JSON | raw graph | slug | `attribute` parameters |
|---|---|---|---|---|---|---|---|
{variants}

{RESULTS_HEADER}
{results}

## Raw graphs (`raw_graph*.npz`: `numpy.load`, no pickle)

- `adjacency_matrix` float32 [N, N]: row = target, column = source. Nodes are in the order
  [selected features | errors, layer-major (`layer * n_pos + pos`) | tokens by position |
  logits by descending probability]. `offsets` gives the first index of each kind.
- `active_features` int64 [n_active, 3]: (layer, position, feature), lexicographic.
  `activation_values` float32 [n_active]. `selected_features` int64: the indices into
  `active_features` of the feature nodes, ascending. Columns of active features that are not
  selected are dropped from the adjacency. In the `skip` variant, 16 of the active features
  are nodes. Each round, circuit-tracer ranks the unvisited features by their influence on the
  logits through the rows computed so far, and takes the top `update_interval * batch_size`
  of them; the tests check that the workbench picks the same ones.
- `input_tokens`, `input_token_strs`, `input_string`.
- `logit_token_ids`, `logit_token_strs`, `logit_probabilities`: softmax of the last position's
  logits, not renormalised.
- `node_mask`, `edge_mask` [target, source] and `cumulative_scores`: `prune_graph` at the
  thresholds above.
- `replacement_score`, `completeness_score`: `compute_graph_scores`.
- `n_layers`, `n_pos`, and `params_json`: the parameters above as JSON.

Position 0 (`<bos>`) has no active features and zero error vectors, because circuit-tracer
zeroes them, so its error nodes' columns are zero. Edge weights:

- into a feature: measured against its pre-activation, without `b_enc`;
- into a logit: measured against the logit less the mean logit over the vocabulary.

Node ids in the JSON:

- errors: `0_{{layer}}_{{pos}}` (circuit-tracer 0.5's form), with `jsNodeId` `{{layer}}_{{pos}}-0`;
- features: `{{layer}}_{{feature}}_{{pos}}`;
- tokens: `E_{{token}}_{{pos}}`;
- logits: `{N_LAYERS + 1}_{{token}}_{{pos}}`.

An error id can coincide with the id of feature `layer` of layer 0 at the same position; none
does in these files (checked when written).

## Files

{listing}
"""
    (outdir / "README.md").write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/circuit_tracer_fixture.py OUTDIR")
    main(Path(sys.argv[1]))
