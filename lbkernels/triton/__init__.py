"""Triton backend: pointer-table multi-tensor kernels (see ``multi_tensor.py``).

``lbkernels.ops`` reaches it through two functions:

- ``get_op(name, device_type)``: the Triton op for ``impl="triton"``, or a RuntimeError
  that says why it cannot run here;
- ``auto_pick(name, device_type)``: the op ``impl="auto"`` prefers on a GPU. It returns
  None (the native CUDA kernel) for every op: the Triton kernels take over only once a
  GPU benchmark shows them faster than the CUDA ones.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter, which
is switched on by ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules
are imported (Triton decides at definition time how a kernel runs).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

from .multi_tensor import interpreting

_KERNEL_MODULE = __name__ + ".lars"


def _kernels_interpreted() -> bool | None:
    """Whether the already-imported kernels run interpreted; None when not imported yet."""
    module = sys.modules.get(_KERNEL_MODULE)
    if module is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module._lars_update, InterpretedFunction)


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
        import torch

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


def get_op(name: str, device_type: str) -> Callable:
    """The Triton op ``name`` for tensors on ``device_type``; RuntimeError when unavailable."""
    ok, why = available(device_type)
    if not ok:
        raise RuntimeError(f"impl='triton' cannot run {name} on {device_type}: {why}")
    from .lars import OPS

    if name not in OPS:
        raise RuntimeError(f"impl='triton': no Triton kernel for {name}; have {sorted(OPS)}")
    return OPS[name]


def auto_pick(name: str, device_type: str) -> Callable | None:
    """The Triton op ``impl='auto'`` should use on ``device_type``, or None for native.

    None everywhere until a GPU benchmark shows a Triton kernel beating the CUDA one.
    """
    return None
