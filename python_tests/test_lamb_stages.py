"""lamb_ in two stages (docs/algorithms.md section 7) on every backend.

``stage="moments"`` then ``stage="update"`` with the same, unreduced ``norm_sq`` is the
full step bit for bit on fp32/fp64 tensors (weights and all state, averaging included)
wherever the full step's norms are held exactly by ``norm_sq``: always for a float64
``norm_sq``; for a float32 one on the reference, CUDA and Triton (their fp32 norms are
fp32 sums), while the CPU kernel's sums are doubles and a float32 ``norm_sq`` rounds
them (tested within that rounding). 16-bit tensors: the update stage takes ``u`` from
the stored, rounded moments, checked against the reference's stages. found_inf in either
stage changes nothing; bad ``stage`` / ``norm_sq`` arguments are refused before any write.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TRITON_CHUNK, backend_params, randn
from lbkernels import ops

WITH_REFERENCE = [pytest.param("reference", "cpu", id="reference-cpu"), *backend_params()]

# A tensor over a 64K chunk (66820 elements: the CPU kernel's blocked path, 2 chunks), a
# conv weight, a zero matrix (||w|| = 0: r = 1), a vector, a 0-dim and an empty tensor.
SHAPES = [(257, 260), (16, 3, 3, 3), (9, 7), (33,), (), (0, 4)]
# Interpreted Triton (~1 us per element): 198 elements, chunks of TRITON_CHUNK so that
# (97,) spans two.
SHAPES_INTERPRETED = [(5, 6), (97,), (9, 7), (7,), (), (0, 4)]
ZERO_W = 2
EXCLUDE = [False, True, False, False, False, False]
STEPS = 3

CONFIGS = {
    "timm": dict(lr=0.02),
    "timm-l2-lambc-max-trust-clipped": dict(lr=0.05, decoupled_weight_decay=False, clip=True,
                                            max_trust=2.0, weight_decay=0.05, max_grad_norm=2.0),
    "timm-no-bias-correction-no-averaging": dict(lr=0.01, bias_correction=False,
                                                 grad_averaging=False),
    "apex-clipped": dict(lr=0.02, style="apex", max_grad_norm=1.0),
    "apex-l2-no-decay-max-trust": dict(lr=0.05, style="apex", decoupled_weight_decay=False,
                                       weight_decay=0.0, max_trust=5.0),
}


@pytest.fixture
def small_chunks(request, monkeypatch):
    """Interpreted Triton's chunk lowered to TRITON_CHUNK (its shapes then span chunks)."""
    params = request.node.callspec.params
    if (params.get("impl"), params.get("device")) == ("triton", "cpu"):
        from lbkernels.triton import multi_tensor

        monkeypatch.setattr(multi_tensor, "CHUNK_SIZE", TRITON_CHUNK)


def shapes_for(impl: str, device: str):
    return SHAPES_INTERPRETED if impl == "triton" and device == "cpu" else SHAPES


def fresh_state(shapes, dtype, device):
    params = randn(shapes, 0, dtype, device)
    params[ZERO_W].zero_()
    return [params, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros((), device=device) for _ in params]]


def copy_of(state):
    return [[t.clone() for t in lst] for lst in state]


def with_averaging(cfg, state, method, device):
    """cfg plus folded averaging; the averages and count appended to ``state``."""
    params = state[0]
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    avg = [p.to(dtype, copy=True) for p in params]
    count = torch.zeros((), dtype=torch.int64, device=device)
    state += [avg, [count]]
    return dict(cfg, averages=avg, average_count=count, average_method=method, average_decay=0.8)


def step_inputs(t, shapes, dtype, device, cfg, grad_scale):
    grads = randn(shapes, 1000 + t, dtype, device)
    if grad_scale is None:
        return grads, cfg
    return ([g * grad_scale for g in grads],
            dict(cfg, grad_scale=torch.tensor(grad_scale, device=device)))


def staged_step(impl, state, grads, cfg, exclude, sq_dtype):
    """One step as the two stages; returns the norm_sq the moments stage wrote."""
    device = state[0][0].device
    norm_sq = torch.full((2, len(state[0])), -7.0, dtype=sq_dtype, device=device)
    ops.lamb_(state[0], grads, *state[1:4], exclude, impl=impl, stage="moments",
              norm_sq=norm_sq, **cfg)
    ops.lamb_(state[0], grads, *state[1:4], exclude, impl=impl, stage="update",
              norm_sq=norm_sq, **cfg)
    return norm_sq


def run_both(impl, device, dtype, cfg, sq_dtype, averaging=None, grad_scale=None, lr_tensor=False,
             steps=STEPS):
    """``steps`` full steps and ``steps`` staged steps from the same state: (full, staged,
    the last norm_sq)."""
    shapes = shapes_for(impl, device)
    full = fresh_state(shapes, dtype, device)
    staged = copy_of(full)
    cfg = dict(cfg)
    if lr_tensor:
        cfg["lr"] = torch.tensor(cfg["lr"], device=device)
    cfg_full, cfg_staged = cfg, cfg
    if averaging is not None:
        cfg_full = with_averaging(cfg, full, averaging, device)
        cfg_staged = with_averaging(cfg, staged, averaging, device)
    exclude = EXCLUDE[:len(shapes)]
    norm_sq = None
    for t in range(steps):
        grads, kw = step_inputs(t, shapes, dtype, device, cfg_full, grad_scale)
        ops.lamb_(full[0], grads, *full[1:4], exclude, impl=impl, **kw)
        _, kw = step_inputs(t, shapes, dtype, device, cfg_staged, grad_scale)
        norm_sq = staged_step(impl, staged, grads, kw, exclude, sq_dtype)
    return full, staged, norm_sq


def assert_identical(a_state, b_state):
    names = ("params", "exp_avgs", "exp_avg_sqs", "steps", "averages", "average_count")
    for name, a_list, b_list in zip(names, a_state, b_state):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert a.dtype == b.dtype and a.shape == b.shape
            # NaN-free state: equal means identical bits (up to the sign of zero).
            assert torch.equal(a, b), f"{name}[{i}] differs"


# --- moments + update == full ----------------------------------------------------------

@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_stages_are_the_full_step_bit_for_bit(impl, device, cfg, dtype, small_chunks):
    full, staged, norm_sq = run_both(impl, device, dtype, CONFIGS[cfg], torch.float64)
    assert_identical(full, staged)
    assert all(s.item() == STEPS for s in staged[3])
    # The norms are the local sums of squares: ||w||^2 of the weights the last moments
    # stage saw (within the summation order), 0 for the excluded tensor.
    shapes = shapes_for(impl, device)
    assert torch.all(norm_sq[:, EXCLUDE[:len(shapes)].index(True)] == 0)
    assert torch.all(norm_sq[:, [0, 3]] > 0)


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_update_takes_the_norms_from_norm_sq(impl, device, small_chunks):
    """The update stage's ratio is sqrt(norm_sq[0]) / sqrt(norm_sq[1]), not norms of its
    own: norm_sq[0] times 4 doubles ||w|| and so r, exactly (powers of 2), and with
    timm's order w - lr * (r * u) that is the full step at 2 * lr, bit for bit (no
    max_trust, no clip, no excluded or zero tensor: every r is the ratio)."""
    shapes = shapes_for(impl, device)
    staged = [randn(shapes, 0, torch.float32, device)] + fresh_state(shapes, torch.float32,
                                                                     device)[1:]
    full = copy_of(staged)
    grads = randn(shapes, 1000, torch.float32, device)
    exclude = [False] * len(shapes)
    norm_sq = torch.empty((2, len(shapes)), dtype=torch.float64, device=device)
    ops.lamb_(staged[0], grads, *staged[1:], exclude, lr=0.02, impl=impl, stage="moments",
              norm_sq=norm_sq)
    norm_sq[0] *= 4
    ops.lamb_(staged[0], grads, *staged[1:], exclude, lr=0.02, impl=impl, stage="update",
              norm_sq=norm_sq)
    ops.lamb_(full[0], grads, *full[1:], exclude, lr=0.04, impl=impl)
    assert_identical(full, staged)


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_shards_with_summed_norms_step_as_the_whole(impl, device, small_chunks):
    """Each tensor split in two shards (two calls, as two ranks would make them), the
    moments stage's norm_sq of both summed (the all-reduce), then the update stage on
    each: the whole tensors' full step, up to the order of the norms' sums (fp64, one
    step: a few fp64 ulps of r, so of each step; measured against the tensor's largest
    value, where w - lr * r * u cancels near 0)."""
    shapes = [(40,), (7, 3), (6, 2, 2)] if impl == "triton" and device == "cpu" else \
        [(70000,), (33, 17), (16, 3, 3, 3)]
    whole = fresh_state(shapes, torch.float64, device)
    whole[0] = randn(shapes, 0, torch.float64, device)
    grads = randn(shapes, 1000, torch.float64, device)
    cut = [s[0] // 2 for s in shapes]
    shards = [[[t[:c].clone() for t, c in zip(lst, cut)] if k < 3 else [s.clone() for s in lst]
               for k, lst in enumerate(whole)],
              [[t[c:].clone() for t, c in zip(lst, cut)] if k < 3 else [s.clone() for s in lst]
               for k, lst in enumerate(whole)]]
    shard_grads = [[g[:c] for g, c in zip(grads, cut)], [g[c:] for g, c in zip(grads, cut)]]
    exclude = [False, True, False]
    cfg = dict(lr=0.05, style="apex", max_trust=3.0, clip=True)
    sums = []
    for state, g in zip(shards, shard_grads):
        norm_sq = torch.empty((2, len(shapes)), dtype=torch.float64, device=device)
        ops.lamb_(state[0], g, *state[1:], exclude, impl=impl, stage="moments", norm_sq=norm_sq,
                  **cfg)
        sums.append(norm_sq)
    total = sums[0] + sums[1]
    for state, g in zip(shards, shard_grads):
        ops.lamb_(state[0], g, *state[1:], exclude, impl=impl, stage="update", norm_sq=total,
                  **cfg)
    ops.lamb_(whole[0], grads, *whole[1:], exclude, impl=impl, **cfg)
    for k in range(3):
        for i, w in enumerate(whole[k]):
            got = torch.cat([shards[0][k][i], shards[1][k][i]])
            torch.testing.assert_close(got, w, rtol=1e-14, atol=1e-14 * w.abs().max().item(),
                                       msg=lambda m: f"list {k}, tensor {i}: {m}")
    assert all(s.item() == 1 for state in shards for s in state[3])


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_stages_with_averaging_grad_scale_and_lr_tensor(impl, device, averaging, small_chunks):
    """Folded averaging (done by the update stage only, counted once per step), AMP
    scaled gradients with global clipping, and a tensor lr."""
    for cfg, kw in (("apex-clipped", dict(grad_scale=1024.0, lr_tensor=True)),
                    ("timm-l2-lambc-max-trust-clipped", dict(grad_scale=256.0))):
        full, staged, _ = run_both(impl, device, torch.float32, CONFIGS[cfg], torch.float64,
                                   averaging=averaging, **kw)
        assert_identical(full, staged)
        assert staged[5][0].item() == STEPS


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("cfg", ["timm", "apex-clipped"])
def test_float32_norm_sq(impl, device, cfg, small_chunks):
    """A float32 norm_sq holds the fp32 norms of the reference, CUDA and Triton exactly:
    bit for bit there. The CPU kernel sums in double and takes the ratio in double: the
    float32 entries round each sum by at most 2^-24 relative, so r moves by at most
    ~2^-24 relative (and then rounds to fp32: one more half ulp). One step from the same
    state: the moments and steps (which do not depend on r) are identical, each weight
    within one fp32 ulp of the full step's plus 2^-22 of the step's size."""
    if not (impl == "native" and device == "cpu"):
        full, staged, _ = run_both(impl, device, torch.float32, CONFIGS[cfg], torch.float32)
        assert_identical(full, staged)
        return
    shapes = shapes_for(impl, device)
    w0 = fresh_state(shapes, torch.float32, device)[0]
    full, staged, _ = run_both(impl, device, torch.float32, CONFIGS[cfg], torch.float32,
                               steps=1)
    assert_identical(full[1:], staged[1:])
    ulp = torch.finfo(torch.float32).eps
    for i, (a, e, p) in enumerate(zip(staged[0], full[0], w0)):
        bound = ulp * e.abs() + 2.0 ** -22 * (e - p).abs()
        assert torch.all((a - e).abs() <= bound), f"params[{i}]"


@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_stages_follow_the_reference_stages(impl, device, dtype, small_chunks):
    """16-bit tensors: the moments stage stores the moments the full step stores (rounded
    once from the same fp32 values); the update stage takes u from those stored moments.
    One staged step against the reference's staged step from the same state: fp32
    arithmetic rounded once to the dtype, the backends' norms summed in another order,
    so each stored value is at most one rounding (one ulp of the dtype) away."""
    shapes = shapes_for(impl, device)
    cfg = CONFIGS["timm-l2-lambc-max-trust-clipped"]
    start = fresh_state(shapes, dtype, "cpu")
    start[1] = [torch.rand_like(p) - 0.5 for p in start[0]]  # moments already under way
    start[2] = [torch.rand_like(p) for p in start[0]]
    start[3] = [torch.full((), 4.0) for _ in start[0]]
    grads = randn(shapes, 1000, dtype, "cpu")
    exclude = EXCLUDE[:len(shapes)]
    want = copy_of(start)
    staged_step("reference", want, grads, cfg, exclude, torch.float32)
    got = [[t.to(device, copy=True) for t in lst] for lst in start]
    staged_step(impl, got, [g.to(device) for g in grads], cfg, exclude, torch.float32)
    full = [[t.to(device, copy=True) for t in lst] for lst in start]
    ops.lamb_(full[0], [g.to(device) for g in grads], *full[1:], exclude, impl=impl, **cfg)
    info = torch.finfo(dtype)
    for name, k in (("params", 0), ("exp_avgs", 1), ("exp_avg_sqs", 2)):
        for i, (a, e) in enumerate(zip(got[k], want[k])):
            torch.testing.assert_close(a.cpu(), e, rtol=info.eps, atol=info.tiny * info.eps,
                                       msg=lambda m: f"{name}[{i}]: {m}")
    for k in (1, 2, 3):  # the moments stage stores what the full step stores
        for a, e in zip(got[k], full[k]):
            assert torch.equal(a, e)
    assert any(not torch.equal(a.cpu(), s) for a, s in zip(got[0], start[0]))


# --- found_inf ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_found_inf_in_either_stage_changes_nothing(impl, device, small_chunks):
    shapes = shapes_for(impl, device)
    cfg = CONFIGS["apex-clipped"]
    state = fresh_state(shapes, torch.float32, device)
    cfg = with_averaging(cfg, state, "swa", device)
    exclude = EXCLUDE[:len(shapes)]
    grads = randn(shapes, 5, torch.float32, device)
    staged_step(impl, state, grads, cfg, exclude, torch.float64)  # a state under way
    skip = dict(cfg, found_inf=torch.ones((), device=device))
    before = copy_of(state)
    norm_sq = torch.zeros((2, len(shapes)), dtype=torch.float64, device=device)
    ops.lamb_(state[0], grads, *state[1:4], exclude, impl=impl, stage="moments",
              norm_sq=norm_sq, **skip)
    assert_identical(state, before)
    # A real moments stage, then a skipped update: nothing written but norm_sq's own.
    ops.lamb_(state[0], grads, *state[1:4], exclude, impl=impl, stage="moments",
              norm_sq=norm_sq, **cfg)
    after_moments = copy_of(state)
    assert not torch.equal(after_moments[1][0], before[1][0])
    ops.lamb_(state[0], grads, *state[1:4], exclude, impl=impl, stage="update",
              norm_sq=norm_sq, **skip)
    assert_identical(state, after_moments)
    assert state[5][0].item() == 1


# --- argument errors ---------------------------------------------------------------------

@pytest.mark.parametrize("impl,device", WITH_REFERENCE)
def test_bad_stage_arguments_are_refused_before_any_write(impl, device):
    shapes = [(4, 3), (5,)]
    params, grads = randn(shapes, 0, torch.float32, device), randn(shapes, 1, torch.float32, device)
    state = [params, [torch.zeros_like(p) + 0.5 for p in params],
             [torch.zeros_like(p) + 0.25 for p in params],
             [torch.ones((), device=device) for _ in params]]
    before = copy_of(state)
    ok = torch.zeros((2, 2), device=device)
    bad = [
        (dict(stage="norms"), ValueError, "stage must be one of"),
        (dict(norm_sq=ok), ValueError, "norm_sq is given but stage is 'full'"),
        (dict(stage="moments"), ValueError, "stage 'moments' needs norm_sq"),
        (dict(stage="update"), ValueError, "stage 'update' needs norm_sq"),
        (dict(stage="moments", norm_sq=torch.zeros((2, 3), device=device)), ValueError,
         "norm_sq must have shape"),
        (dict(stage="update", norm_sq=torch.zeros(4, device=device)), ValueError,
         "norm_sq must have shape"),
        (dict(stage="moments", norm_sq=ok.half()), TypeError, "norm_sq must be float32 or float64"),
        (dict(stage="update", norm_sq=torch.zeros((2, 2), device=device).t()), ValueError,
         "norm_sq must be contiguous"),
    ]
    if device != "cpu":
        bad.append((dict(stage="moments", norm_sq=ok.cpu()), ValueError, "norm_sq is on cpu"))
    for change, exc, match in bad:
        norm_sq = change.get("norm_sq")
        copy = None if norm_sq is None else norm_sq.clone()
        with pytest.raises(exc, match=match):
            ops.lamb_(state[0], grads, *state[1:], [False, True], lr=0.1, impl=impl, **change)
        assert_identical(state, before)
        if norm_sq is not None:
            assert torch.equal(norm_sq, copy)
