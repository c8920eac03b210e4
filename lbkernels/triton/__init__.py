"""Triton backend: pointer-table multi-tensor kernels (see ``multi_tensor.py``).

``lbkernels.ops`` reaches it through two functions:

- ``get_op(name, device_type)``: the Triton op for ``impl="triton"``, or a RuntimeError
  that says why it cannot run here;
- ``auto_pick(name, device_type)``: the op ``impl="auto"`` prefers on a GPU: the Triton
  op where the shipped table ``auto_pick.json`` (op name -> ``"triton"`` or ``"native"``)
  names Triton, else None (the native CUDA kernel). ``make gpu-proof`` writes such a
  table from its benchmark (the faster of the two per op on that GPU); shipping it is a
  copy into this folder. The shipped table is empty: native everywhere.

Each op is ``lbkernels::triton_<name>``, defined from the op's schema in
``lbkernels._library`` (same arguments, defaults and fake kernel as ``lbkernels::<name>``)
with the launcher of ``OPS`` as its kernel.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter, which
is switched on by ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules
are imported (Triton decides at definition time how a kernel runs).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from .multi_tensor import available, interpreting  # noqa: F401  (the backend's API)

# Op name -> the module of this package whose function of the same name launches its
# kernels. Imported on first use: the kernels must be defined after TRITON_INTERPRET is
# read, and Triton is optional. A new algorithm adds its line here and its own module. An
# overload ("name.out") is launched by the function "name_out".
OPS = {
    "multi_tensor_l2norm": "norms",
    "multi_tensor_l2norm.out": "norms",
    "lars_sgd_": "lars",
    "average_": "average",
    "worker_mean_": "average",
    "mean_sum_squares_": "mean_sum_squares",
    "extrap_sgd_": "extrap_sgd",
    "extrap_adam_": "extrap_adam",
    "lamb_": "lamb",
}

PREFIX = "triton_"

_lib = None  # the torch.library fragment holding the lbkernels::triton_* definitions


def _define_ops() -> None:
    global _lib
    if _lib is not None:
        return
    import torch

    from .. import _library

    launchers = {name: getattr(importlib.import_module(f"{__name__}.{module}"),
                               name.replace(".", "_"))
                 for name, module in OPS.items()}
    lib = torch.library.Library(_library.NAMESPACE, "FRAGMENT")
    _library.define_ops(lib, launchers, prefix=PREFIX)
    _lib = lib


def get_op(name: str, device_type: str) -> Callable:
    """The Triton op ``name`` for tensors on ``device_type``; RuntimeError when unavailable."""
    ok, why = available(device_type)
    if not ok:
        raise RuntimeError(f"impl='triton' cannot run {name} on {device_type}: {why}")
    if name not in OPS:
        raise RuntimeError(f"impl='triton': no Triton kernel for {name}; have {sorted(OPS)}")
    _define_ops()
    from .. import _library

    return _library.op(PREFIX + name)


def read_auto_pick(path: Path) -> dict[str, str]:
    """The table at ``path`` (op name -> "triton" | "native"); {} when absent or empty,
    a ValueError naming the file and the entry when an entry is not one of those."""
    text = path.read_text() if path.exists() else ""
    table = json.loads(text) if text.strip() else {}
    for name, impl in table.items():
        if name not in OPS or impl not in ("triton", "native"):
            raise ValueError(f"{path}: entry {name!r}: {impl!r} must map an op of {sorted(OPS)} "
                             "to 'triton' or 'native'")
    return table


# Read once, at import: resolve() consults it on every op call (and inside compiled steps).
AUTO_PICK = read_auto_pick(Path(__file__).with_name("auto_pick.json"))


def auto_pick(name: str, device_type: str) -> Callable | None:
    """The Triton op ``impl='auto'`` uses for ``name`` on ``device_type``, or None for
    native: Triton only on CUDA, where ``AUTO_PICK`` names it for ``name`` and it can run."""
    if device_type != "cuda" or AUTO_PICK.get(name) != "triton" or not available(device_type)[0]:
        return None
    return get_op(name, device_type)
