"""The hook through which an optimizer's fused step also updates a WeightAverager.

``WeightAverager(..., fused_with=optimizer)`` sets ``optimizer._fused_averager``; the
optimizer's ``_step_bucket`` adds :func:`folded_average_arguments` to its
``lbkernels.ops.lars_sgd_`` or ``lamb_`` call (both take the same averaging arguments),
so that the pass that writes the weights also averages them (docs/algorithms.md section 4).
"""

from __future__ import annotations

from typing import Any


def folded_average_arguments(optimizer: Any, group: dict, bucket: Any) -> dict:
    """The averaging keyword arguments of ``lars_sgd_`` / ``lamb_`` for one bucket ({}
    when none)."""
    averager = getattr(optimizer, "_fused_averager", None)
    if averager is None:
        return {}
    return averager._step_arguments(group, bucket)
