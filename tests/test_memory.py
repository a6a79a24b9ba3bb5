"""Freed memory goes back to the system: the C heap's retained pages are the difference between
what a run holds and what its process is charged for (glibc only; skipped elsewhere). Each case
runs in a fresh interpreter, whose heap holds no free blocks from other tests."""

import json
import subprocess
import sys

import pytest

from workbench import memory

pytestmark = pytest.mark.skipif(memory._glibc() is None, reason="the C library is not glibc")

MB = 1 << 20
PRELUDE = """
import json, torch
from workbench import memory, profiling
def blocks(n):
    return [torch.ones(1 << 20) for _ in range(n)]  # 4 MB each, every page written
"""


def _fresh(code: str) -> dict[str, int]:
    script = PRELUDE + code
    if "contextlib" in code:
        script = "import contextlib\n" + script
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_release_gives_back_freed_heap_pages():
    found = _fresh("""
with memory.mapped_large_allocations():
    pass  # leaves glibc's threshold at 32 MB: blocks of 4 MB come from the heap
held = blocks(64)
top = torch.ones(1 << 20)  # allocated after them, so the heap's top stays in use
del held
retained = profiling.rss()
memory.release()
print(json.dumps({"retained": retained, "released": profiling.rss()}))
""")
    assert found["retained"] - found["released"] > 200 * MB, found


LOADING = """
warm = torch.ones(4 << 20)  # 16 MB, mapped; freeing it raises glibc's adaptive threshold to 16 MB
del warm
with {context}:
    held = blocks(64)
    top = torch.ones(1 << 20)
    holding = profiling.rss()
    del held
    freed = profiling.rss()
print(json.dumps({{"holding": holding, "freed": freed}}))
"""


def test_large_allocations_are_given_back_on_free_while_loading():
    mapped = _fresh(LOADING.format(context="memory.mapped_large_allocations()"))
    assert mapped["holding"] - mapped["freed"] > 200 * MB, mapped
    # the control: glibc's own adaptive threshold keeps the same blocks once it has risen
    adaptive = _fresh(LOADING.format(context="contextlib.nullcontext()"))
    assert adaptive["holding"] - adaptive["freed"] < 50 * MB, adaptive


FREEZING = """
import gc, json
from workbench import memory

class Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it

def load():
    return [Node() for _ in range(100)]

before = gc.get_freeze_count()
with memory.loading_frozen():
    collecting = gc.isenabled()
    loaded = load()
frozen = gc.get_freeze_count() - before
del loaded
kept = gc.collect()  # the frozen cycles are not collected
memory.thaw()
freed = gc.collect()  # now they are
try:
    with memory.loading_frozen():
        raise RuntimeError("a failed load")
except RuntimeError:
    pass
print(json.dumps({"collecting": collecting, "frozen": frozen, "kept": kept, "freed": freed,
                  "after_failure": gc.get_freeze_count(), "enabled": gc.isenabled()}))
"""


def test_a_loaded_checkpoint_is_left_out_of_collections_until_thawed():
    """While a checkpoint loads the collector is off; its objects are then frozen (a cycle
    made by the load survives a collection) until `thaw`, after which the collector frees it;
    a load that fails freezes nothing and the collector is back on."""
    out = json.loads(
        subprocess.run([sys.executable, "-c", FREEZING], capture_output=True, text=True,
                       check=True).stdout
    )  # fmt: skip
    assert out["collecting"] is False and out["enabled"] is True
    assert out["frozen"] >= 100
    assert out["kept"] == 0 and out["freed"] >= 100
    assert out["after_failure"] == 0


SCRATCH = """
from workbench.memory import Scratch
before = profiling.rss()
scratch = Scratch(at_least=64 << 20)  # 256 MB of float32 at the least
small = scratch.take("buffer", (1 << 20,), torch.float32, "cpu")
small.fill_(1.0)  # 4 MB written
taken = profiling.rss()
large = scratch.take("buffer", (16 << 20,), torch.float32, "cpu")  # 64 MB: the same buffer
same = large.data_ptr() == small.data_ptr()
plain = Scratch()
first = plain.take("buffer", (1 << 20,), torch.float32, "cpu").data_ptr()
grown = plain.take("buffer", (16 << 20,), torch.float32, "cpu").data_ptr()
print(json.dumps({"charged": taken - before, "same": same, "plain_same": first == grown}))
"""


def test_a_scratch_allowance_is_one_buffer_charged_only_for_pages_written():
    """A buffer made with room for the largest turn serves a larger request in place; the
    allowance costs resident memory only where it is written."""
    found = _fresh(SCRATCH)
    assert found["same"], found
    assert not found["plain_same"], found  # the control: without it the buffer is made anew
    assert found["charged"] < 64 * MB, found  # 4 MB written of 256 MB allowed
