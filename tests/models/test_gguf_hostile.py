"""Hostile GGUF files: headers that claim more than the file holds (arrays of 2^62 bytes,
strings past the end, more tensors than bytes, tensors outside the file, arrays nested 10,000
deep) and headers whose model disagrees with its tensors (layers missing, a layer past
block_count, sizes that do not match). Each is `BadInput` naming the file and the field or
tensor, found fast and in little memory, before anything is written: every import here runs
in a subprocess with a 1 GiB address space and a generous deadline.

The import never deletes what it did not write: an existing `OUT` is refused and left as it
is, and an `OUT.partial` of anyone's is not touched. And a few hundred variants of a valid
file (bytes flipped, overwritten, cut off; fixed seeds) each either import or are `BadInput`,
never another exception or a hang, and never leave `OUT` or a staging directory behind."""

import json
import os
import queue
import random
import resource
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.models import gguf_files
from tests.models.gguf_files import (
    ARRAY,
    STRING,
    UINT8,
    UINT32,
    gguf_array_header,
    gguf_kv,
    gguf_tensor_info,
    hostile_gguf,
    write_llama_gguf,
)
from workbench.cli import cli
from workbench.models import load_checkpoint, resolve_checkpoints
from workbench.models.gguf_check import read_header

ROOT = Path(__file__).resolve().parents[2]
MEMORY = 1 << 30  # bytes of address space for a hostile import (the CLI needs ~0.1 GB of it)
FUZZ_MEMORY = 3 << 30  # for the fuzzing worker, which also loads transformers and imports
DEADLINE = 120.0  # seconds: the import ended rather than hung (it takes about one)
CLI = "from workbench.cli import main; main()"


def _limit_memory(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_import(path: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """`workbench model import PATH --out OUT` in a subprocess with `MEMORY` and `DEADLINE`."""
    return subprocess.run(
        [sys.executable, "-c", CLI, "model", "import", str(path), "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        preexec_fn=_limit_memory(MEMORY),
    )


def assert_bad_input(path: Path, message: str) -> None:
    """Importing `path` exits 2 with one line naming it and containing `message`, and writes
    nothing beside it."""
    out = path.parent / "out"
    before = sorted(os.listdir(path.parent))
    result = run_import(path, out)
    err = result.stderr.strip()
    assert result.returncode == 2, err[-2000:]
    assert err.startswith(f"error: {path}: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert sorted(os.listdir(path.parent)) == before


@pytest.fixture(scope="module")
def tiny_llama():
    return gguf_files.tiny_llama()


def test_an_array_of_2_to_the_62_bytes_in_a_94_byte_file(tmp_path):
    path = hostile_gguf(
        tmp_path / "m.gguf", kvs=(gguf_kv("x", ARRAY, gguf_array_header(UINT8, 2**62)),)
    )
    assert path.stat().st_size == 94
    assert_bad_input(
        path,
        "key 'x' declares an array of 4,611,686,018,427,387,904 UINT8 values (at least "
        "4,611,686,018,427,387,904 bytes) but the file has only 0 left",
    )


def test_a_string_longer_than_the_rest_of_the_file(tmp_path):
    name = gguf_kv("general.name", STRING, struct.pack("<Q", 1000) + b"tiny")
    path = hostile_gguf(tmp_path / "m.gguf", kvs=(name,))
    assert_bad_input(
        path,
        "the value of key 'general.name' at byte 101 needs 1,000 bytes but the file has only "
        "4 left",
    )


def test_more_tensors_than_the_file_could_hold(tmp_path):
    path = hostile_gguf(tmp_path / "m.gguf", tensor_count=2**40, tail=b"\0" * 64)
    assert_bad_input(path, "declares 1 key/value pairs and 1,099,511,627,776 tensors")


@pytest.mark.parametrize(
    ("dims", "offset"),
    [((64, 64), 0), ((4,), 2**40), ((2**32, 2**32), 0)],
    ids=["size past the end", "offset past the end", "size overflowing 64 bits"],
)
def test_a_tensor_whose_bytes_lie_past_the_end(tmp_path, dims, offset):
    tensor = gguf_tensor_info("token_embd.weight", dims, offset=offset)
    table_end = 24 + 45 + len(tensor)  # the header, the architecture key, the tensor table
    # the data section starts at the next multiple of 32, byte 128; 100 bytes of it follow
    path = hostile_gguf(tmp_path / "m.gguf", tensors=(tensor,), tail=b"\0" * (228 - table_end))
    size = 4 * int(np.prod(dims, dtype=object))
    start, end = 128 + offset, 128 + offset + size
    assert_bad_input(
        path,
        f"tensor 'token_embd.weight' needs bytes {start:,} to {end:,} but the file ends at "
        "byte 228",
    )


def test_arrays_nested_ten_thousand_deep(tmp_path):
    nested = gguf_array_header(ARRAY, 1) * 9_999 + gguf_array_header(UINT8, 0)
    path = hostile_gguf(tmp_path / "m.gguf", kvs=(gguf_kv("x", ARRAY, nested),))
    assert_bad_input(path, "key 'x' nests arrays deeper than the limit")


def test_the_nesting_limit_is_a_setting(tmp_path, monkeypatch, capsys):
    nested = gguf_array_header(ARRAY, 1) * 3 + gguf_array_header(UINT8, 0)  # four deep
    path = hostile_gguf(tmp_path / "m.gguf", kvs=(gguf_kv("x", ARRAY, nested),))
    monkeypatch.setenv("WORKBENCH_GGUF_MAX_ARRAY_DEPTH", "4")
    read_header(path)  # four levels are allowed now
    monkeypatch.setenv("WORKBENCH_GGUF_MAX_ARRAY_DEPTH", "3")
    assert cli(["model", "import", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "nests arrays deeper than the limit" in capsys.readouterr().err
    monkeypatch.setenv("WORKBENCH_GGUF_MAX_ARRAY_DEPTH", "deep")
    assert cli(["model", "import", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "WORKBENCH_GGUF_MAX_ARRAY_DEPTH='deep': must be a whole number" in (
        capsys.readouterr().err
    )


def test_an_alignment_that_is_not_a_power_of_two(tmp_path):
    alignment = gguf_kv("general.alignment", UINT32, struct.pack("<I", 48))
    assert_bad_input(
        hostile_gguf(tmp_path / "m.gguf", kvs=(alignment,)),
        "general.alignment is 48, not a power of two",
    )


@pytest.mark.parametrize(
    ("block_count", "missing"), [(4, "blk.2.attn_norm.weight"), (3000, "blk.2.attn_norm.weight"),
                                 (2**32 - 1, "blk.2.attn_norm.weight")]
)  # fmt: skip
def test_block_count_beyond_the_layers_there_are(tmp_path, tiny_llama, block_count, missing):
    path = write_llama_gguf(tiny_llama, tmp_path / "m.gguf", header={"block_count": block_count})
    assert_bad_input(path, f"tensor {missing!r} is missing (block_count is {block_count})")


def test_a_tensor_for_a_layer_past_block_count(tmp_path, tiny_llama):
    extra = {"blk.5.attn_q.weight": np.zeros((64, 64), np.float32)}
    path = write_llama_gguf(tiny_llama, tmp_path / "m.gguf", extra_tensors=extra)
    assert_bad_input(path, "tensor 'blk.5.attn_q.weight' names layer 5 but llama.block_count is 2")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("feed_forward_length", 256, "tensor 'blk.0.ffn_gate.weight' has dimensions [64, 128] "
                                     "but the header's sizes make it [64, 256]"),
        ("head_count_kv", 4, "tensor 'blk.0.attn_k.weight' has dimensions [64, 32] but the "
                             "header's sizes make it [64, 64]"),
        ("vocab_size", 10**9, "tensor 'token_embd.weight' has dimensions [64, 58] but the "
                              "header's sizes make it [64, 1000000000]"),
        ("head_count", 3, "llama.attention.head_count (3) is not a multiple of "
                          "llama.attention.head_count_kv (2)"),
    ],
)  # fmt: skip
def test_sizes_that_disagree_with_the_tensors(tmp_path, tiny_llama, key, value, message):
    path = write_llama_gguf(tiny_llama, tmp_path / "m.gguf", header={key: value})
    assert_bad_input(path, message)


def test_an_existing_out_or_out_partial_is_left_alone(tmp_path, tiny_llama, capsys):
    path = write_llama_gguf(tiny_llama, tmp_path / "m.gguf")
    out, partial = tmp_path / "imported", tmp_path / "imported.partial"
    for directory in (out, partial):
        directory.mkdir()
        (directory / "notes.txt").write_text("mine")
    assert cli(["model", "import", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out}: already exists and is not empty"
    (out / "notes.txt").unlink()  # an empty OUT is used; OUT.partial is not the import's
    assert cli(["model", "import", str(path), "--out", str(out)]) == 0
    assert (partial / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "imported.partial", "m.gguf"]
    assert load_checkpoint(resolve_checkpoints(str(out))[0]).info.architecture == (
        "LlamaForCausalLM"
    )
    (tmp_path / "file").write_text("mine")
    assert cli(["model", "import", str(path), "--out", str(tmp_path / "file")]) == 2
    assert "file: already exists and is not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


# -- fuzzing ------------------------------------------------------------------------------------

# imports each (gguf file, out) pair read from stdin, answering one line "answer <JSON>" per pair
# (anything else a library prints to stdout is ignored)
WORKER = """
import json, sys
from pathlib import Path
from workbench.errors import BadInput
from workbench.models.gguf_import import import_gguf

for line in sys.stdin:
    path, out = json.loads(line)
    try:
        import_gguf(Path(path), Path(out))
        outcome = "imported"
    except BadInput as err:
        outcome = "bad input: " + str(err)
    except Exception as err:
        outcome = "error: " + type(err).__name__ + ": " + str(err)
    print("answer", json.dumps(outcome), flush=True)
"""
Variant = tuple[str, bytes]
INTERESTING = (0, 1, 2**31, 2**31 + 2, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1)


def _variants(data: bytes, header_end: int, seed: int) -> Iterator[Variant]:
    """Truncations, flipped bytes and overwritten 32- and 64-bit numbers, mostly in the
    header (whose counts and sizes are what a reader trusts), a few in the tensors' data."""
    rng = random.Random(seed)
    cuts = {0, 4, 8, 16, 23, 24, header_end - 1, header_end, len(data) - 1}
    cuts |= {rng.randrange(header_end) for _ in range(30)} | {rng.randrange(len(data))}
    for cut in sorted(cuts):
        yield f"truncated at {cut}", data[:cut]
    for n in range(160):
        edited = bytearray(data)
        for _ in range(1 if n < 120 else rng.randint(2, 4)):
            at = rng.randrange(header_end)
            edited[at] = rng.choice([rng.randrange(256), data[at] ^ (1 << rng.randrange(8))])
        yield f"flips {n}", bytes(edited)
    for n in range(110):
        width = "<Q" if n < 70 else "<I"
        at = rng.randrange(header_end - 8)
        value = rng.choice(INTERESTING + (rng.getrandbits(64),)) % 2 ** (8 * struct.calcsize(width))
        edited = data[:at] + struct.pack(width, value) + data[at + struct.calcsize(width) :]
        yield f"{width} {value} at {at}", edited
    for n in range(5):
        at = rng.randrange(header_end, len(data))
        yield f"tensor byte {at} ({n})", data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


class Worker:
    """The fuzzing worker process, asked one variant at a time with a deadline on each."""

    def __init__(self, log: Path):
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=ROOT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            preexec_fn=_limit_memory(FUZZ_MEMORY),
        )
        self.answers: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("answer "):
                self.answers.put(json.loads(line.removeprefix("answer ")))
        self.answers.put(None)  # the worker ended

    def ask(self, path: Path, out: Path) -> str | None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([str(path), str(out)]) + "\n")
        self.proc.stdin.flush()
        try:
            return self.answers.get(timeout=DEADLINE)
        except queue.Empty:
            return None

    def stop(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.mark.heavy
def test_fuzzed_files_import_or_are_bad_input(tmp_path):
    model = gguf_files.tiny_llama(hidden_size=32, intermediate_size=64)
    base = write_llama_gguf(model, tmp_path / "base.gguf")
    data = base.read_bytes()
    header_end = min(t.start for t in read_header(base).tensors.values())
    files, outs = tmp_path / "files", tmp_path / "outs"
    files.mkdir()
    outs.mkdir()
    worker = Worker(tmp_path / "worker.log")
    outcomes: dict[str, int] = {}
    try:
        for index, (name, variant) in enumerate(_variants(data, header_end, seed=3)):
            path, place = files / f"v{index}.gguf", outs / f"v{index}"
            path.write_bytes(variant)
            place.mkdir()
            outcome = worker.ask(path, place / "out")
            if outcome is None:
                log = (tmp_path / "worker.log").read_text()[-3000:]
                pytest.fail(f"{name}: no answer within {DEADLINE} s (hung or died)\n{log}")
            assert outcome == "imported" or outcome.startswith(f"bad input: {path}: "), (
                f"{name}: {outcome}"
            )
            assert "\n" not in outcome, f"{name}: {outcome}"
            left = sorted(os.listdir(place))
            assert left == (["out"] if outcome == "imported" else []), f"{name}: left {left}"
            outcomes[outcome.split(":")[0]] = outcomes.get(outcome.split(":")[0], 0) + 1
            shutil.rmtree(place)
            path.unlink()
    finally:
        worker.stop()
    # the variants reach both ends: some still import, most are refused
    assert outcomes.get("imported", 0) >= 10 and outcomes.get("bad input", 0) >= 100, outcomes
