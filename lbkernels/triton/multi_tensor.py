"""Host side of the Triton multi-tensor kernels: chunk tables, dtype groups, staging.

A kernel covers every tensor of one dtype in one launch. It cannot take a variable
number of pointer arguments, so the launcher writes a *table* of raw addresses to the
device, one row per chunk of at most ``CHUNK_SIZE`` elements, and each program casts
its entry back to a typed pointer (``tl.pointer_type``). Sizes and addresses are 64-bit,
so a tensor over 2**31 elements is just more chunks.

Table layout (one int64 device tensor, row-major, ``C`` chunks and ``T`` tensors)::

    rows 0..4 (length C):  w address, g address, buf address, element count, tensor
    rows 5..9 (length T):  first chunk, end chunk, step address, excluded, output index

Addresses already point at the chunk's first element. A table only holds addresses and
sizes, so one built for the same addresses is valid whatever tensors now live there:
tables are cached by those numbers and rebuilt only when storage moves (a model's
tensors keep their storage from step to step, so steady state uploads nothing).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

# Elements per chunk (one program's share). 65,536 matches the CUDA launcher: large
# enough that a 25M-parameter model is ~400 programs, small enough to fill 132 SMs.
# Tests lower it to put chunk boundaries inside small tensors; tables are keyed by it.
CHUNK_SIZE = 65536

CHUNK_ROWS = 5
TENSOR_ROWS = 5

# Tables kept per process. A table costs 40 bytes per chunk plus 40 per tensor; 64
# entries cover every (optimizer group, dtype) of a large training job.
_CACHE_ENTRIES = 64
_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (read at kernel definition)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class Entry:
    """One tensor of a group: addresses of (w, g, buf, step) and where its norm goes."""

    w: int
    g: int
    buf: int
    step: int
    numel: int
    excluded: bool
    out_index: int


@dataclass
class Table:
    data: torch.Tensor  # int64 device tensor, layout in the module docstring
    n_chunks: int
    n_tensors: int


def table(entries: list[Entry], element_size: int, device: torch.device) -> Table:
    """The chunk table of ``entries`` on ``device``, from the cache when possible."""
    chunk = int(CHUNK_SIZE)
    if chunk <= 0:
        raise ValueError(f"CHUNK_SIZE must be positive, got {chunk}")
    key = (device, chunk, element_size,
           tuple((e.w, e.g, e.buf, e.step, e.numel, e.excluded, e.out_index) for e in entries))
    n_chunks = sum(-(-e.numel // chunk) for e in entries)
    data = _cache.get(key)
    if data is not None:
        _cache.move_to_end(key)
        return Table(data, n_chunks, len(entries))

    rows = [[] for _ in range(CHUNK_ROWS)]
    first, end = [], []
    for k, e in enumerate(entries):
        first.append(len(rows[0]))
        for begin in range(0, e.numel, chunk):
            offset = begin * element_size
            rows[0].append(e.w + offset)
            rows[1].append(e.g + offset if e.g else 0)
            rows[2].append(e.buf + offset if e.buf else 0)
            rows[3].append(min(chunk, e.numel - begin))
            rows[4].append(k)
        end.append(len(rows[0]))
    rows += [first, end, [e.step for e in entries], [int(e.excluded) for e in entries],
             [e.out_index for e in entries]]
    host = torch.tensor([v for row in rows for v in row], dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: the upload is queued on the stream, no host sync.
        data = host.pin_memory().to(device, non_blocking=True)
    else:
        data = host.to(device)
    _cache[key] = data
    if len(_cache) > _CACHE_ENTRIES:
        _cache.popitem(last=False)
    return Table(data, n_chunks, len(entries))


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
        return self._stage(w, w.contiguous(), written)

    def follow(self, x: torch.Tensor, lead: torch.Tensor, written: bool) -> torch.Tensor:
        if dense(x) and x.stride() == lead.stride():
            return x
        return self._stage(x, torch.empty_like(lead).copy_(x), written)

    def _stage(self, orig: torch.Tensor, tmp: torch.Tensor, written: bool) -> torch.Tensor:
        self._keep.append(tmp)
        if written:
            self._pending.append((orig, tmp))
        return tmp

    def write_back(self) -> None:
        for orig, tmp in self._pending:
            orig.copy_(tmp)
        self._pending.clear()
        self._keep.clear()


def scalar_on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A one-element tensor argument, on ``device`` (a no-op when already there)."""
    return None if t is None else t.to(device)
