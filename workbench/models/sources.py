"""Resolve a `--model` argument into checkpoints and load them.

Accepted forms (docs/models.md, "Model sources"):
- a zoo checkpoint directory (`config.json`, `model.safetensors`, tokenizer, `meta.json`);
- a directory of zoo checkpoints (`step_<N>/` subdirectories);
- a Hugging Face model directory (`config.json` + safetensors or bin weights);
- a Hugging Face Trainer output directory (`checkpoint-<N>/` subdirectories);
- a TransformerLens model name, optionally `name@<checkpoint index>` (e.g. `pythia-70m@10`).
"""

import logging
import re
from pathlib import Path

from workbench import memory
from workbench.errors import BadInput
from workbench.hashing import sha256_files, sha256_json
from workbench.models import zoo_format
from workbench.models.base import CheckpointInfo, CheckpointRef, LoadedModel, ModelInfo

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_DIR = re.compile(r"^checkpoint-(\d+)$")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def model_id_for(run_dir: Path) -> str:
    """A readable, stable id for the training run a directory belongs to."""
    resolved = run_dir.expanduser().resolve()
    return f"{resolved.name}-{sha256_json(str(resolved))[:8]}"


def is_hf_directory(path: Path) -> bool:
    has_weights = any((path / w).is_file() for w in HF_WEIGHTS) or any(
        path.glob("model-*.safetensors")
    )
    return (path / "config.json").is_file() and has_weights


def _single_dir_ref(path: Path, run_dir: Path, step: int | None) -> CheckpointRef:
    if zoo_format.is_zoo_checkpoint(path):
        meta = zoo_format.read_json(path / "meta.json")
        step = _int_field(meta, "step", step or 0, path / "meta.json")
        return CheckpointRef("zoo", str(path), model_id_for(run_dir), step, source=str(run_dir))
    if is_hf_directory(path):
        if step is None:
            state = path / "trainer_state.json"
            step = (
                _int_field(zoo_format.read_json(state), "global_step", 0, state)
                if state.is_file()
                else 0
            )
        return CheckpointRef("hf", str(path), model_id_for(run_dir), step, source=str(run_dir))
    if (path / "meta.json").is_file() or (path / "config.json").is_file():
        absent = [name for name in zoo_format.ZOO_FILES if not (path / name).is_file()]
        if (path / "meta.json").is_file() and absent:
            raise BadInput(f"{path / absent[0]}: file not found (a zoo checkpoint needs it)")
        raise BadInput(
            f"{path / 'model.safetensors'}: file not found (no weights beside config.json)"
        )
    raise BadInput(
        f"{path}: not a model directory (expected a zoo checkpoint with config.json, "
        "model.safetensors and meta.json, or a Hugging Face config.json with weights)"
    )


def _int_field(data: dict, name: str, default: int, file: Path) -> int:  # type: ignore[type-arg]
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{file}: field {name!r} must be an integer, got {value!r}")
    return value


def resolve_checkpoints(model: str) -> list[CheckpointRef]:
    """All checkpoints named by `model`, sorted by step."""
    path = Path(model).expanduser()
    if path.is_dir():
        step_dirs = [(int(m.group(1)), p) for p in path.iterdir() if (m := STEP_DIR.match(p.name))]
        trainer_dirs = [
            (int(m.group(1)), p) for p in path.iterdir() if (m := TRAINER_DIR.match(p.name))
        ]
        children = sorted(step_dirs or trainer_dirs)
        if children and not (path / "config.json").is_file():
            return [_single_dir_ref(p, path, step) for step, p in children]
        parent = path.parent if TRAINER_DIR.match(path.name) or STEP_DIR.match(path.name) else path
        m = TRAINER_DIR.match(path.name)
        return [_single_dir_ref(path, parent, int(m.group(1)) if m else None)]
    if path.exists():
        raise BadInput(f"{path}: is a file, expected a model directory or a model name")
    if "/" in model and not re.match(r"^[\w.-]+/[\w.-]+(@\d+)?$", model):
        raise BadInput(f"{model}: no such directory")
    return [_tl_ref(model)]


def _tl_ref(model: str) -> CheckpointRef:
    from workbench.models import engine

    name, _, index = model.partition("@")
    if engine.known_tl_name(name) is None:
        if name.startswith((".", "/", "~")) or "/" in name:
            raise BadInput(f"{model}: no such directory, and not a TransformerLens model name")
        raise BadInput(f"unknown model {name!r}: not a directory and not a TransformerLens name")
    if index and not index.isdigit():
        raise BadInput(f"{model}: the checkpoint index after '@' must be an integer")
    ckpt = int(index) if index else None
    step = ckpt if ckpt is not None else 0
    return CheckpointRef("tl", name, name, step, checkpoint_index=ckpt, source=name)


def select_checkpoints(refs: list[CheckpointRef], which: str) -> list[CheckpointRef]:
    """`all`, `latest` or one training step."""
    if which == "all":
        return refs
    if which == "latest":
        return refs[-1:]
    if not which.isdigit():
        raise BadInput(f"--checkpoint {which!r}: expected all, latest or a step number")
    chosen = [r for r in refs if r.step == int(which)]
    if not chosen:
        steps = ", ".join(str(r.step) for r in refs)
        raise BadInput(f"--checkpoint {which}: no checkpoint at that step (steps: {steps})")
    return chosen


def load_checkpoint(
    ref: CheckpointRef, *, device: str = "cpu", dtype: str = "float32"
) -> LoadedModel:
    """Load one checkpoint as a HookedTransformer with its tokenizer and provenance, on `device`
    (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`) in `dtype` (`float32`, `bfloat16`, `float16`).
    Large temporaries of the load are returned to the system as soon as they are freed
    (`workbench.memory.mapped_large_allocations`)."""
    with memory.mapped_large_allocations():
        return _load_checkpoint(ref, device=device, dtype=dtype)


def _load_checkpoint(ref: CheckpointRef, *, device: str, dtype: str) -> LoadedModel:
    from workbench.models import engine

    target_device, target_dtype = engine.resolve_device(device), engine.resolve_dtype(dtype)
    path = Path(ref.location)
    if ref.kind == "zoo":
        cfg_kwargs = zoo_format.read_json(path / "config.json")
        state_dict = zoo_format.load_zoo_weights(path)
        model = engine.build_from_state_dict(cfg_kwargs, state_dict, source=path)
        tokenizer = _local_tokenizer(path)
        architecture = "zoo:" + str(zoo_format.read_json(path / "meta.json").get("task", ""))
        weight_files = [path / "config.json", path / "model.safetensors"]
        sha = _sha256_files(weight_files)
        config = cfg_kwargs
    elif ref.kind == "hf":
        config = zoo_format.read_json(path / "config.json")
        architecture = engine.hf_architecture(config, path)
        for file in sorted(path.glob("*.safetensors")):
            zoo_format.check_whole(file)
        model = engine.from_hf_directory(path)
        tokenizer = _local_tokenizer(path)
        model.cfg.default_prepend_bos = engine.prepends_bos(architecture, tokenizer)
        weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin"})
        sha = _sha256_files([path / "config.json", *weights])
    else:
        model, tokenizer = engine.from_tl_name(ref.location, ref.checkpoint_index)
        architecture = str(model.cfg.original_architecture)
        sha = sha256_json({"name": ref.location, "checkpoint_index": ref.checkpoint_index})
        config = {"name": ref.location, "checkpoint_index": ref.checkpoint_index}
    model = engine.place(model, target_device, target_dtype)
    cfg = model.cfg
    info = ModelInfo(
        model_id=ref.model_id,
        source=ref.source if ref.kind == "tl" else str(Path(ref.source).resolve()),
        architecture=architecture,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_model=cfg.d_model,
        d_vocab=cfg.d_vocab,
        config=config,
    )
    location = ref.location if ref.kind == "tl" else str(path.resolve())
    loss = train_loss(path, ref.step) if ref.kind != "tl" else None
    ckpt = CheckpointInfo(ref.checkpoint_id, ref.model_id, ref.step, location, sha, loss)
    logger.info("loaded %s (%s, %d layers)", ref.checkpoint_id, architecture, cfg.n_layers)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, checkpoint=ckpt)


def _sha256_files(paths: list[Path]) -> str:
    """The checkpoint's content hash; a file that cannot be read is a `BadInput` naming it."""
    try:
        return sha256_files(paths)
    except OSError as err:
        raise BadInput(f"{err.filename or paths[0]}: cannot read ({err.strerror or err})") from err


def train_loss(path: Path, step: int) -> float | None:
    """The training loss logged at a checkpoint: `train_loss` of a zoo `meta.json`, or the last
    `loss` at or before `step` in a Hugging Face Trainer's `trainer_state.json`."""
    import json
    import math

    try:
        if (path / "meta.json").is_file():
            value = json.loads((path / "meta.json").read_text()).get("train_loss")
            return float(value) if value is not None and math.isfinite(value) else None
        if (path / "trainer_state.json").is_file():
            history = json.loads((path / "trainer_state.json").read_text()).get("log_history", [])
            losses = [h["loss"] for h in history if "loss" in h and h.get("step", 0) <= step]
            return float(losses[-1]) if losses else None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None  # a loss is a nicety: its absence never fails a run
    return None


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def load_tokenizer(location: str):  # type: ignore[no-untyped-def]
    """The tokenizer alone of a stored checkpoint (`checkpoints.path`: its directory, or a
    TransformerLens model name, looked up in the local Hugging Face cache only); None for a
    directory without one. `BadInput` says why it cannot be had."""
    path = Path(location)
    if path.is_dir():
        return _local_tokenizer(path)
    if path.is_absolute() or path.exists():
        raise BadInput(f"{location}: the checkpoint's directory is gone")
    from workbench.models import engine

    return engine.tl_tokenizer(location)


def _local_tokenizer(path: Path):  # type: ignore[no-untyped-def]
    """The directory's Hugging Face tokenizer, or None; a broken one is a `BadInput` naming
    its file."""
    present = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # transformers and tokenizers raise many types here
        # a file that is not JSON is named as such (read only now: tokenizer.json is megabytes)
        for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
            if (path / name).is_file():
                zoo_format.read_json(path / name)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"{present[0]}: not a usable Hugging Face tokenizer ({reason})") from err
