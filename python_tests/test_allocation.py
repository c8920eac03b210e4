"""A fused step allocates nothing proportional to the model (docs/algorithms.md section 6)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lbkernels import _library
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
