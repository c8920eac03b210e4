"""Extrapolated Adam (Lin, Kong, Stich, Jaggi, ICML 2020) as a fused optimizer: Adam on the
anchors, the extrapolation preconditioned by the second moment; the anchors, local
gradients and ``anchor_weights()`` are those of :mod:`lbkernels.optim.extrap`."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ._base import Bucket, check_betas, check_bools, check_numbers, copy_state, group_args, zeros_state
from .extrap import ExtrapOptimizer


class ExtrapAdam(ExtrapOptimizer):
    r"""Extrapolated Adam, one fused op per bucket (docs/algorithms.md section 2.2).

    ``torch.optim.Adam`` (``amsgrad=False``) on the anchor ``x``, with moments of the
    all-reduced gradient ``g``; the extrapolation is this worker's local gradient ``g^k``
    preconditioned by the current second moment. At step ``t`` (counted per parameter)::

        g     = g + weight_decay * x           (L2)  or  x = x * (1 - lr * weight_decay)
                                               (decoupled_weight_decay=True: AdamW)
        m     = beta1 * m + (1 - beta1) * g;   v = beta2 * v + (1 - beta2) * g * g
        denom = sqrt(v / (1 - beta2^t)) + eps
        x     = x - lr / (1 - beta1^t) * m / denom
        w     = x - gamma * g^k / denom

    ``gamma = extrap_scale * lr / K`` unless a group sets ``extrap_lr``; ``K``, the anchors,
    the local gradients, :meth:`attach` and :meth:`anchor_weights` are as in
    :class:`ExtrapSGD`. Memory: anchors, two moments and the local gradients.

    Args:
        params: parameters or param groups.
        lr: learning rate (a float, or a one-element tensor).
        betas, eps, weight_decay: as in ``torch.optim.Adam``.
        decoupled_weight_decay: AdamW's decay of ``x`` instead of L2 on ``g``.
        extrap_scale, extrap_lr, world_size: ``gamma`` and ``K``, as in :class:`ExtrapSGD`.
        impl: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"`` (see ``lbkernels.ops``).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        extrap_scale: float = 1.0,
        extrap_lr: float | torch.Tensor | None = None,
        world_size: int | None = None,
        impl: str = "auto",
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, extrap_scale=extrap_scale,
                        extrap_lr=extrap_lr, impl=impl)
        super().__init__(params, defaults, world_size)

    def _check_group(self, group: dict, values: bool = True) -> None:
        self._check_extrap(group, values)
        check_numbers(group, "eps")
        check_bools(group, "decoupled_weight_decay")
        check_betas(group)

    def _state_kinds(self) -> dict[str, str]:
        return {"anchor": "param", "step": "count", "exp_avg": "param", "exp_avg_sq": "param"}

    def _state_spec(self, group: dict) -> dict:
        return {"anchor": copy_state, "step": _step_counter, "exp_avg": zeros_state,
                "exp_avg_sq": zeros_state}

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor],
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        gamma = self.extrap_lr(group)
        beta1, beta2 = group["betas"]
        ops.extrap_adam_(
            bucket.params,
            bucket.state["anchor"],
            bucket.state["exp_avg"],
            bucket.state["exp_avg_sq"],
            bucket.state["step"],
            grads,
            self._local_grads(bucket, grads, gamma),
            extrap_lr=gamma,
            beta1=float(beta1),
            beta2=float(beta2),
            grad_scale=grad_scale,
            found_inf=found_inf,
            **group_args(group, "lr", "eps", "weight_decay", "decoupled_weight_decay"),
        )


def _step_counter(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=p.device)

