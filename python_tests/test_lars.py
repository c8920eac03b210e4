"""Every LARS backend against the reference, on weights, momentum buffers and steps."""

from __future__ import annotations

import pytest
import torch

from helpers import LARS_CONFIGS as CONFIGS
from helpers import LARS_TOL as TOL
from helpers import assert_lists_close, backend_params, grads_for, make_state
from helpers import lars_shapes as shapes_for
from lbkernels import ops

BACKENDS = backend_params()


def run(impl, shapes, dtype, device, cfg, steps=7, exclude_every=3, lr_tensor=False,
        grad_scale=None, state=None, grad_round=None):
    params, bufs, steps_t = state or make_state(shapes, dtype, device)
    cfg = dict(cfg)
    has_momentum = cfg.get("momentum", 0) != 0
    if lr_tensor:
        cfg["lr"] = torch.tensor(cfg["lr"], device=device)
    exclude = [i % exclude_every == 0 for i in range(len(params))]
    for t in range(steps):
        grads = grads_for(t, shapes, dtype, device)
        if grad_round is not None:  # the inputs a lower-precision run sees, exactly
            grads = [g.to(grad_round).to(dtype) for g in grads]
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
        ops.lars_sgd_(params, grads, bufs if has_momentum else [], steps_t if has_momentum else [],
                      exclude, grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
                      impl=impl, **cfg)
    return params, bufs, steps_t


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(impl, device, cfg, dtype):
    shapes = shapes_for(impl, mixed=cfg == "nesterov")
    exp = run("reference", shapes, dtype, "cpu", CONFIGS[cfg])
    got = run(impl, shapes, dtype, device, CONFIGS[cfg])
    for a, e in zip(got, exp):
        assert_lists_close(a, e, **TOL[dtype])
    if CONFIGS[cfg].get("momentum"):
        assert all(s.item() == 7 for s in got[2])


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_lr_tensor_and_grad_scale(impl, device):
    shapes = shapes_for(impl)
    cfg = CONFIGS["nesterov"]
    exp = run("reference", shapes, torch.float32, "cpu", cfg, grad_scale=1024.0)
    got = run(impl, shapes, torch.float32, device, cfg, lr_tensor=True, grad_scale=1024.0)
    for a, e in zip(got, exp):
        assert_lists_close(a, e, **TOL[torch.float32])
    # Unscaling inside the kernel equals stepping on unscaled gradients.
    plain = run("reference", shapes, torch.float32, "cpu", cfg)
    assert_lists_close(got[0], plain[0], **TOL[torch.float32])


@pytest.mark.parametrize("impl,device", BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_found_inf_changes_nothing(impl, device, first):
    shapes = shapes_for(impl)
    cfg = CONFIGS["dampening-clip"]
    state = make_state(shapes, torch.float32, device)
    if not first:
        state = run(impl, shapes, torch.float32, device, cfg, steps=2, state=state)
    before = [[t.clone() for t in lst] for lst in state]
    params, bufs, steps = state
    grads = grads_for(5, shapes, torch.float32, device)
    grads[0].fill_(float("inf"))
    ops.lars_sgd_(params, grads, bufs, steps, [False] * len(params), found_inf=torch.ones((), device=device),
                  grad_scale=torch.tensor(65536.0, device=device), impl=impl, **cfg)
    for lst, ref in zip(state, before):
        for a, b in zip(lst, ref):
            assert torch.equal(a, b)  # bitwise: NaN-free inputs, so equal means identical bits


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_bound(impl, device, dtype):
    """Kernel error <= 2x the reference's own error in that dtype, both measured against
    the fp64 reference from the same rounded inputs."""
    shapes = shapes_for(impl, mixed=True)
    cfg = CONFIGS["nesterov"]
    params, bufs, steps = make_state(shapes, dtype, "cpu")
    exact = run("reference", shapes, torch.float64, "cpu", cfg,
                state=([p.double() for p in params], [b.double() for b in bufs], [s.clone() for s in steps]),
                grad_round=dtype)
    ref_low = run("reference", shapes, dtype, "cpu", cfg,
                  state=([p.clone() for p in params], [b.clone() for b in bufs], [s.clone() for s in steps]))
    got = run(impl, shapes, dtype, device, cfg,
              state=([p.to(device) for p in params], [b.to(device) for b in bufs], [s.to(device) for s in steps]))

    def err(xs):
        return torch.cat([(x.cpu().double() - e).flatten() for x, e in zip(xs, exact[0])]).norm()

    assert err(got[0]) <= 2 * err(ref_low[0])
    assert err(got[0]) > 0 or err(ref_low[0]) == 0


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_multi_tensor_l2norm(impl, device):
    shapes = shapes_for(impl, mixed=True)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g).to(device) for s in shapes]
    xs.append(torch.randn(6, 5, generator=g).to(device).t())  # non-contiguous
    xs.append(torch.randn(40, generator=g, dtype=torch.float64).to(device))
    xs.append(torch.randn(40, generator=g).to(device, torch.bfloat16))
    got = ops.multi_tensor_l2norm(xs, impl=impl)
    exp = ops.multi_tensor_l2norm([x.cpu() for x in xs], impl="reference")
    assert got.dtype == torch.float32 and got.shape == (len(xs),)
    torch.testing.assert_close(got.cpu(), exp, rtol=2e-6, atol=0)


@pytest.mark.parametrize("impl,device", BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_multi_tensor_l2norm_out(impl, device):
    """The .out overload writes what the functional op returns into the given tensor,
    and refuses a bad out (naming it) before it writes anything."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(s, generator=g).to(device) for s in shapes_for(impl, mixed=True)]
    xs.append(torch.randn(6, 5, generator=g).to(device).t())  # non-contiguous
    xs.append(torch.randn(40, generator=g, dtype=torch.float64).to(device))
    xs.append(torch.randn(40, generator=g).to(device, torch.bfloat16))
    out = torch.full((len(xs),), float("nan"), device=device)
    ptr, version = out.data_ptr(), out._version
    assert ops.multi_tensor_l2norm(xs, out=out, impl=impl) is out
    exp = ops.multi_tensor_l2norm([x.cpu() for x in xs], impl="reference")
    torch.testing.assert_close(out.cpu(), exp, rtol=2e-6, atol=0)
    assert out.data_ptr() == ptr and out._version > version  # written in place, as a write
    assert torch.equal(out, ops.multi_tensor_l2norm(xs, impl=impl))  # the same sums
    empty = torch.empty(0, device=device)
    assert ops.multi_tensor_l2norm([], out=empty, impl=impl) is empty
    bad = [(torch.zeros(len(xs) + 1, device=device), ValueError, "out must have shape"),
           (torch.zeros(len(xs), dtype=torch.float64, device=device), TypeError, "out must be a dense float32"),
           (torch.zeros(2 * len(xs), device=device)[::2], ValueError, "out must be contiguous"),
           (torch.zeros(1, len(xs), device=device), ValueError, "out must have shape")]
    for b, error, message in bad:
        with pytest.raises(error, match=message):
            ops.multi_tensor_l2norm(xs, out=b, impl=impl)
        assert not b.any()  # nothing written


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_mixed_dtypes_and_non_contiguous_in_one_call(impl, device):
    g = torch.Generator().manual_seed(5)
    def fresh():
        return [torch.randn(4, 6, generator=g, dtype=torch.float64).to(device).t(),  # non-contiguous
                torch.randn(50, generator=g).to(device),
                torch.randn(50, generator=g, dtype=torch.float64).to(device)]
    params = fresh()
    grads = fresh()
    grads[0] = grads[0].contiguous()  # strides unlike its param
    bufs = [torch.zeros_like(p) for p in params]
    expected = [[p.clone().cpu() for p in params], [b.clone().cpu() for b in bufs]]
    ops.lars_sgd_(expected[0], [x.cpu() for x in grads], expected[1], [torch.zeros(()) for _ in params],
                  [False] * 3, lr=0.1, momentum=0.9, weight_decay=1e-3, impl="reference")
    ops.lars_sgd_(params, grads, bufs, [torch.zeros((), device=device) for _ in params],
                  [False] * 3, lr=0.1, momentum=0.9, weight_decay=1e-3, impl=impl)
    assert params[0].stride() == (1, 6)  # updated in place, layout kept
    assert_lists_close(params, expected[0], rtol=2e-6, atol=1e-7)
    assert_lists_close(bufs, expected[1], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("impl,device", BACKENDS + [pytest.param("reference", "cpu", id="reference-cpu")])
def test_step_counters_optional_without_dampening(impl, device):
    """Zero-initialised buffers make the first step buf = d without a counter."""
    shapes = shapes_for(impl)
    cfg = CONFIGS["nesterov"]
    with_steps = run(impl, shapes, torch.float32, device, cfg, steps=3)
    params, bufs, _ = make_state(shapes, torch.float32, device)
    for t in range(3):
        ops.lars_sgd_(params, grads_for(t, shapes, torch.float32, device), bufs, [],
                      [i % 3 == 0 for i in range(len(params))], impl=impl, **cfg)
    assert_lists_close(params, with_steps[0], rtol=0, atol=0)
    assert_lists_close(bufs, with_steps[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="dampening != 0 needs a step counter"):
        ops.lars_sgd_(params, grads_for(0, shapes, torch.float32, device), bufs, [],
                      [False] * len(params), impl=impl, **CONFIGS["dampening-clip"])
