"""Import a GGUF file (the format most local models are shared in) as a float32 Hugging Face
directory, which then loads like any other (`workbench model import FILE.gguf --out DIR`).

transformers reads GGUF through the `gguf` package and dequantises every tensor; the model is
then copied into a plain (unquantised) transformers model of the same config and saved with its
tokenizer. Checked before any other reader sees the file or anything is written
(`workbench.models.gguf_check`): every count and size in the header against the bytes the file
has, every tensor's bytes inside the file, the architecture one both transformers' GGUF reader
and the workbench support, every tensor's quantisation one that can be dequantised, and the
tensors those of the header's model (every layer, with the sizes the header gives).

The output directory must not exist or be empty; the import never deletes anything it did not
write. The model is saved into a fresh staging directory next to it, `<out>.partial-<random>`
(created by this run, so an older `<out>.partial*` of anyone's is left alone), which is renamed
to `<out>` when complete and removed if anything fails.
"""

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from workbench.errors import BadInput
from workbench.models.gguf_check import GgufHeader, check_model, read_header

logger = logging.getLogger(__name__)

# GGUF `general.architecture` values the workbench imports (transformers reads them, and the
# resulting Hugging Face architecture is one `workbench.models.engine` converts)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bloom")
GGUF_MAGIC = b"GGUF"
STAGING_ATTEMPTS = 10
MAX_REASON_CHARS = 300  # of a transformers error quoted in a message


def inspect_gguf(path: Path, *, max_array_depth: int | None = None) -> tuple[str, list[str]]:
    """(architecture, quantisation type names) of a GGUF file that passes every check of
    `workbench.models.gguf_check`, or a `BadInput` naming the file and what is wrong."""
    header = read_header(path, max_array_depth=max_array_depth)
    architecture = header.fields.get("general.architecture")
    if not isinstance(architecture, str):
        raise BadInput(f"{path}: general.architecture is missing or not a string")
    if architecture not in GGUF_ARCHITECTURES:
        raise BadInput(
            f"{path}: architecture {architecture!r} is not supported for import "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    kinds = _check_quantisations(header)
    check_model(header, architecture)
    return architecture, kinds


def _check_quantisations(header: GgufHeader) -> list[str]:
    """The quantisation types of the tensors, each checked by dequantising one zero block."""
    import numpy as np
    from gguf import dequantize
    from gguf.constants import GGML_QUANT_SIZES

    checked: set[str] = set()
    for tensor in header.tensors.values():
        kind = tensor.kind
        if kind.name in checked:
            continue
        try:
            dequantize(np.zeros((1, GGML_QUANT_SIZES[kind][1]), np.uint8), kind)
        except NotImplementedError as err:
            raise BadInput(
                f"{header.path}: tensor {tensor.name!r} is quantised as {kind.name}, which the "
                "gguf package cannot dequantise"
            ) from err
        checked.add(kind.name)
    return sorted(checked)


def import_gguf(path: Path, out: Path, *, max_array_depth: int | None = None) -> Path:
    """Dequantise `path` into a float32 Hugging Face directory at `out`; returns `out`.

    `max_array_depth` bounds how deeply the header's arrays may nest (default: the
    `WORKBENCH_GGUF_MAX_ARRAY_DEPTH` environment variable, else 3)."""
    path, out = path.expanduser(), out.expanduser()
    _check_out(out)
    architecture, kinds = inspect_gguf(path, max_array_depth=max_array_depth)
    logger.info("importing %s (%s; %s)", path.name, architecture, ", ".join(kinds))
    model, tokenizer = _load(path)
    _save(model, tokenizer, out)
    logger.info("wrote %s", out)
    return out


def _check_out(out: Path) -> None:
    """`out` is new or an empty directory: nothing of anyone's is ever replaced."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BadInput(f"{out}: already exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out}: already exists and is not empty")


def _load(path: Path) -> tuple[Any, Any]:
    """The float32 transformers model and tokenizer of a checked GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are float32 now
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
    except MemoryError:
        raise
    except Exception as err:  # the file passed every check, so what is left is its content
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:MAX_REASON_CHARS]
        raise BadInput(f"{path}: transformers cannot read it ({reason})") from err
    model.eval()
    return model, tokenizer


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    """Save into a staging directory this run creates, then rename it to `out`; on any failure
    remove the staging directory (and only it)."""
    staging = _make_staging(out)
    try:
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        try:
            os.rename(staging, out)  # replaces `out` only if it is (still) an empty directory
        except OSError as err:
            raise BadInput(
                f"{out}: cannot move the imported model there ({err.strerror}); it was "
                "written meanwhile or cannot be replaced, and is left as it is"
            ) from err
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _make_staging(out: Path) -> Path:
    """A new directory `<out>.partial-<random>` beside `out`, made by this call (never one that
    already existed)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(STAGING_ATTEMPTS):
            staging = out.with_name(f"{out.name}.partial-{uuid.uuid4().hex[:8]}")
            try:
                staging.mkdir()
            except FileExistsError:
                continue
            return staging
    except OSError as err:
        raise BadInput(f"{out.parent}: cannot create a directory there ({err.strerror})") from err
    raise BadInput(f"{out.parent}: cannot find a free name for a staging directory")
