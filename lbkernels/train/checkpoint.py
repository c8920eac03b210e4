"""Checkpoints: written atomically, loaded with ``torch.load(weights_only=True)``, checked
against a content checksum.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects),
so loading one never runs code from the file. The random generators' states are stored
as tensors for the same reason.

The dict carries the SHA-256 of its own content (key ``sha256``: every tensor's dtype,
shape and bytes, every key and value), inside the one file that is renamed into place,
so the checksum and the content it covers are always written together. torch's zip
reader does not check the archive's CRCs: without the checksum a flipped bit in tensor
data would load as a silently different run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


CHECKSUM_KEY = "sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or damaged (the message is one line)."""


class OwnCheckpointError(CheckpointError):
    """This process's own checkpoint (``checkpoint.rank<R>.pt``, a shard file) is missing,
    damaged or out of step: an error the other processes may not share."""


def content_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content, the same before saving and after loading.

    Tensors count by dtype, shape and bytes (a non-contiguous tensor as its elements in
    order); containers by kind, length and items; scalars by type and exact value (a
    float by its hex form), so that a changed key, value or tensor byte changes it.
    """
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())  # raw bytes of any dtype (bool, bf16 too)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (str, bytes)):
        data = obj.encode() if isinstance(obj, str) else obj
        h.update(f"{'S' if isinstance(obj, str) else 'B'}{len(data)}:".encode())
        h.update(data)
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    else:  # None, bool, int, torch.dtype, ...: their type and repr are exact
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def save(path: str | os.PathLike, state: dict[str, Any]) -> str:
    """Write ``state`` to ``path`` so that ``path`` always holds a whole checkpoint;
    returns its content digest (:func:`content_digest`).

    The bytes go to a temporary file in the same directory, are flushed to disk, and
    the file then replaces ``path`` in one rename: a process killed at any moment
    leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    if CHECKSUM_KEY in state:
        raise ValueError(f"state: the key {CHECKSUM_KEY!r} is the checkpoint's own checksum")
    digest = content_digest(state)
    state = {**state, CHECKSUM_KEY: digest}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself lives in the directory: make it durable too.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The state :func:`save` wrote to ``path``, its checksum verified (and removed).

    Raises CheckpointError, with one line and the file left as it is, when the file is
    missing, unreadable, not a checkpoint of this command, or damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (a run writes checkpoint.pt "
                              "into its --out-dir)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports truncation and foreign objects in many ways
        raise CheckpointError(f"{path}: {_unreadable(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of this command (it holds a "
                              f"{type(state).__name__}, not a dict)")
    state = dict(state)
    saved = state.pop(CHECKSUM_KEY, None)
    if not isinstance(saved, str):
        raise CheckpointError(f"{path}: no content checksum: not a checkpoint written by this "
                              "command (or one changed by hand); it is not used")
    if content_digest(state) != saved:
        raise CheckpointError(f"{path}: damaged checkpoint: its content no longer matches the "
                              "checksum written with it (bytes changed on disk or in transit); "
                              "the file is kept as it is")
    return state


def _unreadable(e: Exception) -> str:
    """torch's error in one line, without its advice to load untrusted files unsafely."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        if "Unsupported global:" in text:
            detail = text.strip().splitlines()[0].split(" was not ")[0]
            return (f"not a checkpoint of this command: it holds Python objects a checkpoint "
                    f"never holds ({detail}); they are not loaded, as loading them could run code")
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(".") if text.strip() else ""
    return f"unreadable checkpoint ({first or type(e).__name__}: the file is truncated or damaged)"


def rng_state(device: torch.device) -> dict[str, Any]:
    """The state of every global random generator this process uses."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
