"""lbkernels: fused kernels and optimizers for large-batch training.

Importing the package defines every ``torch.ops.lbkernels`` op (the pure-PyTorch
reference is the default kernel) and then loads the compiled library, whose C++/CUDA
kernels take over for their devices. A missing library is not an error: the reference
kernels serve every op, and ``impl="native"`` says what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

# The oldest torch the package is tested with (2.11, on the GPU machine; 2.13 on CPU).
MIN_TORCH = (2, 11)
if tuple(int(x) for x in torch.__version__.split(".")[:2]) < MIN_TORCH:
    raise ImportError(f"lbkernels needs torch >= {'.'.join(map(str, MIN_TORCH))}, "
                      f"found {torch.__version__}")

from . import _library  # noqa: F401  (defines the ops before the compiled kernels register)

__version__ = "0.1.0"


def _load_compiled() -> tuple[str | None, bool]:
    """Import the compiled kernels. Returns why they are unavailable (None when loaded)
    and whether that is a fault worth a warning (a built library that fails to load)."""
    if os.environ.get("LBK_DISABLE_NATIVE") == "1":
        return "disabled by LBK_DISABLE_NATIVE=1", False
    if importlib.util.find_spec(__name__ + "._C") is None:
        return "the C++ extension is not built (a pure-Python install, LBK_SKIP_CPP=1)", False
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return f"the C++ extension failed to load: {e}", True
    return None, False


native_unavailable_reason, _faulty = _load_compiled()
_library.read_native_kernels()
_library.define_held_ops()
if _faulty:
    warnings.warn(
        f"lbkernels: {native_unavailable_reason}; the pure-PyTorch reference kernels are used.",
        RuntimeWarning,
        stacklevel=2,
    )

from . import ops  # noqa: E402
from . import optim  # noqa: E402

__all__ = ["ops", "optim", "native_unavailable_reason", "__version__"]
