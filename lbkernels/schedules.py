"""Learning-rate and batch-size schedules for large-batch training.

So far: the linear scaling rule with gradual warm-up (Goyal et al. 2017), used by the
large-batch SGD and LARS recipes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def linear_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int = 256) -> float:
    """The linear scaling rule: ``base_lr * batch_size / base_batch_size``."""
    if base_lr < 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr}")
    if batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch_size and base_batch_size must be > 0, got {batch_size}, {base_batch_size}")
    return base_lr * batch_size / base_batch_size


def warmup_multistep(
    warmup_steps: int,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    warmup_start: float = 0.0,
) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at update ``step`` (for ``LambdaLR``).

    Linear warm-up from ``warmup_start`` to 1 over ``warmup_steps`` updates (Goyal et
    al.: ramp to ``k * lr`` over the first epochs), then ``gamma`` at every milestone
    (in updates) passed.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_start <= 1.0:
        raise ValueError(f"warmup_start must be in [0, 1], got {warmup_start}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing, got {list(milestones)}")
    ms = list(milestones)

    def factor(step: int) -> float:
        decay = gamma ** sum(step >= m for m in ms)
        if step < warmup_steps:
            return decay * (warmup_start + (1.0 - warmup_start) * step / warmup_steps)
        return decay

    return factor
