"""Read a GGUF file's header without trusting it, and check that it describes a model the
importer can convert.

A GGUF header is a list of counts and sizes (of key/value pairs, strings, arrays, tensors and
their dimensions) followed by the tensors' bytes. Readers that allocate or loop by those counts
can be made to run for minutes or exhaust memory by a file of a hundred bytes, and a header
whose layer count disagrees with its tensors makes transformers fill the missing layers with
random weights. So, before any other reader sees the file:

* every count is checked against the bytes that follow it (a string or array longer than the
  rest of the file, more tensors or key/value pairs than the file could hold) before it is used,
  and arrays nest at most `max_array_depth` levels (`WORKBENCH_GGUF_MAX_ARRAY_DEPTH`, default 3);
* every tensor has at most four dimensions, a known type, an aligned offset, and bytes that lie
  inside the file without overlapping another tensor's;
* the tensors are those of the header's architecture: the embedding and the output norm, every
  layer 0..block_count-1 with the attention and MLP tensors the converter maps, no layer at or
  past block_count, and dimensions that agree with embedding_length, the head counts and the
  vocabulary.

Any violation is `BadInput`, one sentence naming the file and the field or tensor. The header is
read through a read-only memory map; nothing is allocated in proportion to a claimed count.
"""

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from workbench.errors import BadInput

MAX_ARRAY_DEPTH = 3  # arrays of arrays of arrays; transformers itself reads only flat arrays
MAX_ARRAY_DEPTH_ENV = "WORKBENCH_GGUF_MAX_ARRAY_DEPTH"
MAX_ARRAY_DEPTH_CEILING = 64  # the setting's upper bound (each level is a Python call)
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML tensors have at most four dimensions
DEFAULT_ALIGNMENT = 32
MAGIC = b"GGUF"

# GGUF value types: their numbers in the file, names for messages, struct formats for scalars
UINT32, STRING, ARRAY = 4, 8, 9
TYPE_NAMES = {
    0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
    7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64",
}  # fmt: skip
SCALAR_FORMATS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
# the fewest bytes one value of each type takes (a string: its length; an array: type + length)
MIN_SIZES = {**{t: struct.calcsize(f) for t, f in SCALAR_FORMATS.items()}, STRING: 8, ARRAY: 12}
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, one byte of value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset


# a tensor's header entry as read: name, type, dims, offset from the data section
_TensorInfo = tuple[str, GGMLQuantizationType, tuple[int, ...], int]


@dataclass(frozen=True)
class GgufArray:
    """An array value, summarised (its items are checked, not kept)."""

    item_type: int
    length: int


@dataclass(frozen=True)
class GgufTensor:
    """A tensor's header entry; `dims` in file order (ne0, the row length, first)."""

    name: str
    kind: GGMLQuantizationType
    dims: tuple[int, ...]
    start: int  # absolute byte offset of its data in the file
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    """What a checked GGUF header says: scalar and string values by key (arrays summarised)."""

    path: Path
    version: int
    fields: dict[str, object]
    tensors: dict[str, GgufTensor]
    size: int


def max_array_depth_setting() -> int:
    """The array nesting limit: `WORKBENCH_GGUF_MAX_ARRAY_DEPTH` if set, else the default."""
    raw = os.environ.get(MAX_ARRAY_DEPTH_ENV, "").strip()
    if not raw:
        return MAX_ARRAY_DEPTH
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_ARRAY_DEPTH_CEILING:
        raise BadInput(
            f"{MAX_ARRAY_DEPTH_ENV}={raw!r}: must be a whole number from 1 to "
            f"{MAX_ARRAY_DEPTH_CEILING}"
        )
    return int(raw)


class _Cursor:
    """Reads the memory-mapped file front to back, refusing to read past its end."""

    def __init__(self, path: Path, buf: mmap.mmap, order: str):
        self.path, self.buf, self.order = path, buf, order
        self.pos, self.size = 0, len(buf)

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            raise BadInput(
                f"{self.path}: {what} at byte {self.pos:,} needs {n:,} bytes but the file has "
                f"only {self.left:,} left"
            )

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def scalar(self, fmt: str, what: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def uint(self, fmt: str, what: str) -> int:
        return int(self.scalar(fmt, what))

    def string(self, what: str) -> str:
        length = self.uint("Q", f"the length of {what}")
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadInput(f"{self.path}: {what} at byte {self.pos:,} is not UTF-8") from err
        self.pos += length
        return text

    def strings(self, count: int, what: str) -> None:
        """Check `count` strings in a row (a vocabulary: the one long loop of a header)."""
        buf, size, fmt, pos = self.buf, self.size, self.order + "Q", self.pos
        for _ in range(count):
            if pos + 8 > size:
                break
            (length,) = struct.unpack_from(fmt, buf, pos)
            if length > size - pos - 8:
                break
            try:
                buf[pos + 8 : pos + 8 + length].decode("utf-8")
            except UnicodeDecodeError:
                break
            pos += 8 + length
        else:
            self.pos = pos
            return
        self.pos = pos
        self.string(what)  # the string that stopped the loop: raises, naming where and why


def read_header(path: Path, *, max_array_depth: int | None = None) -> GgufHeader:
    """Parse and check `path`'s header and tensor table against the file's own size."""
    depth = max_array_depth_setting() if max_array_depth is None else max_array_depth
    if not 1 <= depth <= MAX_ARRAY_DEPTH_CEILING:
        raise BadInput(f"max_array_depth must be from 1 to {MAX_ARRAY_DEPTH_CEILING}, not {depth}")
    if not path.is_file():
        raise BadInput(f"{path}: file not found")
    size = path.stat().st_size
    with path.open("rb") as fh:
        if fh.read(4) != MAGIC:
            raise BadInput(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
        if size < 24:
            raise BadInput(f"{path}: only {size} bytes, too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(path, buf, _byte_order(path, buf)), depth)


def _byte_order(path: Path, buf: mmap.mmap) -> str:
    """'<' or '>': the byte order in which the version is one this reader knows."""
    for order in "<>":
        (version,) = struct.unpack_from(order + "I", buf, 4)
        if version in SUPPORTED_VERSIONS:
            return order
    (version,) = struct.unpack_from("<I", buf, 4)
    raise BadInput(f"{path}: GGUF version {version} is not supported (versions 2 and 3 are)")


def _parse(cur: _Cursor, depth: int) -> GgufHeader:
    cur.pos = 4
    version = cur.uint("I", "the version")
    n_tensors = cur.uint("Q", "the tensor count")
    n_kv = cur.uint("Q", "the key/value count")
    least = n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES
    if least > cur.left:
        raise BadInput(
            f"{cur.path}: the header declares {n_kv:,} key/value pairs and {n_tensors:,} "
            f"tensors, which need at least {least:,} bytes, but the file has only {cur.left:,} "
            "after the header"
        )
    fields: dict[str, object] = {}
    types: dict[str, int] = {}
    for index in range(n_kv):
        key = cur.string(f"the name of key/value pair {index}")
        if key in fields:
            raise BadInput(f"{cur.path}: key {key!r} appears twice")
        types[key] = cur.uint("I", f"the type of key {key!r}")
        fields[key] = _value(cur, types[key], key=key, depth=depth)
    infos = [_tensor_info(cur, index) for index in range(n_tensors)]
    alignment = _alignment(cur.path, fields, types)
    data_start = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(cur.path, infos, data_start=data_start, alignment=alignment)
    _check_overlaps(cur.path, tensors, size=cur.size)
    return GgufHeader(cur.path, version, fields, tensors, cur.size)


def _value(cur: _Cursor, value_type: int, *, key: str, depth: int) -> object:
    """Read one value of `value_type` (arrays are checked item by item, then summarised)."""
    what = f"the value of key {key!r}"
    if value_type in SCALAR_FORMATS:
        return cur.scalar(SCALAR_FORMATS[value_type], what)
    if value_type == STRING:
        return cur.string(what)
    if value_type != ARRAY:
        raise BadInput(f"{cur.path}: key {key!r} has unknown value type {value_type}")
    if depth < 1:
        raise BadInput(
            f"{cur.path}: key {key!r} nests arrays deeper than the limit at byte {cur.pos:,} "
            f"(set {MAX_ARRAY_DEPTH_ENV} to allow more)"
        )
    item_type = cur.uint("I", f"the item type of key {key!r}")
    length = cur.uint("Q", f"the array length of key {key!r}")
    if item_type not in MIN_SIZES:
        raise BadInput(f"{cur.path}: key {key!r} is an array of unknown value type {item_type}")
    least = length * MIN_SIZES[item_type]
    if least > cur.left:
        raise BadInput(
            f"{cur.path}: key {key!r} declares an array of {length:,} {TYPE_NAMES[item_type]} "
            f"values (at least {least:,} bytes) but the file has only {cur.left:,} left"
        )
    if item_type in SCALAR_FORMATS:
        cur.skip(least, what)
    elif item_type == STRING:
        cur.strings(length, what)
    else:
        for _ in range(length):
            _value(cur, item_type, key=key, depth=depth - 1)
    return GgufArray(item_type, length)


def _tensor_info(cur: _Cursor, index: int) -> _TensorInfo:
    """(name, type, dims, offset from the data section) of the `index`th tensor entry."""
    name = cur.string(f"the name of tensor {index}")
    n_dims = cur.uint("I", f"the dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise BadInput(f"{cur.path}: tensor {name!r} has {n_dims:,} dimensions (at most 4)")
    dims = tuple(cur.uint("Q", f"the dimensions of tensor {name!r}") for _ in range(n_dims))
    raw_kind = cur.uint("I", f"the type of tensor {name!r}")
    offset = cur.uint("Q", f"the data offset of tensor {name!r}")
    try:
        kind = GGMLQuantizationType(raw_kind)
    except ValueError as err:
        raise BadInput(f"{cur.path}: tensor {name!r} has unknown type {raw_kind}") from err
    return name, kind, dims, offset


def _alignment(path: Path, fields: dict[str, object], types: dict[str, int]) -> int:
    """The data section's alignment: `general.alignment` (a UINT32 power of two) or 32."""
    if "general.alignment" not in fields:
        return DEFAULT_ALIGNMENT
    value = fields["general.alignment"]
    if types["general.alignment"] != UINT32 or not isinstance(value, int):
        raise BadInput(f"{path}: general.alignment is not a UINT32")
    if value <= 0 or value & (value - 1):
        raise BadInput(f"{path}: general.alignment is {value}, not a power of two")
    return value


def _place_tensors(
    path: Path,
    infos: list[_TensorInfo],
    *,
    data_start: int,
    alignment: int,
) -> dict[str, GgufTensor]:
    """Each tensor's byte range, checked to be whole blocks, aligned and named once."""
    tensors: dict[str, GgufTensor] = {}
    for name, kind, dims, offset in infos:
        if name in tensors:
            raise BadInput(f"{path}: tensor {name!r} appears twice")
        block, type_size = GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise BadInput(
                f"{path}: tensor {name!r} has rows of {dims[0]:,} values, not a whole number of "
                f"{kind.name} blocks of {block}"
            )
        if offset % alignment:
            raise BadInput(f"{path}: tensor {name!r} has offset {offset:,}, not a multiple of "
                           f"the alignment {alignment}")  # fmt: skip
        n_elements = 1
        for dim in dims:
            n_elements *= dim
        tensors[name] = GgufTensor(
            name, kind, dims, data_start + offset, n_elements // block * type_size
        )
    return tensors


def _check_overlaps(path: Path, tensors: dict[str, GgufTensor], *, size: int) -> None:
    """Every tensor's bytes lie inside the file, and no two tensors share bytes."""
    previous: GgufTensor | None = None
    for tensor in sorted(tensors.values(), key=lambda t: t.start):
        end = tensor.start + tensor.n_bytes
        if end > size:
            raise BadInput(
                f"{path}: tensor {tensor.name!r} needs bytes {tensor.start:,} to {end:,} but the "
                f"file ends at byte {size:,}"
            )
        if previous is not None and tensor.start < previous.start + previous.n_bytes:
            raise BadInput(
                f"{path}: tensor {tensor.name!r} overlaps tensor {previous.name!r} (both use "
                f"byte {tensor.start:,})"
            )
        if tensor.n_bytes:
            previous = tensor


# -- the model the header describes -----------------------------------------------------------

# Tensors per architecture, as dims in file order over symbols: E embedding_length, V the
# vocabulary, F the MLP width, Q query width (heads x head size), K key/value width, D head size,
# P GPT-2's positions. `top` are model-wide, `layer` are per block (after "blk.N.").
_LLAMA_LAYER = {
    "attn_norm.weight": ("E",), "attn_q.weight": ("E", "Q"), "attn_k.weight": ("E", "K"),
    "attn_v.weight": ("E", "K"), "attn_output.weight": ("Q", "E"), "ffn_norm.weight": ("E",),
    "ffn_gate.weight": ("E", "F"), "ffn_up.weight": ("E", "F"), "ffn_down.weight": ("F", "E"),
}  # fmt: skip
_LLAMA_TOP = {"token_embd.weight": ("E", "V"), "output_norm.weight": ("E",)}
_FUSED_LAYER = {
    "attn_norm.weight": ("E",), "attn_norm.bias": ("E",),
    "attn_qkv.weight": ("E", "3E"), "attn_qkv.bias": ("3E",),
    "attn_output.weight": ("E", "E"), "attn_output.bias": ("E",),
    "ffn_norm.weight": ("E",), "ffn_norm.bias": ("E",),
    "ffn_up.weight": ("E", "F"), "ffn_up.bias": ("F",),
    "ffn_down.weight": ("F", "E"), "ffn_down.bias": ("E",),
}  # fmt: skip
_NORM_TOP = {"output_norm.weight": ("E",), "output_norm.bias": ("E",)}
LAYOUTS: dict[str, tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]] = {
    "llama": (_LLAMA_TOP, _LLAMA_LAYER),
    "mistral": (_LLAMA_TOP, _LLAMA_LAYER),
    "qwen2": (
        _LLAMA_TOP,
        {**_LLAMA_LAYER, "attn_q.bias": ("Q",), "attn_k.bias": ("K",), "attn_v.bias": ("K",)},
    ),
    "qwen3": (
        _LLAMA_TOP,
        {**_LLAMA_LAYER, "attn_q_norm.weight": ("D",), "attn_k_norm.weight": ("D",)},
    ),
    "gpt2": (
        {"token_embd.weight": ("E", "V"), "position_embd.weight": ("E", "P"), **_NORM_TOP},
        _FUSED_LAYER,
    ),
    "bloom": (
        {
            "token_embd.weight": ("E", "V"),
            "token_embd_norm.weight": ("E",),
            "token_embd_norm.bias": ("E",),
            **_NORM_TOP,
        },
        _FUSED_LAYER,
    ),
}
QWEN3_HEAD_SIZE = 128  # transformers reads no head size for qwen3 and uses its config's default
GPT2_POSITIONS = 1024  # nor a position count for gpt2 (context_length is not mapped)
LAYER_NAME = re.compile(r"blk\.(\d+)\.")


def check_model(header: GgufHeader, architecture: str) -> None:
    """The tensors are those of `architecture`'s model of the header's sizes, every layer."""
    path = header.path
    top, layer = LAYOUTS[architecture]
    n_layers = _positive(header, f"{architecture}.block_count")
    sizes = _sizes(header, architecture)
    for name in header.tensors:
        match = LAYER_NAME.match(name)
        if match and int(match.group(1)) >= n_layers:
            raise BadInput(
                f"{path}: tensor {name!r} names layer {match.group(1)} but "
                f"{architecture}.block_count is {n_layers}"
            )
    expected = dict(top)
    if "output.weight" in header.tensors:
        expected["output.weight"] = ("E", "V")
    for name, dims in expected.items():
        _check_tensor(header, name, tuple(sizes[d] for d in dims), n_layers=n_layers)
    # layer by layer, stopping at the first missing tensor: a block_count larger than the
    # tensors can back costs no more than the tensors there are
    for index in range(n_layers):
        for suffix, dims in layer.items():
            want = tuple(sizes[d] for d in dims)
            _check_tensor(header, f"blk.{index}.{suffix}", want, n_layers=n_layers)


def _check_tensor(header: GgufHeader, name: str, want: tuple[int, ...], *, n_layers: int) -> None:
    tensor = header.tensors.get(name)
    if tensor is None:
        layer = LAYER_NAME.match(name)
        where = f" (block_count is {n_layers})" if layer else ""
        raise BadInput(f"{header.path}: tensor {name!r} is missing{where}")
    if tensor.dims != want:
        raise BadInput(
            f"{header.path}: tensor {name!r} has dimensions {list(tensor.dims)} but the header's "
            f"sizes make it {list(want)}"
        )


def _sizes(header: GgufHeader, arch: str) -> dict[str, int]:
    """The symbols of `LAYOUTS` from the header's values (checked to be consistent)."""
    path = header.path
    width = _positive(header, f"{arch}.embedding_length")
    n_heads = _positive(header, f"{arch}.attention.head_count")
    n_kv = _positive(header, f"{arch}.attention.head_count_kv", default=n_heads)
    if n_heads % n_kv:
        raise BadInput(
            f"{path}: {arch}.attention.head_count ({n_heads}) is not a multiple of "
            f"{arch}.attention.head_count_kv ({n_kv})"
        )
    head = _head_size(header, arch, width=width, n_heads=n_heads)
    fused = arch in ("gpt2", "bloom")  # their MLP is 4 x width in transformers
    mlp = 4 * width if fused else _positive(header, f"{arch}.feed_forward_length")
    return {
        "E": width, "3E": 3 * width, "V": _vocabulary(header, arch), "F": mlp,
        "Q": n_heads * head, "K": n_kv * head, "D": head, "P": GPT2_POSITIONS,
    }  # fmt: skip


def _head_size(header: GgufHeader, arch: str, *, width: int, n_heads: int) -> int:
    if arch == "qwen3":
        size = _positive(header, f"{arch}.attention.key_length", default=QWEN3_HEAD_SIZE)
        if size != QWEN3_HEAD_SIZE:
            raise BadInput(
                f"{header.path}: {arch}.attention.key_length is {size}, but transformers "
                f"imports qwen3 files only with heads of {QWEN3_HEAD_SIZE}"
            )
        return size
    if arch in ("llama", "mistral") and f"{arch}.rope.dimension_count" in header.fields:
        return _positive(header, f"{arch}.rope.dimension_count")  # transformers' head_dim
    if width % n_heads:
        raise BadInput(
            f"{header.path}: {arch}.embedding_length ({width}) is not a multiple of "
            f"{arch}.attention.head_count ({n_heads})"
        )
    return width // n_heads


def _vocabulary(header: GgufHeader, arch: str) -> int:
    """The vocabulary size: `{arch}.vocab_size` if given, else the number of tokens."""
    tokens = header.fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GgufArray) or tokens.item_type != STRING:
        raise BadInput(f"{header.path}: tokenizer.ggml.tokens (the vocabulary) is missing")
    size = _positive(header, f"{arch}.vocab_size", default=tokens.length)
    if tokens.length > size:
        raise BadInput(
            f"{header.path}: tokenizer.ggml.tokens has {tokens.length:,} tokens but "
            f"{arch}.vocab_size is {size:,}"
        )
    _check_token_ids(header, tokens.length)
    return size


def _check_token_ids(header: GgufHeader, n_tokens: int) -> None:
    """The special tokens (`tokenizer.ggml.*_token_id`) are tokens of the vocabulary."""
    for key, value in header.fields.items():
        special = key.startswith("tokenizer.ggml.") and key.endswith("_token_id")
        if special and (type(value) is not int or not 0 <= value < n_tokens):
            raise BadInput(
                f"{header.path}: {key} is {value!r}, not a token of the {n_tokens:,} in "
                "tokenizer.ggml.tokens"
            )


def _positive(header: GgufHeader, key: str, *, default: int | None = None) -> int:
    """The header's integer `key`, which must be positive (or `default` when absent)."""
    value = header.fields.get(key, default)
    if value is None:
        raise BadInput(f"{header.path}: {key} is missing")
    if type(value) is not int or value <= 0:
        raise BadInput(f"{header.path}: {key} is {value!r}, not a positive whole number")
    return value
