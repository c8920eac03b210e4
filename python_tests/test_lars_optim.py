"""The LARS optimizer: SGD equivalence, published variants, bad input, tracing."""

from __future__ import annotations

import copy

import pytest
import torch

import lbkernels
from lbkernels import _library, ops
from helpers import compiled_backend_params, optim_backend_params
from lbkernels.optim import LARS, lars_param_groups

BACKENDS = optim_backend_params()


def net(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4)).to(device)


def steps(m, opt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    device = next(m.parameters()).device
    for _ in range(n):
        x, y = torch.randn(32, 10, generator=g).to(device), torch.randint(0, 4, (32,), generator=g).to(device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight-decay": dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    "dampening": dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=1e-3),
}


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_excluded_lars_is_torch_sgd(impl, device, case):
    a, b = net(device=device), net(device=device)
    steps(a, LARS(a.parameters(), lars_exclude=True, impl=impl, **SGD_CASES[case]), 8)
    steps(b, torch.optim.SGD(b.parameters(), **SGD_CASES[case]), 8)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sgd_checkpoint_loads_into_lars():
    a, b = net(), net()
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    steps(a, sgd, 3)
    b.load_state_dict(a.state_dict())
    lars = LARS(b.parameters(), lr=0.1, momentum=0.9, lars_exclude=True)
    lars.load_state_dict(copy.deepcopy(sgd.state_dict()))  # as from a file: no shared buffers
    steps(a, sgd, 3, seed=1)
    steps(b, lars, 3, seed=1)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# -- published variants, written out from their documented algorithms ------------------
def timm_lars_step(params, lr, momentum, dampening, wd, nesterov, tc, eps, trust_clip, always_adapt, state):
    for p in params:
        grad = p.grad.clone()
        if wd != 0 or always_adapt:
            w_norm, g_norm = p.norm(2.0), grad.norm(2.0)
            ratio = tc * w_norm / (g_norm + w_norm * wd + eps)
            ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, ratio, 1.0), 1.0)
            if trust_clip:
                ratio = torch.clamp(ratio / lr, max=1.0)
            grad.add_(p, alpha=wd)
            grad.mul_(ratio)
        if momentum != 0:
            if p not in state:
                buf = state[p] = grad.clone()
            else:
                buf = state[p]
                buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        p.add_(grad, alpha=-lr)


def apex_larc_then_sgd_step(params, lr, momentum, wd, tc, eps, clip, state):
    for p in params:
        param_norm, grad_norm = torch.norm(p), torch.norm(p.grad)
        grad = p.grad.clone()
        if param_norm != 0 and grad_norm != 0:
            adaptive = tc * param_norm / (grad_norm + param_norm * wd + eps)
            if clip:
                adaptive = min(adaptive / lr, 1)
            grad += wd * p
            grad *= adaptive
        if p not in state:
            buf = state[p] = grad.clone()
        else:
            buf = state[p]
            buf.mul_(momentum).add_(grad)
        p.add_(buf, alpha=-lr)


def assert_same_steps(a, opt, b, step_b):
    """5 steps of ``opt`` on ``a`` and of ``step_b(params)`` on ``b``, on the same
    batches, leave the two models bitwise equal."""
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(32, 10, generator=g), torch.randint(0, 4, (32,), generator=g)
        for m in (a, b):
            for p in m.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        with torch.no_grad():
            step_b(list(b.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("trust_clip,always_adapt,wd", [(False, False, 0.0), (False, False, 1e-3),
                                                        (True, True, 0.0), (True, False, 5e-4)])
def test_reproduces_timm_lars_bitwise(trust_clip, always_adapt, wd):
    a, b = net(), net()
    hp = dict(lr=0.5, momentum=0.9, dampening=0.0, nesterov=True, eps=1e-8)
    opt = LARS(a.parameters(), weight_decay=wd, trust_coefficient=0.001, clip=trust_clip,
               always_adapt=always_adapt, impl="reference", **hp)
    state: dict = {}
    assert_same_steps(a, opt, b, lambda params: timm_lars_step(
        params, hp["lr"], hp["momentum"], 0.0, wd, True, 0.001, 1e-8, trust_clip, always_adapt, state))


def test_reproduces_apex_larc_bitwise():
    a, b = net(), net()
    for p in list(a.parameters())[-1:]:
        with torch.no_grad():
            p.zero_()  # a zero-norm tensor: apex applies neither ratio nor decay
    b.load_state_dict(a.state_dict())
    opt = LARS(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02,
               clip=True, zero_norm_decay=False, impl="reference")
    state: dict = {}
    assert_same_steps(a, opt, b, lambda params: apex_larc_then_sgd_step(
        params, 0.1, 0.9, 1e-3, 0.02, 1e-8, True, state))


@pytest.mark.parametrize("impl,device", compiled_backend_params())
def test_compiled_backend_follows_reference_on_a_model(impl, device):
    a, b = net(), net(device=device)
    kw = dict(lr=1.0, momentum=0.9, weight_decay=5e-4, trust_coefficient=0.01)
    steps(a, LARS(lars_param_groups(a, 5e-4), impl="reference", **kw), 10)
    steps(b, LARS(lars_param_groups(b, 5e-4), impl=impl, **kw), 10)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-5, atol=1e-6)


def test_lars_param_groups_splits_by_ndim():
    m = net()
    groups = lars_param_groups(m, weight_decay=1e-4)
    assert [p.ndim for p in groups[0]["params"]] == [2, 2]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and len(groups[1]["params"]) == 4
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"] is True


# -- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(momentum=-0.9), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(trust_coefficient=-1.0), ValueError, "trust_coefficient"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(nesterov=True), ValueError, "nesterov"),
    (dict(momentum=0.9, nesterov=True, dampening=0.1), ValueError, "nesterov"),
    (dict(momentum_style="keras"), ValueError, "momentum_style"),
    (dict(impl="cuda"), ValueError, "impl"),
    (dict(lr="fast"), TypeError, "lr"),
])
def test_bad_hyperparameters_rejected(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LARS(net().parameters(), **kwargs)


def test_bad_group_rejected_and_optimizer_unchanged():
    m = net()
    opt = LARS(list(m.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": list(m.parameters())[2:], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1


def test_non_float_params_rejected():
    with pytest.raises(TypeError, match=r"params\[1\].*dtype"):
        LARS([torch.zeros(3, requires_grad=True), torch.zeros(3, dtype=torch.long)], lr=0.1)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_sparse_grad_rejected_and_nothing_changes(impl, device):
    emb = torch.nn.Embedding(10, 4, sparse=True, device=device)
    lin = torch.nn.Linear(4, 2, device=device)
    opt = LARS([*lin.parameters(), *emb.parameters()], lr=0.1, momentum=0.9, impl=impl)
    lin(emb(torch.tensor([1, 2], device=device))).sum().backward()
    before = [p.detach().clone() for p in [*lin.parameters(), *emb.parameters()]]
    with pytest.raises(TypeError, match=r"grads\[2\].*sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip([*lin.parameters(), *emb.parameters()], before))


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_op_rejects_mismatched_lists_and_changes_nothing(impl, device):
    def ones(n, dtype=torch.float32):
        return torch.ones(n, dtype=dtype, device=device)

    p = [ones(3), ones(4)]
    g = [ones(3), ones(4)]
    with pytest.raises(ValueError, match="grads has 1 entries"):
        ops.lars_sgd_(p, g[:1], [], [], [False, False], lr=0.1, impl=impl)
    with pytest.raises(ValueError, match="exclude has 1 entries"):
        ops.lars_sgd_(p, g, [], [], [False], lr=0.1, impl=impl)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        ops.lars_sgd_(p, [ones(3), ones(5)], [], [], [False, False], lr=0.1, impl=impl)
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype"):
        ops.lars_sgd_(p, [ones(3, torch.float64), ones(4)], [], [], [False, False], lr=0.1, impl=impl)
    with pytest.raises(ValueError, match="momentum_buffers has 1 entries"):
        ops.lars_sgd_(p, g, [torch.zeros(3, device=device)], [torch.zeros((), device=device) for _ in p],
                      [False, False], lr=0.1, momentum=0.9, impl=impl)
    assert all(torch.equal(x, torch.ones_like(x)) for x in p)


def test_op_rejects_mixed_devices():
    p = [torch.ones(3), torch.ones(3, device="meta")]
    with pytest.raises(ValueError, match=r"params\[1\] is on meta"):
        ops.lars_sgd_(p, [torch.ones(3), torch.ones(3, device="meta")], [], [], [False, False], lr=0.1,
                      impl="reference")


def test_unknown_impl_and_missing_backends_say_why():
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.multi_tensor_l2norm([torch.ones(2)], impl="fast")
    if lbkernels.native_unavailable_reason is not None:
        with pytest.raises(RuntimeError, match="no compiled lbkernels kernel"):
            ops.multi_tensor_l2norm([torch.ones(2)], impl="native")


# -- tracing: opcheck of every op in test_opcheck.py, compiled steps in test_optim_compile.py --
def test_momentum_buffers_share_one_allocation_per_dtype():
    """Buffers of contiguous params are views of one buffer (streaming, not scattered);
    a non-contiguous param keeps its own buffer in its layout."""
    m = net()
    t = torch.nn.Parameter(torch.randn(7, 5).t())  # non-contiguous leaf
    opt = LARS([*m.parameters(), t], lr=0.1, momentum=0.9)
    steps(m, opt, 1)
    t.grad = torch.ones_like(t)
    opt.step()
    bufs = [opt.state[p]["momentum_buffer"] for p in m.parameters()]
    assert len({b.untyped_storage().data_ptr() for b in bufs}) == 1
    assert all(b.shape == p.shape for b, p in zip(bufs, m.parameters()))
    tb = opt.state[t]["momentum_buffer"]
    assert tb.stride() == t.stride() and tb.untyped_storage().data_ptr() != bufs[0].untyped_storage().data_ptr()


class _GivenGradNorms:
    """A gradient-norm source (``take_grad_norms``) that claims ``||g||^2 = value`` for
    every param of an adapting bucket, and records what it was asked."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def norm_sq(self, params, grads, adapts, grad_scale, found_inf):
        self.calls.append((len(params), adapts))
        if self.value is None or not adapts:
            return None
        return torch.tensor([[-1.0] * len(params), [self.value] * len(params)], dtype=torch.float64)


@pytest.mark.parametrize("impl", ["reference", "native"])
def test_take_grad_norms_source_is_what_the_step_uses(impl):
    if impl == "native" and not _library.has_native_kernel("lars_sgd_", "cpu"):
        pytest.skip(f"compiled kernels not loaded: {lbkernels.native_unavailable_reason}")
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)

    def step(source):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for q, p in zip(ps, params):
            q.grad = p.grad.clone()
        opt = LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, impl=impl)
        opt.take_grad_norms(source)
        opt.step()
        return ps

    plain = step(None)
    true = _GivenGradNorms(None)  # asked, but knows nothing: the op computes ||g||
    assert all(torch.equal(a, b) for a, b in zip(step(true), plain))
    assert true.calls == [(3, True)]
    exact = params[0].grad.double().square().sum().item()
    # Every param told ||g||^2 of params[0]: only params[0] keeps its update (to the
    # rounding of a norm summed in another order).
    told = step(_GivenGradNorms(exact))
    torch.testing.assert_close(told[0], plain[0], rtol=2**-22, atol=0.0)
    assert not torch.equal(told[1], plain[1])


def test_take_grad_norms_refused_where_the_op_takes_none_and_not_kept_by_copies():
    from lbkernels.optim import LAMB
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="LAMB takes no gradient norms"):
        LAMB([p]).take_grad_norms(_GivenGradNorms(1.0))
    opt = LARS([p], lr=0.1)
    opt.take_grad_norms(_GivenGradNorms(1.0))
    # A copy (or an unpickled optimizer) is not attached to the hook that fed the original.
    assert copy.deepcopy(opt)._grad_norm_source is None
    opt.take_grad_norms(None)
    assert opt._grad_norm_source is None


def test_detached_grad_norm_source_is_no_longer_used():
    """After take_grad_norms(None) the steps compute every ||g|| again: they equal the
    steps of a new optimizer loaded with the same state, which never had a source."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]

    def grads(step):
        g = torch.Generator().manual_seed(step)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)

    opt = LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, impl="reference")
    opt.take_grad_norms(_GivenGradNorms(123.0))
    grads(0)
    opt.step()
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fresh = LARS(qs, lr=0.1, momentum=0.9, weight_decay=1e-4, impl="reference")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.take_grad_norms(None)
    for step in range(1, 4):
        grads(step)
        for q, p in zip(qs, ps):
            q.grad = p.grad.clone()
        opt.step()
        fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
