"""The LAMB optimizer: the rule against a plain loop, timm's and apex's LAMB bit for bit,
AdamW equivalence and checkpoints, global clipping under GradScaler, bad input,
folded averaging, allocations. (The generic optimizer checks run it from
helpers.OPTIMIZERS; the op's kernels are tested in test_lamb.py.)"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from helpers import (assert_same_run, compiled_backend_params, load_run, optim_backend_params,
                     through_checkpoint)
from lbkernels import _library
from lbkernels.optim import LAMB, WeightAverager, lamb_param_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.params import TimmStyleLAMB  # noqa: E402

BACKENDS = optim_backend_params()
# fp64 params: the optimizer computes in fp64 and so does the loop; what is left is the
# order of operations (~10 roundings per element and step, norms summed in another order)
# over 6 steps: ~1e-14 relative. 1e-11 leaves three orders of margin and would still catch
# a wrong formula, whose errors are ~1e-3 and up.
TOL64 = dict(rtol=1e-11, atol=1e-12)


def make_params(dtype=torch.float64, device="cpu"):
    """Two weight matrices, a bias that starts at zero (||w|| = 0: r = 1 at first) and a
    norm-like vector, in two groups."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (4, 6), (4,), (7,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype))
          for s in shapes]
    with torch.no_grad():
        ps[2].zero_()
    return ps


def set_grads(params, t, scale=1.0):
    g = torch.Generator().manual_seed(1000 + t)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * scale).to(p.device, p.dtype)


@torch.no_grad()
def lamb_loop_step(groups, state, max_grad_norm):
    """One LAMB step written out per tensor from docs/algorithms.md section 7, in the
    params' dtype. ``groups``: (params, hyper-parameters) pairs."""
    grads = [p.grad for ps, _ in groups for p in ps]
    c = 1.0
    if max_grad_norm is not None:
        n = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        c = n / max_grad_norm if n > max_grad_norm else 1.0
    for ps, hp in groups:
        b1, b2 = hp["betas"]
        wd, eps, lr = hp["weight_decay"], hp["eps"], hp["lr"]
        excluded = hp["lamb_exclude"] or not (hp["always_adapt"] or wd != 0)
        for p in ps:
            st = state.setdefault(p, {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "t": 0})
            st["t"] += 1
            t = st["t"]
            g = p.grad / c
            if not hp["decoupled_weight_decay"]:
                g = g + wd * p
            st["m"] = b1 * st["m"] + ((1 - b1) if hp["grad_averaging"] else 1.0) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            m_hat, v_hat = st["m"], st["v"]
            if hp["bias_correction"]:
                m_hat, v_hat = m_hat / (1 - b1**t), v_hat / (1 - b2**t)
            u = m_hat / (v_hat.sqrt() + eps)
            if hp["decoupled_weight_decay"]:
                u = u + wd * p
            nw, nu = float(p.norm()), float(u.norm())
            r = 1.0
            if not excluded and nw > 0 and nu > 0:
                r = (nw if hp["max_trust"] is None else min(nw, hp["max_trust"])) / nu
                r = min(r, 1.0) if hp["clip"] else r
            p -= lr * r * u


DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                max_trust=None, clip=False, grad_averaging=True, decoupled_weight_decay=True,
                always_adapt=True, style="timm", lamb_exclude=False)
# Every option, each away from its default at least once; lr large enough that the ratio
# and the decay move the weights visibly in 6 steps.
CASES = {
    "paper": dict(lr=0.05),
    "no-bias-correction": dict(lr=0.05, bias_correction=False),
    "no-grad-averaging": dict(lr=0.02, grad_averaging=False, betas=(0.8, 0.99)),
    "l2": dict(lr=0.05, decoupled_weight_decay=False, weight_decay=0.1),
    "max-trust": dict(lr=0.05, max_trust=1.5),
    "lambc": dict(lr=0.05, clip=True, eps=1e-3),
    "global-clip": dict(lr=0.05, max_grad_norm=0.5),
    "timm-defaults": dict(lr=0.05, max_grad_norm=1.0, always_adapt=False),
    "apex": dict(lr=0.05, style="apex", max_grad_norm=2.0, decoupled_weight_decay=False),
}
# The second group: no decay (so always_adapt=False excludes it), or excluded by name.
SECOND = {"weight_decay": 0.0, "lr": 0.02}


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("exclude_second", [False, True], ids=["wd0-group", "excluded-group"])
def test_lamb_is_the_written_out_rule(case, exclude_second, impl, device):
    hp = {**DEFAULTS, "max_grad_norm": None, **CASES[case]}
    second = {**SECOND, "lamb_exclude": exclude_second}
    a, b = make_params(device=device), make_params(device=device)
    opt = LAMB([{"params": a[:2]}, {"params": a[2:], **second}], impl=impl, **hp)
    max_grad_norm = hp.pop("max_grad_norm")
    groups = [(b[:2], hp), (b[2:], {**hp, **second})]
    state: dict = {}
    for t in range(6):
        # Gradients large enough (norm ~10) that the global clipping acts.
        set_grads(a, t, 2.0)
        set_grads(b, t, 2.0)
        opt.step()
        lamb_loop_step(groups, state, max_grad_norm)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **TOL64)
    for p, q in zip(a, b):
        torch.testing.assert_close(opt.state[p]["exp_avg"], state[q]["m"], **TOL64)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], state[q]["v"], **TOL64)
        assert opt.state[p]["step"].item() == 6
    assert not torch.equal(a[0], make_params(device=device)[0])  # it did train


# -- timm's Lamb and apex's FusedLAMB, transcribed ---------------------------------------
@torch.no_grad()
def timm_lamb_step(groups, state, max_grad_norm, lr, betas, eps, grad_averaging, trust_clip,
                   always_adapt):
    """timm's ``Lamb.step`` (``foreach=False``, ``decoupled_decay=False``, no caution):
    one step count per group, the global norm of the per-tensor norms, ``lerp`` for the
    averaged first moment, the bias corrections as Python floats."""
    grads = [p.grad for ps, _ in groups for p in ps]
    clip_global = None
    if max_grad_norm is not None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        clip_global = (norm / max_grad_norm).clamp_(min=1.0)
    beta1, beta2 = betas
    beta3 = 1 - beta1 if grad_averaging else 1.0
    for g_index, (ps, wd) in enumerate(groups):
        step = state["step", g_index] = state.get(("step", g_index), 0.0) + 1.0
        bc1, bc2 = 1 - beta1**step, 1 - beta2**step
        for p in ps:
            grad = p.grad if clip_global is None else p.grad / clip_global
            st = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
            exp_avg, exp_avg_sq = st
            if beta3 == 1 - beta1:
                exp_avg.lerp_(grad, beta3)
            else:
                exp_avg.mul_(beta1).add_(grad, alpha=beta3)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (bc2**0.5)).add_(eps)
            update = (exp_avg / bc1).div_(denom)
            if wd != 0:
                update.add_(p, alpha=wd)
            if wd != 0 or always_adapt:
                w_norm, g_norm = p.norm(2.0), update.norm(2.0)
                ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, w_norm / g_norm, 1.0), 1.0)
                if trust_clip:
                    ratio = torch.clamp(ratio, max=1.0)
                update.mul_(ratio)
            p.add_(update, alpha=-lr)


@torch.no_grad()
def apex_lamb_step(groups, state, max_grad_norm, lr, betas, eps, adam_w_mode, grad_averaging,
                   use_nvlamb):
    """apex ``FusedLAMB.step`` and its CUDA kernel (multi_tensor_lamb.cu), per element in
    fp32 with the hyper-parameters as C ``float``s: stage 1 writes the update, stage 2
    ``p = p - (lr * (||w|| / ||u||)) * u``; bias corrections ``1 - pow(beta, step)`` in
    double (std::pow of a float and an int), rounded to float."""
    f32 = torch.float32

    def f(x):
        return torch.tensor(x, dtype=f32)

    grads = [p.grad for ps, _ in groups for p in ps]
    # apex's global norm: multi_tensor_l2norm over the fp32 grads, then over [that, 0].
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    clipped = norm / f(max_grad_norm) if norm > max_grad_norm else f(1.0)
    b1, b2 = f(betas[0]), f(betas[1])
    beta3 = 1 - b1 if grad_averaging else f(1.0)
    for g_index, (ps, wd) in enumerate(groups):
        step = state["step", g_index] = state.get(("step", g_index), 0) + 1
        bc1 = f(1 - float(b1) ** step)
        bc2 = f(1 - float(b2) ** step)
        decay = f(wd)
        for p in ps:
            m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
            param_norm = torch.linalg.vector_norm(p)
            g = p.grad / clipped
            if not adam_w_mode:
                g = g + decay * p
            m.copy_(m * b1 + beta3 * g)
            v.copy_(v * b2 + (1 - b2) * g * g)
            u = (m / bc1) / ((v / bc2).sqrt() + f(eps))
            if adam_w_mode:
                u = u + decay * p
            ratio = f(lr)
            if use_nvlamb or wd != 0:
                update_norm = torch.linalg.vector_norm(u)
                if update_norm != 0 and param_norm != 0:
                    ratio = f(lr) * (param_norm / update_norm)
            p.copy_(p - ratio * u)


def run_both(opt, params_b, step_b, steps=6):
    a = [p for g in opt.param_groups for p in g["params"]]
    for t in range(steps):
        set_grads(a, t, 3.0)  # norm ~15: the global clipping at 1.0 acts
        set_grads(params_b, t, 3.0)
        opt.step()
        step_b()
    return a


TRANSCRIBED_HP = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-6)


def assert_transcription_matches(step, **options):
    """6 steps of LAMB (reference kernel, ``options``) and of ``step(groups, state)`` on
    twin params, the second group without decay, leave weights and moments bitwise equal."""
    a, b = make_params(torch.float32), make_params(torch.float32)
    opt = LAMB([{"params": a[:2], "weight_decay": 0.01}, {"params": a[2:], "weight_decay": 0.0}],
               max_grad_norm=1.0, impl="reference", **TRANSCRIBED_HP, **options)
    state: dict = {}
    groups = [(b[:2], 0.01), (b[2:], 0.0)]
    run_both(opt, b, lambda: step(groups, state))
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg"], state[q][0])
        assert torch.equal(opt.state[p]["exp_avg_sq"], state[q][1])


@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("always_adapt", [False, True])
@pytest.mark.parametrize("grad_averaging", [True, False])
def test_timm_lamb_bit_for_bit(trust_clip, always_adapt, grad_averaging):
    assert_transcription_matches(
        lambda groups, state: timm_lamb_step(groups, state, 1.0, trust_clip=trust_clip,
                                             always_adapt=always_adapt,
                                             grad_averaging=grad_averaging, **TRANSCRIBED_HP),
        always_adapt=always_adapt, clip=trust_clip, grad_averaging=grad_averaging)


@pytest.mark.parametrize("adam_w_mode", [True, False])
@pytest.mark.parametrize("use_nvlamb", [False, True])
@pytest.mark.parametrize("grad_averaging", [True, False])
def test_apex_fused_lamb_bit_for_bit(adam_w_mode, use_nvlamb, grad_averaging):
    assert_transcription_matches(
        lambda groups, state: apex_lamb_step(groups, state, 1.0, adam_w_mode=adam_w_mode,
                                             grad_averaging=grad_averaging,
                                             use_nvlamb=use_nvlamb, **TRANSCRIBED_HP),
        style="apex", always_adapt=use_nvlamb, decoupled_weight_decay=adam_w_mode,
        grad_averaging=grad_averaging)


# -- AdamW: the same state, and the same rule with every tensor excluded -------------------
# fp32 after 6 steps: AdamW decays w before the update, LAMB adds wd * w to it; a few
# ulps of |w| ~ 1 per step.
ADAMW_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_excluded_lamb_is_adamw_and_loads_its_checkpoint(impl, device):
    a, b = make_params(torch.float32, device), make_params(torch.float32, device)
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    adamw = torch.optim.AdamW(a, **hp)
    for t in range(3):
        set_grads(a, t)
        adamw.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    lamb = LAMB(b, lamb_exclude=True, impl=impl, **hp)
    lamb.load_state_dict(through_checkpoint(adamw.state_dict()))
    for p in b:
        assert set(lamb.state[p]) == {"exp_avg", "exp_avg_sq", "step"}
        assert lamb.state[p]["step"].device == p.device
    for t in range(3, 6):
        set_grads(a, t)
        set_grads(b, t)
        adamw.step()
        lamb.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, **ADAMW_TOL)
        torch.testing.assert_close(lamb.state[q]["exp_avg_sq"], adamw.state[p]["exp_avg_sq"], **ADAMW_TOL)
        assert lamb.state[q]["step"].item() == 6


# -- GradScaler with global clipping -------------------------------------------------------
@pytest.mark.parametrize("impl,device", BACKENDS)
def test_scaled_gradients_clip_by_the_unscaled_norm(impl, device):
    """The global norm is taken over the scaled gradients once and divided by the scale
    in the op: a step on gradients scaled by 2^12 equals the step on the unscaled ones."""
    a, b = make_params(torch.float32, device), make_params(torch.float32, device)
    oa = LAMB([{"params": a[:2]}, {"params": a[2:], "weight_decay": 0.0}], lr=0.05, max_grad_norm=1.0, impl=impl)
    ob = LAMB([{"params": b[:2]}, {"params": b[2:], "weight_decay": 0.0}], lr=0.05, max_grad_norm=1.0, impl=impl)
    scale = 2.0**12  # a power of two: scaling and unscaling are exact
    for t in range(4):
        set_grads(a, t, 3.0 * scale)
        set_grads(b, t, 3.0)
        oa.grad_scale = torch.tensor(scale, device=device)
        oa.found_inf = torch.zeros((), device=device)
        oa.step()
        ob.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.slow  # dynamo traces the step: ~10 s on two cores
@pytest.mark.parametrize("impl,device", compiled_backend_params())
def test_compiled_step_with_global_clipping_matches_eager(impl, device):
    """The global norm (computed at the step's first op, dropped after it) in one graph
    (fullgraph=True), with a tensor lr; helpers.OPTIMIZERS' LAMB row compiles the rest."""
    runs = []
    for compiled in (False, True):
        ps = make_params(torch.float32, device)
        opt = LAMB([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], max_grad_norm=1.0,
                   lr=torch.tensor(0.05, device=device), impl=impl)
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        try:
            for t in range(3):
                set_grads(ps, t, 3.0)
                step()
        finally:
            torch._dynamo.reset()
        runs.append(ps)
    for p, q in zip(*runs):
        # The existing LARS parity tolerance (fp32): the compiled step calls the same kernels.
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_global_norm_spans_every_group():
    """One group's step depends on the other group's gradients through the global norm."""
    a, b = make_params(), make_params()
    oa = LAMB([{"params": a[:2]}, {"params": a[2:]}], lr=0.05, max_grad_norm=1.0, impl="reference")
    ob = LAMB([{"params": b[:2]}, {"params": b[2:]}], lr=0.05, max_grad_norm=1.0, impl="reference")
    set_grads(a, 0)
    set_grads(b, 0)
    b[3].grad.mul_(100)
    oa.step()
    ob.step()
    assert not torch.equal(a[0], b[0])


# -- bad input -------------------------------------------------------------------------
BAD = [
    (dict(lr=-1.0), "lr"),
    (dict(eps=float("nan")), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(betas=0.9), "betas"),
    (dict(max_trust=0.0), "max_trust"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(clip=1), "clip"),
    (dict(always_adapt="no"), "always_adapt"),
    (dict(style="nvidia"), "style"),
    (dict(impl="cuda"), "impl"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[n for _, n in BAD])
def test_bad_hyperparameters_are_named(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        LAMB(make_params(), **kwargs)


def test_a_group_cannot_set_its_own_max_grad_norm_and_a_bad_edit_changes_nothing():
    ps = make_params()
    with pytest.raises(ValueError, match="max_grad_norm is one value"):
        LAMB([{"params": ps[:2]}, {"params": ps[2:], "max_grad_norm": 5.0}], max_grad_norm=1.0)
    opt = LAMB(ps, lr=0.1, impl="reference")
    set_grads(ps, 0)
    before = [p.detach().clone() for p in ps]
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param group 0: Invalid betas\[1\]"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before)) and not opt.state


# -- lamb_param_groups, folded averaging, allocations --------------------------------------
def test_lamb_param_groups_excludes_biases_and_norms():
    m = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    decay, rest = lamb_param_groups(m, weight_decay=0.02)
    assert decay == {"params": [m[0].weight, m[2].weight], "weight_decay": 0.02}
    assert rest["params"] == [m[0].bias, m[1].weight, m[1].bias, m[2].bias]
    assert rest["weight_decay"] == 0.0 and rest["lamb_exclude"] is True
    LAMB([decay, rest])  # accepted as they are


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_folded_averaging_equals_step_then_update(impl, device, mode):
    runs = []
    for fused in (True, False):
        ps = make_params(torch.float32, device)
        opt = LAMB([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], lr=0.05,
                   max_grad_norm=1.0, impl=impl)
        avg = WeightAverager(ps, mode=mode, decay=0.8, impl=impl, fused_with=opt if fused else None)
        for t in range(5):
            set_grads(ps, t, 3.0)
            opt.step()
            if not fused:
                avg.update()
        runs.append((ps, avg))
    (pa, fused), (pb, sep) = runs
    assert all(torch.equal(p, q) for p, q in zip(pa, pb))  # averaging does not change the step
    # The same expression on the same weights; the compiled kernel may fuse a multiply-add.
    for a, b in zip(fused.averages, sep.averages):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert fused.n_averaged == sep.n_averaged == 5


def _bytes_allocated_by_second_step(opt) -> int:
    opt.step()  # lazy state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_step_allocates_nothing(max_grad_norm):
    """One group: the op computes the global gradient norm itself, nothing is allocated."""
    if not _library.has_native_kernel("lamb_", "cpu"):
        pytest.skip("compiled lamb_ kernel not loaded (the reference allocates by design)")
    ps = make_params(torch.float32)
    ps += [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(4)]
    set_grads(ps, 0)
    opt = LAMB(ps, lr=0.01, max_grad_norm=max_grad_norm, impl="native")
    assert _bytes_allocated_by_second_step(opt) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_step_of_several_groups_allocates_nothing(dtype):
    """Several groups share one global norm, computed by multi_tensor_l2norm into the
    optimizer's kept buffers: nothing allocated after the first step. fp64 grads take
    torch._foreach_norm, which allocates its norms: the control that the profiler sees
    the global norm's allocations in this very step."""
    if not _library.has_native_kernel("lamb_", "cpu"):
        pytest.skip("compiled lamb_ kernel not loaded (the reference allocates by design)")
    ps = make_params(dtype)
    ps += [torch.nn.Parameter(torch.randn(256, 256, dtype=dtype)) for _ in range(4)]
    set_grads(ps, 0)
    opt = LAMB([{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.0}], lr=0.01,
               max_grad_norm=1.0, impl="native")
    allocated = _bytes_allocated_by_second_step(opt)
    if dtype == torch.float32:
        assert allocated == 0
    else:  # n fp64 norms, their stack and the global norm: a few bytes per tensor
        assert allocated >= 8 * len(ps)


def test_several_groups_keep_norm_buffers_across_param_changes():
    """The kept norm buffers follow the grads: with a param without grad and then a new
    group, the steps equal those made with fresh buffers at every step, bit for bit."""
    if not _library.has_native_kernel("lamb_", "cpu"):
        pytest.skip("compiled lamb_ kernel not loaded")
    runs = []
    for fresh in (False, True):
        ps = make_params(torch.float32)
        extra = torch.nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(2)))
        opt = LAMB([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}], lr=0.05,
                   max_grad_norm=1.0, impl="native")
        for t in range(5):
            set_grads(ps, t, 3.0)
            if t == 1:
                ps[0].grad = None  # one grad fewer: 3 norms
            if t == 2:
                opt.add_param_group({"params": [extra], "weight_decay": 0.0})
            if t >= 2:
                extra.grad = torch.full_like(extra, 0.5 * t)
            if fresh:
                opt._norm_out.clear()
            opt.step()
            n = 3 if t == 1 else 4 + (t >= 2)
            assert opt._norm_out[torch.device("cpu")][0].shape == (n,)
        runs.append(ps + [extra])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_one_group_clips_by_the_norm_of_every_gradient(impl, device):
    """One group (the op computes the global norm) steps as two groups of the same
    settings (the optimizer computes it and hands it to both ops)."""
    runs = []
    for split in (False, True):
        ps = make_params(torch.float32, device)
        groups = [{"params": ps[:2]}, {"params": ps[2:]}] if split else ps
        opt = LAMB(groups, lr=0.05, max_grad_norm=1.0, impl=impl)
        for t in range(4):
            set_grads(ps, t, 3.0)  # norms above 1: every step clips
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_deepcopy_and_pickle_keep_no_stale_norm():
    ps = make_params()
    opt = LAMB(ps, lr=0.05, max_grad_norm=1.0, impl="reference")
    set_grads(ps, 0, 5.0)
    opt.step()
    twin_ps = [p.detach().clone().requires_grad_() for p in ps]
    twin = LAMB(twin_ps, lr=0.05, max_grad_norm=1.0, impl="reference")
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    set_grads(ps, 1)  # a much smaller norm: a norm kept from step 0 would clip wrongly
    set_grads(twin_ps, 1)
    opt.step()
    twin.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, twin_ps))


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_the_bench_timm_style_loop_is_lamb(max_grad_norm):
    """bench's anchor computes the rule it is timed against."""
    a, b = make_params(torch.float32), make_params(torch.float32)
    with torch.no_grad():
        for p, q in zip(a, b):  # no zero norm: the loop has no exclusion to mirror
            p.add_(0.5)
            q.add_(0.5)
    opt = LAMB(a, lr=0.05, weight_decay=0.01, max_grad_norm=max_grad_norm, impl="reference")
    loop = TimmStyleLAMB(b, lr=0.05, weight_decay=0.01, max_grad_norm=max_grad_norm)
    run_both(opt, b, loop.step, steps=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.slow  # three short training runs (29 s on two busy cores)
def test_a_lamb_training_run_resumes_bit_for_bit(tmp_path):
    from lbkernels.train.__main__ import main

    # A constant rate (no warm-up, step decay without milestones): the schedule of a
    # 1-epoch run is then that of the 2-epoch one, which the resume extends.
    flags = ["--method", "lamb", "--model", "mlp", "--width", "0.25", "--batch-size", "256",
             "--quiet", "--lamb-clip", "--lamb-max-grad-norm", "1.0", "--warmup-epochs", "0",
             "--decay", "step"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(flags + ["--epochs", "2", "--out-dir", str(whole)]) == 0
    assert main(flags + ["--epochs", "1", "--out-dir", str(resumed)]) == 0
    assert main(["--resume", str(resumed), "--epochs", "2"]) == 0
    assert_same_run(load_run(whole), load_run(resumed))
    state = load_run(whole)["method"]["optimizer"]
    assert state["param_groups"][0]["max_grad_norm"] == 1.0 and state["param_groups"][0]["clip"]
