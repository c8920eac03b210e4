"""Reference extrapolated-SGD and extrap-Adam steps (docs/algorithms.md sections 2, 2.1, 2.2).

The anchor ``x`` is the real iterate; the parameters ``w`` hold the extrapolated point
where the next forward and backward run. One call updates the anchor from the gradient
taken at ``w`` and writes the next extrapolated point.

Random numbers (the noise variants). The reference draws from one ``torch.Generator``
on the params' device per call, seeded with ``mix_seed(seed, offset)`` (splitmix64 of
the pair, below), tensor by tensor in list order, ``shape``-shaped, in the arithmetic
dtype: ``torch.randn`` for ``"gaussian"``, ``2 * torch.rand - 1`` for ``"uniform"``,
``"weight"`` and ``"filter"`` (SmoothOut's uniform perturbation). The compiled kernels
use Philox4x32-10 instead (``csrc/include/lbkernels/philox.h`` documents the counter
layout), so backends agree in distribution, not bit for bit; each is reproducible for a
fixed ``(seed, offset)``.
"""

from __future__ import annotations

import torch

from .._validate import check_tensor_lists
from ._checks import (Tensors, check_betas, check_nonnegative, check_norm_sq, check_scalars,
                      check_steps)
from .lars import opmath_dtype, trust_ratio

EXTRAPOLATIONS = ("past_grad", "gaussian", "uniform", "weight", "filter")

# Added to ||r_j|| in the filter variant (SmoothOut's normalisation).
FILTER_EPS = 1e-6

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(seed: int, offset: int) -> int:
    """The 63-bit generator seed of one call: splitmix64(splitmix64(seed) ^ offset) >> 1."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (offset & _MASK64)) >> 1


def _check_common(params, anchors, grads, local_grads, lr_tensor, extrap_lr_tensor, grad_scale,
                  found_inf) -> None:
    check_tensor_lists(params, same_shape={"anchors": anchors, "grads": grads},
                       optional={"local_grads": local_grads})
    if local_grads:
        check_tensor_lists(params, same_shape={"local_grads": local_grads})
    check_scalars(lr_tensor=lr_tensor, extrap_lr_tensor=extrap_lr_tensor, grad_scale=grad_scale,
                  found_inf=found_inf)


def check_extrap_sgd_args(params, anchors, momentum_buffers, grads, local_grads, exclude, *, lr,
                          lr_tensor, extrap_lr, extrap_lr_tensor, momentum, weight_decay,
                          extrapolation, noise_scale, offset, grad_scale, found_inf,
                          norm_sq=None, **_) -> None:
    """Every check of ``extrap_sgd_``, before any write (the other keyword arguments of
    the op need none); the Triton launcher runs it too."""
    _check_common(params, anchors, grads, local_grads, lr_tensor, extrap_lr_tensor, grad_scale,
                  found_inf)
    check_tensor_lists(params, same_shape={}, flags={"exclude": exclude})
    if momentum != 0.0:
        check_tensor_lists(params, same_shape={"momentum_buffers": momentum_buffers})
    if extrapolation not in EXTRAPOLATIONS:
        raise ValueError(f"extrapolation must be one of {EXTRAPOLATIONS}, got {extrapolation!r}")
    check_nonnegative(lr=lr, extrap_lr=extrap_lr, momentum=momentum, weight_decay=weight_decay,
                      noise_scale=noise_scale, offset=offset)
    check_norm_sq(params, norm_sq)


def check_extrap_adam_args(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads, *,
                           lr, lr_tensor, extrap_lr, extrap_lr_tensor, beta1, beta2, eps,
                           weight_decay, grad_scale, found_inf, **_) -> None:
    """Every check of ``extrap_adam_``, before any write (the other keyword arguments of
    the op need none); the Triton launcher runs it too."""
    _check_common(params, anchors, grads, local_grads, lr_tensor, extrap_lr_tensor, grad_scale,
                  found_inf)
    check_tensor_lists(params, same_shape={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    if len(steps) != len(params):
        raise ValueError(f"steps has {len(steps)} entries but params has {len(params)}")
    check_steps(params, steps)
    check_nonnegative(lr=lr, extrap_lr=extrap_lr, eps=eps, weight_decay=weight_decay)
    check_betas(beta1, beta2)


def _prepare(i, w, anchors, grads, local_grads, lr, lr_tensor, extrap_lr, extrap_lr_tensor,
             grad_scale):
    """Arithmetic dtype, anchor, (unscaled) gradient and local gradient, lr, extrap_lr."""
    ct = opmath_dtype(w.dtype)
    x32, g32 = anchors[i].to(ct), grads[i].to(ct)
    gk32 = local_grads[i].to(ct) if local_grads else g32
    if grad_scale is not None:
        scale = grad_scale.to(w.device, ct)
        g32 = g32 / scale
        gk32 = gk32 / scale if local_grads else g32
    lr_i = lr if lr_tensor is None else lr_tensor.to(w.device, ct)
    elr_i = extrap_lr if extrap_lr_tensor is None else extrap_lr_tensor.to(w.device, ct)
    return ct, x32, g32, gk32, lr_i, elr_i


def _axpy(x: torch.Tensor, y: torch.Tensor, a) -> torch.Tensor:
    """x + a * y, with the single-rounding ``add(alpha=)`` form when ``a`` is a float."""
    return x.add(y, alpha=a) if isinstance(a, float) else x + a * y


def _skip_mask(params, found_inf):
    """found_inf != 0 as a 0-d bool tensor on the params' device (no host sync), or None."""
    if found_inf is None or not params:
        return None
    return found_inf.to(params[0].device).reshape(()) != 0


def noise(x: torch.Tensor, extrapolation: str, a: float, gen: torch.Generator) -> torch.Tensor:
    """eps_t of section 2.1 for the (updated) anchor ``x``, drawn from ``gen``."""
    if extrapolation == "gaussian":
        return a * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    r = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1
    if extrapolation == "uniform":
        return a * r
    if extrapolation == "weight":
        return a * r * x.abs()
    # "filter": per output filter j (dim 0; a 0-d/1-d tensor is one filter)
    r2, x2 = (r.flatten(1), x.flatten(1)) if x.dim() >= 2 else (r.reshape(1, -1), x.reshape(1, -1))
    n_r = torch.linalg.vector_norm(r2, dim=1, keepdim=True)
    n_x = torch.linalg.vector_norm(x2, dim=1, keepdim=True)
    return (a * r2 / (n_r + FILTER_EPS) * n_x).reshape(x.shape)


def extrap_sgd_(
    params: Tensors, anchors: Tensors, momentum_buffers: Tensors, grads: Tensors,
    local_grads: Tensors, exclude: list[bool], *,
    lr: float, lr_tensor: torch.Tensor | None = None,
    extrap_lr: float = 0.0, extrap_lr_tensor: torch.Tensor | None = None,
    momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
    lars: bool = False, trust_coefficient: float = 0.001, eps: float = 1e-8, clip: bool = False,
    extrapolation: str = "past_grad", noise_scale: float = 0.0, seed: int = 0, offset: int = 0,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    norm_sq: torch.Tensor | None = None,
) -> None:
    """One extrapolated-SGD step over lists of tensors, in place.

    Per tensor ``i`` (``x = anchors[i]``, ``w = params[i]``, ``g = grads[i]``, ``gk =
    local_grads[i]``, or ``g`` when ``local_grads`` is empty)::

        d = g + wd * x;   d = r * d   if lars and not exclude[i]  (r: lars.trust_ratio of x, g)
        buf = m * buf + d;  u = d + m * buf (nesterov) or buf     (u = d when m == 0)
        x = x - lr * u
        w = x - extrap_lr * gk                      extrapolation="past_grad"
        w = x + eps_t                               noise variants (module docstring), a = noise_scale:
            "gaussian" a*N(0,1), "uniform" a*U(-1,1), "weight" a*U(-1,1)*|x|,
            "filter" a * r_j / (||r_j|| + 1e-6) * ||x_j||, r ~ U(-1,1), j the output filter (dim 0)

    The noise is taken at the updated anchor. Gradients are divided by ``grad_scale``
    when given; with ``found_inf != 0`` nothing changes.

    ``norm_sq`` (optional): precomputed squared norms for the trust ratio, as in
    ``lars.lars_sgd_`` with the anchor as its ``w``: ``norm_sq[0, i] = ||x_i||^2``,
    ``norm_sq[1, i] = ||g_i||^2`` (``g`` as passed, still loss-scaled); a negative entry
    is computed. Read only for LARS tensors (``lars`` and not ``exclude[i]``).
    """
    check_extrap_sgd_args(params, anchors, momentum_buffers, grads, local_grads, exclude, lr=lr,
                          lr_tensor=lr_tensor, extrap_lr=extrap_lr,
                          extrap_lr_tensor=extrap_lr_tensor, momentum=momentum,
                          weight_decay=weight_decay, extrapolation=extrapolation,
                          noise_scale=noise_scale, offset=offset, grad_scale=grad_scale,
                          found_inf=found_inf, norm_sq=norm_sq)
    has_momentum = momentum != 0.0
    gen = None
    if extrapolation != "past_grad" and params:
        gen = torch.Generator(device=params[0].device)
        gen.manual_seed(mix_seed(seed, offset))

    skip = _skip_mask(params, found_inf)
    for i, w in enumerate(params):
        ct, x32, g32, gk32, lr_i, elr_i = _prepare(i, w, anchors, grads, local_grads, lr,
                                                   lr_tensor, extrap_lr, extrap_lr_tensor,
                                                   grad_scale)
        d = g32.add(x32, alpha=weight_decay)
        if lars and not exclude[i]:
            r, _ = trust_ratio(x32, g32, lr_i, weight_decay, trust_coefficient, eps, clip,
                               None if norm_sq is None else norm_sq[:, i],
                               None if grad_scale is None else grad_scale.to(w.device, ct))
            d = d.mul(r)
        if has_momentum:
            buf = momentum_buffers[i].to(ct).mul(momentum).add(d)
            u = d.add(buf, alpha=momentum) if nesterov else buf
        else:
            u = d
        x_new = _axpy(x32, u, -lr_i)
        if extrapolation == "past_grad":
            w_new = _axpy(x_new, gk32, -elr_i)
        else:
            w_new = x_new + noise(x_new, extrapolation, noise_scale, gen)
        if skip is not None:
            x_new = torch.where(skip, x32, x_new)
            w_new = torch.where(skip, w.to(ct), w_new)
            if has_momentum:
                buf = torch.where(skip, momentum_buffers[i].to(ct), buf)
        anchors[i].copy_(x_new)
        w.copy_(w_new)
        if has_momentum:
            momentum_buffers[i].copy_(buf)


def extrap_adam_(
    params: Tensors, anchors: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: Tensors,
    grads: Tensors, local_grads: Tensors, *,
    lr: float, lr_tensor: torch.Tensor | None = None,
    extrap_lr: float = 0.0, extrap_lr_tensor: torch.Tensor | None = None,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
) -> None:
    """One extrap-Adam step over lists of tensors, in place (section 2.2).

    Per tensor ``i`` (``t = steps[i] + 1``, stored first; ``gk`` as in ``extrap_sgd_``)::

        g = g + wd * x   (L2)   or   x = x * (1 - lr * wd)   (decoupled, AdamW)
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        denom = sqrt(v) / sqrt(1 - beta2^t) + eps
        x = x - lr / (1 - beta1^t) * m / denom          (torch.optim.Adam on the anchor)
        w = x - extrap_lr * gk / denom

    Bias corrections are computed in fp64 from the step counter, as torch.optim.Adam does
    with Python floats. With ``found_inf != 0`` nothing changes, ``steps`` included.
    """
    check_extrap_adam_args(params, anchors, exp_avgs, exp_avg_sqs, steps, grads, local_grads,
                           lr=lr, lr_tensor=lr_tensor, extrap_lr=extrap_lr,
                           extrap_lr_tensor=extrap_lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
                           weight_decay=weight_decay, grad_scale=grad_scale, found_inf=found_inf)

    skip = _skip_mask(params, found_inf)
    for i, w in enumerate(params):
        ct, x32, g32, gk32, lr_i, elr_i = _prepare(i, w, anchors, grads, local_grads, lr,
                                                   lr_tensor, extrap_lr, extrap_lr_tensor,
                                                   grad_scale)
        t = steps[i].to(torch.float64).reshape(()) + 1
        x_dec = x32
        if weight_decay != 0.0:
            if decoupled_weight_decay:
                x_dec = x32 * (1 - lr_i * weight_decay)
            else:
                g32 = g32.add(x32, alpha=weight_decay)
        m = exp_avgs[i].to(ct).lerp(g32, 1 - beta1)
        v = exp_avg_sqs[i].to(ct).mul(beta2).addcmul(g32, g32, value=1 - beta2)
        bc1 = 1 - beta1 ** t
        bc2_sqrt = (1 - beta2 ** t).sqrt()
        step_size = (lr_i / bc1).to(ct)
        denom = (v.sqrt() / bc2_sqrt.to(ct)).add(eps)
        x_new = x_dec - step_size * (m / denom)
        w_new = x_new - elr_i * (gk32 / denom)
        new_t = t.to(torch.float32)
        if skip is not None:
            x_new = torch.where(skip, x32, x_new)
            w_new = torch.where(skip, w.to(ct), w_new)
            m = torch.where(skip, exp_avgs[i].to(ct), m)
            v = torch.where(skip, exp_avg_sqs[i].to(ct), v)
            new_t = torch.where(skip, steps[i].reshape(()), new_t)
        anchors[i].copy_(x_new)
        w.copy_(w_new)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        steps[i].copy_(new_t.reshape(steps[i].shape))
