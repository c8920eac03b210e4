"""Parameter sets and the step variants the benchmarks time: lbkernels' optimizers, the
anchors a user would otherwise pick, and SWA kept beside the LARS step
(``python -m bench.bench_averaging`` compares those)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lbkernels import _library
from lbkernels.optim import LARS, ExtrapSGD, WeightAverager


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's ResNet-50 (25,557,032 parameters)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes if b == 0 else 4 * width, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inplanes, 1, 1), (4 * width,), (4 * width,)]
        inplanes = 4 * width
    return shapes + [(1000, 2048), (1000,)]


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "2000x1000": lambda: [(1000,)] * 2000,
    "1x25M": lambda: [(25_000_000,)],
}


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype))
        p.grad = torch.randn(s, generator=g).to(device, dtype) * 1e-3
        params.append(p)
    return params


# -- anchors ------------------------------------------------------------------------------
class TimmStyleLARS:
    """The per-tensor LARS loop of timm's ``Lars`` (``foreach=False``): two norm kernels,
    a handful of elementwise kernels and a temporary per tensor."""

    def __init__(self, params, lr, momentum, weight_decay, trust_coefficient=0.001, eps=1e-8):
        self.params, self.lr, self.m, self.wd = list(params), lr, momentum, weight_decay
        self.tc, self.eps = trust_coefficient, eps
        self.bufs: dict = {}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            grad = p.grad
            w_norm, g_norm = p.norm(2.0), grad.norm(2.0)
            ratio = self.tc * w_norm / (g_norm + w_norm * self.wd + self.eps)
            ratio = torch.where(w_norm > 0, torch.where(g_norm > 0, ratio, 1.0), 1.0)
            grad = grad.add(p, alpha=self.wd).mul_(ratio)
            buf = self.bufs.get(p)
            if buf is None:
                buf = self.bufs[p] = grad.clone()
            else:
                buf.mul_(self.m).add_(grad)
            p.add_(buf, alpha=-self.lr)


class ForeachLARS:
    """LARS from ``torch._foreach_*`` ops: the best a user gets without a custom kernel."""

    def __init__(self, params, lr, momentum, weight_decay, trust_coefficient=0.001, eps=1e-8):
        self.params, self.lr, self.m, self.wd = list(params), lr, momentum, weight_decay
        self.tc, self.eps = trust_coefficient, eps
        self.bufs = None

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        w_norm = torch.stack(torch._foreach_norm(self.params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = self.tc * w_norm / (g_norm + w_norm * self.wd + self.eps)
        ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
        d = torch._foreach_add(grads, self.params, alpha=self.wd)
        torch._foreach_mul_(d, ratio.unbind())
        if self.bufs is None:
            self.bufs = [x.clone() for x in d]
        else:
            torch._foreach_mul_(self.bufs, self.m)
            torch._foreach_add_(self.bufs, d)
        torch._foreach_add_(self.params, self.bufs, alpha=-self.lr)


class ExtrapSGDWithLocalGrads:
    """``ExtrapSGD`` stepping as it does under DDP: with this worker's local-gradient list
    (28 bytes per fp32 parameter: read x, buf, g, g^k; write x, buf, w). The capture (the
    comm hook's copy, part of the backward) runs in ``prepare()``, outside the timed step."""

    BYTES_PER_PARAM = 28

    def __init__(self, params, lr, momentum, weight_decay, impl="native"):
        self.opt = ExtrapSGD(params, lr=lr, momentum=momentum, nesterov=False,
                             weight_decay=weight_decay, impl=impl)

    def prepare(self):
        self.opt.capture_local_grads()

    def step(self):
        self.opt.step()


# -- weight averaging with the LARS step (bench/bench_averaging.py) ------------------------
# The name of the native LARS step but for its device: the anchor of bench_averaging's ratios.
ANCHOR_PREFIX = "lbkernels LARS native-"


class FoldedSWALARS:
    """LARS whose step also updates an SWA mean of the weights (one pass)."""

    BYTES_PER_PARAM = 28

    def __init__(self, params, impl="native", **hp):
        self.opt = LARS(params, impl=impl, **hp)
        self.averager = WeightAverager(params, mode="swa", fused_with=self.opt)

    def step(self):
        self.opt.step()


class LARSThenWeightAverager:
    """The LARS step, then ``WeightAverager.update()`` (a second sweep over w)."""

    BYTES_PER_PARAM = 32

    def __init__(self, params, **hp):
        self.opt = LARS(params, impl="native", **hp)
        self.averager = WeightAverager(params, mode="swa", impl="native")

    def step(self):
        self.opt.step()
        self.averager.update()


class LARSThenAveragedModel:
    """The LARS step, then ``AveragedModel.update_parameters`` (torch's SWA)."""

    BYTES_PER_PARAM = 32

    def __init__(self, params, **hp):
        self.opt = LARS(params, impl="native", **hp)
        self.module = nn.ParameterList(params)
        self.swa = AveragedModel(self.module)

    def step(self):
        self.opt.step()
        self.swa.update_parameters(self.module)


def averaging_variants(device: str, hp: dict) -> dict:
    """The three averaging variants (native LARS kernels; empty where not built)."""
    if not _library.has_native_kernel("lars_sgd_", device):
        return {}
    return {
        "SWA folded into LARS step": lambda ps: FoldedSWALARS(ps, **hp),
        "SWA LARS step + WeightAverager.update": lambda ps: LARSThenWeightAverager(ps, **hp),
        "SWA LARS step + AveragedModel.update_parameters": lambda ps: LARSThenAveragedModel(ps, **hp),
    }


# -- every variant -----------------------------------------------------------------------
# The anchor of every ratio.
ANCHOR = "SGD fused"
HP = dict(lr=0.1, momentum=0.9, weight_decay=5e-5)


def variants(device: str) -> dict[str, Callable]:
    """Every step variant on ``device``: name -> factory of an optimizer over a parameter
    list (those whose kernels are not built left out)."""
    out = {
        "SGD foreach": lambda ps: torch.optim.SGD(ps, foreach=True, **HP),
        "SGD fused": lambda ps: torch.optim.SGD(ps, fused=True, **HP),
        "LARS timm-style loop": lambda ps: TimmStyleLARS(ps, **HP),
        "LARS torch._foreach_": lambda ps: ForeachLARS(ps, **HP),
    }
    if _library.has_native_kernel("lars_sgd_", device):
        out[ANCHOR_PREFIX + device] = lambda ps: LARS(ps, impl="native", **HP)
    out.update(averaging_variants(device, HP))
    if _library.has_native_kernel("extrap_sgd_", device):
        out[f"lbkernels ExtrapSGD native-{device}"] = lambda ps: ExtrapSGDWithLocalGrads(ps, **HP)
    if device == "cuda":
        from lbkernels import triton as lbk_triton  # only with CUDA: triton is a GPU backend

        if lbk_triton.available("cuda")[0]:
            out["lbkernels LARS triton"] = lambda ps: LARS(ps, impl="triton", **HP)
    return out
