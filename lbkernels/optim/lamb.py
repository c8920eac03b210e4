"""LAMB as a fused, drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

import sys
from typing import Any

import torch

from .. import ops
from ._base import (Bucket, FusedOptimizer, check_betas, check_bools, check_numbers, group_args,
                    zeros_state)
from ._folded import folded_average_arguments
from .lars import lars_param_groups

_STYLES = ("timm", "apex")


class LAMB(FusedOptimizer):
    r"""Layer-wise adaptive moments (You et al. 2020, "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes"), fused (docs/algorithms.md section 7).

    For every parameter tensor ``w`` with gradient ``g``, at its step ``t`` (arithmetic
    in fp32, fp64 for fp64 params; norms of whole tensors)::

        g   = g / c,  c = max(N / max_grad_norm, 1)   N: the L2 norm of all the gradients
                                                      of the optimizer (max_grad_norm)
        g   = g + wd * w                              (decoupled_weight_decay=False: L2)
        m   = beta1 * m + b3 * g,   b3 = 1 - beta1, or 1 without grad_averaging
        v   = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)   (bias_correction)
        u   = m_hat / (sqrt(v_hat) + eps) + wd * w    (decoupled_weight_decay=True)
        r   = min(||w||, max_trust) / ||u||            (max_trust=None: ||w|| / ||u||)
        r   = 1      if ||w|| == 0 or ||u|| == 0, or the tensor is excluded
        r   = min(r, 1)                               (clip: LAMBC)
        w   = w - lr * (r * u)                        (style="apex": w - (lr * r) * u)

    A tensor is excluded (``r = 1``: Adam with the decay inside the update) when its
    group has ``lamb_exclude=True`` (see :func:`lamb_param_groups`), or
    ``always_adapt=False`` and the group's ``weight_decay == 0`` (timm, apex). The
    defaults are the paper's plain rule: every tensor adapted, no clamp of ``||w||``, no
    LAMBC, no global gradient clipping.

    The step is one fused op per (group, device): moments, norms, ratio and write in
    one op, no host sync; ``torch.amp.GradScaler`` is honoured inside the kernel (a
    skipped step leaves weights, moments and step counts bitwise unchanged). With
    ``max_grad_norm`` the global norm is computed once per step on the device
    (``ops.multi_tensor_l2norm`` per device, combined there) and handed to every op.

    Reproducing other implementations (bit for bit with ``impl="reference"``;
    python_tests/test_lamb_optim.py transcribes each):

    * timm ``Lamb`` (defaults ``max_grad_norm=1.0, always_adapt=False,
      trust_clip=False, decoupled_decay=False``): ``LAMB(..., max_grad_norm=1.0,
      always_adapt=False, clip=trust_clip)`` (``style="timm"``). timm's
      ``decoupled_decay=False`` is our ``decoupled_weight_decay=True`` (the decay inside
      ``u``, under the ratio); timm's ``decoupled_decay=True`` (decay of ``w`` outside
      the ratio) and ``caution`` have no counterpart here.
    * apex ``FusedLAMB`` (defaults ``max_grad_norm=1.0, use_nvlamb=False,
      adam_w_mode=True``): ``LAMB(..., style="apex", max_grad_norm=1.0,
      always_adapt=use_nvlamb, decoupled_weight_decay=adam_w_mode)``.

    Both keep one step count per group, this class one per tensor (as
    ``torch.optim.AdamW``): the same while every tensor steps together. The state keys
    are ``torch.optim.AdamW``'s (``exp_avg``, ``exp_avg_sq``, ``step``), so an AdamW
    checkpoint loads.

    Example::

        from lbkernels.optim import LAMB, lamb_param_groups
        opt = LAMB(lamb_param_groups(model, weight_decay=0.01), lr=2e-3, max_grad_norm=1.0)

    Args:
        params: parameters or param groups (a group may set ``lamb_exclude``).
        lr: learning rate (a float, or a one-element tensor for compiled/captured steps).
        betas, eps, weight_decay: as in ``torch.optim.AdamW`` (``eps`` 1e-6 as timm/apex).
        bias_correction: divide the moments by ``1 - beta^t`` (Adam); False: the paper's
            plain moments.
        max_trust: clamp ``||w||`` at this value in the ratio (the paper's ``phi``);
            None: no clamp.
        clip: LAMBC, the ratio clipped at 1 (Fong et al. 2020; timm's ``trust_clip``).
        max_grad_norm: clip the gradients by their global norm over every group and
            device first (timm, apex: 1.0); None: no clipping. One value for the whole
            optimizer: a param group cannot set its own.
        grad_averaging: ``b3 = 1 - beta1``; False: ``b3 = 1`` (apex, timm).
        decoupled_weight_decay: the decay in the update ``u`` (the paper, AdamW-like);
            False: L2, added to the gradient before the moments (apex ``adam_w_mode=False``).
        always_adapt: False excludes the groups with ``weight_decay == 0`` (timm's
            default, apex without ``use_nvlamb``).
        style: ``"timm"`` or ``"apex"``: the order of the floating-point operations of
            that implementation (docs/algorithms.md section 7 lists the differences).
        lamb_exclude: the group's default for exclusion from the ratio.
        impl: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"`` (see ``lbkernels.ops``).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        max_trust: float | None = None,
        clip: bool = False,
        max_grad_norm: float | None = None,
        grad_averaging: bool = True,
        decoupled_weight_decay: bool = True,
        always_adapt: bool = True,
        style: str = "timm",
        lamb_exclude: bool = False,
        impl: str = "auto",
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            bias_correction=bias_correction, max_trust=max_trust, clip=clip,
            max_grad_norm=max_grad_norm, grad_averaging=grad_averaging,
            decoupled_weight_decay=decoupled_weight_decay, always_adapt=always_adapt,
            style=style, lamb_exclude=lamb_exclude, impl=impl,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict, values: bool = True) -> None:
        check_numbers(group, "lr", "eps", "weight_decay", values=values)
        check_betas(group)
        check_bools(group, "bias_correction", "clip", "grad_averaging", "decoupled_weight_decay",
                    "always_adapt", "lamb_exclude")
        # A clamp or clipping threshold of 0 would zero every adapted step.
        for name in ("max_trust", "max_grad_norm"):
            if group[name] is not None:
                check_numbers(group, name, positive=(name,))
        if group["max_grad_norm"] != self.defaults["max_grad_norm"]:
            raise ValueError("max_grad_norm is one value for the whole optimizer (the norm is "
                             f"over every group's gradients): got {group['max_grad_norm']!r} in a "
                             f"param group, {self.defaults['max_grad_norm']!r} in the defaults")
        if group["style"] not in _STYLES:
            raise ValueError(f"style must be one of {_STYLES}, got {group['style']!r}")
        if values:  # at construction (the params do not change inside a step)
            _refuse_dtensors(group["params"])

    def _state_kinds(self) -> dict[str, str]:
        return {"exp_avg": "param", "exp_avg_sq": "param", "step": "count"}

    def _state_spec(self, group: dict) -> dict:
        return {"step": _step_counter, "exp_avg": zeros_state, "exp_avg_sq": zeros_state}

    def _after_step(self, stepped: bool) -> None:
        self._grad_norms = None  # the next step's gradients are new

    def _global_grad_norm(self, device: torch.device, impl: str) -> torch.Tensor:
        """The L2 norm of every gradient of every group (as GradScaler left them: the op
        divides by grad_scale), on ``device``: one ``multi_tensor_l2norm`` per device at
        the first op of the step, their norms combined on each device that needs it."""
        norms = getattr(self, "_grad_norms", None)
        if norms is None:
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        by_device.setdefault(p.grad.device, []).append(p.grad)
            # multi_tensor_l2norm returns fp32: for an fp64 model that rounding (~6e-8
            # relative) would be the step's largest error, so fp64 grads keep fp64 norms.
            per_device = [torch.stack(torch._foreach_norm(gs))
                          if all(g.dtype == torch.float64 for g in gs)
                          else ops.multi_tensor_l2norm(gs, impl=impl) for gs in by_device.values()]
            norms = self._grad_norms = {"per_device": per_device}
        if device not in norms:
            parts = norms["per_device"]
            # timm's global norm: the norm of the per-tensor norms.
            stacked = parts[0] if len(parts) == 1 else torch.cat([n.to(device) for n in parts])
            norms[device] = torch.linalg.vector_norm(stacked.to(device))
        return norms[device]

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor],
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        adapt = group["always_adapt"] or group["weight_decay"] != 0
        exclude = [group["lamb_exclude"] or not adapt] * len(grads)
        max_grad_norm = group["max_grad_norm"]
        grad_norm = None
        if max_grad_norm is not None:
            grad_norm = self._global_grad_norm(bucket.params[0].device, group["impl"])
        beta1, beta2 = group["betas"]
        ops.lamb_(
            bucket.params,
            grads,
            bucket.state["exp_avg"],
            bucket.state["exp_avg_sq"],
            bucket.state["step"],
            exclude,
            beta1=float(beta1),
            beta2=float(beta2),
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
            grad_norm=grad_norm,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **group_args(group, "lr", "eps", "weight_decay", "bias_correction", "grad_averaging",
                         "decoupled_weight_decay", "max_trust", "clip", "style"),
            **folded_average_arguments(self, group, bucket),
        )


def lamb_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: weights with ``weight_decay`` and the trust ratio, and
    biases/normalisation weights (``ndim <= 1``) excluded from the ratio with no weight
    decay (the split of :func:`~lbkernels.optim.lars_param_groups`)."""
    return [{("lamb_exclude" if k == "lars_exclude" else k): v for k, v in g.items()}
            for g in lars_param_groups(model, weight_decay)]


def _step_counter(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=p.device)


def _refuse_dtensors(params: list) -> None:
    dtensor = sys.modules.get("torch.distributed.tensor")  # none exist unless it is imported
    if dtensor is None:
        return
    for i, p in enumerate(params):
        if isinstance(p, dtensor.DTensor):
            raise TypeError(f"params[{i}] is a DTensor (FSDP2): LAMB's trust ratio needs the norm "
                            "of the whole update across shards, which it does not compute; "
                            "DistributedDataParallel works")
