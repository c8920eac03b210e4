"""lbkernels: fused kernels and optimizers for large-batch training.

Importing the package defines every ``torch.ops.lbkernels`` op (the pure-PyTorch
reference is the default kernel) and then loads the compiled library, whose C++/CUDA
kernels take over for their devices. A missing library is not an error: the reference
kernels serve every op, and ``impl="native"`` says what is missing.
"""

from __future__ import annotations

import os
import warnings

from . import _library  # noqa: F401  (defines the ops before the compiled kernels register)

__version__ = "0.1.0"


def _load_compiled() -> str | None:
    """Import the compiled kernels; returns why they are unavailable, or None."""
    if os.environ.get("LBK_DISABLE_NATIVE") == "1":
        return "disabled by LBK_DISABLE_NATIVE=1"
    try:
        from . import _C  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


native_unavailable_reason = _load_compiled()
if native_unavailable_reason is not None and os.environ.get("LBK_SKIP_CPP") != "1":
    warnings.warn(
        "lbkernels: compiled kernels not loaded (" + native_unavailable_reason + "); "
        "the pure-PyTorch reference kernels are used.",
        RuntimeWarning,
        stacklevel=2,
    )

from . import ops  # noqa: E402
from . import optim  # noqa: E402

__all__ = ["ops", "optim", "native_unavailable_reason", "__version__"]
