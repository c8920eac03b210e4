"""What several test files share: the backends a kernel test runs over, the optimizer
table, the LARS kernel runs, the documented noise draw, the Triton chunk fixture, the
checkpoint comparisons of the training command, and gloo process groups.

Test files import from here, never from each other (conftest.py only configures).
"""

from __future__ import annotations

import datetime
import io
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import lbkernels
from lbkernels import _library, ops
from lbkernels.optim import LAMB, LARS, ExtrapAdam, ExtrapSGD, ShiftedMomentumSGD


# --- backends -----------------------------------------------------------------------------
def _triton_usable(device_type: str) -> tuple[bool, str]:
    try:
        from lbkernels import triton as lbk_triton

        return lbk_triton.available(device_type)
    except Exception as e:  # pragma: no cover - reported as the skip reason
        return False, f"Triton backend unusable: {e}"


def backend_params(device_types=("cpu", "cuda")) -> list:
    """(impl, device) pairs every kernel test runs over, with skip reasons for the
    ones this machine cannot run. The reference runs on CPU as the oracle itself."""
    out = []
    for dev in device_types:
        if dev == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
            out.append(pytest.param("native", dev, marks=pytest.mark.skip(reason=reason), id=f"native-{dev}"))
            out.append(pytest.param("triton", dev, marks=pytest.mark.skip(reason=reason), id=f"triton-{dev}"))
            continue
        native_ok = _library.has_native_kernel("lars_sgd_", dev)
        marks = [] if native_ok else [pytest.mark.skip(reason=f"compiled kernels not loaded: {lbkernels.native_unavailable_reason}")]
        out.append(pytest.param("native", dev, marks=marks, id=f"native-{dev}"))
        ok, why = _triton_usable(dev)
        marks = [] if ok else [pytest.mark.skip(reason=why)]
        out.append(pytest.param("triton", dev, marks=marks + _interpreted(dev), id=f"triton-{dev}"))
    return out


def optim_backend_params(triton_cpu: bool = False) -> list:
    """(impl, device) pairs every optimizer-level test runs over: its models and grads are
    built on ``device``. On cpu the compiled kernels (what impl="auto" picks there) and the
    reference; on cuda the compiled kernels and Triton. Interpreted Triton on cpu only with
    ``triton_cpu`` (a few tests: a program costs milliseconds there, and it is marked slow)."""
    out = [pytest.param("reference", "cpu", id="reference-cpu")]
    for param in backend_params():
        impl, dev = param.values
        if triton_cpu or (impl, dev) != ("triton", "cpu"):
            out.append(param)
    return out


def compiled_backend_params() -> list:
    """The compiled (impl, device) pairs, each skipped with its reason where absent: what a
    comparison with the reference runs over (impl="auto" would fall back to the reference
    and compare it with itself)."""
    return [p for p in optim_backend_params() if p.values[0] != "reference"]


def _interpreted(device_type: str) -> list:
    """The slow mark where Triton runs under its interpreter (CPU tensors): a program
    costs milliseconds there, 70% of the kernel tests' time on two cores."""
    return [pytest.mark.slow] if device_type == "cpu" else []


def randn(shapes, seed, dtype, device) -> list[torch.Tensor]:
    """Standard normal tensors of ``shapes``, drawn in fp64 from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for s in shapes]


# --- Triton at chunk boundaries -----------------------------------------------------------
# Chunks of 64 so that chunk boundaries fall inside small tensors: the interpreter costs
# a few milliseconds per program. 1, a chunk, a chunk + 1, an odd prime, empty, 0-dim,
# several chunks in 2-D, empty 3-D.
TRITON_CHUNK = 64
TRITON_SHAPES = [(1,), (TRITON_CHUNK,), (TRITON_CHUNK + 1,), (97,), (0,), (), (3, 50), (2, 0, 3)]


def _triton_device_params() -> list:
    out = []
    for dev in ("cpu", "cuda"):
        ok, why = _triton_usable(dev)
        out.append(pytest.param(dev, marks=([] if ok else [pytest.mark.skip(reason=why)]) + _interpreted(dev),
                                id=dev))
    return out


@pytest.fixture(params=_triton_device_params())
def triton_chunked_device(request, monkeypatch):
    """Each device Triton runs on, with the kernels' chunk lowered to TRITON_CHUNK."""
    from lbkernels.triton import multi_tensor

    monkeypatch.setattr(multi_tensor, "CHUNK_SIZE", TRITON_CHUNK)
    return request.param


# --- the optimizer table ------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One optimizer the generic checks (test_optim_generic.py) run against."""

    name: str
    make: Callable[..., torch.optim.Optimizer]  # make(params, impl=..., **overrides)
    state_keys: tuple[str, ...]  # per-param state expected after a step
    group_overrides: dict = field(default_factory=dict)  # a second group's different hyper-parameters
    copy_state_keys: tuple[str, ...] = ()  # state that starts as a copy of the param, not zeros


# Adding an optimizer to the project means adding a row here.
OPTIMIZERS = [
    Entry(
        "LARS",
        lambda params, impl="auto", **kw: LARS(
            params, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True,
                       "trust_coefficient": 0.02, "impl": impl, **kw}),
        ("momentum_buffer",),
        {"lr": 0.05, "weight_decay": 0.0, "lars_exclude": True},
    ),
    Entry(
        "LARS-paper-clip",
        lambda params, impl="auto", **kw: LARS(
            params, **{"lr": 0.5, "momentum": 0.9, "dampening": 0.1, "clip": True,
                       "momentum_style": "paper", "weight_decay": 1e-3, "impl": impl, **kw}),
        ("momentum_buffer", "step"),
        {"lr": 0.2, "momentum": 0.5},
    ),
    Entry(
        "ShiftedMomentumSGD-lars",
        lambda params, impl="auto", **kw: ShiftedMomentumSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "delay": 2, "weight_decay": 1e-4, "nesterov": True,
                       "lars": True, "trust_coefficient": 0.02, "impl": impl, **kw}),
        ("momentum_buffer_0", "momentum_buffer_1", "momentum_buffer_2"),
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "lars_exclude": True},
    ),
    Entry(
        "ExtrapSGD-nesterov",
        lambda params, impl="auto", **kw: ExtrapSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "impl": impl, **kw}),
        ("anchor", "momentum_buffer"),
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.0, "extrap_scale": 0.5},
        copy_state_keys=("anchor",),
    ),
    Entry(
        "ExtrapSGD-lars",
        lambda params, impl="auto", **kw: ExtrapSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "lars": True,
                       "trust_coefficient": 0.02, "impl": impl, **kw}),
        ("anchor", "momentum_buffer"),
        {"lr": 0.05, "weight_decay": 0.0, "lars_exclude": True, "extrap_lr": 0.01},
        copy_state_keys=("anchor",),
    ),
    Entry(
        # The groups' noise is keyed by their seeds: the second group names its seed so that
        # a separate optimizer for it draws the same numbers.
        "ExtrapSGD-filter-noise",
        lambda params, impl="auto", **kw: ExtrapSGD(
            params, **{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "extrapolation": "filter",
                       "noise_scale": 0.01, "noise_anneal": True, "seed": 3, "impl": impl, **kw}),
        ("anchor", "momentum_buffer"),
        {"lr": 0.05, "noise_scale": 0.02, "seed": 11},
        copy_state_keys=("anchor",),
    ),
    Entry(
        "ExtrapAdam",
        lambda params, impl="auto", **kw: ExtrapAdam(
            params, **{"lr": 0.01, "weight_decay": 1e-4, "impl": impl, **kw}),
        ("anchor", "step", "exp_avg", "exp_avg_sq"),
        {"lr": 0.005, "betas": (0.8, 0.99), "weight_decay": 1e-2, "decoupled_weight_decay": True},
        copy_state_keys=("anchor",),
    ),
    Entry(
        # No max_grad_norm: its norm spans every group, so two groups would not equal two
        # optimizers (test_lamb_optim.py checks the clipping).
        "LAMB",
        lambda params, impl="auto", **kw: LAMB(
            params, **{"lr": 0.01, "weight_decay": 1e-2, "clip": True, "max_trust": 5.0,
                       "impl": impl, **kw}),
        ("step", "exp_avg", "exp_avg_sq"),
        {"lr": 0.005, "betas": (0.8, 0.99), "weight_decay": 0.0, "style": "apex",
         "decoupled_weight_decay": False, "lamb_exclude": True},
    ),
]

# The rows whose step advances a host counter (the round-robin position, the noise offset):
# a compiled step breaks its graph there and a CUDA-graph capture is refused.
HOST_COUNTERS = ("ShiftedMomentumSGD-lars", "ExtrapSGD-filter-noise")


def through_checkpoint(state: dict) -> dict:
    """``state`` saved with torch.save and loaded back weights-only, as a checkpoint is."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def model(seed=0, dtype=torch.float32, device="cpu"):
    """The small classifier the optimizer checks train (the same weights on every device)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).to(device, dtype)


def batch(t, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(100 + t)
    x, y = torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g)
    return x.to(device), y.to(device)


def train(m, opt, steps, start=0, scaler=None, inf_at=()):
    """``steps`` steps from batch ``start``, on the model's device; the loss is made
    infinite at the steps in ``inf_at``."""
    p0 = next(m.parameters())
    for t in range(start, start + steps):
        x, y = batch(t, p0.dtype, p0.device)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(x), y)
        if t in inf_at:
            loss = loss * float("inf")
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


# --- LARS kernel runs (test_lars.py, test_lars_average.py) --------------------------------
# Shapes of A1: 1, a chunk (65536), chunk + 1, an odd prime, empty, 0-dim, 2-D.
LARS_SHAPES = [(1,), (65536,), (65537,), (7919,), (0,), (), (33, 17)]
# The Triton interpreter costs ~1 us per element: it gets the same kinds of shapes, small
# (its own chunk-boundary tests live in test_triton.py).
LARS_SHAPES_INTERPRETED = [(1,), (1024,), (1025,), (127,), (0,), (), (9, 7)]
# ~100 tensors of mixed sizes, as a model of many small layers.
LARS_MIXED = [(int(n),) for n in torch.randint(1, 300, (100,), generator=torch.Generator().manual_seed(7))]

LARS_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum-wd": dict(lr=0.5, momentum=0.9, weight_decay=1e-2),
    "nesterov": dict(lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "dampening-clip": dict(lr=2.0, momentum=0.8, dampening=0.3, weight_decay=1e-2, clip=True),
    "paper-apex": dict(lr=0.3, momentum=0.9, momentum_style="paper", trust_coefficient=0.02,
                       zero_norm_decay=False, weight_decay=5e-3),
}

# fp32 after 7 steps: norms reduced in a different order and coefficients folded, a few
# ulps per step; fp64 the same in its own ulps.
LARS_TOL = {torch.float32: dict(rtol=2e-6, atol=2e-6), torch.float64: dict(rtol=1e-13, atol=1e-13)}


def lars_shapes(impl: str, mixed: bool = False):
    if impl == "triton" and not torch.cuda.is_available():
        # Interpreted, a program costs milliseconds whatever its size: 16 of the mixed
        # tensors (one program each per pass) keep the many-small-layers case at a
        # quarter of the 100-tensor time.
        return LARS_SHAPES_INTERPRETED + (LARS_MIXED[:16] if mixed else [])
    return LARS_SHAPES + (LARS_MIXED if mixed else [])


def make_state(shapes, dtype, device, seed=0):
    params = randn(shapes, seed, dtype, device)
    if len(params) > 3:
        params[2].zero_()  # a zero weight: the ratio falls back to 1
    bufs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    return params, bufs, steps


def grads_for(step, shapes, dtype, device):
    grads = randn(shapes, 1000 + step, dtype, device)
    if len(grads) > 4 and step % 3 == 1:
        grads[4 if len(grads[4].shape) else 0].zero_()  # a zero gradient now and then
    return grads


def assert_lists_close(actual, expected, **tol):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.cpu(), e.cpu(), msg=lambda m: f"tensor {i}: {m}", **tol)


# --- extrapolation noise (docs/algorithms.md section 2.1) ----------------------------------
def noise_call(impl, device, extrapolation, anchors, *, a=0.5, seed=11, offset=3):
    """w - x of one step that leaves x unchanged (zero gradients), in fp64."""
    x = [t.to(device) for t in anchors]
    params = [torch.full_like(t, 7.0) for t in x]
    grads = [torch.zeros_like(t) for t in x]
    ops.extrap_sgd_(params, x, [], grads, [], [False] * len(x), lr=0.1, impl=impl,
                    extrapolation=extrapolation, noise_scale=a, seed=seed, offset=offset)
    for t, t0 in zip(x, anchors):
        assert torch.equal(t.cpu(), t0)  # the anchor does not move with a zero gradient
    return [(p.cpu().double() - t.double()) for p, t in zip(params, anchors)]


M32 = 0xFFFFFFFF


def philox4x32_10(ctr, key):
    """Philox4x32-10 in Python integers (Salmon et al. 2011), for the layout test."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return c0, c1, c2, c3


def documented_draw(numel, tensor, seed, offset, gaussian):
    """The values philox.h promises for elements 0..numel-1 of one tensor, in fp64."""
    key = (seed & M32, ((seed >> 32) ^ (offset >> 32)) & M32)
    out = []
    for q in range((numel + 3) // 4):
        w = philox4x32_10((q & M32, q >> 32, tensor, offset & M32), key)
        if gaussian:
            for w0, w1 in ((w[0], w[1]), (w[2], w[3])):
                a = ((w0 >> 8) + 1) * 2.0 ** -24
                b = (w1 >> 8) * 2.0 ** -24
                r = math.sqrt(-2 * math.log(a))
                out += [r * math.cos(2 * math.pi * b), r * math.sin(2 * math.pi * b)]
        else:
            out += [(2 * (v >> 8) + 1 - 2 ** 24) * 2.0 ** -24 for v in w]
    return torch.tensor(out[:numel], dtype=torch.float64)


# --- the training command's checkpoints ---------------------------------------------------
def load_run(run_dir: Path, name: str = "checkpoint.pt") -> dict:
    from lbkernels.train import checkpoint

    return checkpoint.load(Path(run_dir) / name)


def assert_same(a, b, path="state"):
    """Bitwise equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def groups_as_saved(method_state: dict) -> dict:
    # torch.optim.Optimizer.load_state_dict adds {"differentiable": False} to the groups
    # it loads; the key changes nothing in the step.
    for group in method_state["optimizer"]["param_groups"]:
        group.setdefault("differentiable", False)
    return method_state


def history_rows(state: dict) -> list[dict]:
    """A checkpoint's history without the wall-clock times (which never repeat)."""
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in state["history"]]


def assert_same_run(a: dict, b: dict) -> None:
    """Two checkpoints of one run: weights, method state, data position and history."""
    assert_same(a["model"], b["model"], "model")
    assert_same(groups_as_saved(a["method"]), groups_as_saved(b["method"]), "method")
    assert history_rows(a) == history_rows(b)


def train_env(**extra: str) -> dict:
    """The environment of a training subprocess: one thread (as each torchrun process)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def main_one_thread(argv: list[str]) -> int:
    """The training command in this process on one thread, as each torchrun process
    runs (small batches gain nothing from two, and the sums then split alike)."""
    from lbkernels.train.__main__ import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def torchrun(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m lbkernels.train *args``; with
    ``check``, a failure shows the processes' stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lbkernels.train", *args], env=train_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


# --- gloo process groups ------------------------------------------------------------------
class GlooGroup:
    """``world`` processes in one gloo process group, started once and given jobs.

    A job is ``fn(rank, world, *args)``, a module-level function run on every rank; the
    values it returns come back by rank. Each process imports torch on start (3-6 s on two
    cores), so the multi-process tests share one group per world size instead of one
    spawn each. A job that fails leaves the group closed; the next one starts a new group.
    """

    def __init__(self, world: int, root: Path):
        ctx = torch.multiprocessing.get_context("spawn")
        self.world, self.closed = world, False
        self._conns, self._procs = [], []
        for rank in range(world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve_gloo_jobs, args=(rank, world, str(root / "store"), theirs), daemon=True)
            proc.start()
            self._conns.append(ours)
            self._procs.append(proc)

    def run(self, fn: Callable, *args, timeout: float = 300) -> list:
        for conn in self._conns:
            conn.send((fn, args))
        replies = []
        for rank, conn in enumerate(self._conns):
            if not conn.poll(timeout):
                self.close()
                raise TimeoutError(f"{fn.__name__}: rank {rank} gave no result within {timeout} s")
            replies.append(conn.recv())
        failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in enumerate(replies) if not ok]
        if failures:
            self.close()
            raise AssertionError(f"{fn.__name__} failed\n" + "\n".join(failures))
        return [torch.load(io.BytesIO(value), weights_only=False) for _, value in replies]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _serve_gloo_jobs(rank: int, world: int, store: str, conn) -> None:
    import traceback

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    while (job := conn.recv()) is not None:
        fn, args = job
        try:
            buf = io.BytesIO()
            torch.save(fn(rank, world, *args), buf)
            conn.send((True, buf.getvalue()))
        except BaseException:
            conn.send((False, traceback.format_exc()))
    dist.destroy_process_group()
    # DDP's reducer keeps the gloo group (and its threads) alive past destroy_process_group;
    # destroyed by the interpreter's exit, it aborted the process now and then (SIGABRT).
    # The results are sent: leave without that teardown.
    os._exit(0)
