"""Returning freed memory to the operating system, so that a run's resident memory follows what
it holds rather than the most it ever held.

glibc's allocator keeps freed blocks for reuse: after a large temporary is freed (a forward and
backward pass's saved activations, a checkpoint's weights before processing) the process keeps
them resident, and the next phase's allocations, of other sizes, are added on top. Two remedies,
both no-ops where the C library is not glibc:

- `mapped_large_allocations()`: while loading a model, every allocation of 1 MB or more gets
  its own mapping, returned to the system as soon as it is freed (outside the load this costs
  a page fault per page on every reuse, so it ends with the load, leaving the thresholds where
  glibc's adaptive rule takes them: 32 MB for mapping, 64 MB for trimming the heap's top);
- `release()`: `malloc_trim`, giving back every free page, at the end of a phase that freed
  much (an edge attribution's last backward pass, the attribution, a faithfulness curve's
  ablated passes); it takes milliseconds,
  but the pages given back are faulted in again when next used (about 1 s for a GPT-2-small
  attribution's buffers, measured), so it is not called in a loop whose every turn reuses the
  same blocks.

`benchmarks/bench_stored_run.py` shows the peaks with them; docs/benchmarks.md has the figures.

Python's own collector is the other cost of a large heap: a full collection walks every object
the process holds, and with TransformerLens imported and a model loaded that is a few million
(0.2 s a collection on the GPT-2-small shape, measured). `loading_frozen()` holds
collections off while a checkpoint loads and then sets what the load made apart from later
collections, until the checkpoint is done with (`thaw()`).
"""

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers in glibc's malloc.h
LOAD_THRESHOLD = 1 << 20
RUN_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems
RUN_TRIM = 2 * RUN_THRESHOLD  # what glibc's adaptive rule sets beside it


@cache
def _glibc() -> Any:
    """glibc's C library, or None (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def release() -> None:
    """Give every free page of the C heap back to the system (glibc's `malloc_trim(0)`)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def mapped_large_allocations() -> Iterator[None]:
    """Allocations of 1 MB or more mapped on their own (freed straight back) for the block."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, LOAD_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            # fixing one threshold stops glibc adapting both: set them where it would have
            libc.mallopt(M_MMAP_THRESHOLD, RUN_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, RUN_TRIM)
            libc.malloc_trim(0)


@contextmanager
def loading_frozen() -> Iterator[None]:
    """No cyclic collection while the block runs (a checkpoint's load: TransformerLens's import
    and the model's construction make millions of objects and few cycles); if it succeeds,
    every object then alive is left out of later collections (`gc.freeze`), which walk only
    what the work makes afterwards. `thaw()` makes them collectable again once the checkpoint
    is done with. A load that fails freezes nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def thaw() -> None:
    """Undo `loading_frozen`'s freeze: a process that loads checkpoint after checkpoint
    (`watch`) collects each one's cycles once it is done with it."""
    gc.unfreeze()


class Scratch:
    """Buffers a loop reuses from turn to turn, by name. A fresh tensor of tens of megabytes is
    mapped anew by the allocator each time it is made, and the first touch of its pages costs
    about a millisecond per 4 MB here (a fifth of an SAE encoder's matrix product at GPT-2-small
    size, a tenth of an edge attribution): a buffer taken from a `Scratch` is touched once."""

    def __init__(self, at_least: int = 0) -> None:
        """`at_least`: the elements every buffer is made with at the least. A loop whose
        buffers grow from turn to turn (a layer with more mixed heads than the one before)
        would otherwise map each anew, touching its pages again; pages never written are not
        resident, so an allowance for the largest turn costs memory only when that turn
        comes."""
        self._buffers: dict[str, Any] = {}
        self.at_least = at_least

    def take(self, name: str, shape: tuple[int, ...], dtype: Any, device: Any) -> Any:
        """A contiguous `shape` tensor with undefined contents: the buffer `name` when it is
        large enough (what it held before is overwritten by whoever takes it next)."""
        import torch

        n = 1
        for size in shape:
            n *= size
        device = torch.device(device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != device:
            size = max(n, self.at_least)
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:n].view(shape)
