"""Triton kernels (lbkernels.triton) against the reference oracle.

On a machine without a GPU they run on CPU tensors under Triton's interpreter (the
conftest sets TRITON_INTERPRET=1 first); with a GPU, on CUDA tensors. The chunk size is
lowered to 64 so that chunk boundaries fall inside small tensors: the interpreter costs
about 5 ms per program, which keeps this file to a few seconds.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TRITON_CHUNK, TRITON_SHAPES, randn, triton_chunked_device
from lbkernels import ops
from lbkernels import triton as lbk_triton
from lbkernels.reference import lars as ref

CHUNK = TRITON_CHUNK
SHAPES = TRITON_SHAPES
STEPS = 7
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15)}

device = triton_chunked_device


class State:
    """params, momentum buffers and steps of one run, cloned per backend."""

    def __init__(self, shapes, dtypes, device, momentum=True):
        self.params = [randn([s], 10 + i, dt, device)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
        self.bufs = [torch.full_like(p, float("nan")) for p in self.params] if momentum else []
        self.steps = [torch.zeros((), device=device) for _ in self.params] if momentum else []

    def clone(self, dtype=None):
        c = object.__new__(State)
        c.params = [p.clone() if dtype is None else p.to(dtype) for p in self.params]
        c.bufs = [b.clone() if dtype is None else b.to(dtype) for b in self.bufs]
        c.steps = [s.clone() for s in self.steps]
        return c

    def tensors(self):
        return self.params + self.bufs + self.steps


def _grads(state, step, scale=1.0):
    grads = []
    for i, p in enumerate(state.params):
        g = randn([p.shape], 1000 * step + i, torch.float64, p.device)[0] * scale
        grads.append(g.to(p.dtype))
    return grads


def _run(impl, state, exclude, steps=STEPS, lr=0.1, grad_scale=None, **kw):
    """``steps`` LARS steps; ``lr`` is a float, a tensor, or a function of the step."""
    if impl == "reference":
        op = ref.lars_sgd_
    else:
        op = lbk_triton.get_op("lars_sgd_", state.params[0].device.type)
    scale = 1.0 if grad_scale is None else grad_scale.item()
    for t in range(steps):
        lr_t = lr(t) if callable(lr) else lr
        as_tensor = isinstance(lr_t, torch.Tensor)
        op(state.params, _grads(state, t, scale), state.bufs, state.steps, exclude,
           lr=1.0 if as_tensor else lr_t, lr_tensor=lr_t if as_tensor else None,
           grad_scale=grad_scale, **kw)
    return state


def _assert_states_close(a, b, dtype):
    for x, y in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(x.cpu(), y.cpu(), **TOL.get(x.dtype, TOL[dtype]), equal_nan=True)


CONFIGS = {
    "default": dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02),
    "nesterov": dict(momentum=0.9, weight_decay=5e-4, nesterov=True),
    "dampening": dict(momentum=0.8, dampening=0.3, weight_decay=1e-3),
    "paper": dict(momentum=0.9, weight_decay=1e-4, momentum_style="paper"),
    "clip": dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=1.0, clip=True, lr=0.5),
    "no_momentum": dict(momentum=0.0, weight_decay=1e-4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lars_matches_reference(device, dtype, config):
    kw = CONFIGS[config]
    state = State(SHAPES, [dtype] * len(SHAPES), device, momentum=kw["momentum"] != 0)
    exclude = [i % 3 == 1 for i in range(len(SHAPES))]
    expected = _run("reference", state.clone(), exclude, **kw)
    got = _run("triton", state.clone(), exclude, **kw)
    _assert_states_close(got, expected, dtype)
    if kw["momentum"]:
        assert all(s.item() == STEPS for s in got.steps)


def test_lars_lr_tensor_schedule_and_grad_scale(device):
    """lr as a tensor that changes every step (warm-up), paper style, AMP-scaled grads."""
    state = State(SHAPES, [torch.float32] * len(SHAPES), device)
    exclude = [False] * len(SHAPES)
    sched = [torch.tensor(0.02 * (t + 1), device=device) for t in range(STEPS)]
    kw = dict(momentum=0.9, weight_decay=1e-4, momentum_style="paper", clip=True,
              grad_scale=torch.tensor(1024.0, device=device))
    expected = _run("reference", state.clone(), exclude, lr=sched.__getitem__, **kw)
    got = _run("triton", state.clone(), exclude, lr=sched.__getitem__, **kw)
    _assert_states_close(got, expected, torch.float32)


def test_lars_zero_norms(device):
    """Zero weights or zero grads: r = 1, with and without apex's zero-norm rule."""
    for zero_norm_decay in (True, False):
        params = [torch.zeros(70, device=device), torch.ones(5, device=device)]
        grads = [torch.randn(70, device=device), torch.zeros(5, device=device)]
        got = [p.clone() for p in params]
        kw = dict(lr=0.1, weight_decay=0.1, zero_norm_decay=zero_norm_decay)
        ref.lars_sgd_(params, grads, [], [], [False, False], **kw)
        lbk_triton.get_op("lars_sgd_", device)(got, grads, [], [], [False, False], **kw)
        for x, y in zip(got, params):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("flag", [0.0, 1.0])
def test_lars_found_inf(device, flag):
    """found_inf = 1 leaves weights, buffers and steps bitwise unchanged (first step
    included); found_inf = 0 is a normal step."""
    state = State(SHAPES, [torch.float32] * len(SHAPES), device)
    exclude = [False] * len(SHAPES)
    before = state.clone()
    kw = dict(momentum=0.9, weight_decay=1e-4, found_inf=torch.tensor(flag, device=device),
              grad_scale=torch.tensor(8.0, device=device))
    _run("triton", state, exclude, steps=2, **kw)
    if flag:
        for x, y in zip(state.tensors(), before.tensors()):
            assert x.cpu().numpy().tobytes() == y.cpu().numpy().tobytes()
    else:
        expected = _run("reference", before, exclude, steps=2, **kw)
        _assert_states_close(state, expected, torch.float32)


def test_lars_many_tensors_mixed_dtypes(device):
    """40 tensors of mixed sizes and all four dtypes in one call (one launch per dtype).
    fp32/fp64 tight; fp16/bf16 by the rule: kernel error <= 2x the reference's own error
    in that dtype, both measured against the reference run in fp64."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    # Up to 80 elements (1 + i * 37 % 80) or 3 x (1 + i): every dtype has tensors of one
    # chunk and of two (48 programs per pass; the interpreter costs ~5 ms a program).
    shapes = [(1 + (37 * i) % 80,) if i % 5 else (3, 1 + i) for i in range(40)]
    dts = [dtypes[i % 4] for i in range(40)]
    state = State(shapes, dts, device)
    exclude = [i % 7 == 0 for i in range(40)]
    kw = dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01, lr=0.5)
    got = _run("triton", state.clone(), exclude, **kw)
    expected = _run("reference", state.clone(), exclude, **kw)
    oracle = _run("reference", state.clone(torch.float64), exclude, **kw)
    for i, dt in enumerate(dts):
        pairs = [(got.params[i], expected.params[i], oracle.params[i]),
                 (got.bufs[i], expected.bufs[i], oracle.bufs[i])]
        for k, r, o in pairs:
            if dt in (torch.float32, torch.float64):
                torch.testing.assert_close(k, r, **TOL[dt])
            else:
                err_k = (k.double() - o).abs().max()
                err_r = (r.double() - o).abs().max()
                assert err_k <= 2 * err_r, (i, dt, err_k.item(), err_r.item())
        assert got.steps[i].item() == STEPS


def test_lars_non_contiguous(device):
    """Params, grads and buffers in layouts the kernels cannot walk are staged, not skipped."""
    strided = torch.randn(12, 10, device=device)
    params = [torch.randn(10, 12, device=device).t(),            # dense, transposed: walked
              strided[:, ::2],                                    # gaps: staged
              torch.randn(4, 3, 5, device=device).permute(2, 0, 1)]
    grads = [torch.randn(12, 10, device=device),                  # strides unlike params[0]
             torch.randn(12, 5, device=device),
             torch.randn(5, 4, 3, device=device)]
    bufs = [torch.zeros(p.shape, device=device) for p in params]
    bufs[2] = torch.zeros(5, 3, 4, device=device).transpose(1, 2)
    steps = [torch.zeros((), device=device) for _ in params]
    expected = [[t.clone() for t in xs] for xs in (params, bufs, steps)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(2):
        lbk_triton.get_op("lars_sgd_", device)(params, grads, bufs, steps, [False] * 3, **kw)
        ref.lars_sgd_(expected[0], grads, expected[1], expected[2], [False] * 3, **kw)
    for x, y in zip(params + bufs + steps, sum(expected, [])):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
    torch.testing.assert_close(strided[:, ::2], expected[0][1], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp64", "fp16", "bf16"])
def test_l2norm_matches_reference(device, dtype):
    xs = randn(SHAPES, 3, dtype, device) + [torch.randn(5, 40, device=device).to(dtype).t()]
    got = lbk_triton.get_op("multi_tensor_l2norm", device)(xs)
    expected = ref.multi_tensor_l2norm(xs)
    assert got.dtype == torch.float32 and got.device.type == device
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=2e-6 if dtype != torch.float64 else 1e-7, atol=0)


def test_l2norm_mixed_dtypes_and_empty_list(device):
    xs = [torch.randn(n, device=device, dtype=dt)
          for n, dt in zip([3, 200, 65, 1], [torch.float64, torch.float16, torch.float32, torch.float64])]
    got = ops.multi_tensor_l2norm(xs, impl="triton")
    torch.testing.assert_close(got.cpu(), ref.multi_tensor_l2norm(xs).cpu(), rtol=2e-6, atol=0)
    assert ops.multi_tensor_l2norm([], impl="triton").shape == (0,)


def test_l2norm_out_matches_reference(device):
    """The .out overload on the Triton kernels: the reference's norms, written in place."""
    xs = randn(SHAPES, 7, torch.float32, device) + [torch.randn(9, device=device, dtype=torch.float64)]
    out = torch.full((len(xs),), float("nan"), device=device)
    assert ops.multi_tensor_l2norm(xs, out=out, impl="triton") is out
    torch.testing.assert_close(out.cpu(), ref.multi_tensor_l2norm(xs).cpu(), rtol=2e-6, atol=0)
    bad = torch.zeros(len(xs), dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="out must be a dense float32"):
        ops.multi_tensor_l2norm(xs, out=bad, impl="triton")
    assert not bad.any()


def test_table_cache_follows_storage(device):
    """A table is reused while the tensors keep their storage and rebuilt when it moves."""
    from lbkernels.triton import multi_tensor

    xs = [torch.randn(100, device=device), torch.randn(3, device=device)]
    op = lbk_triton.get_op("multi_tensor_l2norm", device)
    op(xs)
    cached = len(multi_tensor._cache)
    op(xs)
    assert len(multi_tensor._cache) == cached
    xs[0] = xs[0] * 2  # new storage
    torch.testing.assert_close(op(xs).cpu(), ref.multi_tensor_l2norm(xs).cpu(), rtol=2e-6, atol=0)
    assert len(multi_tensor._cache) == min(cached + 1, multi_tensor._CACHE_ENTRIES)


def test_bad_arguments_write_nothing(device):
    p = [torch.randn(4, device=device)]
    before = p[0].clone()
    op = lbk_triton.get_op("lars_sgd_", device)
    with pytest.raises(ValueError, match="grads"):
        op(p, [torch.randn(5, device=device)], [], [], [False], lr=0.1)
    with pytest.raises(TypeError, match="steps"):
        op(p, [torch.randn(4, device=device)], [torch.zeros(4, device=device)],
           [torch.zeros((), dtype=torch.float64, device=device)], [False], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_style"):
        op(p, [torch.randn(4, device=device)], [], [], [False], lr=0.1, momentum_style="x")
    with pytest.raises(ValueError, match="exclude"):
        op(p, [torch.randn(4, device=device)], [], [], [], lr=0.1)
    with pytest.raises(TypeError, match="xs"):
        lbk_triton.get_op("multi_tensor_l2norm", device)([torch.ones(2, dtype=torch.int32, device=device)])
    assert torch.equal(p[0], before)


def test_selection():
    """get_op explains why it cannot run; auto never picks Triton without GPU evidence."""
    ok, why = lbk_triton.available("mps")
    assert not ok and "mps" in why
    with pytest.raises(RuntimeError, match="mps"):
        lbk_triton.get_op("lars_sgd_", "mps")
    assert lbk_triton.auto_pick("lars_sgd_", "cuda") is None
    ok, _ = lbk_triton.available("cpu")
    if ok:
        with pytest.raises(RuntimeError, match="no Triton kernel"):
            lbk_triton.get_op("swa_update_", "cpu")


def test_cpu_needs_the_interpreter():
    """Without TRITON_INTERPRET=1 the CPU is refused with the reason, not run wrongly."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, lbkernels\n"
        "from lbkernels import triton as t\n"
        "ok, why = t.available('cpu')\n"
        "assert not ok and 'TRITON_INTERPRET=1' in why, why\n"
        "try:\n"
        "    lbkernels.ops.multi_tensor_l2norm([torch.ones(3)], impl='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
