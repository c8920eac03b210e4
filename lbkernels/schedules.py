"""Learning-rate and batch-size schedules for large-batch training.

- The linear scaling rule with gradual warm-up (Goyal et al. 2017), used by the
  large-batch SGD and LARS recipes: :func:`linear_scaled_lr`, :func:`warmup_multistep`.
- Growing the batch instead of decaying the learning rate (Smith, Kindermans, Le 2018):
  the SGD noise scale :func:`noise_scale`, the step schedule :class:`BatchSizeSchedule`
  and the scaling rules :func:`scale_lr_with_batch` (``B ∝ lr``) and
  :func:`scale_batch_with_momentum` (``B ∝ 1/(1 - m)``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from ._validate import check_int


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


# --------------------------------------------------------------------------------------
# Growing the batch instead of decaying the learning rate (Smith, Kindermans, Le 2018)
# --------------------------------------------------------------------------------------


def _positive_float(name: str, value, *, above: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > above):
        raise ValueError(f"{name} must be a finite number > {above:g}, got {value!r}")
    return v


def _check_momentum(name: str, momentum: float) -> float:
    try:
        m = float(momentum)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {momentum!r}") from None
    if not 0.0 <= m < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {momentum!r}")
    return m


def noise_scale(
    lr: float, dataset_size: int, batch_size: int, momentum: float = 0.0, *, exact: bool = True
) -> float:
    r"""The scale of the gradient noise in SGD: ``g = lr / (1 - m) * (N / B - 1)``.

    ``N`` is ``dataset_size``, ``B`` the global ``batch_size``, ``m`` the momentum
    (Smith & Le 2017; Smith, Kindermans, Le 2018, eq. 5). Decaying ``lr`` or growing
    ``B`` by ``alpha`` lowers it by about ``alpha``; ``exact=False`` gives the
    ``B << N`` form ``lr * N / (B * (1 - m))`` in which both fall by exactly ``alpha``
    (the form :class:`BatchSizeSchedule` keeps its promise in). With ``B = N`` the
    gradient is exact and the noise scale is 0.
    """
    try:
        lr = float(lr)
    except (TypeError, ValueError):
        raise ValueError(f"lr must be a number, got {lr!r}") from None
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    n = check_int("dataset_size", dataset_size, 1)
    b = check_int("batch_size", batch_size, 1)
    if b > n:
        raise ValueError(f"batch_size must be <= dataset_size, got {b} > {n}")
    m = _check_momentum("momentum", momentum)
    return lr / (1.0 - m) * (n / b - (1.0 if exact else 0.0))


def scale_lr_with_batch(lr: float, batch_size: int, factor: float) -> tuple[float, int]:
    """Raise the learning rate and the batch together: ``(factor * lr, factor * B)``.

    ``B ∝ lr`` keeps the noise scale ``lr * N / (B * (1 - m))`` while cutting the number
    of updates by ``factor`` (the paper's "increased initial learning rate": 0.1 and 128
    become 0.5 and 640 with ``factor=5``). The batch is rounded to the nearest integer.
    """
    lr = _positive_float("lr", lr)
    b = check_int("batch_size", batch_size, 1)
    factor = _positive_float("factor", factor)
    new_b = round(b * factor)
    if new_b < 1:
        raise ValueError(f"factor {factor} leaves batch_size {b} below 1")
    return lr * factor, new_b


def scale_batch_with_momentum(batch_size: int, momentum: float, new_momentum: float) -> int:
    """The batch that keeps the noise scale when momentum changes: ``B * (1 - m) / (1 - m')``.

    ``B ∝ 1/(1 - m)``: the effective learning rate is ``lr / (1 - m)``. The paper calls
    raising the momentum a last resort (after ``B ∝ lr``): the momentum buffer takes
    about ``B / (N * (1 - m))`` epochs to catch up after every change of the noise scale.
    Example: momentum 0.9 -> 0.98 turns a batch of 640 into 3200. Rounded to the nearest
    integer.
    """
    b = check_int("batch_size", batch_size, 1)
    m = _check_momentum("momentum", momentum)
    m_new = _check_momentum("new_momentum", new_momentum)
    return max(1, round(b * (1.0 - m) / (1.0 - m_new)))


class Phase(NamedTuple):
    """One constant stretch of a :class:`BatchSizeSchedule`: from ``start_epoch`` on,
    train with ``lr`` and global batch ``batch_size``."""

    start_epoch: int
    lr: float
    batch_size: int


_MODES = ("increase_batch", "hybrid", "decay_lr")


class BatchSizeSchedule:
    r"""Step schedule that lowers the noise scale by growing the batch, the learning rate, or both.

    A step schedule that divides the learning rate by ``alpha = factor`` at every
    milestone divides the noise scale ``g ≈ lr * N / (B * (1 - m))`` by ``alpha``.
    Smith, Kindermans and Le (ICLR 2018) get the same curves per epoch, with far fewer
    updates, by multiplying the batch by ``alpha`` instead. At a milestone, with
    ``B_max = max_batch`` (no cap when ``None``; the paper suggests ``B_max ~ N/10``)::

        increase_batch:  B' = min(round(alpha * B), B_max),  lr' = lr * B' / (alpha * B)
        hybrid:          as increase_batch at the first milestone, then
                         B' = B,                            lr' = lr / alpha
        decay_lr:        B' = B,                            lr' = lr / alpha

    so ``lr / B`` — the noise scale up to the constant ``N / (1 - m)`` — falls by exactly
    ``alpha`` at every milestone in every mode. While the batch grows freely the learning
    rate stays put; once the cap binds the learning rate takes the rest of the decay (and
    the rounding of a fractional ``alpha * B``). The exact noise scale
    ``lr / (1 - m) * (N / B - 1)`` falls by ``alpha * (N - B) / (N - B')``, slightly more
    than ``alpha`` when the batch grows: the paper's rule lives in the ``B << N`` regime.

    The paper's CIFAR-10 schedules (``lr=0.1, batch_size=128, milestones=(60, 120, 160),
    factor=5``): ``decay_lr`` gives lr 0.1, 0.02, 0.004, 0.0008 at B = 128; ``hybrid``
    B 128 -> 640 then lr 0.1 -> 0.02 -> 0.004; ``increase_batch`` with ``max_batch=5120``
    B 128 -> 640 -> 3200 -> 5120 at lr 0.1, 0.1, 0.1, 0.032.

    Args:
        lr: learning rate before the first milestone.
        batch_size: global batch (summed over data-parallel ranks) before the first milestone.
        milestones: epochs (0-based, strictly increasing) at which the new values start,
            as in ``torch.optim.lr_scheduler.MultiStepLR``.
        factor: ``alpha > 1``, the divisor of the noise scale at each milestone (5 in the
            paper). It is not a multiplier like ``gamma=0.2``.
        max_batch: cap ``B_max`` on the global batch, at least ``batch_size``.
        mode: ``"increase_batch"``, ``"hybrid"`` or ``"decay_lr"``.

    ``at(epoch)`` returns ``(lr, batch_size)``; ``str(schedule)`` is a table of the phases.
    """

    def __init__(
        self,
        lr: float,
        batch_size: int,
        milestones: Sequence[int],
        factor: float,
        max_batch: int | None = None,
        mode: str = "increase_batch",
    ) -> None:
        self.lr = _positive_float("lr", lr)
        self.batch_size = check_int("batch_size", batch_size, 1)
        ms = [check_int(f"milestones[{i}]", m, 1) for i, m in enumerate(milestones)]
        if any(b <= a for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {ms}")
        self.milestones = tuple(ms)
        # A decay multiplier (gamma=0.2) passed by habit would grow the noise: say so.
        self.factor = _positive_float("factor (the divisor of the noise scale, e.g. 5)", factor, above=1.0)
        if max_batch is not None:
            max_batch = check_int("max_batch", max_batch, 1)
            if max_batch < self.batch_size:
                raise ValueError(f"max_batch must be >= batch_size, got {max_batch} < {self.batch_size}")
        self.max_batch = max_batch
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.phases: tuple[Phase, ...] = self._build_phases()

    def _build_phases(self) -> tuple[Phase, ...]:
        lr, b = self.lr, self.batch_size
        phases = [Phase(0, lr, b)]
        for i, epoch in enumerate(self.milestones):
            grow = self.mode == "increase_batch" or (self.mode == "hybrid" and i == 0)
            if grow:
                target = self.factor * b
                new_b = round(target)
                if self.max_batch is not None:
                    new_b = min(new_b, self.max_batch)
                # Whatever the batch could not absorb (the cap, the rounding) goes to lr.
                lr, b = lr * new_b / target, new_b
            else:
                lr = lr / self.factor
            phases.append(Phase(epoch, lr, b))
        return tuple(phases)

    def phase(self, epoch: int) -> Phase:
        """The phase that ``epoch`` (0-based) falls in."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        passed = sum(epoch >= m for m in self.milestones)
        return self.phases[passed]

    def at(self, epoch: int) -> tuple[float, int]:
        """``(lr, batch_size)`` for ``epoch`` (0-based; a milestone's epoch has the new values)."""
        p = self.phase(epoch)
        return p.lr, p.batch_size

    def noise_scale(self, epoch: int, dataset_size: int, momentum: float = 0.0, *, exact: bool = True) -> float:
        """:func:`noise_scale` of the values at ``epoch``."""
        lr, b = self.at(epoch)
        return noise_scale(lr, dataset_size, b, momentum, exact=exact)

    def updates(self, dataset_size: int, epochs: int, drop_last: bool = False) -> int:
        """Number of optimizer steps over ``epochs`` epochs of ``dataset_size`` samples."""
        n = check_int("dataset_size", dataset_size, 1)
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        per_epoch = (lambda b: n // b) if drop_last else (lambda b: -(-n // b))
        return sum(per_epoch(self.at(e)[1]) for e in range(epochs))

    def table(self, epochs: int | None = None) -> str:
        """The phases as a text table; ``epochs`` closes the last phase's range."""
        rows = [("epochs", "lr", "batch", "noise / initial")]
        g0 = self.lr / self.batch_size
        for i, p in enumerate(self.phases):
            end = self.phases[i + 1].start_epoch if i + 1 < len(self.phases) else epochs
            span = f"{p.start_epoch}-{end - 1}" if end is not None else f"{p.start_epoch}-"
            rows.append((span, f"{p.lr:.6g}", str(p.batch_size), f"{p.lr / p.batch_size / g0:.6g}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr!r}, batch_size={self.batch_size}, "
            f"milestones={self.milestones}, factor={self.factor!r}, max_batch={self.max_batch}, "
            f"mode={self.mode!r})"
        )


# --------------------------------------------------------------------------------------
# Delay-aware learning rates (Giladi, Shpigel Nacson, Hoffer, Soudry, ICLR 2020)
# --------------------------------------------------------------------------------------

_DELAY_RULES = ("stability", "inverse")
_MOMENTUM_KINDS = ("none", "standard", "shifted")


def delay_scaled_lr(lr0: float, tau: int, rule: str = "stability") -> float:
    r"""The learning rate for gradients that are ``tau`` steps stale, from the synchronous ``lr0``.

    ``rule="stability"``: ``lr0 * sin(pi / (4*tau + 2))``. On a quadratic of top curvature
    ``lambda`` plain SGD with delay ``tau`` is stable for ``lr * lambda <
    2*sin(pi / (2*(2*tau + 1)))`` (see :func:`stability_threshold`), 2 at ``tau = 0``: the
    rule scales ``lr0`` by the ratio of the two thresholds, so the delayed run can reach
    the same minima (those of curvature below ``2 / lr0``) as the synchronous one. For large
    ``tau`` it is about ``lr0 * pi / (4*tau + 2)``.

    ``rule="inverse"``: the paper's plain ``lr0 / (tau + 1)``. Both give ``lr0 / 2`` at
    ``tau = 1``; from ``tau = 2`` on the stability rule is the smaller one: 0.93 times the
    inverse rule at ``tau = 2``, 0.83 at ``tau = 8``, tending to ``pi / 4``.
    """
    lr0 = _positive_float("lr0", lr0)
    tau = check_int("tau", tau)
    if rule == "stability":
        return lr0 * math.sin(math.pi / (4 * tau + 2))
    if rule == "inverse":
        return lr0 / (tau + 1)
    raise ValueError(f"rule must be one of {_DELAY_RULES}, got {rule!r}")


def _characteristic(tau: int, momentum: float, kind: str, a: float):
    """Coefficients (highest degree first) of the characteristic polynomial in ``z``."""
    import numpy as np

    if kind == "none":  # z^(tau+1) - z^tau + a
        c = np.zeros(tau + 2)
        c[0], c[1] = 1.0, -1.0
        c[-1] += a
        return c
    c = np.zeros(tau + 3)
    if kind == "standard":  # (z - 1)(z - m) z^tau + a z
        c[0], c[1], c[2] = 1.0, -(1.0 + momentum), momentum
    else:  # shifted: (z - 1)(z^(tau+1) - m) + a z
        c[0], c[1] = 1.0, -1.0
        c[-2] -= momentum
        c[-1] += momentum
    c[-2] += a
    return c


def _spectral_radius(tau: int, momentum: float, kind: str, a: float) -> float:
    import numpy as np

    return float(np.max(np.abs(np.roots(_characteristic(tau, momentum, kind, a)))))


def stability_threshold(tau: int, momentum: float = 0.0, kind: str = "none") -> float:
    r"""The largest stable ``a = lr * lambda`` of SGD with delay ``tau`` on a quadratic.

    With curvature ``lambda``, gradients ``tau`` steps stale and momentum ``m``, the
    iterates follow a linear recurrence whose characteristic polynomial is::

        none:      z^(tau+1) - z^tau + a                  (no momentum)
        standard:  (z - 1)(z - m) z^tau + a z             (one buffer at the server)
        shifted:   (z - 1)(z^(tau+1) - m) + a z           (one buffer per worker, round robin)

    The run converges while every root lies inside the unit circle. The threshold is found
    by bisection on ``a`` (to a relative 1e-13) of the largest root modulus given by
    ``numpy.roots``; the stable ``a`` form an interval ``(0, threshold)``. Without
    momentum it equals the closed form ``2*sin(pi / (2*(2*tau + 1)))``; with ``tau = 0``
    the two momentum kinds coincide at ``2*(1 + m)``. With ``m = 0`` all three kinds are
    the same. Results are cached.

    Args:
        tau: the delay in steps, an integer >= 0.
        momentum: ``m`` in ``[0, 1)``; must be 0 for ``kind="none"``.
        kind: ``"none"``, ``"standard"`` or ``"shifted"``.
    """
    tau = check_int("tau", tau)
    m = _check_momentum("momentum", momentum)
    if kind not in _MOMENTUM_KINDS:
        raise ValueError(f"kind must be one of {_MOMENTUM_KINDS}, got {kind!r}")
    if kind == "none" and m != 0.0:
        raise ValueError(f"kind='none' takes momentum=0, got momentum={momentum!r}; "
                         "use kind='standard' or 'shifted'")
    return _threshold(tau, m, kind)


@functools.lru_cache(maxsize=512)
def _threshold(tau: int, m: float, kind: str) -> float:
    # 2*(1 + m) is the threshold at tau = 0, and a delay only lowers it; doubling guards
    # the bracket all the same.
    lo, hi = 0.0, 2.0 * (1.0 + m) * 1.01
    while _spectral_radius(tau, m, kind, hi) <= 1.0:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        if _spectral_radius(tau, m, kind, mid) <= 1.0:
            lo = mid
        else:
            hi = mid
    return lo
