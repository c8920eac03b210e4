"""lars_sgd_'s cache of ||w||^2 (w_norm_sq, w_norm_key) on the Triton backend.

The numerics contract: K steps with the cache passed equal the same K steps without it
bit for bit, weights and every state tensor, because the cached number is the sum the
next call's norm pass would compute from w (same chunks, tiles and order). Run like
test_triton.py: the interpreter on CPU tensors without a GPU, chunks of TRITON_CHUNK so
that tensors span several chunks.
"""

from __future__ import annotations

import pytest
import torch

from helpers import TRITON_CHUNK, randn, triton_chunked_device
from lbkernels import triton as lbk_triton
from lbkernels.reference import lars as ref
from lbkernels.triton import norms

device = triton_chunked_device
STEPS = 4
# test_triton.py's tolerances against the reference (the backend's own sums differ in order).
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-7)}
# 1 to 3 chunks of 64, an empty tensor, a 0-dim one; the (10, 20)[:, ::2] view (not
# dense: staged into a temporary and copied back) joins in ``_params``.
SHAPES = [(1,), (TRITON_CHUNK,), (TRITON_CHUNK + 1,), (3, 50), (0,), ()]
EXCLUDE = [False, False, True, False, False, False, False]
KW = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3, trust_coefficient=0.02)


def _op(device):
    return lbk_triton.get_op("lars_sgd_", device)


class Run:
    """params, momentum buffers and step counters, and the cache when ``cache``."""

    def __init__(self, dtype, device, cache):
        # A tuple of dtypes: params of each in turn (a launch per dtype group, the cache
        # indexed by argument position across them).
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        self.params = [randn([s], 10 + i, torch.float64, device)[0].to(dtypes[i % len(dtypes)])
                       for i, s in enumerate(SHAPES)]
        self.params.append(randn([(10, 20)], 99, torch.float64, device)[0].to(dtypes[-1])[:, ::2])
        n = len(self.params)
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.steps = [torch.zeros((), device=device) for _ in self.params]
        self.cache = None
        if cache:
            self.cache = dict(w_norm_sq=torch.full((n,), -1.0, dtype=torch.float64, device=device),
                              w_norm_key=torch.zeros((2, n), dtype=torch.int64))

    def step(self, op, t, **kw):
        grads = [randn([tuple(p.shape)], 1000 * t + i, torch.float64, p.device)[0].to(p.dtype)
                 for i, p in enumerate(self.params)]
        op(self.params, grads, self.bufs, self.steps, EXCLUDE, **KW, **(self.cache or {}), **kw)

    def tensors(self):
        return self.params + self.bufs + self.steps


def _assert_bitwise(a: Run, b: Run):
    for x, y in zip(a.tensors(), b.tensors()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def _assert_cache_is_fresh(run: Run, device):
    """Each adapted entry is the sum the norm pass computes from w now: its square root in
    fp32 is multi_tensor_l2norm's norm (same group, so same chunks and block); its key is
    (version counter, address); excluded entries are untouched."""
    w_norm_sq, key = run.cache["w_norm_sq"], run.cache["w_norm_key"]
    fresh = norms.multi_tensor_l2norm(run.params)
    for i, p in enumerate(run.params):
        if EXCLUDE[i]:
            assert w_norm_sq[i].item() == -1.0 and key[:, i].tolist() == [0, 0]
            continue
        # sqrt in fp64 rounded to fp32 is the correctly rounded fp32 sqrt, the kernels'
        # sqrt_rn (torch's CPU fp32 sqrt is 1 ulp off for 165.25990295410156).
        assert w_norm_sq[i].sqrt().float().item() == fresh[i].item(), i
        assert key[:, i].tolist() == [p._version, p.data_ptr()], i
        expected = torch.linalg.vector_norm(p.double()).square().item()
        assert w_norm_sq[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-30), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16,
                                   (torch.float32, torch.bfloat16, torch.float64)],
                         ids=["fp32", "fp64", "bf16", "fp16", "mixed"])
def test_cache_is_bitwise_the_recomputed_norm(device, dtype):
    with_cache, without = Run(dtype, device, True), Run(dtype, device, False)
    op = _op(device)
    for t in range(STEPS):
        with_cache.step(op, t)
        without.step(op, t)
        _assert_bitwise(with_cache, without)
        _assert_cache_is_fresh(with_cache, device)
    if dtype == torch.float32:  # and the backend still agrees with the oracle
        expected = Run(dtype, device, False)
        for t in range(STEPS):
            expected.step(ref.lars_sgd_, t)
        for x, y in zip(with_cache.tensors(), expected.tensors()):
            torch.testing.assert_close(x, y, **TOL[dtype])


def test_cache_is_used_when_the_key_matches(device):
    """A matching key makes the op take the entry for ||w||^2 without reading w: a wrong
    entry (4x the true sum) changes the step, which is what proves the cache is read."""
    stale, without = Run(torch.float32, device, True), Run(torch.float32, device, False)
    op = _op(device)
    stale.step(op, 0)
    without.step(op, 0)
    stale.cache["w_norm_sq"][0] *= 4.0
    stale.step(op, 1)
    without.step(op, 1)
    assert not torch.equal(stale.params[0], without.params[0])
    torch.testing.assert_close(stale.params[1:], without.params[1:], rtol=0, atol=0)


def test_a_changed_param_is_recomputed(device):
    """An in-place edit (version counter), a new storage (address) and a negative entry
    each make the op compute ||w|| again: the run equals the one without the cache."""
    with_cache, without = Run(torch.float32, device, True), Run(torch.float32, device, False)
    op = _op(device)
    edits = [
        lambda r: r.params[0].mul_(1.5),
        lambda r: r.params.__setitem__(1, r.params[1].clone() * 0.5),
        lambda r: r.cache and r.cache["w_norm_sq"].fill_(-1.0),
    ]
    for t, edit in enumerate(edits):
        with torch.no_grad():
            edit(with_cache)
            edit(without)
        with_cache.step(op, t)
        without.step(op, t)
        _assert_bitwise(with_cache, without)
        _assert_cache_is_fresh(with_cache, device)


def test_skipped_step_keeps_the_cache_valid(device):
    """found_inf != 0 writes no weight; a matched entry stays (w unchanged), an unmatched
    one (an edit before the step) gets the sum of the unchanged w: every entry and key is
    valid after the skip, and the next steps still equal the run without the cache."""
    with_cache, without = Run(torch.float32, device, True), Run(torch.float32, device, False)
    op = _op(device)
    inf = torch.ones((), device=device)
    for t, flag in enumerate([0.0, 1.0, 0.0]):
        if t == 1:  # an edit before the skipped step: its stale entry must not survive it
            with torch.no_grad():
                with_cache.params[0].add_(1.0)
                without.params[0].add_(1.0)
        before = [x.clone() for x in with_cache.params]
        with_cache.step(op, t, found_inf=inf * flag)
        without.step(op, t, found_inf=inf * flag)
        _assert_bitwise(with_cache, without)
        if flag:
            torch.testing.assert_close(with_cache.params, before, rtol=0, atol=0)
        _assert_cache_is_fresh(with_cache, device)


def test_norm_sq_takes_precedence_and_the_cache_is_still_written(device):
    """A ||w||^2 given by norm_sq (here a wrong one, so that using it shows) is used
    rather than the cache; the entry written is still the new w's own sum."""
    with_cache, without = Run(torch.float32, device, True), Run(torch.float32, device, False)
    norm_sq = torch.full((2, len(with_cache.params)), -1.0, dtype=torch.float64, device=device)
    norm_sq[0, 3] = 7.0
    norm_sq[1, 1] = 2.0
    op = _op(device)
    for t in range(3):
        with_cache.step(op, t, norm_sq=norm_sq)
        without.step(op, t, norm_sq=norm_sq)
        _assert_bitwise(with_cache, without)
        _assert_cache_is_fresh(with_cache, device)


def test_another_op_writing_the_params_makes_them_recomputed(device):
    """worker_mean_ (post-local SGD's averaging across workers) writes the params between
    two steps: its version bump makes the next step recompute every ||w||."""
    with_cache, without = Run(torch.float32, device, True), Run(torch.float32, device, False)
    op = _op(device)
    worker_mean = lbk_triton.get_op("worker_mean_", device)
    for t in range(3):
        for run in (with_cache, without):
            if t:  # w = (3 w) / 2 on every param
                flat = torch.cat([p.reshape(-1) for p in run.params]) * 3.0
                worker_mean(run.params, flat, 2)
            run.step(op, t)
        _assert_bitwise(with_cache, without)
        _assert_cache_is_fresh(with_cache, device)


def test_inference_tensors_are_never_keyed(device):
    """Inference tensors have no version counter: stepped as without the cache, and
    their keys left untouched (as the reference and the native op leave them)."""
    op = _op(device)
    with torch.inference_mode():
        with_cache, without = Run(torch.float32, device, True), Run(torch.float32, device, False)
        for t in range(2):
            with_cache.step(op, t)
            without.step(op, t)
    _assert_bitwise(with_cache, without)
    assert not with_cache.cache["w_norm_key"].any()


def test_op_bumps_version_counters(device):
    """The op counts as an in-place write of what it mutates, once per call."""
    run = Run(torch.float32, device, True)
    versions = [p._version for p in run.params]
    run.step(_op(device), 0)
    assert all(p._version > v for p, v in zip(run.params, versions))


def test_other_ops_bump_what_they_write(device):
    """extrap_sgd_, extrap_adam_ and lamb_ on Triton count as in-place writes of the
    params (and of every state tensor they write): a LARS step on the same params after
    them recomputes ||w|| instead of serving a cached norm of the old weights."""
    shapes = [(5,), (3, 4)]

    params, anchors, bufs, grads = (randn(shapes, k, torch.float32, device) for k in range(4))
    steps = [torch.zeros((), device=device) for _ in shapes]
    calls = {
        "extrap_sgd_": ((params, anchors, bufs, grads, [], [False] * 2),
                        dict(lr=0.1, momentum=0.9), [params, anchors, bufs]),
        "extrap_adam_": ((params, anchors, [torch.zeros_like(p) for p in params],
                          [torch.zeros_like(p) for p in params], steps, grads, []),
                         dict(lr=0.1), [params, anchors, steps]),
        "lamb_": ((params, grads, [torch.zeros_like(p) for p in params],
                   [torch.zeros_like(p) for p in params], steps, [False] * 2),
                  dict(lr=0.1), [params, steps]),
    }
    for name, (args, kw, written) in calls.items():
        before = [[t._version for t in ts] for ts in written]
        lbk_triton.get_op(name, device)(*args, **kw)
        after = [[t._version for t in ts] for ts in written]
        assert all(a > b for bs, as_ in zip(before, after) for b, a in zip(bs, as_)), name


def test_lamb_moments_stage_bumps_the_norm_sq_it_writes(device):
    """lamb_'s moments stage writes each tensor's sums into norm_sq: counted as a write,
    as the native op counts it."""
    shapes = [(5,), (3, 4)]
    params, grads = (randn(shapes, k, torch.float32, device) for k in range(2))
    norm_sq = torch.full((2, len(shapes)), -1.0, dtype=torch.float64, device=device)
    before = norm_sq._version
    lbk_triton.get_op("lamb_", device)(
        params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
        [torch.zeros((), device=device) for _ in shapes], [False] * 2, lr=0.1, stage="moments",
        norm_sq=norm_sq)
    assert (norm_sq >= 0).all()
    assert norm_sq._version == before + 1
