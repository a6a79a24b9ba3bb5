"""The zoo checkpoint directory format (see docs/models.md, "Model sources").

A checkpoint directory holds `config.json` (keyword arguments of `HookedTransformerConfig`),
`model.safetensors` (the HookedTransformer `state_dict`), a Hugging Face tokenizer
(`tokenizer.json` + `tokenizer_config.json`) and `meta.json` (task, step, seed, train loss).

`check_safetensors` reads a safetensors file's header without torch and checks its structure
(the zoo's and Hugging Face's weights share the format): a file still being written gets a
reason, a file that can never load gets a `BadInput` sentence naming it and what is wrong. The
loaders and `workbench watch` run it before any weights are read.
"""

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workbench.errors import BadInput, read_text

if TYPE_CHECKING:
    import torch

ZOO_FILES = ("config.json", "model.safetensors", "meta.json")


def is_zoo_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in ZOO_FILES)


def save_zoo_checkpoint(
    out: Path,
    *,
    cfg_kwargs: dict[str, Any],
    state_dict: "dict[str, torch.Tensor]",
    tokenizer: Any,
    meta: dict[str, Any],
) -> None:
    """Write one checkpoint directory atomically (to a temp dir, then renamed)."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg_kwargs, indent=2, sort_keys=True))
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; anything else is a `BadInput` naming the file."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    except ValueError as err:  # the one other: an integer of more digits than Python reads
        raise BadInput(f"{path}: not usable JSON (it holds a number too long to read)") from err
    except RecursionError as err:
        raise BadInput(f"{path}: not usable JSON (nested too deeply)") from err
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return data


def load_zoo_weights(path: Path) -> "dict[str, torch.Tensor]":
    from safetensors.torch import load_file

    file = path / "model.safetensors"
    check_whole(file)
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types
        raise BadInput(f"{file}: cannot read weights ({err})") from err


# --- the safetensors header -----------------------------------------------------------------

SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the format's own limit on the JSON header
MAX_OFFSET = 2**64 - 1  # offsets and sizes are unsigned 64-bit integers in the format
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E5M2FNUZ": 8,
    "F8_E4M3FNUZ": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}  # fmt: skip


def check_whole(file: Path) -> None:
    """`check_safetensors` for a loader: a file shorter than its header says is bad too."""
    incomplete = check_safetensors(file)
    if incomplete:
        raise BadInput(f"{file}: cannot read weights (the file {incomplete})")


def check_safetensors(file: Path) -> str | None:
    """None when `file` is a whole, well-formed safetensors file; a reason when it is shorter
    than its header says (a file still being written, e.g. "has no header yet"); a `BadInput`
    naming the file when it cannot be one: a header that is not a JSON object of tensors (each
    a dtype, a shape and two data offsets whose span fits the shape), tensors that overlap or
    leave gaps, or bytes after the last tensor."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "has no header yet"
            (length,) = struct.unpack("<Q", head)
            if length > SAFETENSORS_MAX_HEADER:
                raise BadInput(
                    f"{file}: not a safetensors file (its header length {length} is over the "
                    f"format's limit of {SAFETENSORS_MAX_HEADER} bytes)"
                )
            if 8 + length > size:
                return f"is shorter than its header ({size} bytes, the header ends at {8 + length})"
            raw = fh.read(length)
    except FileNotFoundError as err:
        raise BadInput(f"{file}: file not found") from err
    except OSError as err:
        raise BadInput(f"{file}: cannot read ({err.strerror or err})") from err
    header = _parse_header(file, raw)
    end = _data_end(file, header)
    if 8 + length + end > size:
        return f"is {size} bytes of {8 + length + end}"
    if 8 + length + end < size:
        extra = size - 8 - length - end
        raise BadInput(
            f"{file}: not a valid safetensors file ({extra} bytes after the last tensor)"
        )
    return None


def _parse_header(file: Path, raw: bytes) -> dict[str, Any]:
    where = f"{file}: not a valid safetensors file"
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadInput(f"{where} (its header is not UTF-8 text at byte {err.start})") from err
    except json.JSONDecodeError as err:
        message = err.msg.removesuffix(" at")
        raise BadInput(f"{where} (its header is not JSON: {message} at byte {err.pos})") from err
    except ValueError as err:  # the one other: an integer of more digits than Python reads
        raise BadInput(f"{where} (its header holds a number too long to read)") from err
    except RecursionError as err:
        raise BadInput(f"{where} (its header is JSON nested too deeply)") from err
    if not isinstance(header, dict):
        raise BadInput(f"{where} (its header is a JSON {_kind(header)}, expected an object)")
    metadata = header.get("__metadata__") or {}  # absent or null: none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(f"{where} (its '__metadata__' must map names to strings)")
    return header


def _data_end(file: Path, header: dict[str, Any]) -> int:
    """Where the last tensor's bytes end (relative to the data); the tensors must tile the data
    from 0 without gaps or overlaps, as the format requires."""
    spans = sorted(
        (_tensor_span(file, name, entry), name)
        for name, entry in header.items()
        if name != "__metadata__"
    )
    end, previous = 0, None
    for (begin, stop), name in spans:
        if begin < end:
            raise BadInput(
                f"{file}: not a valid safetensors file (tensor {name!r} overlaps {previous!r})"
            )
        if begin > end:
            raise BadInput(
                f"{file}: not a valid safetensors file ({begin - end} bytes of no tensor before "
                f"tensor {name!r})"
            )
        end, previous = stop, name
    return end


def _tensor_span(file: Path, name: str, entry: Any) -> tuple[int, int]:
    """A header entry's (begin, end) data offsets, once its dtype, shape and offsets agree."""
    where = f"{file}: not a valid safetensors file (tensor {name!r}"
    if not isinstance(entry, dict):
        raise BadInput(f"{where} is a JSON {_kind(entry)}, expected an object)")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise BadInput(f"{where}: field 'dtype' must be a string, got {_short(dtype)})")
    if dtype not in DTYPE_BITS:
        raise BadInput(f"{where}: unknown dtype {_short(dtype)})")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise BadInput(
            f"{where}: field 'shape' must be a list of non-negative integers, got {_short(shape)})"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise BadInput(
            f"{where}: field 'data_offsets' must be two non-negative integers, "
            f"got {_short(offsets)})"
        )
    begin, end = offsets
    if begin > end:
        raise BadInput(f"{where}: data_offsets [{begin}, {end}] end before they begin)")
    n_bytes = _n_bytes(shape, DTYPE_BITS[dtype])
    if n_bytes is None:
        raise BadInput(f"{where}: shape {_short(shape)} of {dtype} is not a whole number of bytes)")
    if n_bytes != end - begin:
        raise BadInput(
            f"{where}: shape {_short(shape)} of {dtype} is {n_bytes} bytes, its data_offsets "
            f"span {end - begin})"
        )
    return begin, end


def _n_bytes(shape: list[int], bits: int) -> int | None:
    """Bytes a tensor of `shape` takes (None: not whole bytes); a shape too large for the
    format is more bytes than any file holds (checked without multiplying without bound)."""
    if 0 in shape:
        return 0
    total = bits
    for dim in shape:
        total *= dim
        if total > 8 * MAX_OFFSET:
            return MAX_OFFSET + 1  # spans no valid data_offsets can have
    return None if total % 8 else total // 8


def _count(value: Any) -> bool:
    """A non-negative integer that fits the format's 64 bits (JSON `true` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_OFFSET


def _kind(value: Any) -> str:
    names = {list: "list", dict: "object", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
