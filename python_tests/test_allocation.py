"""A fused step allocates nothing proportional to the model (docs/algorithms.md section 6)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lbkernels import _library, ops
from lbkernels.optim import LARS, ExtrapSGD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.params import TimmStyleLARS, make_params  # noqa: E402


def bytes_allocated_by_step(opt) -> int:
    opt.step()  # lazy state is created on the first step, as in torch.optim
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_lars_step_allocates_nothing_model_sized():
    ps = make_params([(256, 256)] * 6 + [(300,)] * 40 + [(70000,)])
    model_bytes = sum(p.numel() * p.element_size() for p in ps)
    if not _library.has_native_kernel("lars_sgd_", "cpu"):
        pytest.skip("compiled kernels not loaded (the reference allocates by design)")
    opt = LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, impl="native")
    assert bytes_allocated_by_step(opt) < 0.001 * model_bytes


def test_extrap_sgd_step_and_capture_allocate_nothing_model_sized():
    """The step with a local-gradient list, and the capture the DDP hook does per step
    (copies into buffers allocated at the first capture)."""
    ps = make_params([(256, 256)] * 6 + [(300,)] * 40 + [(70000,)])
    model_bytes = sum(p.numel() * p.element_size() for p in ps)
    if not _library.has_native_kernel("extrap_sgd_", "cpu"):
        pytest.skip("compiled kernels not loaded (the reference allocates by design)")
    opt = ExtrapSGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, impl="native")
    opt.capture_local_grads()
    opt.step()  # lazy state: anchors, buffers, local-gradient buffers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.capture_local_grads()
        opt.step()
    assert sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) < 0.001 * model_bytes


def test_counter_sees_a_model_sized_temporary():
    """The positive control: a timm-style loop allocates a gradient-sized temporary per tensor."""
    ps = make_params([(256, 256)] * 6)
    model_bytes = sum(p.numel() * p.element_size() for p in ps)
    assert bytes_allocated_by_step(TimmStyleLARS(ps, 0.1, 0.9, 1e-4)) >= model_bytes


def test_lamb_op_allocates_nothing_model_sized():
    """The op alone, computing the global gradient norm itself (no grad_norm) and folding
    the averaging in: its per-chunk partial sums are a few bytes per 64K elements."""
    ps = make_params([(256, 256)] * 6 + [(300,)] * 40 + [(70000,)])
    model_bytes = sum(p.numel() * p.element_size() for p in ps)
    if not _library.has_native_kernel("lamb_", "cpu"):
        pytest.skip("compiled kernels not loaded (the reference allocates by design)")
    grads = [torch.randn_like(p) for p in ps]
    m, v, avg = ([torch.zeros_like(p) for p in ps] for _ in range(3))
    steps = [torch.zeros(()) for _ in ps]
    count = torch.zeros((), dtype=torch.int64)
    exclude = [p.numel() == 300 for p in ps]  # the 70000-element tensor takes the blocked path

    def step():
        ops.lamb_(ps, grads, m, v, steps, exclude, lr=0.01, max_grad_norm=1.0, averages=avg,
                  average_count=count, impl="native")

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    assert sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) < 0.001 * model_bytes
