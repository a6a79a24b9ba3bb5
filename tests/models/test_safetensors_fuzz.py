"""Broken safetensors files, made by the hundred from a valid zoo checkpoint's weights with fixed
seeds: truncations, flipped bytes in the header length and in the JSON, and headers that are
valid JSON of the wrong shape. Each one either passes the check `workbench watch` runs on a
checkpoint's weights (`weights_incomplete`: whole, or still being written) or is a `BadInput`
sentence naming the file; never another exception. The check agrees with the safetensors
library itself: what it passes as whole loads, what it rejects does not."""

import json
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from workbench.errors import BadInput
from workbench.models.zoo_format import check_whole, load_zoo_weights
from workbench.watch import weights_incomplete

Variant = tuple[str, bytes]


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: object, body: bytes, *, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _truncations(data: bytes, rng: random.Random) -> Iterator[Variant]:
    (length,) = struct.unpack("<Q", data[:8])
    cuts = {0, 1, 7, 8, 9, 8 + length // 2, 8 + length - 1, 8 + length, len(data) - 1}
    cuts |= {rng.randrange(len(data)) for _ in range(40)}
    for cut in sorted(cuts):
        yield f"truncated at {cut}", data[:cut]


def _flips(data: bytes, rng: random.Random, start: int, stop: int, n: int) -> Iterator[Variant]:
    for _ in range(n):
        at = rng.randrange(start, stop)
        value = rng.choice([rng.randrange(256), data[at] ^ (1 << rng.randrange(8))])
        yield f"byte {at} -> {value}", data[:at] + bytes([value]) + data[at + 1 :]


def _tensor_edits(header: dict, rng: random.Random, n: int) -> Iterator[tuple[str, dict]]:
    """One field of one random tensor replaced by a wrong value, `n` times."""
    names = [k for k in header if k != "__metadata__"]
    wrong: dict[str, list] = {
        "dtype": ["F33", "f32", 32, None, "", ["F32"], "I4"],
        "shape": [[-1], [1.5], "4", None, [True], [2**70], [[2]], [3, 3, 3], []],
        "data_offsets": [
            ["0", "4"], [4, 0], [-4, 0], [0], [0, 4, 8], None, [0.0, 4.0], [2**63, 2**63 + 4],
            [2**64, 2**64 + 4], [0, 2**40], [1, 5], [True, 5], "0-4",
        ],
    }  # fmt: skip
    for _ in range(n):
        name, field = rng.choice(names), rng.choice(sorted(wrong))
        value = rng.choice(wrong[field])
        edited = json.loads(json.dumps(header))
        edited[name][field] = value
        yield f"{name}.{field} = {value!r}", edited


def _wrong_shapes(header: dict) -> Iterator[tuple[str, object]]:
    """Headers that are valid JSON but not a safetensors header."""
    first, second = [k for k in header if k != "__metadata__"][:2]
    for value in ([], {"x": 1}, "weights", 42, None, True, [header]):
        yield f"header {json.dumps(value)[:20]}", value
    yield "a tensor that is a list", header | {first: [1, 2]}
    yield (
        "a tensor without data_offsets",
        header | {first: {k: v for k, v in header[first].items() if k != "data_offsets"}},
    )
    yield "metadata a list", header | {"__metadata__": ["format", "pt"]}
    yield "metadata with a number", header | {"__metadata__": {"format": 1}}
    yield "metadata null", header | {"__metadata__": None}
    yield "overlapping ranges", header | {second: header[second] | {"data_offsets": [0, 4]}}
    yield "a tensor removed (a gap)", {k: v for k, v in header.items() if k != first}
    yield (
        "a tensor too many",
        header | {"extra": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    )
    yield "huge offsets", header | {
        first: header[first] | {"data_offsets": [2**62, 2**62 + 4]}
    }  # fmt: skip


def variants(data: bytes) -> Iterator[Variant]:
    """A few hundred broken (and a few intact) versions of one safetensors file."""
    rng = random.Random(20240601)
    header, body = _split(data)
    (length,) = struct.unpack("<Q", data[:8])
    yield "intact", data
    yield from _truncations(data, rng)
    yield from _flips(data, rng, 0, 8, 40)  # the header length
    yield from _flips(data, rng, 8, 8 + length, 120)  # the JSON header
    yield from _flips(data, rng, 8 + length, len(data), 10)  # tensor bytes: still a valid file
    for what, edited in _tensor_edits(header, random.Random(7), 80):
        yield what, _join(edited, body)
    for what, value in _wrong_shapes(header):
        yield what, _join(value, body)
    yield "header length larger than the file", _join(header, body, length=len(data) * 3)
    yield "header length over the format's limit", _join(header, body, length=2**40)
    yield "header length 2**64-1", b"\xff" * 8 + data[8:]
    yield "bytes after the last tensor", data + b"\0" * 16
    yield "header not UTF-8", data[:8] + b"\xff\xfe" + data[10:]
    deep = b"[" * 100_000 + b"]" * 100_000
    yield "header nested deeply", struct.pack("<Q", len(deep)) + deep
    digits = b'{"x": ' + b"9" * 5000 + b"}"
    yield "an integer of 5,000 digits", struct.pack("<Q", len(digits)) + digits
    yield "empty header, no tensors", _join({}, b"")


@pytest.fixture(scope="module")
def weights(induction_dir: Path) -> bytes:
    return (sorted(induction_dir.glob("step_*"))[0] / "model.safetensors").read_bytes()


def _outcome(check: Callable[[], object]) -> str:
    try:
        result = check()
    except BadInput as err:
        return f"bad: {err}"
    return "whole" if result is None else f"incomplete: {result}"


def _load(checkpoint: Path) -> None:
    load_zoo_weights(checkpoint)


def test_every_broken_file_passes_the_check_or_is_bad_input(tmp_path, weights):
    """Through the watcher's check, then the loader: a result or a BadInput naming the file,
    never AttributeError, TypeError, KeyError or anything else."""
    checkpoint = tmp_path / "step_1"
    checkpoint.mkdir()
    file = checkpoint / "model.safetensors"
    seen: dict[str, int] = {}
    cases = list(variants(weights))
    assert len(cases) > 300
    for what, data in cases:
        file.write_bytes(data)
        outcome = _outcome(lambda: weights_incomplete(checkpoint))
        kind = outcome.split(":")[0]
        seen[kind] = seen.get(kind, 0) + 1
        if kind == "bad":
            assert str(file) in outcome and "\n" not in outcome, (what, outcome)
        loaded = _outcome(lambda: _load(checkpoint))
        if kind == "whole":
            assert loaded == "whole", (what, loaded)
        else:  # a loader is given whole weights or nothing: incomplete is bad too
            assert loaded.startswith(f"bad: {file}: "), (what, loaded)
        if kind == "bad":  # the loader says the same as the watcher
            assert loaded == outcome, (what, loaded, outcome)
    assert seen.keys() == {"whole", "incomplete", "bad"}, seen
    assert seen["bad"] > 150, seen


def test_the_check_agrees_with_the_safetensors_library(tmp_path, weights):
    """What the check passes as whole the safetensors library loads; what it rejects (bad or
    incomplete) the library refuses too: the check is neither laxer nor stricter."""
    file = tmp_path / "model.safetensors"
    for what, data in variants(weights):
        file.write_bytes(data)
        ours = _outcome(lambda: check_whole(file))
        try:
            load_file(str(file))
            theirs = "loads"
        except Exception as err:  # the library's own error types
            theirs = f"refused: {type(err).__name__}: {err}"
        assert (ours == "whole") == (theirs == "loads"), (what, ours, theirs)


@pytest.mark.parametrize(
    ("header", "sentence"),
    [
        ([], "its header is a JSON list, expected an object"),
        ({"x": 1}, "tensor 'x' is a JSON number, expected an object"),
        (
            {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}},
            "tensor 'w': field 'data_offsets' must be two non-negative integers",
        ),
        (
            {"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}},
            "tensor 'w': unknown dtype \"F99\"",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            "tensor 'w': shape [2] of F32 is 8 bytes, its data_offsets span 4",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            "tensor 'b' overlaps 'a'",
        ),
        ({"__metadata__": {"n": 1}}, "its '__metadata__' must map names to strings"),
    ],
)
def test_bad_headers_are_one_sentence_naming_the_file(tmp_path, header, sentence):
    file = tmp_path / "model.safetensors"
    file.write_bytes(_join(header, b"\0" * 4))
    with pytest.raises(BadInput) as caught:
        check_whole(file)
    assert str(caught.value).startswith(f"{file}: not a valid safetensors file (")
    assert sentence in str(caught.value)
