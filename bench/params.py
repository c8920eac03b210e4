"""Parameter sets and the step variants the benchmarks time: lbkernels' optimizers, the
anchors a user would otherwise pick (for LAMB: a timm-style loop and
``torch.optim.AdamW(fused=True)``), and SWA kept beside the LARS step
(``python -m bench.bench_averaging`` compares those)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from lbkernels import _library
from lbkernels.optim import LAMB, LARS, ExtrapSGD, WeightAverager


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


def bert_base_shapes() -> list[tuple[int, ...]]:
    """The 199 parameter shapes of BERT-base (uncased) with its pooler, 109,482,240
    parameters: hidden 768, 12 layers, FFN 3072, vocabulary 30522, 512 positions, 2 token
    types (Devlin et al. 2019, section 3: L=12, H=768, A=12, "110M"; the config.json of
    bert-base-uncased on the Hugging Face hub). Linear weights are (out, in) as in torch.nn.Linear."""
    h, ffn = 768, 3072
    shapes: list[tuple[int, ...]] = [(30522, h), (512, h), (2, h), (h,), (h,)]  # embeddings, LayerNorm
    for _ in range(12):
        shapes += [(h, h), (h,)] * 3  # query, key, value
        shapes += [(h, h), (h,), (h,), (h,)]  # attention output dense, LayerNorm
        shapes += [(ffn, h), (ffn,), (h, ffn), (h,), (h,), (h,)]  # FFN in, out, LayerNorm
    return shapes + [(h, h), (h,)]  # pooler


PARAM_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": resnet50_shapes,
    "2000x1000": lambda: [(1000,)] * 2000,
    "1x25M": lambda: [(25_000_000,)],
    "bert-base": bert_base_shapes,
}
# Sets that time only some variants (names containing one of these, and the anchor):
# BERT-base is 4.4x ResNet-50, and the LARS rows add nothing there.
SET_VARIANTS = {"bert-base": ("AdamW", "LAMB")}


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


class TimmStyleLAMB:
    """The per-tensor loop of timm's ``Lamb`` (``foreach=False``, timm's defaults but
    ``max_grad_norm``): moments, denominator, update, two norms and the write, each its
    own kernel, with update-sized temporaries per tensor."""

    BYTES_PER_PARAM = 28

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None):
        self.params, self.lr, self.wd, self.betas, self.eps = list(params), lr, weight_decay, betas, eps
        self.max_grad_norm = max_grad_norm
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        b1, b2 = self.betas
        self.t += 1
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        clip = None
        if self.max_grad_norm is not None:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params]))
            clip = (norm / self.max_grad_norm).clamp_(min=1.0)
        for p, (exp_avg, exp_avg_sq) in zip(self.params, self.state):
            grad = p.grad if clip is None else p.grad / clip
            exp_avg.lerp_(grad, 1 - b1)
            exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            update = (exp_avg / bc1).div_((exp_avg_sq.sqrt() / bc2**0.5).add_(self.eps))
            update.add_(p, alpha=self.wd)
            w_norm, u_norm = p.norm(2.0), update.norm(2.0)
            update.mul_(torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0))
            p.add_(update, alpha=-self.lr)


class Bytes28:
    """An Adam-like optimizer (AdamW, LAMB) counted at 28 bytes per parameter in the
    bandwidth column: read w, g, m, v; write w, m, v (the minimum of an Adam step)."""

    BYTES_PER_PARAM = 28

    def __init__(self, opt):
        self.opt = opt

    def step(self):
        self.opt.step()


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
# LAMB's (timm's defaults) for its rows, AdamW's the same lr and decay.
LAMB_HP = dict(lr=1e-3, weight_decay=0.01)


def lamb_variants(device: str) -> dict[str, Callable]:
    """LAMB and its anchors: the timm-style loop, AdamW(fused=True), lbkernels' LAMB
    without and with timm's global gradient clipping (max_grad_norm=1.0)."""
    out = {
        "AdamW fused": lambda ps: Bytes28(torch.optim.AdamW(ps, fused=True, **LAMB_HP)),
        "LAMB timm-style loop": lambda ps: TimmStyleLAMB(ps, **LAMB_HP),
        "LAMB timm-style loop, clip 1.0": lambda ps: TimmStyleLAMB(ps, max_grad_norm=1.0, **LAMB_HP),
    }
    if _library.has_native_kernel("lamb_", device):
        for name, clip in (("", None), (", clip 1.0", 1.0)):
            out[f"lbkernels LAMB native-{device}{name}"] = (
                lambda ps, clip=clip: Bytes28(LAMB(ps, impl="native", max_grad_norm=clip, **LAMB_HP)))
    return out


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
    out.update(lamb_variants(device))
    if device == "cuda":
        from lbkernels import triton as lbk_triton  # only with CUDA: triton is a GPU backend

        if lbk_triton.available("cuda")[0]:
            out["lbkernels LARS triton"] = lambda ps: LARS(ps, impl="triton", **HP)
    return out
