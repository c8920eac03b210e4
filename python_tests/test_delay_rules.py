"""Delay-aware learning rates and stability thresholds (Giladi et al., ICLR 2020)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lbkernels.schedules import delay_scaled_lr, stability_threshold

KINDS = ("none", "standard", "shifted")


@pytest.mark.parametrize("tau", range(65))
def test_threshold_without_momentum_is_the_closed_form(tau):
    closed = 2 * math.sin(math.pi / (2 * (2 * tau + 1)))
    assert stability_threshold(tau) == pytest.approx(closed, rel=1e-11)


def test_threshold_special_cases():
    for m in (0.0, 0.5, 0.9):
        # No delay: the heavy-ball bound 2(1 + m), the same for both kinds of momentum.
        assert stability_threshold(0, m, "standard") == pytest.approx(2 * (1 + m), rel=1e-11)
        assert stability_threshold(0, m, "shifted") == pytest.approx(2 * (1 + m), rel=1e-11)
    for tau in (1, 3, 8):
        plain = stability_threshold(tau)
        assert stability_threshold(tau, 0.0, "standard") == pytest.approx(plain, rel=1e-11)
        assert stability_threshold(tau, 0.0, "shifted") == pytest.approx(plain, rel=1e-11)
        # The paper's point: with delay, shifted momentum tolerates larger steps.
        assert stability_threshold(tau, 0.9, "shifted") > 1.5 * stability_threshold(tau, 0.9, "standard")


def simulate(kinds, momenta, taus, a, steps=10_000, tail=1_000):
    """SGD on f(w) = w^2 / 2 (curvature 1, so lr = a) from w_0 = 1 with gradients ``tau``
    steps stale, for many configurations at once. Returns the largest |w| of the run and
    of its last ``tail`` steps.

    standard: v = m v + g(w_{t-tau});          w -= a v
    shifted:  v_k = m v_k + g(w_{t-tau}),  k = t mod (tau + 1);  w -= a v_k
    """
    n = len(a)
    cols = np.arange(n)
    taus, m, a = np.asarray(taus), np.asarray(momenta, dtype=float), np.asarray(a)
    shifted = np.array([k == "shifted" for k in kinds])
    ring = max(taus) + 1  # w_{t-tau} for every tau; rows not yet written hold w_0
    hist = np.ones((ring, n))
    w, v, per_worker = np.ones(n), np.zeros(n), np.zeros((ring, n))
    peak, tail_peak = np.ones(n), np.zeros(n)
    for t in range(steps):
        g = hist[(t - taus) % ring, cols]
        k = t % (taus + 1)
        vk = m * per_worker[k, cols] + g
        per_worker[k, cols] = vk
        v = m * v + g
        w = w - a * np.where(shifted, vk, v)
        hist[(t + 1) % ring] = w
        peak = np.maximum(peak, np.abs(w))
        if t >= steps - tail:
            tail_peak = np.maximum(tail_peak, np.abs(w))
    return peak, tail_peak


def test_simulation_is_stable_below_the_threshold_and_diverges_above():
    configs = [("none", 0.0, tau) for tau in (1, 2, 4, 8, 16)]
    configs += [(kind, m, tau) for kind in ("standard", "shifted") for m in (0.5, 0.9)
                for tau in (1, 2, 4, 8, 16)]
    kinds, momenta, taus = ([c[i] for c in configs] * 2 for i in range(3))
    thresholds = [stability_threshold(tau, m, kind) for kind, m, tau in configs]
    a = [0.98 * x for x in thresholds] + [1.02 * x for x in thresholds]
    peak, tail = simulate(kinds, momenta, taus, a)
    n = len(configs)
    for i, c in enumerate(configs):
        # Below: bounded, and the last 1,000 steps below the start (the slowest case,
        # shifted m=0.9 tau=16, is at 0.58). Above: growing (that case reaches 1.85).
        assert peak[i] < 1.2 and tail[i] < 1.0, (c, peak[i], tail[i])
        assert tail[n + i] > 1.5, (c, tail[n + i])


def test_delay_scaled_lr_keeps_the_synchronous_minima_stable():
    # lr0 = 0.5: synchronous SGD converges where the curvature is below 2 / lr0 = 4. With
    # gradients tau steps stale, the stability rule's lr converges at curvature 0.98 * 4
    # and diverges at 1.02 * 4 (simulated, not derived from the rule's formula). The
    # inverse rule lr0 / (tau + 1) is larger from tau = 2 on and diverges already at 0.98 * 4.
    lr0, taus = 0.5, [1, 2, 5, 16]
    below, above = 0.98 * 2 / lr0, 1.02 * 2 / lr0
    a = [delay_scaled_lr(lr0, t) * below for t in taus] + \
        [delay_scaled_lr(lr0, t) * above for t in taus] + \
        [delay_scaled_lr(lr0, t, "inverse") * below for t in taus[1:]]
    n = len(taus)
    peak, tail = simulate(["none"] * len(a), [0.0] * len(a), taus + taus + taus[1:], a)
    for i, tau in enumerate(taus):
        assert peak[i] < 1.2 and tail[i] < 1.0, (tau, peak[i], tail[i])
        assert tail[n + i] > 1.5, (tau, tail[n + i])
    for i, tau in enumerate(taus[1:]):
        assert tail[2 * n + i] > 1.5, (tau, tail[2 * n + i])
    # No delay, no change; at tau = 1 the two rules agree (lr0 / 2).
    assert delay_scaled_lr(lr0, 0) == lr0
    assert delay_scaled_lr(lr0, 1) == pytest.approx(delay_scaled_lr(lr0, 1, "inverse"), rel=1e-15)
    # Far out the stability rule tends to pi / 4 times the inverse rule (docstring): the
    # ratio is pi / 4 * (tau + 1) / (tau + 1/2) to O(1 / tau^2), 5e-5 above pi / 4 at 10,000.
    tau = 10_000
    ratio = delay_scaled_lr(lr0, tau) / delay_scaled_lr(lr0, tau, "inverse")
    assert ratio == pytest.approx(math.pi / 4, rel=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        stability_threshold(-1)
    with pytest.raises(ValueError, match="tau"):
        stability_threshold(1.5)
    with pytest.raises(ValueError, match="tau"):
        stability_threshold(True)
    with pytest.raises(ValueError, match="momentum"):
        stability_threshold(2, 1.0, "shifted")
    with pytest.raises(ValueError, match="kind='none' takes momentum=0"):
        stability_threshold(2, 0.9)
    with pytest.raises(ValueError, match="kind"):
        stability_threshold(2, 0.9, "nesterov")
    with pytest.raises(ValueError, match="lr0"):
        delay_scaled_lr(-0.1, 2)
    with pytest.raises(ValueError, match="tau"):
        delay_scaled_lr(0.1, -2)
    with pytest.raises(ValueError, match="rule"):
        delay_scaled_lr(0.1, 2, "sqrt")
