"""The streamed writes of the native CPU extrap_sgd_ / extrap_adam_ (csrc/cpu/stream_store.h).

In the AVX2 / AVX512 builds the extrapolated point w of an fp32/fp64 tensor of at least
LBK_CPU_STREAM_BYTES (default 1 MiB) is written with non-temporal stores from the first
address of w aligned to the vector width; the elements before it and after the last whole
vector are stored plainly. Checked here, weights and all state:

* tensors just under, at and over the threshold, as views whose lists start at different
  misaligned offsets, against the reference, and bitwise against the same step on aligned
  copies (the loops compute per element: where w lies must not change a bit);
* in fresh processes that stream every tensor (LBK_CPU_STREAM_BYTES=0), under each x86
  capability, small tensors at every misalignment bitwise against plain stores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import backend_params
from lbkernels import _library, ops

pytestmark = pytest.mark.skipif(not _library.has_native_kernel("extrap_sgd_", "cpu"),
                                reason="no native CPU extrap kernels")

THRESHOLD = 1 << 20  # bytes: stream_min_bytes()'s default
# 3 steps: the kernels contract products into FMAs and sum LARS norms in another order, a
# few ulps per step compounding through the buffers (test_extrap_ops.py's bound for 7 steps).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}
SGD_CONFIGS = {
    "momentum-wd": dict(lr=0.2, extrap_lr=0.1, momentum=0.9, weight_decay=1e-2),
    "nesterov-local-scaled": dict(lr=0.2, extrap_lr=0.05, momentum=0.9, nesterov=True,
                                  weight_decay=5e-4, local=True, grad_scale=8.0),
    "lars-local": dict(lr=2.0, extrap_lr=0.5, momentum=0.9, weight_decay=5e-3, lars=True,
                       trust_coefficient=0.02, local=True),
}
ADAM_CONFIGS = {
    "l2": dict(lr=1e-2, extrap_lr=5e-3, weight_decay=1e-2),
    "decoupled-local": dict(lr=1e-2, extrap_lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1,
                            decoupled_weight_decay=True, local=True),
}
SGD_LISTS = ("params", "anchors", "momentum_buffers")
ADAM_LISTS = ("params", "anchors", "exp_avgs", "exp_avg_sqs")


def threshold_sizes(dtype):
    """Just under, at, and over the threshold by 3 vectors and an odd tail; and a small one."""
    at = THRESHOLD // (torch.finfo(dtype).bits // 8)
    return [at - 1, at, at + 3 * 16 + 5, 37]


def tensors(sizes, seed, dtype, offset):
    """Tensors of `sizes`, each a view `offset` elements into its own storage (0: aligned)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        t = torch.empty(n + offset, dtype=dtype)[offset:]
        out.append(t.copy_(torch.randn(n, generator=g, dtype=torch.float64)))
    return out


def run_sgd(impl, sizes, dtype, cfg, extrapolation, offset, steps=3):
    """`steps` of extrap_sgd_; the lists start at offsets offset, offset + 1, ... (0: all aligned)."""
    cfg = dict(cfg)
    local = cfg.pop("local", False)
    scale = cfg.pop("grad_scale", None)
    at = (lambda k: 0) if offset == 0 else (lambda k: offset + k)
    x = tensors(sizes, 0, dtype, at(1))
    state = [[t.clone() for t in x], x, [torch.zeros_like(t) for t in x]]
    state = [[tensors([t.numel()], 0, dtype, at(k))[0].copy_(t) for t in lst]
             for k, lst in enumerate(state)]
    for step in range(steps):
        grads = tensors(sizes, 1000 + step, dtype, at(3))
        local_grads = tensors(sizes, 2000 + step, dtype, at(4)) if local else []
        if scale is not None:
            grads = [g.mul_(scale) for g in grads]
            local_grads = [g.mul_(scale) for g in local_grads]
        ops.extrap_sgd_(*state, grads, local_grads, [i % 3 == 2 for i in range(len(sizes))],
                        impl=impl, extrapolation=extrapolation, noise_scale=0.1, seed=5,
                        offset=step, grad_scale=None if scale is None else torch.tensor(scale),
                        **cfg)
    return state


def run_adam(impl, sizes, dtype, cfg, offset, steps=3):
    cfg = dict(cfg)
    local = cfg.pop("local", False)
    at = (lambda k: 0) if offset == 0 else (lambda k: offset + k)
    x = tensors(sizes, 0, dtype, at(1))
    state = [[t.clone() for t in x], x, [torch.zeros_like(t) for t in x],
             [torch.zeros_like(t) for t in x]]
    state = [[tensors([t.numel()], 0, dtype, at(k))[0].copy_(t) for t in lst]
             for k, lst in enumerate(state)]
    counters = [torch.zeros(()) for _ in sizes]
    for step in range(steps):
        grads = tensors(sizes, 1000 + step, dtype, at(4))
        local_grads = tensors(sizes, 2000 + step, dtype, at(5)) if local else []
        ops.extrap_adam_(*state, counters, grads, local_grads, impl=impl, **cfg)
    return state


def assert_bitwise(actual, expected, names):
    for name, a_list, e_list in zip(names, actual, expected):
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            assert a.dtype == e.dtype and a.shape == e.shape
            assert torch.equal(a.view(torch.uint8), e.view(torch.uint8)), f"{name}[{i}] differs"


def assert_close(actual, expected, names, dtype):
    for name, a_list, e_list in zip(names, actual, expected):
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            torch.testing.assert_close(a, e, msg=lambda m: f"{name}[{i}]: {m}", **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg,extrapolation", [(c, "past_grad") for c in SGD_CONFIGS]
                         + [("momentum-wd", e) for e in ("gaussian", "weight", "filter")])
def test_sgd_around_the_threshold_on_misaligned_views(dtype, cfg, extrapolation):
    sizes = threshold_sizes(dtype)
    args = (sizes, dtype, SGD_CONFIGS[cfg], extrapolation)
    got = run_sgd("native", *args, offset=3)
    assert_bitwise(got, run_sgd("native", *args, offset=0), SGD_LISTS)
    exp = run_sgd("reference", *args, offset=0)
    # The noise variants draw from another generator in the reference: there only the
    # anchors and buffers (which the draw does not touch) are compared with it.
    first = 0 if extrapolation == "past_grad" else 1
    assert_close(got[first:], exp[first:], SGD_LISTS[first:], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("cfg", list(ADAM_CONFIGS))
def test_adam_around_the_threshold_on_misaligned_views(dtype, cfg):
    sizes = threshold_sizes(dtype)
    got = run_adam("native", sizes, dtype, ADAM_CONFIGS[cfg], offset=5)
    assert_bitwise(got, run_adam("native", sizes, dtype, ADAM_CONFIGS[cfg], offset=0), ADAM_LISTS)
    assert_close(got, run_adam("reference", sizes, dtype, ADAM_CONFIGS[cfg], offset=0),
                 ADAM_LISTS, dtype)


# Small sizes around one and two vectors (AVX2 fp64: 4 elements, AVX512 fp32: 16) at every
# misalignment of w within a 64-byte line: the head, whole vectors and tail all vary.
SMALL_SIZES = [1, 3, 4, 5, 8, 15, 16, 17, 31, 33, 100, 4099]


def all_steps() -> dict:
    """Every variant on SMALL_SIZES at every offset, in this process's setting."""
    out = {}
    for dtype in (torch.float32, torch.float64):
        for offset in range(64 // (torch.finfo(dtype).bits // 8)):
            for cfg, extrapolation in [("nesterov-local-scaled", "past_grad"), ("lars-local", "past_grad"),
                                       ("momentum-wd", "gaussian"), ("momentum-wd", "filter")]:
                out[f"sgd {dtype} {offset} {cfg} {extrapolation}"] = run_sgd(
                    "native", SMALL_SIZES, dtype, SGD_CONFIGS[cfg], extrapolation, offset, steps=2)
            out[f"adam {dtype} {offset}"] = run_adam(
                "native", SMALL_SIZES, dtype, ADAM_CONFIGS["decoupled-local"], offset, steps=2)
    return out


def steps_in_process(tmp_path: Path, **env: str) -> dict:
    path = tmp_path / f"steps-{len(list(tmp_path.iterdir()))}.pt"
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import torch; "
            f"import test_extrap_stream as t; torch.save(t.all_steps(), {str(path)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return torch.load(path)


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx512", "avx2"])
def test_streaming_every_tensor_changes_no_bit(tmp_path, capability):
    have = torch.backends.cpu.get_cpu_capability()  # the best the CPU has: AVX512, AVX2, ...
    if have not in {"avx512": ("AVX512",), "avx2": ("AVX2", "AVX512")}[capability]:
        pytest.skip(f"this CPU's capability is {have}")
    streamed = steps_in_process(tmp_path, ATEN_CPU_CAPABILITY=capability, LBK_CPU_STREAM_BYTES="0")
    plain = steps_in_process(tmp_path, ATEN_CPU_CAPABILITY=capability,
                             LBK_CPU_STREAM_BYTES=str(1 << 40))
    assert streamed.keys() == plain.keys()
    for key in plain:
        assert_bitwise(streamed[key], plain[key], [f"{key} list {k}" for k in range(4)])
