"""Triton backend: pointer-table multi-tensor kernels (see ``multi_tensor.py``).

``lbkernels.ops`` reaches it through two functions:

- ``get_op(name, device_type)``: the Triton op for ``impl="triton"``, or a RuntimeError
  that says why it cannot run here;
- ``auto_pick(name, device_type)``: the op ``impl="auto"`` prefers on a GPU. It returns
  None (the native CUDA kernel) for every op: the Triton kernels take over only once a
  GPU benchmark shows them faster than the CUDA ones.

Each op is ``lbkernels::triton_<name>``, defined from the op's schema in
``lbkernels._library`` (same arguments, defaults and fake kernel as ``lbkernels::<name>``)
with the launcher of ``OPS`` as its kernel.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter, which
is switched on by ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules
are imported (Triton decides at definition time how a kernel runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from .multi_tensor import available, interpreting  # noqa: F401  (the backend's API)

# Op name -> the module of this package whose function of the same name launches its
# kernels. Imported on first use: the kernels must be defined after TRITON_INTERPRET is
# read, and Triton is optional. A new algorithm adds its line here and its own module.
OPS = {
    "multi_tensor_l2norm": "norms",
    "lars_sgd_": "lars",
    "average_": "average",
    "worker_mean_": "average",
    "extrap_sgd_": "extrap_sgd",
    "extrap_adam_": "extrap_adam",
}

PREFIX = "triton_"

_lib = None  # the torch.library fragment holding the lbkernels::triton_* definitions


def _define_ops() -> None:
    global _lib
    if _lib is not None:
        return
    import torch

    from .. import _library

    launchers = {name: getattr(importlib.import_module(f"{__name__}.{module}"), name)
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
    import torch

    return getattr(torch.ops.lbkernels, PREFIX + name)


def auto_pick(name: str, device_type: str) -> Callable | None:
    """The Triton op ``impl='auto'`` should use on ``device_type``, or None for native.

    None everywhere until a GPU benchmark shows a Triton kernel beating the CUDA one.
    """
    return None
