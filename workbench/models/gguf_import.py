"""Import a GGUF file (the format most local models are shared in) as a float32 Hugging Face
directory, which then loads like any other (`workbench model import FILE.gguf --out DIR`).

transformers reads GGUF through the `gguf` package and dequantises every tensor; the model is
then copied into a plain (unquantised) transformers model of the same config and saved with its
tokenizer. Checked before anything is written: the file is GGUF, its architecture is one both
transformers' GGUF reader and the workbench support, and every tensor's quantisation can be
dequantised. The directory is written to `<out>.partial` and renamed when complete.
"""

import logging
import shutil
from pathlib import Path

from workbench.errors import BadInput

logger = logging.getLogger(__name__)

# GGUF `general.architecture` values the workbench imports (transformers reads them, and the
# resulting Hugging Face architecture is one `workbench.models.engine` converts)
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "bloom")
GGUF_MAGIC = b"GGUF"


def inspect_gguf(path: Path) -> tuple[str, list[str]]:
    """(architecture, quantisation type names) of a GGUF file, or a `BadInput` naming it."""
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    with path.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise BadInput(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    import numpy as np
    from gguf import GGUFReader, dequantize

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as err:
        raise BadInput(f"{path}: cannot read the GGUF header ({err})") from err
    if architecture not in GGUF_ARCHITECTURES:
        raise BadInput(
            f"{path}: architecture {architecture!r} is not supported for import "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    checked: set[str] = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in checked:
            continue
        try:
            dequantize(np.asarray(tensor.data), tensor.tensor_type)
        except NotImplementedError as err:
            raise BadInput(
                f"{path}: tensor {tensor.name!r} is quantised as {kind}, which the gguf package "
                "cannot dequantise"
            ) from err
        checked.add(kind)
    return architecture, sorted(checked)


def import_gguf(path: Path, out: Path) -> Path:
    """Dequantise `path` into a float32 Hugging Face directory at `out`; returns `out`."""
    path, out = path.expanduser(), out.expanduser()
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"{out}: already exists and is not empty")
    architecture, kinds = inspect_gguf(path)
    logger.info("importing %s (%s; %s)", path.name, architecture, ", ".join(kinds))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        )
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise BadInput(f"{path}: transformers cannot read it ({err})") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if out.exists():
        out.rmdir()
    staging.rename(out)
    logger.info("wrote %s", out)
    return out
