"""Reference LAMB step (docs/algorithms.md section 7).

Written for clarity, not speed: one tensor at a time, fp32 arithmetic for fp16/bf16
tensors (fp64 for fp64), and, per ``style``, the operation order of timm's ``Lamb``
(``"timm"``) or of apex's ``FusedLAMB`` CUDA kernel (``"apex"``), so that the flags
that select either reproduce its formulas bit for bit (python_tests/test_lamb.py).
Where the two orders differ:

============================  ==================================  =================================
step                          ``style="timm"``                    ``style="apex"``
============================  ==================================  =================================
first moment (grad_averaging) ``lerp(m, g, 1 - b1)``              ``m * b1 + b3 * g``
first moment (otherwise)      ``m * b1 + g`` (add, alpha=b3=1)     ``m * b1 + b3 * g``
scalars b1, b2, eps, wd, lr   the Python floats, rounded per op   rounded to the arithmetic dtype
                                                                  first (apex's ``float``
                                                                  arguments), ``b3 = 1 - b1`` in it
bias corrections              ``1 - b^t`` in fp64                 ``1 - b^t`` in fp64 with ``b`` so
                                                                  rounded, then rounded
denominator                   ``sqrt(v) / sqrt(bc2) + eps``       ``sqrt(v / bc2) + eps``
update ``u``                  ``(m / bc1) / denom (+ wd * w)``     ``(m / bc1) / denom + wd * w``
                                                                  (``wd * w`` even when wd == 0)
write                         ``w - lr * (r * u)``                ``w - (lr * r) * u``
============================  ==================================  =================================
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._validate import check_tensor_lists
from . import average as _average
from ._checks import (Tensors, check_betas, check_nonnegative, check_norm_sq, check_scalars,
                      check_steps)
from .lars import check_folded_average_args, opmath_dtype

STYLES = ("timm", "apex")
STAGES = ("full", "moments", "update")


def check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, steps, exclude, *, lr, lr_tensor,
                    beta1, beta2, eps, weight_decay, max_trust, max_grad_norm, grad_norm, style,
                    grad_scale, found_inf, averages, average_count, average_method,
                    norm_sq=None, stage="full", **_) -> None:
    """Every check of ``lamb_``, before any write (the other keyword arguments of the op
    need none); the Triton launcher runs it too."""
    check_tensor_lists(params, same_shape={"grads": grads, "exp_avgs": exp_avgs,
                                           "exp_avg_sqs": exp_avg_sqs},
                       flags={"exclude": exclude})
    if len(steps) != len(params):
        raise ValueError(f"steps has {len(steps)} entries but params has {len(params)}")
    check_steps(params, steps)
    check_nonnegative(lr=lr, eps=eps, weight_decay=weight_decay)
    check_betas(beta1, beta2)
    for name, v in (("max_trust", max_trust), ("max_grad_norm", max_grad_norm)):
        if v is not None and not v > 0.0:  # also rejects NaN
            raise ValueError(f"{name} must be > 0 or None, got {v}")
    if grad_norm is not None and max_grad_norm is None:
        raise ValueError("grad_norm is given but max_grad_norm is None: nothing to clip")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    check_scalars(lr_tensor=lr_tensor, grad_norm=grad_norm, grad_scale=grad_scale,
                  found_inf=found_inf)
    check_folded_average_args(params, averages, average_count, average_method, found_inf)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage == "full" and norm_sq is not None:
        raise ValueError("norm_sq is given but stage is 'full': only the stages 'moments' "
                         "(which writes it) and 'update' (which reads it) take it")
    if stage != "full" and norm_sq is None:
        raise ValueError(f"stage {stage!r} needs norm_sq, a (2, len(params)) float32/float64 "
                         "tensor of the sums of squares of w and u")
    check_norm_sq(params, norm_sq)


def global_grad_norm(grads: Tensors) -> torch.Tensor:
    """The L2 norm of all of ``grads`` as a 0-d tensor: per-tensor norms in each tensor's
    arithmetic dtype, then the norm of those norms (fp64 when every grad is fp64, else
    fp32), as timm's ``Lamb`` computes it."""
    dtype = torch.float64 if all(g.dtype == torch.float64 for g in grads) else torch.float32
    norms = [torch.linalg.vector_norm(g, dtype=opmath_dtype(g.dtype)).to(dtype) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_divisor(grads: Tensors, max_grad_norm: float | None, grad_norm: torch.Tensor | None,
                 grad_scale: torch.Tensor | None) -> torch.Tensor | None:
    """``c`` of the global clipping (``g = g / c``), a 0-d tensor, or None without
    ``max_grad_norm``: ``N / max_grad_norm`` when ``N > max_grad_norm``, else 1, with ``N``
    the norm of the unscaled gradients: ``grad_norm`` (the norm of the scaled ones, given
    by the optimizer) or the norm over ``grads``, divided by ``grad_scale``. No host sync."""
    if max_grad_norm is None or not grads:
        return None
    n = global_grad_norm(grads) if grad_norm is None else grad_norm.to(grads[0].device).reshape(())
    n = n.to(torch.float64 if n.dtype == torch.float64 else torch.float32)
    if grad_scale is not None:
        n = n / grad_scale.to(n.device, n.dtype).reshape(())
    return torch.where(n > max_grad_norm, n / max_grad_norm, torch.ones_like(n))


def trust_ratio(n_w: torch.Tensor, n_u: torch.Tensor, max_trust: float | None, clip: bool,
                excluded: bool) -> torch.Tensor:
    """``r = phi(||w||) / ||u||`` (1 if either norm is 0 or the tensor is excluded),
    ``phi(z) = min(z, max_trust)``; ``min(r, 1)`` with ``clip`` (LAMBC). timm's order:
    ratio, zero-norm rule, clipping."""
    if excluded:
        return torch.ones_like(n_w)
    phi = n_w if max_trust is None else torch.clamp(n_w, max=max_trust)
    r = torch.where(n_w > 0, torch.where(n_u > 0, phi / n_u, 1.0), 1.0)
    return torch.clamp(r, max=1.0) if clip else r


def _const(x: float, ct: torch.dtype, device) -> torch.Tensor:
    """A scalar rounded to the arithmetic dtype first, as apex's ``float`` arguments."""
    return torch.tensor(x, dtype=ct, device=device)


class _Rule(NamedTuple):
    """The options of one call that the per-tensor math reads."""

    beta1: float
    beta2: float
    eps: float
    wd: float
    bias_correction: bool
    grad_averaging: bool
    decoupled: bool
    apex: bool


def _moments(o: _Rule, w32, g32, m0, v0):
    """The new ``(m, v)`` of one tensor from its unscaled, clipped gradient, in the
    arithmetic dtype (L2 decay added to ``g`` first)."""
    ct, dev = w32.dtype, w32.device
    if o.apex:
        b1, b2 = _const(o.beta1, ct, dev), _const(o.beta2, ct, dev)
        b3 = 1 - b1 if o.grad_averaging else _const(1.0, ct, dev)
        if not o.decoupled:
            g32 = g32 + _const(o.wd, ct, dev) * w32
        return m0 * b1 + b3 * g32, v0 * b2 + (1 - b2) * g32 * g32
    if not o.decoupled and o.wd != 0.0:
        g32 = g32.add(w32, alpha=o.wd)
    m = m0.lerp(g32, 1 - o.beta1) if o.grad_averaging else m0.mul(o.beta1).add(g32, alpha=1.0)
    return m, v0.mul(o.beta2).addcmul(g32, g32, value=1 - o.beta2)


def _direction(o: _Rule, m, v, w32, t: torch.Tensor):
    """``u`` of one tensor from its new moments at step ``t`` (an fp64 0-d tensor)."""
    ct, dev = w32.dtype, w32.device
    if o.apex:
        wd_c = _const(o.wd, ct, dev)
        if o.bias_correction:
            b1, b2 = _const(o.beta1, ct, dev), _const(o.beta2, ct, dev)
            bc1 = (1 - b1.to(torch.float64) ** t).to(ct)
            bc2 = (1 - b2.to(torch.float64) ** t).to(ct)
            m, v = m / bc1, v / bc2
        u = m / (v.sqrt() + _const(o.eps, ct, dev))
        return u + wd_c * w32 if o.decoupled else u
    if o.bias_correction:
        bc1 = (1 - o.beta1 ** t).to(ct)
        bc2_sqrt = (1 - o.beta2 ** t).sqrt().to(ct)
        u = (m / bc1).div((v.sqrt() / bc2_sqrt).add(o.eps))
    else:
        u = m.div(v.sqrt().add(o.eps))
    return u.add(w32, alpha=o.wd) if o.decoupled and o.wd != 0.0 else u


def _norms(w32, u) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||w||, ||u||)`` in the arithmetic dtype, in row-major order whatever the layout:
    a transposed param (and so its u) summed in memory order gave ||u|| 1 ulp off its
    contiguous twin's."""
    return torch.linalg.vector_norm(w32.contiguous()), torch.linalg.vector_norm(u.contiguous())


def _new_weight(o: _Rule, w32, u, r, lr: float, lr_tensor: torch.Tensor | None):
    """timm: ``w - lr * (r * u)``; apex: ``w - (lr * r) * u``."""
    ct, dev = w32.dtype, w32.device
    lr_i = None if lr_tensor is None else lr_tensor.to(dev, ct).reshape(())
    if o.apex:
        return w32 - (_const(lr, ct, dev) * r if lr_i is None else lr_i * r) * u
    if lr_i is None:
        return w32.add(u * r, alpha=-lr)
    return w32 - lr_i * (u * r)


def lamb_(
    params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors, steps: Tensors,
    exclude: list[bool], *, lr: float, lr_tensor: torch.Tensor | None = None,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.01,
    bias_correction: bool = True, grad_averaging: bool = True,
    decoupled_weight_decay: bool = True, max_trust: float | None = None, clip: bool = False,
    max_grad_norm: float | None = None, grad_norm: torch.Tensor | None = None,
    style: str = "timm", grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None, averages: Tensors | None = None,
    average_count: torch.Tensor | None = None, average_method: str = "swa",
    average_decay: float = 0.999, norm_sq: torch.Tensor | None = None, stage: str = "full",
) -> None:
    """One LAMB step over lists of tensors, in place.

    Per tensor ``i`` (``t = steps[i] + 1``, stored first; ``wd = weight_decay``)::

        g = grads[i] / grad_scale                         (when grad_scale)
        g = g / c,  c = max(N / max_grad_norm, 1)         (when max_grad_norm; N the global
                                                           norm of the unscaled gradients)
        g = g + wd * w                                    (L2: not decoupled_weight_decay)
        m = b1 * m + b3 * g,  b3 = 1 - b1 if grad_averaging else 1
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)   (m, v without bias_correction)
        u = m_hat / (sqrt(v_hat) + eps) + wd * w          (+ wd * w: decoupled_weight_decay)
        r = phi(||w||) / ||u||,  phi(z) = min(z, max_trust) (z without max_trust)
        r = 1 if ||w|| == 0 or ||u|| == 0 or exclude[i];  r = min(r, 1) if clip (LAMBC)
        w = w - lr * (r * u)                              style="timm"
        w = w - (lr * r) * u                              style="apex"

    The module docstring lists every difference of order between the two styles. Bias
    corrections are computed in fp64 from the step counter; nothing is read on the host.
    With ``found_inf != 0`` nothing changes (weights, moments, steps, averages, count).

    Weight averaging folded into the step (docs/algorithms.md section 4), as ``lars_sgd_``:
    with ``averages`` non-empty each new ``w`` is averaged in exactly as
    ``average_(averages, params, average_count, method=average_method,
    decay=average_decay)`` would, and ``average_count`` is incremented once per call.

    The step in two stages, for sharded tensors whose norms must be summed over the shards
    between the moments and the write (``stage="full"``, the default, is both at once;
    ``norm_sq`` is then None):

    - ``stage="moments"``: everything up to ``r``: ``m``, ``v`` and ``steps`` written (the
      moments rounded to their dtype), then ``norm_sq[0, i] = ||w_i||^2`` and
      ``norm_sq[1, i] = ||u_i||^2`` (0 for excluded tensors): the full step's norms,
      squared in ``norm_sq``'s dtype. ``w``, the averages and the count are not written;
      with ``found_inf != 0`` neither are ``m``, ``v``, ``steps`` (``norm_sq`` is).
    - ``stage="update"``: the rest, from the stored ``m``, ``v`` and ``t = steps[i]`` (not
      incremented again): ``u`` again, ``||w|| = sqrt(norm_sq[0, i])``,
      ``||u|| = sqrt(norm_sq[1, i])`` in the arithmetic dtype, ``r``, the write and the
      folded averaging. ``max_grad_norm``, ``grad_norm`` and ``grad_scale`` are not
      used (the gradient is not read).

    ``moments`` then ``update`` with the same ``norm_sq`` is ``full`` bit for bit for
    fp32/fp64 tensors whose arithmetic dtype ``norm_sq``'s holds (float64, or float32 for
    fp32 tensors): in binary floating point ``sqrt(x * x) == |x|`` (barring underflow),
    and ``u`` is computed from the same moments, stored exactly. A 16-bit tensor's update
    stage takes ``u`` from its stored, rounded moments, where the full step uses the
    unrounded ones.
    """
    check_lamb_args(params, grads, exp_avgs, exp_avg_sqs, steps, exclude, lr=lr,
                    lr_tensor=lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
                    weight_decay=weight_decay, max_trust=max_trust, max_grad_norm=max_grad_norm,
                    grad_norm=grad_norm, style=style, grad_scale=grad_scale, found_inf=found_inf,
                    averages=averages, average_count=average_count, average_method=average_method,
                    norm_sq=norm_sq, stage=stage)
    o = _Rule(beta1, beta2, eps, weight_decay, bias_correction, grad_averaging,
              decoupled_weight_decay, style == "apex")
    skip = None
    if found_inf is not None and params:
        skip = found_inf.to(params[0].device).reshape(()) != 0
    if stage == "update":
        for i, w in enumerate(params):
            ct = opmath_dtype(w.dtype)
            w32 = w.to(ct)
            u = _direction(o, exp_avgs[i].to(ct), exp_avg_sqs[i].to(ct), w32,
                           steps[i].to(torch.float64).reshape(()))
            n_w, n_u = norm_sq[:, i].to(w.device, ct).sqrt()
            r = trust_ratio(n_w, n_u, max_trust, clip, exclude[i])
            w_new = _new_weight(o, w32, u, r, lr, lr_tensor)
            w.copy_(w_new if skip is None else torch.where(skip, w32, w_new))
    else:
        c = clip_divisor(grads, max_grad_norm, grad_norm, grad_scale)
        for i, (w, g) in enumerate(zip(params, grads)):
            ct, dev = opmath_dtype(w.dtype), w.device
            w32, g32 = w.to(ct), g.to(ct)
            if grad_scale is not None:
                g32 = g32 / grad_scale.to(dev, ct).reshape(())
            if c is not None:
                g32 = g32 / c.to(dev, ct)
            t = steps[i].to(torch.float64).reshape(()) + 1
            m0, v0 = exp_avgs[i].to(ct), exp_avg_sqs[i].to(ct)
            m, v = _moments(o, w32, g32, m0, v0)
            u = _direction(o, m, v, w32, t)
            n_w, n_u = _norms(w32, u)
            new_t = t.to(torch.float32)
            if stage == "moments":
                sq = torch.stack((n_w, n_u)).to(norm_sq.dtype).square()
                norm_sq[:, i] = torch.zeros_like(sq) if exclude[i] else sq
            else:
                w_new = _new_weight(o, w32, u, trust_ratio(n_w, n_u, max_trust, clip, exclude[i]),
                                    lr, lr_tensor)
            if skip is not None:
                m = torch.where(skip, m0, m)
                v = torch.where(skip, v0, v)
                new_t = torch.where(skip, steps[i].reshape(()), new_t)
            if stage == "full":
                w.copy_(w_new if skip is None else torch.where(skip, w32, w_new))
            exp_avgs[i].copy_(m)
            exp_avg_sqs[i].copy_(v)
            steps[i].copy_(new_t.reshape(steps[i].shape))
    if averages and stage != "moments":
        _average.average_(averages, params, average_count, method=average_method,
                          decay=average_decay, found_inf=found_inf)
