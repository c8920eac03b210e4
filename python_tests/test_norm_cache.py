"""lars_sgd_'s norm cache (w_norm_sq, w_norm_key; docs/algorithms.md section 1): the
reused ||w||^2 is the number the norm pass would compute, so a run with the cache equals
the run without bit for bit; every write to w between steps is seen (version counter,
data_ptr) and recomputes. A stale entry would change the result: each reuse-path test
also forges a key onto the old entry and checks that the run then differs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lbkernels import _library, ops
from lbkernels.optim import LAMB, LARS, ShiftedMomentumSGD, WeightAverager
from lbkernels.reference.lars import cached_norm_sq
from helpers import batch, model, randn, through_checkpoint, train

NATIVE_CPU = _library.has_native_kernel("lars_sgd_", "cpu")
needs_native = pytest.mark.skipif(not NATIVE_CPU, reason="compiled kernels not loaded")
IMPLS = [pytest.param("reference", id="reference"),
         pytest.param("native", id="native", marks=needs_native)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Small tensors (the whole-tensor path), several 64K chunks with ragged ends (the blocked
# path), 0-dim and empty; exclude[] mixes excluded tensors in.
SHAPES = [(3, 5), (7,), (2 * 65536 + 13,), (300, 401), (), (0,), (1,), (65536,)]
EXCLUDE = [False, True, False, False, False, False, True, False]
HP = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)


def new_cache(n: int) -> dict:
    return {"w_norm_sq": torch.full((n,), -1.0, dtype=torch.float64),
            "w_norm_key": torch.zeros((2, n), dtype=torch.int64)}


def make_params(dtype, noncontig: bool):
    ps = randn(SHAPES, 0, dtype, "cpu")
    if noncontig:  # the staged path: transposed 2-D params
        ps = [p.t().contiguous().t() if p.dim() == 2 else p for p in ps]
        assert not ps[0].is_contiguous() and not ps[3].is_contiguous()
    return ps


def run_op(impl, dtype, cache, steps=4, noncontig=False, norm_sq=False, params=None):
    """``steps`` lars_sgd_ calls on SHAPES; returns (params, bufs, steps, cache)."""
    ps = make_params(dtype, noncontig) if params is None else params
    bufs = [torch.zeros_like(p) for p in ps]
    counters = [torch.zeros(()) for _ in ps]
    kw = dict(HP, dampening=0.1)
    if norm_sq:  # ||w||^2 given for param 3, ||g||^2 for param 0: the cache skips the first
        given = torch.full((2, len(ps)), -1.0, dtype=torch.float64)
        given[0, 3], given[1, 0] = 2.5, 4.0
        kw["norm_sq"] = given
    c = new_cache(len(ps)) if cache else {}
    for t in range(steps):
        gs = randn(SHAPES, 100 + t, dtype, "cpu")
        ops.lars_sgd_(ps, gs, bufs, counters, EXCLUDE, impl=impl, **kw, **c)
    return ps, bufs, counters, c


def assert_bitwise(a: list, b: list):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"tensor {i} differs"


def assert_keys(ps, cache, impl):
    sq, key = cache["w_norm_sq"], cache["w_norm_key"]
    for i, p in enumerate(ps):
        if EXCLUDE[i]:
            assert sq[i] == -1 and key[0, i] == 0 and key[1, i] == 0, f"excluded {i} written"
            continue
        assert key[0, i] == p._version and key[1, i] == p.data_ptr(), f"key {i}"
        exact = p.double().square().sum()
        if impl == "reference":
            assert torch.equal(sq[i], cached_norm_sq(p)), f"entry {i}"
        # The native entry is summed in the working precision per 64K chunk, as its norm
        # pass: within fp32 rounding of the exact sum (the bitwise check is the run above).
        torch.testing.assert_close(sq[i], exact, rtol=1e-5 if p.dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["plain", "noncontig", "norm_sq"])
def test_cache_equals_no_cache_bitwise(impl, dtype, variant):
    opts = dict(noncontig=variant == "noncontig", norm_sq=variant == "norm_sq")
    ref = run_op(impl, dtype, False, **opts)
    got = run_op(impl, dtype, True, **opts)
    for a, b in zip(ref[:3], got[:3]):
        assert_bitwise(a, b)
    assert_keys(got[0], got[3], impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_matching_entry_is_used(impl, dtype):
    """The positive control of every bitwise test here: an entry whose key matches is
    used as ||w||^2 (a wrong one changes the step), one whose key does not is ignored."""
    ps, bufs, counters, c = run_op(impl, dtype, True, steps=2)
    gs = randn(SHAPES, 7, dtype, "cpu")

    def step(entry_scale, forge_version):
        qs, bs, ns = ([t.clone() for t in ts] for ts in (ps, bufs, counters))
        cc = {k: v.clone() for k, v in c.items()}
        cc["w_norm_sq"] *= entry_scale
        for i, q in enumerate(qs):  # the clones' keys: what the cache holds, or a version off
            cc["w_norm_key"][:, i] = torch.tensor([q._version + forge_version, q.data_ptr()])
        ops.lars_sgd_(qs, gs, bs, ns, EXCLUDE, impl=impl, **HP, dampening=0.1, **cc)
        return qs

    truth = step(1.0, 0)
    assert not all(torch.equal(a, b) for a, b in zip(truth, step(4.0, 0)))
    assert_bitwise(truth, step(4.0, 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_skipped_step_changes_nothing(impl):
    ps, bufs, counters, c = run_op(impl, torch.float32, True, steps=2)
    before = [t.clone() for t in ps + bufs + counters]
    cache_before = {k: v.clone() for k, v in c.items()}
    gs = randn(SHAPES, 7, torch.float32, "cpu")
    ops.lars_sgd_(ps, gs, bufs, counters, EXCLUDE, impl=impl, **HP, dampening=0.1,
                  found_inf=torch.ones(()), **c)
    assert_bitwise(ps + bufs + counters, before)
    if impl == "native":
        assert torch.equal(c["w_norm_sq"], cache_before["w_norm_sq"])
        assert torch.equal(c["w_norm_key"], cache_before["w_norm_key"])
    else:  # the reference rewrites the (unchanged) norm and the key: still true
        assert_keys(ps, c, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_inference_tensors_are_never_keyed(impl):
    """Inference tensors have no version counter: stepped as without the cache, no key."""
    with torch.inference_mode():
        ref = run_op(impl, torch.float32, False, steps=2)
        got = run_op(impl, torch.float32, True, steps=2)
    for a, b in zip(ref[:3], got[:3]):
        assert_bitwise(a, b)
    assert not got[3]["w_norm_key"].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_cache_arguments_name_the_argument(impl):
    ps, bufs, counters, _ = run_op(impl, torch.float32, False, steps=0)
    n = len(ps)
    good = new_cache(n)
    bad = [
        (dict(w_norm_sq=good["w_norm_sq"]), "w_norm_key is missing"),
        (dict(w_norm_key=good["w_norm_key"]), "w_norm_sq is missing"),
        (dict(good, w_norm_sq=good["w_norm_sq"].float()), "w_norm_sq must be a dense float64"),
        (dict(good, w_norm_sq=torch.zeros(n + 1, dtype=torch.float64)), r"w_norm_sq must have shape"),
        (dict(good, w_norm_sq=torch.zeros(2 * n, dtype=torch.float64)[::2]), "w_norm_sq must be contiguous"),
        (dict(good, w_norm_key=good["w_norm_key"].int()), "w_norm_key must be a dense int64"),
        (dict(good, w_norm_key=torch.zeros((n, 2), dtype=torch.int64)), "w_norm_key must have shape"),
        (dict(good, w_norm_key=torch.zeros((2, n), dtype=torch.int64).t().contiguous().t()),
         "w_norm_key must be contiguous"),
    ]
    before = [p.clone() for p in ps]
    gs = randn(SHAPES, 7, torch.float32, "cpu")
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ops.lars_sgd_(ps, gs, bufs, counters, EXCLUDE, impl=impl, **HP, **kw)
    assert_bitwise(ps, before)


# --- the native entry is the native norm pass's sum, bit for bit ----------------------------
# A 1-ulp change of a float64 sum rarely reaches an fp32/bf16/fp16 step (the ratio is
# rounded to fp32): the bitwise runs above do not pin those entries. Here the native
# norm pass (csrc/cpu/lars_kernel.cpp sum_squares_range / sum_squares_reduced) is emulated
# in numpy: per 64K chunk, fp32 lanes (16 with AVX512, 8 with AVX2 and the default
# build), fused multiply-adds where the build has FMA, lanes then the tail added in
# double, chunks added in order from 0.
CAPABILITY = torch.backends.cpu.get_cpu_capability()
FUSED = CAPABILITY in ("AVX2", "AVX512")
LANES = 16 if CAPABILITY == "AVX512" else 8


def _madd32(x: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """fp32 x * x + acc, once rounded (FUSED: fp64 rounded to odd, then to fp32, is the
    correct rounding: 53 >= 2 * 24 + 2 bits) or twice (the default build)."""
    if not FUSED:
        return (x * x).astype(np.float32) + acc
    x2, a = x.astype(np.float64) ** 2, acc.astype(np.float64)  # x2 exact
    s = x2 + a
    bb = s - x2
    err = (x2 - (s - bb)) + (a - bb)  # TwoSum: s + err == x2 + a exactly
    even = (s.view(np.int64) & 1) == 0
    s = np.where((err != 0) & even, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def _chunk_sum(x: np.ndarray, reduced: bool) -> float:
    n = len(x)
    if not reduced:
        acc, i = np.zeros((4, LANES), np.float32), 0
        for i in range(0, n - 4 * LANES + 1, 4 * LANES):
            acc = _madd32(x[i:i + 4 * LANES].reshape(4, LANES), acc)
        i = (n // (4 * LANES)) * 4 * LANES
        while i + LANES <= n:
            acc[0] = _madd32(x[i:i + LANES], acc[0])
            i += LANES
        lanes = (acc[0] + acc[1]) + (acc[2] + acc[3])
    else:  # fp16/bf16 as fp32 values: eight accumulators
        acc, i = np.zeros(8, np.float32), (n // 8) * 8
        for j in range(0, i, 8):
            acc = _madd32(x[j:j + 8], acc)
        lanes = acc
    s = 0.0
    for v in lanes:
        s += float(v)
    for v in x[i:]:
        s += float(v) * float(v)
    return s


def native_norm_sq(p: torch.Tensor) -> float:
    x = p.detach().float().flatten().numpy()  # fp16/bf16 values are exact in fp32
    total = 0.0
    for b in range(0, len(x), 65536):
        total += _chunk_sum(x[b:b + 65536], p.dtype != torch.float32)
    return total


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_native_entry_is_the_norm_pass_sum(dtype):
    ps, _, _, c = run_op("native", dtype, True, steps=2)
    l2 = ops.multi_tensor_l2norm(ps, impl="native")
    for i, p in enumerate(ps):
        want = native_norm_sq(p)
        # The emulation is the norm pass: its norm is multi_tensor_l2norm's, which sums
        # with the same loops.
        assert np.float32(np.sqrt(want)) == l2[i].item(), f"emulation of tensor {i}"
        if not EXCLUDE[i]:
            assert c["w_norm_sq"][i].item() == want, f"entry {i}"


# --- version counters -------------------------------------------------------------------
def _op_calls():
    """(name, call(tensors) -> the tensors it mutates) for every native op, on CPU."""
    shapes = [(3, 4), (70000,)]

    def ps():
        return randn(shapes, 0, torch.float32, "cpu")

    def lars():
        w, g, b = ps(), ps(), [torch.zeros(s) for s in shapes]
        n = [torch.zeros(()) for _ in shapes]
        c = new_cache(2)
        ops.lars_sgd_(w, g, b, n, [False, False], lr=0.1, momentum=0.9, dampening=0.1,
                      impl="native", **c)
        return w + b + n + [c["w_norm_sq"], c["w_norm_key"]]

    def average():
        a, count = ps(), torch.zeros((), dtype=torch.int64)
        ops.average_(a, ps(), count, impl="native")
        return a + [count]

    def worker_mean():
        w = ps()
        ops.worker_mean_(w, torch.cat([p.flatten() for p in ps()]) * 2, 2, impl="native")
        return w

    def extrap_sgd():
        w, x, b = ps(), ps(), [torch.zeros(s) for s in shapes]
        ops.extrap_sgd_(w, x, b, ps(), [], [False, False], lr=0.1, extrap_lr=0.1, momentum=0.9,
                        impl="native")
        return w + x + b

    def extrap_adam():
        w, x, m, v = ps(), ps(), [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
        n = [torch.zeros(()) for _ in shapes]
        ops.extrap_adam_(w, x, m, v, n, ps(), [], lr=0.1, extrap_lr=0.1, impl="native")
        return w + x + m + v + n

    def lamb():
        w, m, v = ps(), [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
        n = [torch.zeros(()) for _ in shapes]
        ops.lamb_(w, ps(), m, v, n, [False, False], lr=0.1, impl="native")
        return w + m + v + n

    return [lars, average, worker_mean, extrap_sgd, extrap_adam, lamb]


@needs_native
@pytest.mark.parametrize("call", _op_calls(), ids=lambda f: f.__name__)
def test_native_ops_bump_versions_once(call):
    for t in call():  # fresh tensors, version 0, each mutated by one call
        assert t._version == 1, "a mutated tensor's version counter was not bumped once"


# --- every write between steps is seen (optimizer level) ----------------------------------
def _forge_keys(opt):
    """Makes every cache entry look current: what a write that bumped nothing would leave."""
    for _, buckets, _ in opt._buckets.values():
        for bucket in buckets:
            if bucket.w_norm is not None:
                key = bucket.w_norm["w_norm_key"]
                for i, p in enumerate(bucket.params):
                    key[0, i], key[1, i] = p._version, p.data_ptr()


def _new_weights(m):
    other = model(seed=5)
    return {k: v.to(next(m.parameters()).dtype) for k, v in other.state_dict().items()}


def _inplace(m, opt):
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)


def _copy(m, opt):
    with torch.no_grad():
        for p, q in zip(m.parameters(), model(seed=5).parameters()):
            p.copy_(q)


def _module_load(m, opt):
    m.load_state_dict(_new_weights(m))


def _set_data(m, opt):
    for p, q in zip(m.parameters(), model(seed=5).parameters()):
        p.data = q.detach().clone()


def _averager(m, opt):
    avg = WeightAverager(m, mode="ema", decay=0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)  # (seen: recomputed) so that the average differs from the weights
    avg.update()
    avg.apply_to()  # kept: training goes on from the averaged weights


def _worker_mean(m, opt):
    ps = list(m.parameters())
    flat = torch.cat([p.detach().flatten() for p in model(seed=5).parameters()]) * 2
    with torch.no_grad():
        ops.worker_mean_(ps, flat, 2)


def _lamb_step(m, opt):
    lamb = LAMB(m.parameters(), lr=0.05, weight_decay=1e-2)
    x, y = batch(50)
    lamb.zero_grad()
    F.cross_entropy(m(x), y).backward()
    lamb.step()


def _optimizer_load(m, opt):
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    opt.load_state_dict(through_checkpoint(opt.state_dict()))


WRITES = [_inplace, _copy, _module_load, _set_data, _averager, _worker_mean, _lamb_step,
          _optimizer_load]


def _lars(m, impl, reuse):
    return LARS(m.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3,
                trust_coefficient=0.02, impl=impl, reuse_norms=reuse)


def _run_with_write(impl, write, reuse, forge=False):
    m = model()
    opt = _lars(m, impl, reuse)
    train(m, opt, 2)
    write(m, opt)
    if forge:
        _forge_keys(opt)
    train(m, opt, 2, start=2)
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("write", WRITES, ids=lambda f: f.__name__.strip("_"))
def test_write_between_steps_recomputes(impl, write):
    if write in (_worker_mean,) and not NATIVE_CPU:
        pytest.skip("the native op's version bump is what this checks")
    fresh = _run_with_write(impl, write, reuse=False)
    assert_bitwise(_run_with_write(impl, write, reuse=True), fresh)
    if write is not _optimizer_load:  # (its cache is dropped: nothing to forge)
        stale = _run_with_write(impl, write, reuse=True, forge=True)
        assert not all(torch.equal(a, b) for a, b in zip(stale, fresh)), \
            "a stale norm gave the same result: this check cannot fail"


def _ddp_job(rank, world, reuse, forge):
    """One LARS step before DDP's construction (which broadcasts rank 0's weights), two
    after; returns rank 1's weights and whether the broadcast bumped the versions."""
    m = model(seed=rank)  # different weights per rank until the broadcast
    opt = _lars(m, "auto", reuse)
    train(m, opt, 1)
    versions = [p._version for p in m.parameters()]
    ddp = torch.nn.parallel.DistributedDataParallel(m)
    bumped = all(p._version > v for p, v in zip(m.parameters(), versions))
    if forge:
        _forge_keys(opt)
    train(ddp, opt, 2, start=1)
    return [p.detach().clone() for p in m.parameters()], bumped


@pytest.mark.slow
def test_ddp_broadcast_recomputes(gloo):
    group = gloo(2)
    fresh = group.run(_ddp_job, False, False)[1][0]
    got, bumped = group.run(_ddp_job, True, False)[1]
    stale = group.run(_ddp_job, True, True)[1][0]
    assert bumped, "DDP's broadcast left the version counters as they were"
    assert_bitwise(got, fresh)
    assert not all(torch.equal(a, b) for a, b in zip(stale, fresh))


# --- optimizer level ----------------------------------------------------------------------
def _makers():
    return [
        pytest.param(lambda ps, impl, reuse: LARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02,
                                                  nesterov=True, impl=impl, reuse_norms=reuse), id="LARS"),
        pytest.param(lambda ps, impl, reuse: ShiftedMomentumSGD(ps, lr=0.5, momentum=0.9, delay=2, weight_decay=1e-3,
                                                                lars=True, trust_coefficient=0.02, impl=impl,
                                                                reuse_norms=reuse), id="ShiftedMomentumSGD-lars"),
    ]


def _groups(m):
    ps = list(m.parameters())
    return [{"params": ps[:2]}, {"params": ps[2:], "lars_exclude": True}]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make", _makers())
def test_optimizer_reuse_equals_no_reuse(make, impl):
    runs = []
    for reuse in (False, True):
        m = model()
        opt = make(_groups(m), impl, reuse)
        train(m, opt, 5)
        runs.append((m, opt))
    (ma, oa), (mb, ob) = runs
    assert_bitwise(list(ma.parameters()), list(mb.parameters()))
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for k in sa:
        assert_bitwise([sa[k][n] for n in sorted(sa[k])], [sb[k][n] for n in sorted(sb[k])])
    assert "w_norm_sq" not in str(ob.state_dict())  # the cache is not saved
    used = [b.w_norm is not None for _, bs, _ in ob._buckets.values() for b in bs]
    assert used == [True, False]  # the adapted group only


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make", _makers())
def test_resume_equals_uninterrupted(make, impl):
    a = model()
    oa = make(_groups(a), impl, True)
    train(a, oa, 5)
    b = model()
    ob = make(_groups(b), impl, True)
    train(b, ob, 2)
    saved = through_checkpoint({"model": b.state_dict(), "opt": ob.state_dict()})
    c = model(seed=9)
    oc = make(_groups(c), impl, True)
    c.load_state_dict(saved["model"])
    oc.load_state_dict(saved["opt"])
    train(c, oc, 3, start=2)
    assert_bitwise(list(a.parameters()), list(c.parameters()))


@needs_native
def test_step_with_cache_allocates_nothing():
    ps = [torch.randn(256, 256) for _ in range(4)] + [torch.randn(300) for _ in range(20)] + [torch.randn(70000)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = LARS(ps, lr=0.1, momentum=0.9, weight_decay=1e-4, impl="native")
    opt.step()  # lazy state and the cache are made on the first step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    assert sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0) == 0
    (bucket,) = [b for _, bs, _ in opt._buckets.values() for b in bs]
    assert (bucket.w_norm["w_norm_sq"] >= 0).all()  # the cache was in use


@pytest.mark.slow  # a compile costs seconds on two cores
@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_step_runs_without_cache(impl):
    a, b = model(), model()
    oa, ob = _lars(a, impl, True), _lars(b, impl, True)
    compiled = torch.compile(ob.step, fullgraph=True, backend="eager")
    try:
        for t in range(3):
            x, y = batch(t)
            for m, opt, step in ((a, oa, oa.step), (b, ob, compiled)):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                step()
    finally:
        torch._dynamo.reset()
    assert_bitwise(list(a.parameters()), list(b.parameters()))
    assert all(bk.w_norm is None for _, bs, _ in ob._buckets.values() for bk in bs)
