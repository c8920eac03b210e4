"""The optimizers on a GPU: a CUDA-graph capture of the step, GradScaler over a real fp16
overflow, 16-bit parameters against the reference, and a parameter past 2**31 elements.
Every row runs a compiled CUDA backend and is skipped with its reason elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import HOST_COUNTERS, OPTIMIZERS, assert_same, batch, compiled_backend_params, model, randn
from lbkernels import ops
from lbkernels.optim import LARS

CUDA_BACKENDS = [p for p in compiled_backend_params() if p.values[1] == "cuda"]
each_cuda_backend = pytest.mark.parametrize("impl,device", CUDA_BACKENDS)
each_optimizer = pytest.mark.parametrize("entry", OPTIMIZERS, ids=[e.name for e in OPTIMIZERS])

# helpers.HOST_COUNTERS: a replay would repeat the captured counter, so the capture
# itself is refused (ShiftedMomentumSGD without worker=).


def grads_of(m, t):
    """The gradients of the loss on batch ``t`` at ``m``'s weights."""
    x, y = batch(t, device=next(m.parameters()).device)
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    return [p.grad.clone() for p in m.parameters()]


@each_optimizer
@each_cuda_backend
def test_graph_replays_equal_eager_steps(entry, impl, device):
    a, b = model(device=device), model(device=device)
    oa = entry.make(a.parameters(), impl=impl, lr=torch.tensor(0.05, device=device))
    ob = entry.make(b.parameters(), impl=impl, lr=torch.tensor(0.05, device=device))
    # One eager step each first: lazy state and cached tensor lists exist before capture.
    for m, opt in ((a, oa), (b, ob)):
        grads_of(m, 0)
        opt.step()
    static = [p.grad for p in b.parameters()]  # the graph reads the grads from here
    graph = torch.cuda.CUDAGraph()
    if entry.name in HOST_COUNTERS:
        with pytest.raises(RuntimeError, match="CUDA graph"), torch.cuda.graph(graph):
            ob.step()
        return
    with torch.cuda.graph(graph):
        ob.step()
    for t in range(1, 5):  # four replays against four eager steps, on a's grads
        for s, g in zip(static, grads_of(a, t)):
            s.copy_(g)
        oa.step()
        graph.replay()
    torch.cuda.synchronize()
    assert_same(dict(a.named_parameters()), dict(b.named_parameters()), "weights")
    assert_same(oa.state_dict()["state"], ob.state_dict()["state"])


def amp_step(m, opt, scaler, t):
    device = next(m.parameters()).device
    x, y = batch(t, device=device)
    opt.zero_grad()
    with torch.autocast(device.type, dtype=torch.float16):
        loss = torch.nn.functional.cross_entropy(m(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@each_optimizer
@each_cuda_backend
def test_grad_scaler_skips_a_real_fp16_overflow(entry, impl, device):
    a, b = model(device=device), model(device=device)
    oa, ob = entry.make(a.parameters(), impl=impl), entry.make(b.parameters(), impl=impl)
    sa, sb = (torch.amp.GradScaler(device, init_scale=2.0**10) for _ in range(2))
    for t in range(2):
        amp_step(a, oa, sa, t)
        amp_step(b, ob, sb, t)
    before = copy.deepcopy((a.state_dict(), oa.state_dict()))
    # Loss ~1 scaled by 2**40: its gradient at the fp16 logits (~2**40 / 16) is past fp16's
    # largest value (65504), so the backward itself makes inf: the scaler must skip.
    sa.update(2.0**40)
    amp_step(a, oa, sa, 2)
    assert sa.get_scale() == 2.0**39  # found_inf seen: the scale halved
    assert_same(a.state_dict(), before[0], "weights")
    assert_same(oa.state_dict()["state"], before[1]["state"], "optimizer state")
    # The next finite steps follow a run that took a step without gradients there (a step
    # count, round-robin position or noise offset advances: helpers.OPTIMIZERS' rule).
    sa.update(2.0**10)
    ob.zero_grad()
    ob.step()
    for t in range(3, 5):
        amp_step(a, oa, sa, t)
        amp_step(b, ob, sb, t)
    assert_same(a.state_dict(), b.state_dict(), "weights")
    assert_same(oa.state_dict()["state"], ob.state_dict()["state"])


# Noise is keyed by the device (extrap.py's offset): the cpu reference draws other numbers.
SAME_ON_EVERY_DEVICE = [e for e in OPTIMIZERS if "noise" not in e.name]


@pytest.mark.parametrize("entry", SAME_ON_EVERY_DEVICE, ids=[e.name for e in SAME_ON_EVERY_DEVICE])
@each_cuda_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_error_bound(entry, impl, device, dtype):
    """test_lars.py's rule for 16-bit tensors: the backend's error is at most 2x the
    reference's own error in that dtype, both against the fp64 reference run from the
    same rounded weights and gradients (an elementwise tolerance means nothing once two
    runs round one value differently)."""
    initial = [p.detach().to(dtype) for p in model().parameters()]
    shapes = [w.shape for w in initial]

    def run(impl_, device_, dtype_):
        params = [torch.nn.Parameter(w.to(device_, dtype_)) for w in initial]
        opt = entry.make(params, impl=impl_)
        for t in range(5):
            for p, g in zip(params, randn(shapes, 1000 + t, torch.float64, "cpu")):
                p.grad = g.to(dtype).to(device_, dtype_)
            opt.step()
        return [p.detach().cpu().double() for p in params]

    exact = run("reference", "cpu", torch.float64)

    def err(xs):
        return torch.cat([(x - e).flatten() for x, e in zip(xs, exact)]).norm()

    got, ref_low = err(run(impl, device, dtype)), err(run("reference", "cpu", dtype))
    assert got <= 2 * ref_low
    assert ref_low > 0  # the check compares something


def _norm64(x: torch.Tensor, chunk: int = 2**28) -> torch.Tensor:
    """||x|| in fp64 on x's device, a chunk at a time (a whole fp64 copy would be 16 GiB)."""
    return sum(x[i:i + chunk].double().square().sum() for i in range(0, x.numel(), chunk)).sqrt()


NATIVE_CUDA = [p for p in CUDA_BACKENDS if p.values[0] == "native"]


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", NATIVE_CUDA)
def test_lars_steps_a_param_past_2_31_elements(impl, device):
    n = 2**31 + 1
    need = 2 * n * 2 + 2 * 2**30 + 2**30  # fp16 param and grad, a 2 GiB fp64 chunk, 1 GiB spare
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device).manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, generator=gen, device=device, dtype=torch.float16))
    p.grad = torch.randn(n, generator=gen, device=device, dtype=torch.float16)
    # The start, the middle, and the last 4097 elements, across index 2**31 (past int32).
    slices = [slice(0, 4096), slice(2**30 - 2048, 2**30 + 2048), slice(2**31 - 4096, n)]
    w = [p.detach()[s].clone() for s in slices]
    g = [p.grad[s].clone() for s in slices]
    lr, wd, tc, eps = 1.0, 1e-4, 0.1, 1e-8  # an update of ~0.1 * g: many fp16 ulps of w
    w_norm, g_norm = _norm64(p.detach()), _norm64(p.grad)
    LARS([p], lr=lr, weight_decay=wd, trust_coefficient=tc, eps=eps, impl=impl).step()
    ratio = tc * w_norm / (g_norm + wd * w_norm + eps)
    for s, ws, gs in zip(slices, w, g):
        before = ws.clone()
        # The reference on the slice, its ratio given through lr (an excluded tensor has r = 1).
        ops.lars_sgd_([ws], [gs], [], [], [True], lr=(lr * ratio).float(), weight_decay=wd, impl="reference")
        got = p.detach()[s]
        assert (got != before).float().mean() > 0.5, f"elements {s} were not stepped"
        torch.testing.assert_close(got, ws, msg=lambda m: f"elements {s}: {m}")


def _first_lamb_direction_norm64(w, g, wd, eps, chunk=2**28):
    """||u|| of a first LAMB step in fp64, a chunk at a time: the moments start at zero, so
    with bias correction m_hat = g and v_hat = g^2, and u = g / (|g| + eps) + wd * w."""
    total = 0.0
    for i in range(0, w.numel(), chunk):
        gs, ws = g[i:i + chunk].double(), w[i:i + chunk].double()
        total = total + (gs / (gs.abs() + eps) + wd * ws).square().sum()
    return total.sqrt()


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", NATIVE_CUDA)
def test_lamb_steps_a_param_past_2_31_elements(impl, device):
    n = 2**31 + 1
    # fp16 param, grad and two moments (4 GiB each), 2 GiB fp64 chunks (x4 in the norms), 1 spare
    need = 4 * n * 2 + 9 * 2**30
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device).manual_seed(0)
    p = torch.randn(n, generator=gen, device=device, dtype=torch.float16)
    g = torch.randn(n, generator=gen, device=device, dtype=torch.float16)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device=device)
    # The start, the middle, and the last 4097 elements, across index 2**31 (past int32).
    slices = [slice(0, 4096), slice(2**30 - 2048, 2**30 + 2048), slice(2**31 - 4096, n)]
    w = [p[s].clone() for s in slices]
    lr, wd, eps = 0.01, 0.01, 1e-6  # |u| ~ 1: updates of ~0.01, many fp16 ulps of w
    ratio = (_norm64(p) / _first_lamb_direction_norm64(p, g, wd, eps)).item()
    ops.lamb_([p], [g], [m], [v], [step], [False], lr=lr, weight_decay=wd, eps=eps, impl=impl)
    assert step.item() == 1
    for s, ws in zip(slices, w):
        before = ws.clone()
        ms, vs = torch.zeros_like(ws), torch.zeros_like(ws)
        # The reference on the slice, its ratio given through lr (an excluded tensor has r = 1).
        ops.lamb_([ws], [g[s]], [ms], [vs], [torch.zeros((), device=device)], [True],
                  lr=lr * ratio, weight_decay=wd, eps=eps, impl="reference")
        assert (p[s] != before).float().mean() > 0.5, f"elements {s} were not stepped"
        for got, expected in ((p[s], ws), (m[s], ms), (v[s], vs)):
            torch.testing.assert_close(got, expected, msg=lambda msg: f"elements {s}: {msg}")


@each_cuda_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lars_norm_cache_is_bitwise_the_recomputed_norm(impl, device, dtype):
    """lars_sgd_'s w_norm_sq / w_norm_key: 4 steps with the cache equal 4 without, bit for
    bit, on tensors of several 64K chunks, one not pack-aligned (a view at offset 1: its
    packs read element by element), with an excluded one, step 2 skipped (found_inf)
    after an edit; each entry is the norm the norm pass computes from w now
    (multi_tensor_l2norm: the same chunks, tiles and order), each key (version counter
    after the op, address)."""
    sizes, exclude = [3 * 65536 + 7, 1000, 65536, 5], [False, False, False, True]

    def state():
        ws = [randn([(n + 1,)], 10 + i, torch.float64, device)[0].to(dtype) for i, n in enumerate(sizes)]
        params = [w[1:] if i == 0 else w[:-1] for i, w in enumerate(ws)]  # params[0] at offset 1
        return params, [torch.zeros_like(p) for p in params], [torch.zeros((), device=device) for _ in params]

    runs = {cache: state() for cache in (True, False)}
    n = len(sizes)
    w_norm_sq = torch.full((n,), -1.0, dtype=torch.float64, device=device)
    w_norm_key = torch.zeros((2, n), dtype=torch.int64)
    for t in range(4):
        for cache, (params, bufs, steps) in runs.items():
            grads = [randn([(p.numel(),)], 100 * t + i, torch.float64, device)[0].to(dtype)
                     for i, p in enumerate(params)]
            extra = dict(w_norm_sq=w_norm_sq, w_norm_key=w_norm_key) if cache else {}
            if t == 2:  # an edit (stale entry) and a skipped step: the entry is refreshed
                with torch.no_grad():
                    params[1].mul_(1.5)
                extra["found_inf"] = torch.ones((), device=device)
            ops.lars_sgd_(params, grads, bufs, steps, exclude, lr=0.1, momentum=0.9,
                          weight_decay=1e-3, trust_coefficient=0.02, impl=impl, **extra)
        for x, y in zip(sum(runs[True], []), sum(runs[False], [])):
            assert torch.equal(x, y)
        params = runs[True][0]
        fresh = ops.multi_tensor_l2norm(params, impl=impl)
        for i, p in enumerate(params):
            if exclude[i]:
                assert w_norm_sq[i].item() == -1.0 and w_norm_key[:, i].tolist() == [0, 0]
                continue
            # sqrt in fp64 rounded to fp32: the correctly rounded fp32 sqrt, the kernels' sqrt_rn
            assert w_norm_sq[i].sqrt().float().item() == fresh[i].item(), (t, i)
            assert w_norm_key[:, i].tolist() == [p._version, p.data_ptr()], (t, i)
