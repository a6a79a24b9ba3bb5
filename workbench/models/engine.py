"""The one module that builds TransformerLens `HookedTransformer`s.

Everything that constructs or converts a model lives here, so that a later move from
`HookedTransformer` to TransformerLens's `TransformerBridge` touches this module only.
All models are loaded the same way: layer norms folded into the following weights and writing
weights centred (both leave the logits unchanged), the unembedding left uncentred so that logits
equal the source model's, and value biases left in place so that `hook_z` is the head's own value.
"""

import dataclasses
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.errors import BadInput

logger = logging.getLogger(__name__)

warnings.filterwarnings("ignore", message=r".*HookedTransformer is deprecated.*")
warnings.filterwarnings("ignore", message=r".*TransformerBridge.*", category=DeprecationWarning)

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens import loading_from_pretrained as tl_loading  # noqa: E402

# Hugging Face architectures whose TransformerLens weight converters we support offline (each
# checked against the Hugging Face model's logits in tests/models/test_architectures.py), by
# the `model_type` a config.json without `architectures` names.
HF_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPTJForCausalLM": "gptj",
    "OPTForCausalLM": "opt",
    "BloomForCausalLM": "bloom",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
MODEL_TYPE_TO_ARCHITECTURE = {v: k for k, v in HF_ARCHITECTURES.items()}
# Architectures whose prompts start with a BOS token by TransformerLens's convention whatever
# their tokenizer does (GPT-2's tokenizer never adds one); every other architecture gets a BOS
# exactly when its own tokenizer adds one (Llama 2/3 do, SmolLM2 and Qwen2 do not).
BOS_BY_CONVENTION = {
    "GPT2LMHeadModel",
    "GPTNeoXForCausalLM",
    "GPTJForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
}


def prepends_bos(architecture: str, tokenizer: Any) -> bool:
    """Whether task prompts for a Hugging Face model of `architecture` start with BOS."""
    if architecture in BOS_BY_CONVENTION or tokenizer is None:
        return True
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


PROCESSING = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": False,
    "fold_value_biases": False,
    "refactor_factored_attn_matrices": False,
}


MLP_NORMS = "workbench_mlp_norms"  # the model attribute holding them (see remember_mlp_norms)


def remember_mlp_norms(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Keep each layer's `ln2` weight and bias (None for RMSNorm) from the state dict before
    `fold_ln` folds them into the MLP's input weights: what a transcoder that reads the MLP's
    input after the norm (circuit-tracer's `mlp.hook_in`) needs to be folded the same way
    (`mlp_norms`). Nothing is kept for a model without `ln2` weights."""
    norms = []
    for layer in range(model.cfg.n_layers):
        weight = state_dict.get(f"blocks.{layer}.ln2.w")
        if weight is None:
            return
        bias = state_dict.get(f"blocks.{layer}.ln2.b")
        norms.append((weight.detach().clone(), None if bias is None else bias.detach().clone()))
    setattr(model, MLP_NORMS, norms)


def load_processed(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Load `state_dict` into `model` processed by `PROCESSING`: the same steps as
    TransformerLens's `load_and_process_state_dict` (its own fold, centring and module swap, so
    the same weights to the bit; tests/models/test_architectures.py compares every tensor),
    without the copy of the whole state dict it takes before folding. `state_dict` is consumed:
    each folded tensor replaces its entry, and each entry is dropped once it is copied into the
    model, so the load holds about one copy of the weights besides the source's own.

    The fold is TransformerLens 3.9's `ProcessWeights.fold_layer_norm` less its first line (the
    copy), so its per-layer steps are called here by name; a TransformerLens that renames them
    fails here, and in that test, before any model is loaded with other weights."""
    from transformer_lens.components import LayerNormPre, RMSNormPre
    from transformer_lens.weight_processing import ProcessWeights

    cfg = model.cfg
    assert PROCESSING["fold_ln"] and not PROCESSING["center_unembed"]
    assert not PROCESSING["fold_value_biases"] and not PROCESSING["refactor_factored_attn_matrices"]
    state_dict = model.fill_missing_keys(state_dict)
    # processed in float32 and stored back in each tensor's own dtype, as TransformerLens does
    dtypes = {k: v.dtype for k, v in state_dict.items() if v.is_floating_point()}
    for key in dtypes:
        state_dict[key] = state_dict[key].float()
    norm = cfg.normalization_type
    fold = norm in ("LN", "LNPre", "RMS", "RMSPre") and any(
        k.endswith((".ln1.w", ".ln2.w", "ln_final.w")) for k in state_dict
    )
    if fold:
        # the module swap load_and_process_state_dict makes before processing
        pre: Any = {"LN": LayerNormPre, "RMS": RMSNormPre}.get(str(norm))
        if pre is not None:
            cfg.normalization_type = f"{norm}Pre"
            model.ln_final = pre(cfg)
            for block in model.blocks:
                block.ln1, block.ln2 = pre(cfg), pre(cfg)
                if cfg.is_layer_norm_activation():
                    block.mlp.ln = pre(cfg)
        centred = cfg.normalization_type == "LNPre"  # LayerNorm: fold biases, centre weights
        gqa = "" if getattr(cfg, "n_key_value_heads", None) is None else "_"
        for layer in range(cfg.n_layers):
            state_dict = ProcessWeights._fold_layer(
                state_dict, cfg, layer, centred, centred, None, gqa
            )
        state_dict = ProcessWeights._fold_final_rms_bias(state_dict, cfg, centred, None)
        state_dict = ProcessWeights._fold_unembed_layer_norm(
            state_dict, cfg, centred, centred, None
        )
    centre = PROCESSING["center_writing_weights"] and cfg.normalization_type in ("LN", "LNPre")
    if centre and not getattr(cfg, "final_rms", False):
        state_dict = ProcessWeights.center_writing_weights(state_dict, cfg)
    for key, dtype in dtypes.items():
        if key in state_dict:
            state_dict[key] = state_dict[key].to(dtype)
    _copy_into(model, state_dict, transposed=_stored_transposed(model))
    if fold:
        model.setup()


# Weights TransformerLens 3.9 multiplies as `F.linear(x, W.T.contiguous())`: stored with `W.T`
# contiguous, that call copies nothing (it copied the unembedding, 154 MB for GPT-2, and every
# gated MLP's three matrices on each forward pass, and autograd kept the copies for a backward
# pass). The values, and the operand F.linear is given, are the same.
TRANSPOSED = ("unembed.W_U", "mlp.W_in", "mlp.W_gate", "mlp.W_out")


def _stored_transposed(model: HookedTransformer) -> set[str]:
    """The names of the model's `TRANSPOSED` parameters."""
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    names = {"unembed.W_U"} if hasattr(model, "unembed") else set()
    for i, block in enumerate(model.blocks):
        if isinstance(getattr(block, "mlp", None), GatedMLP):
            names |= {f"blocks.{i}.{name}" for name in TRANSPOSED[1:]}
    return names


def _copy_into(
    model: HookedTransformer, state_dict: dict[str, torch.Tensor], *, transposed: set[str]
) -> None:
    """`model.load_state_dict(state_dict, strict=False)` an entry at a time, each entry dropped
    once copied (one call per entry would walk every module each time): keys the model lacks
    (the folded norms' weights) are skipped, as are buffers of another shape (an attention
    mask or rotary table for another context length, which TransformerLens keeps its own of).
    The parameters named in `transposed` are copied into storage laid out with their
    transpose contiguous (`TRANSPOSED`)."""
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with torch.no_grad():
        for key in list(state_dict):
            value = state_dict.pop(key)
            target = params.get(key)
            if target is None:
                target = buffers.get(key)
                if target is None or target.shape != value.shape:
                    continue
            elif target.shape != value.shape:
                raise ValueError(
                    f"{key}: shape {list(value.shape)} where the model has {list(target.shape)}"
                )
            if key in transposed and value.dim() == 2:
                stored = torch.empty(value.T.shape, dtype=target.dtype, device=target.device)
                target.data = stored.copy_(value.T).T
            else:
                target.copy_(value)


def mlp_norms(model: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """Each layer's `ln2` (weight, bias) as loaded, before folding; None when the model was
    loaded without them being kept (a TransformerLens name, or a model without `ln2`)."""
    return getattr(model, MLP_NORMS, None)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """`auto` (CUDA if available, else MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`; a
    device this machine does not have is a `BadInput`."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise BadInput(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise BadInput(f"--device {spec}: this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BadInput(f"--device {spec}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise BadInput(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BadInput(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def place(model: HookedTransformer, device: torch.device, dtype: torch.dtype) -> HookedTransformer:
    """Move a loaded model (built and weight-processed in float32 on the CPU) to `device` and
    `dtype`; TransformerLens updates `cfg.device` and `cfg.dtype` with it."""
    if dtype != torch.float32:
        model = model.to(dtype, print_details=False)
    if device.type != "cpu":
        model = model.to(device, print_details=False)
    return model


def build_from_state_dict(
    cfg_kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], *, source: Path | None = None
) -> HookedTransformer:
    """A HookedTransformer from `HookedTransformerConfig` kwargs and its raw `state_dict`.

    With `source` (the checkpoint directory), a config or weights that do not describe a working
    model are a `BadInput` naming `config.json` or `model.safetensors` and what is wrong."""
    where = source or Path(".")
    config_file, weights_file = where / "config.json", where / "model.safetensors"
    _check_config_fields(cfg_kwargs, config_file)
    try:
        # no random initialisation: every weight comes from the state dict (_check_weights)
        cfg = HookedTransformerConfig(**{**cfg_kwargs, "device": "cpu", "init_weights": False})
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    except Exception as err:  # TransformerLens validates with asserts and ValueErrors
        raise BadInput(f"{config_file}: not a valid model configuration ({_reason(err)})") from err
    _check_weights(model, state_dict, weights_file)
    remember_mlp_norms(model, state_dict)
    load_processed(model, state_dict)
    model.eval()
    _check_runs(model, config_file)
    return model


# HookedTransformerConfig fields that must be positive integers when given
_POSITIVE_INT_FIELDS = ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_vocab", "d_mlp")


def _check_config_fields(cfg_kwargs: dict[str, Any], config_file: Path) -> None:
    fields = {f.name: f for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    unknown = sorted(set(cfg_kwargs) - set(fields))
    if unknown:
        raise BadInput(
            f"{config_file}: unknown field {unknown[0]!r} (not a HookedTransformerConfig field)"
        )
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and name not in cfg_kwargs
    ]
    if missing:
        raise BadInput(f"{config_file}: required field {missing[0]!r} is missing")
    for name in _POSITIVE_INT_FIELDS:
        value = cfg_kwargs.get(name)
        if value is None and name not in ("n_layers", "d_model", "n_ctx", "d_head"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInput(
                f"{config_file}: field {name!r} must be a positive integer, got {value!r}"
            )


def _check_weights(
    model: HookedTransformer, weights: dict[str, torch.Tensor], weights_file: Path
) -> None:
    """Every parameter the config implies is present with its shape, nothing unknown, all
    finite (buffers such as attention masks may be absent: they are rebuilt)."""
    expected = model.state_dict()
    parameters = dict(model.named_parameters())
    missing = sorted(set(parameters) - set(weights))
    if missing:
        raise BadInput(f"{weights_file}: tensor {missing[0]!r} is missing")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise BadInput(f"{weights_file}: unexpected tensor {unexpected[0]!r} for this config.json")
    for name, tensor in weights.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise BadInput(
                f"{weights_file}: tensor {name!r} has shape {list(tensor.shape)}, but config.json "
                f"implies {list(want)}"
            )
    check_finite({name: weights[name] for name in parameters}, weights_file)


def check_finite(weights: dict[str, torch.Tensor], weights_file: Path) -> None:
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.numel() and not _finite(tensor):
            raise BadInput(f"{weights_file}: tensor {name!r} has NaN or infinite values")


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, from the tensor's extremes in one pass: they are NaN when
    any value is (aminmax propagates NaN) and infinite when any value is. (`isfinite(t).all()`
    builds a mask as large as the tensor first; on SmolLM2's weights it took 15 times longer.)"""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_runs(model: HookedTransformer, config_file: Path) -> None:
    """One forward pass on two tokens: settings that only fail when the model runs (an unknown
    positional embedding, activation or normalisation) fail here, naming the config."""
    try:
        with torch.no_grad():
            model(torch.zeros(1, min(2, model.cfg.n_ctx), dtype=torch.long))
    except Exception as err:
        raise BadInput(
            f"{config_file}: the model it describes does not run ({_reason(err)})"
        ) from err


def _reason(err: BaseException) -> str:
    """The first line of an exception's message, for a one-sentence error."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def new_untrained(cfg_kwargs: dict[str, Any]) -> HookedTransformer:
    """A randomly initialised HookedTransformer, for training (no weight processing)."""
    cfg = HookedTransformerConfig(**{**cfg_kwargs, "device": "cpu"})
    return HookedTransformer(cfg, tokenizer=None, move_to_device=False)


def hf_architecture(config: dict[str, Any], path: Path) -> str:
    """The supported Hugging Face architecture named by a `config.json`, or a BadInput."""
    archs = config.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPE_TO_ARCHITECTURE.get(config.get("model_type", ""), "")
    if arch not in HF_ARCHITECTURES:
        supported = ", ".join(sorted(HF_ARCHITECTURES))
        raise BadInput(
            f"{path / 'config.json'}: architecture {arch or config.get('model_type')!r} is not "
            f"supported (supported: {supported})"
        )
    return arch


def from_hf_directory(path: Path) -> HookedTransformer:
    """Convert a local Hugging Face causal LM directory with TransformerLens's converters.

    A config or weights that transformers cannot load are a `BadInput` naming the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = path / "config.json"
    try:
        hf_config = AutoConfig.from_pretrained(str(path))
    except Exception as err:
        raise BadInput(f"{config_file}: not a valid Hugging Face config ({_reason(err)})") from err
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path), config=hf_config, dtype=torch.float32
        )
    except Exception as err:
        reason = _reason(err)
        if "ignore_mismatched_sizes" in reason:  # transformers' summary of a shape mismatch
            reason = "tensor shapes do not match the config"
        raise BadInput(
            f"{hf_weights_file(path)}: cannot be loaded with {config_file.name} ({reason})"
        ) from err
    hf_model.eval()
    check_finite(dict(hf_model.state_dict()), hf_weights_file(path))
    try:
        cfg = _tl_config(path)
        state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf_model)
    except (AttributeError, KeyError) as err:
        raise BadInput(f"{config_file}: TransformerLens cannot convert it ({err})") from err
    del hf_model
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    remember_mlp_norms(model, state_dict)
    load_processed(model, state_dict)
    model.eval()
    return model


def hf_weights_file(path: Path) -> Path:
    """The weights file of a Hugging Face directory (the first, if sharded), for messages."""
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    shards = sorted(path.glob("model-*.safetensors"))
    return shards[0] if shards else path / "model.safetensors"


def _tl_config(path: Path) -> HookedTransformerConfig:
    """TransformerLens's config for a Hugging Face directory, converted from a staged copy of
    its `config.json`:

    - TransformerLens picks some architectures by substrings of the path it is given (a path
      containing `llama` or `gemma` never has its config read), so it is given a neutral one;
    - transformers 5 no longer writes GPT-2's `n_ctx` (only `n_positions`), which
      TransformerLens's GPT-2 converter reads: it is filled in from `n_positions`;
    - a config without `architectures` gets the one its `model_type` names."""
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = [hf_architecture(config, path)]  # TransformerLens reads the first
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config.get("n_positions", 1024)
    with tempfile.TemporaryDirectory(prefix="workbench-hf-config-") as staged:
        (Path(staged) / "config.json").write_text(json.dumps(config))
        cfg = tl_loading.get_pretrained_model_config(staged, fold_ln=True, device="cpu")
    cfg.model_name = path.name
    cfg.tokenizer_name = None  # the workbench loads the directory's tokenizer itself
    # no random initialisation: every weight comes from the converted checkpoint (a weight
    # matrix it lacks is TransformerLens's error), and memory is not touched until it is loaded
    cfg.init_weights = False
    if cfg.n_key_value_heads is not None:
        # grouped-query attention: every query head gets its own copy of its group's key and
        # value weights, so `hook_k_input`, `hook_k`, `hook_v` (and the node a{L}.h{H}<k|v>)
        # are per query head, as TransformerLens's patching functions see them (docs/models.md,
        # "Grouped-query attention"). The forward pass is unchanged.
        cfg.ungroup_grouped_query_attention = True
    return cfg


def known_tl_name(name: str) -> str | None:
    """The official Hugging Face name of a TransformerLens model name or alias, else None."""
    try:
        return str(tl_loading.get_official_model_name(name))
    except (ValueError, KeyError):
        return None


def tl_tokenizer(name: str) -> Any:
    """The tokenizer of a TransformerLens named model, from the local Hugging Face cache only
    (never the network); `BadInput` if it is not there."""
    official = known_tl_name(name)
    if official is None:
        raise BadInput(f"unknown model {name!r}: not a directory and not a TransformerLens name")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(official, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BadInput(
            f"model {name!r}: its tokenizer is not in the local Hugging Face cache"
        ) from err


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def from_tl_name(name: str, checkpoint_index: int | None) -> tuple[HookedTransformer, Any]:
    """Load a TransformerLens named model (from the hub or the local Hugging Face cache)."""
    official = known_tl_name(name)
    if official is None:
        raise BadInput(f"unknown model {name!r}: not a directory and not a TransformerLens name")
    try:
        model = HookedTransformer.from_pretrained(
            official,
            checkpoint_index=checkpoint_index,
            device="cpu",
            **PROCESSING,
        )
    except (OSError, ValueError, ConnectionError) as err:
        reason = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else str(err)
        raise BadInput(
            f"model {name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded: {reason.splitlines()[0] if reason else 'no network'}"
        ) from err
    model.eval()
    return model, model.tokenizer


def checkpoint_labels(name: str) -> list[int]:
    """Training steps of a TransformerLens checkpointed model (e.g. Pythia), hub needed."""
    labels, _kind = tl_loading.get_checkpoint_labels(name)
    return [int(x) for x in labels]
