"""Triton backend (pointer-table multi-tensor kernels).

Only the selection seam exists so far: ``get_op`` raises a clear error and ``auto_pick``
never selects Triton until the kernels are built.
"""

from __future__ import annotations

from collections.abc import Callable


def get_op(name: str, device_type: str) -> Callable:
    raise RuntimeError(
        f"impl='triton': the Triton backend for {name} is not available in this build; "
        "use impl='auto', 'native' or 'reference'."
    )


def available(device_type: str) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device_type`` here, and if not, why."""
    return False, "the Triton backend is not built yet"


def auto_pick(name: str, device_type: str) -> Callable | None:
    """The Triton op ``impl='auto'`` should use on ``device_type``, or None for native."""
    return None
