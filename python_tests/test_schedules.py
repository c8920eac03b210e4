"""Batch-size schedules and the noise scale (Smith, Kindermans, Le 2018)."""

from __future__ import annotations

import math

import pytest

from lbkernels.schedules import (
    BatchSizeSchedule,
    linear_scaled_lr,
    noise_scale,
    scale_batch_with_momentum,
    scale_lr_with_batch,
    warmup_multistep,
)

# The paper's CIFAR-10 setting: wide ResNet 16-4, 200 epochs, momentum 0.9, factor 5.
N, EPOCHS, MOMENTUM, ALPHA = 50_000, 200, 0.9, 5
MILESTONES = (60, 120, 160)
EPOCH_IN_PHASE = (0, 60, 120, 160)


def cifar(mode: str) -> BatchSizeSchedule:
    return BatchSizeSchedule(0.1, 128, MILESTONES, ALPHA, max_batch=5120, mode=mode)


@pytest.mark.parametrize(
    "mode, lrs, batches",
    [
        ("decay_lr", (0.1, 0.02, 0.004, 0.0008), (128, 128, 128, 128)),
        ("hybrid", (0.1, 0.1, 0.02, 0.004), (128, 640, 640, 640)),
        # 3200 * 5 = 16000 passes B_max = 5120: lr takes the rest, 0.1 * 5120 / 16000.
        ("increase_batch", (0.1, 0.1, 0.1, 0.032), (128, 640, 3200, 5120)),
    ],
)
def test_paper_cifar10_tables(mode, lrs, batches):
    s = cifar(mode)
    for epoch, lr, b in zip(EPOCH_IN_PHASE, lrs, batches):
        got_lr, got_b = s.at(epoch)
        assert got_b == b
        assert got_lr == pytest.approx(lr, rel=1e-12)
    # Every epoch of a phase has the phase's values; milestones start the new ones.
    assert s.at(59) == s.at(0) and s.at(119) == s.at(60) and s.at(EPOCHS - 1) == s.at(160)


@pytest.mark.parametrize("mode", ["decay_lr", "hybrid", "increase_batch"])
@pytest.mark.parametrize("max_batch", [None, 5120, 700])
def test_noise_scale_falls_by_exactly_alpha(mode, max_batch):
    s = BatchSizeSchedule(0.1, 128, MILESTONES, ALPHA, max_batch=max_batch, mode=mode)
    g = [s.noise_scale(e, N, MOMENTUM, exact=False) for e in EPOCH_IN_PHASE]
    for before, after in zip(g, g[1:]):
        assert before / after == pytest.approx(ALPHA, rel=1e-12)
    # The exact noise scale falls by alpha * (N - B) / (N - B'): a little more when B grows.
    for e0, e1 in zip(EPOCH_IN_PHASE, EPOCH_IN_PHASE[1:]):
        b0, b1 = s.at(e0)[1], s.at(e1)[1]
        ratio = s.noise_scale(e0, N, MOMENTUM) / s.noise_scale(e1, N, MOMENTUM)
        assert ratio == pytest.approx(ALPHA * (N - b0) / (N - b1), rel=1e-12)


def test_cap_and_rounding_go_to_the_learning_rate():
    # factor 2.5 on 100 -> 250 -> 625 (capped at 500): lr 1 -> 1 -> 500 / 625 = 0.8.
    s = BatchSizeSchedule(1.0, 100, (1, 2), 2.5, max_batch=500)
    assert [p.batch_size for p in s.phases] == [100, 250, 500]
    assert [p.lr for p in s.phases] == pytest.approx([1.0, 1.0, 0.8], rel=1e-12)
    # A fractional alpha * B is rounded and the learning rate absorbs the rounding.
    s = BatchSizeSchedule(1.0, 3, (1,), 1.7)
    assert s.at(1) == (pytest.approx(5 / 5.1, rel=1e-12), 5)
    # A cap equal to the initial batch turns increase_batch into decay_lr.
    a = BatchSizeSchedule(0.1, 128, MILESTONES, ALPHA, max_batch=128)
    b = BatchSizeSchedule(0.1, 128, MILESTONES, ALPHA, mode="decay_lr")
    assert [p.batch_size for p in a.phases] == [p.batch_size for p in b.phases] == [128] * 4
    # Each lr is 0.1 times up to 3 factors of 1 / 5: a few roundings of 2^-53 each apart.
    assert [p.lr for p in a.phases] == pytest.approx([p.lr for p in b.phases], rel=1e-14)


def test_noise_scale_formula():
    assert noise_scale(0.1, N, 128, 0.9) == pytest.approx(0.1 / 0.1 * (N / 128 - 1), rel=1e-14)
    assert noise_scale(0.1, N, 128) == pytest.approx(0.1 * (N / 128 - 1), rel=1e-14)
    assert noise_scale(0.1, N, 128, 0.9, exact=False) == pytest.approx(N / 128, rel=1e-14)
    assert noise_scale(0.1, N, N) == 0.0  # full-batch gradient: no noise


def test_scaling_rules_preserve_the_noise_scale():
    # The paper's section 5.2: lr 0.1 -> 0.5 with B 128 -> 640, then momentum 0.9 -> 0.98 with B 640 -> 3200.
    lr, b = scale_lr_with_batch(0.1, 128, 5)
    assert (lr, b) == (pytest.approx(0.5), 640)
    assert scale_batch_with_momentum(640, 0.9, 0.98) == 3200
    base = noise_scale(0.1, N, 128, 0.9, exact=False)
    assert noise_scale(lr, N, b, 0.9, exact=False) == pytest.approx(base, rel=1e-12)
    assert noise_scale(lr, N, 3200, 0.98, exact=False) == pytest.approx(base, rel=1e-12)


def test_updates_count_matches_the_paper():
    # The paper: about 80,000 updates for decaying lr, about 29,000 for increasing batch.
    assert cifar("decay_lr").updates(N, EPOCHS) == 60 * 391 + 60 * 391 + 40 * 391 + 40 * 391
    assert cifar("increase_batch").updates(N, EPOCHS) == 60 * 391 + 60 * 79 + 40 * 16 + 40 * 10
    assert cifar("increase_batch").updates(N, EPOCHS, drop_last=True) == 60 * 390 + 60 * 78 + 40 * 15 + 40 * 9


def test_table_and_repr():
    text = cifar("increase_batch").table(EPOCHS)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].split()[:3] == ["epochs", "lr", "batch"]
    assert lines[-1].split() == ["160-199", "0.032", "5120", "0.008"]
    assert str(cifar("hybrid")).splitlines()[-1].split()[0] == "160-"
    assert "mode='hybrid'" in repr(cifar("hybrid"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=12.5), "batch_size"),
        (dict(milestones=(60, 60)), "milestones"),
        (dict(milestones=(0, 60)), "milestones"),
        (dict(milestones=(1.5,)), "milestones"),
        (dict(factor=0.2), "factor"),
        (dict(factor=1), "factor"),
        (dict(max_batch=64), "max_batch"),
        (dict(mode="cosine"), "mode"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = dict(lr=0.1, batch_size=128, milestones=MILESTONES, factor=5) | kwargs
    with pytest.raises(ValueError, match=match):
        BatchSizeSchedule(**args)


def test_bad_arguments_of_the_helpers():
    with pytest.raises(ValueError, match="momentum"):
        noise_scale(0.1, N, 128, momentum=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        noise_scale(0.1, N, N + 1)
    with pytest.raises(ValueError, match="new_momentum"):
        scale_batch_with_momentum(128, 0.9, -0.1)
    with pytest.raises(ValueError, match="factor"):
        scale_lr_with_batch(0.1, 128, 0)
    with pytest.raises(ValueError, match="epoch"):
        cifar("hybrid").at(-1)


def test_existing_helpers_unchanged():
    assert linear_scaled_lr(0.1, 1024) == pytest.approx(0.4)
    f = warmup_multistep(10, (20,), gamma=0.1)
    assert f(5) == pytest.approx(0.5) and f(20) == pytest.approx(0.1) and math.isclose(f(10), 1.0)
