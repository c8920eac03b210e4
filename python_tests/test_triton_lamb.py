"""The Triton lamb_ kernels against the reference at chunk boundaries.

The chunk is lowered to 64 (helpers.triton_chunked_device) so that a tensor's norms are
added from several programs' partials and the update pass covers chunks of one tensor
from several programs; the backend-generic checks of lamb_ are in test_lamb.py. On a
machine without a GPU the kernels run on CPU tensors under Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TRITON_SHAPES, randn, triton_chunked_device
from lbkernels import triton as lbk_triton
from lbkernels.reference import lamb as ref

STEPS = 3
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7), torch.float64: dict(rtol=1e-13, atol=1e-15)}

device = triton_chunked_device


class State:
    """params, moments, steps and (optionally) averages and their count of one run."""

    def __init__(self, shapes, dtypes, device, averages=False):
        self.params = [randn([s], 10 + i, dt, device)[0] for i, (s, dt) in enumerate(zip(shapes, dtypes))]
        self.exp_avgs = [randn([p.shape], 50 + i, p.dtype, device)[0] for i, p in enumerate(self.params)]
        self.exp_avg_sqs = [randn([p.shape], 90 + i, p.dtype, device)[0].abs() for i, p in enumerate(self.params)]
        self.steps = [torch.full((), float(i % 3), device=device) for i in range(len(shapes))]
        acc = [torch.float64 if p.dtype == torch.float64 else torch.float32 for p in self.params]
        self.averages = [p.to(a) + 1 for p, a in zip(self.params, acc)] if averages else None
        self.count = torch.tensor(2, device=device) if averages else None

    def clone(self, dtype=None):
        c = object.__new__(State)
        cast = (lambda x: x.clone()) if dtype is None else (lambda x: x.to(dtype))
        for name in ("params", "exp_avgs", "exp_avg_sqs"):
            setattr(c, name, [cast(x) for x in getattr(self, name)])
        c.steps = [s.clone() for s in self.steps]
        c.averages = None if self.averages is None else [cast(a) for a in self.averages]
        c.count = None if self.count is None else self.count.clone()
        return c

    def tensors(self):
        extra = [] if self.averages is None else self.averages + [self.count]
        return self.params + self.exp_avgs + self.exp_avg_sqs + self.steps + extra


def _run(impl, state, exclude, steps=STEPS, **kw):
    op = ref.lamb_ if impl == "reference" else lbk_triton.get_op("lamb_", state.params[0].device.type)
    kw = {"lr": 0.05, **kw}
    for t in range(steps):
        grads = [randn([p.shape], 1000 * t + i, torch.float64, p.device)[0].to(p.dtype) * 4
                 for i, p in enumerate(state.params)]
        op(state.params, grads, state.exp_avgs, state.exp_avg_sqs, state.steps, exclude,
           averages=state.averages, average_count=state.count, **kw)
    return state


CONFIGS = {
    "timm": dict(),
    "apex": dict(style="apex"),
    "timm-l2-lerp-high": dict(decoupled_weight_decay=False, beta1=0.3),
    "apex-l2-no-averaging-no-bias": dict(style="apex", decoupled_weight_decay=False,
                                         grad_averaging=False, bias_correction=False),
    "max-trust-lambc-no-decay": dict(max_trust=2.0, clip=True, weight_decay=0.0),
    # N is about 4 * sqrt(326) = 72: both clip, the second from a given norm and a scale.
    "global-clip": dict(max_grad_norm=5.0),
    "given-norm-scaled-lr-tensor": dict(style="apex", max_grad_norm=5.0,
                                        grad_norm=torch.tensor(300.0), grad_scale=torch.tensor(4.0),
                                        lr_tensor=torch.tensor(0.02)),
    "ema": dict(average_method="ema", average_decay=0.9),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lamb_matches_reference(device, dtype, config):
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in CONFIGS[config].items()}
    state = State(TRITON_SHAPES, [dtype] * len(TRITON_SHAPES), device,
                  averages=config in ("ema", "global-clip"))
    exclude = [i == 2 for i in range(len(TRITON_SHAPES))]
    got = _run("triton", state.clone(), exclude, **kw)
    expected = _run("reference", state.clone(), exclude, **kw)
    for x, y in zip(got.tensors(), expected.tensors()):  # the count (int64) exactly
        torch.testing.assert_close(x, y, **TOL.get(x.dtype, dict(rtol=0, atol=0)))


def test_lamb_mixed_dtypes_and_global_clip(device):
    """24 tensors of all four dtypes in one call: one norm over every group's gradients,
    a launch per dtype; 16-bit moments computed again in the write pass. fp32/fp64
    tight; fp16/bf16 by the rule: kernel error <= 2x the reference's own error in that
    dtype, both measured against the reference run in fp64."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
    shapes = [(1 + (37 * i) % 80,) if i % 5 else (3, 1 + i) for i in range(24)]
    dts = [dtypes[i % 4] for i in range(24)]
    state = State(shapes, dts, device, averages=True)
    exclude = [i % 7 == 0 for i in range(24)]
    kw = dict(max_grad_norm=10.0, weight_decay=0.1)
    got = _run("triton", state.clone(), exclude, **kw)
    expected = _run("reference", state.clone(), exclude, **kw)
    oracle = _run("reference", state.clone(torch.float64), exclude, **kw)
    for i, dt in enumerate(dts):
        for name in ("params", "exp_avgs", "exp_avg_sqs", "averages"):
            k, r, o = (getattr(s, name)[i] for s in (got, expected, oracle))
            if dt == torch.float64:
                # c is fp32 when not every gradient is fp64 (the reference's dtype), and two
                # fp32 norms of the same gradients may differ by an ulp (1.2e-7 relative).
                torch.testing.assert_close(k, r, rtol=1.2e-7, atol=1e-15)
            elif dt == torch.float32:
                torch.testing.assert_close(k, r, **TOL[dt])
            else:
                err_k = (k.double() - o).abs().max()
                err_r = (r.double() - o).abs().max()
                assert err_k <= 2 * err_r, (i, dt, name, err_k.item(), err_r.item())
        assert got.steps[i].item() == expected.steps[i].item()
    assert got.count.item() == 2 + STEPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lamb_found_inf_changes_nothing(device, dtype):
    """With found_inf set, weights, moments, steps, averages and count keep their bits,
    also with the global norm and 16-bit moments."""
    state = State(TRITON_SHAPES, [dtype] * len(TRITON_SHAPES), device, averages=True)
    before = [x.clone() for x in state.tensors()]
    _run("triton", state, [False] * len(TRITON_SHAPES), steps=1, max_grad_norm=1.0,
         found_inf=torch.ones((), device=device))
    for x, y in zip(state.tensors(), before):
        assert torch.equal(x, y)
