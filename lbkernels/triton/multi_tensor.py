"""Host side of the Triton multi-tensor kernels: chunk tables, dtype groups, staging,
block sizes and whether the kernels can run here.

A kernel covers every tensor of one dtype in one launch. It cannot take a variable
number of pointer arguments, so the launcher writes a *table* of raw addresses to the
device, one row per chunk of at most ``CHUNK_SIZE`` elements, and each program casts
its entry back to a typed pointer (``tl.pointer_type``). Sizes and addresses are 64-bit,
so a tensor over 2**31 elements is just more chunks.

Table layout (one int64 device tensor, row-major; ``L`` lists, ``C`` chunks, ``T``
tensors), built by ``chunk_table`` for every kernel::

    rows 0..L-1 (length C):  each list's address at the chunk's first element (0: absent)
    row L       (length C):  element count
    row L + 1   (length C):  tensor slot (position in the group)
    row L + 2   (length C):  index of the chunk's first element within its tensor
    then the caller's per-tensor rows (length T each)

A table only holds addresses and sizes, so one built for the same numbers is valid
whatever tensors now live there: tables are cached by those numbers and rebuilt only
when storage moves (a model's tensors keep their storage from step to step, so steady
state uploads nothing).

This module imports no Triton: ``available`` must answer where Triton is missing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Elements per chunk (one program's share). 65,536 matches the CUDA launcher: large
# enough that a 25M-parameter model is ~400 programs, small enough to fill 132 SMs.
# Tests lower it to put chunk boundaries inside small tensors; tables are keyed by it.
CHUNK_SIZE = 65536

# Elements per loop iteration of a chunk program. On a GPU, 1024 with 4 warps is 8
# elements (two 16-byte fp32 loads) per thread, which saturates bandwidth; the
# interpreter runs one numpy operation per iteration, so there a whole chunk at once.
BLOCK = 1024
BLOCK_INTERPRETED = 65536
# Partials reduced per iteration of a per-tensor program.
RBLOCK = 1024
NUM_WARPS = 4

# Tables kept per process. A table costs 8 bytes per row entry (e.g. 48 per chunk and
# 40 per tensor for LARS); 64 entries cover every (optimizer group, dtype) of a large
# training job.
_CACHE_ENTRIES = 64
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_interpreted() -> bool | None:
    """Whether the already-imported kernels run interpreted; None when not imported yet.
    Every kernel module imports ``math``, so its ``div`` tells how all were defined."""
    module = sys.modules.get(__name__.rpartition(".")[0] + ".math")
    if module is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module.div, InterpretedFunction)


def available(device_type: str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device_type`` here, and if not, why."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install: report it rather than fail the caller
        return False, f"triton failed to import: {e}"
    compiled_as = _kernels_interpreted()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        if interpreting() or compiled_as:
            return False, ("TRITON_INTERPRET=1 runs kernels on the CPU; the chunk tables hold "
                           "device addresses the interpreter cannot read")
        return True, ""
    if device_type == "cpu":
        if not interpreting():
            return False, ("Triton runs on CPU tensors only under its interpreter: set "
                           "TRITON_INTERPRET=1 before importing lbkernels.triton")
        if compiled_as is False:
            return False, ("the Triton kernels were imported before TRITON_INTERPRET=1 was "
                           "set; set it before the first import")
        return True, ""
    return False, f"Triton kernels run on cuda (or cpu when interpreted), not {device_type}"


def check_runnable(device: torch.device) -> None:
    """RuntimeError, with the reason, when the kernels cannot run on ``device``."""
    ok, why = available(device.type)
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run on {device.type} tensors here: {why}")


def block(longest: int, chunked: bool = True) -> int:
    """Elements per loop iteration for a launch whose longest run is ``longest``: the
    usual block, or the power of two at or above ``longest`` when that is smaller, so
    that a group of small tensors does not pay for masked-off lanes (the interpreter's
    65,536-element block over a 300-element tensor is 200x the work). Runs that are not
    chunks (filters) ignore the chunk size, so that sums taken in blocks of this size
    do not depend on it."""
    limit = BLOCK_INTERPRETED if interpreting() else BLOCK
    if chunked:
        longest = min(longest, max(1, int(CHUNK_SIZE)))
    return max(16, min(limit, 1 << (max(1, longest) - 1).bit_length()))


def upload(key: tuple, build: Callable[[], list[int]], device: torch.device) -> torch.Tensor:
    """The int64 table ``build()`` (a flat list) on ``device``, cached under ``key``."""
    data = _cache.get(key)
    if data is not None:
        _cache.move_to_end(key)
        return data
    host = torch.tensor(build(), dtype=torch.int64)
    # Pinned + non_blocking: the upload is queued on the stream, no host sync.
    data = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _cache[key] = data
    if len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return data


@dataclass
class Table:
    data: torch.Tensor  # int64 device tensor, layout in the module docstring
    n_chunks: int
    n_tensors: int


def chunk_table(addresses: list[tuple[int, ...]], numels: list[int],
                element_sizes: tuple[int, ...], tensor_rows: list[list[int]],
                device: torch.device) -> Table:
    """The chunk table of one group (layout in the module docstring), cached.

    ``addresses[k]`` holds tensor k's address in each list (0: absent) and
    ``element_sizes`` each list's element size (an average and its param differ).
    """
    chunk = int(CHUNK_SIZE)
    if chunk <= 0:
        raise ValueError(f"CHUNK_SIZE must be positive, got {chunk}")
    n_chunks = sum(-(-n // chunk) for n in numels)

    def build():
        n_lists = len(element_sizes)
        rows = [[] for _ in range(n_lists + 3)]
        for k, (addr, numel) in enumerate(zip(addresses, numels)):
            for begin in range(0, numel, chunk):
                for d, (a, size) in enumerate(zip(addr, element_sizes)):
                    rows[d].append(a + begin * size if a else 0)
                rows[n_lists].append(min(chunk, numel - begin))
                rows[n_lists + 1].append(k)
                rows[n_lists + 2].append(begin)
        return [v for row in rows + tensor_rows for v in row]

    key = (device, chunk, element_sizes, tuple(addresses), tuple(numels),
           tuple(tuple(r) for r in tensor_rows))
    return Table(upload(key, build, device), n_chunks, len(numels))


def chunk_spans(numels: list[int]) -> tuple[list[int], list[int]]:
    """(first chunk, end chunk) of every tensor in a table of ``numels``: per-tensor
    rows for kernels that reduce a tensor's chunks in one program."""
    chunk = int(CHUNK_SIZE)
    first, end, n = [], [], 0
    for numel in numels:
        first.append(n)
        n += -(-numel // chunk)
        end.append(n)
    return first, end


def group_by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of ``tensors`` per dtype, in first-seen order: one launch per dtype."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def dense(x: torch.Tensor) -> bool:
    """True when x's elements fill ``numel`` consecutive slots from its address, in any
    dimension order (contiguous, channels_last, transposed...): walkable as flat memory."""
    if x.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Staging:
    """Views the kernels can walk, with copy-back of temporaries.

    A kernel walks ``numel`` elements from a tensor's address in lock step for w, g and
    buf, which is right when w is dense (no gaps or overlaps) and g and buf have w's
    strides. Anything else is copied into a temporary in w's layout (or contiguous when
    w itself is not dense) and, for written tensors, copied back by ``write_back``.
    Parameters and their gradients normally share strides: the common path copies nothing.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        # Temporaries are referenced only by address in the table: keep them alive
        # until the kernels that read them are queued (the allocator is stream-ordered).
        self._keep: list[torch.Tensor] = []

    def lead(self, w: torch.Tensor, written: bool, contiguous: bool = False) -> torch.Tensor:
        """w itself when the kernel can walk it: dense, or row-major when ``contiguous``
        (kernels that index by row-major position, e.g. element-keyed random numbers)."""
        if w.is_contiguous() if contiguous else dense(w):
            return w
        return self.stage(w, w.contiguous(), written)

    def follow(self, x: torch.Tensor, lead: torch.Tensor, written: bool) -> torch.Tensor:
        """x itself when it has ``lead``'s layout, else a temporary in that layout (and
        x's dtype, which may differ: an fp32 average of an fp16 param)."""
        if dense(x) and x.stride() == lead.stride():
            return x
        return self.stage(x, torch.empty_like(lead, dtype=x.dtype).copy_(x), written)

    def stage(self, orig: torch.Tensor, tmp: torch.Tensor, written: bool) -> torch.Tensor:
        """``tmp`` in place of ``orig``, kept alive, copied back when ``written``."""
        self._keep.append(tmp)
        if written:
            self._pending.append((orig, tmp))
        return tmp

    def write_back(self) -> None:
        for orig, tmp in self._pending:
            orig.copy_(tmp)
        self._pending.clear()
        self._keep.clear()


def bump_versions(tensors: list[torch.Tensor]) -> None:
    """Counts a launch's writes (through raw addresses, which autograd does not see) as
    in-place changes of ``tensors``, once per call, as torch's in-place ops and the
    native ops do: a key taken before the call (lars_sgd_'s w_norm_key) no longer
    matches. Inference tensors have no counter (skipped)."""
    torch.autograd.graph.increment_version(tensors)


def scalars_on(device: torch.device, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    """One-element tensor arguments (or None), on ``device`` (a no-op when already there)."""
    return [None if t is None else t.to(device) for t in ts]


def pointer(t: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a valid stand-in for a pointer argument its constexpr flag keeps unread."""
    return fallback if t is None else t
