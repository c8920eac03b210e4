"""LARS / LARC as a fused, drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ._base import (Bucket, FusedOptimizer, capturing, check_bools, check_numbers, group_args,
                    norm_arguments, zeros_state)
from ._bucket import hold, norm_cache_arguments
from ._folded import folded_average_arguments

_MOMENTUM_STYLES = ("torch", "paper")


class LARS(FusedOptimizer):
    r"""Layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017), fused.

    For every parameter tensor ``w`` with gradient ``g`` (norms in fp32 or better)::

        r   = tc * ||w|| / (||g|| + wd * ||w|| + eps)      trust ratio, tc = trust_coefficient
        r   = 1                  if ||w|| == 0 or ||g|| == 0, or the group has lars_exclude=True
        r   = min(r / lr, 1)     if clip  (LARC: the effective rate is min(lr, tc*||w||/...))
        d   = r * (g + wd * w)
        buf = d (first step),  then  buf = momentum * buf + (1 - dampening) * d
        u   = d + momentum * buf  if nesterov  else  buf
        w  <- w - lr * u

    ``momentum_style="paper"`` keeps the learning rate inside the buffer as in the paper
    (``buf = m * buf + lr * d; w -= buf``); it differs from the default only while ``lr``
    changes. A group with ``lars_exclude=True`` (see :func:`lars_param_groups`) is plain
    momentum SGD: with every group excluded, ``LARS`` is ``torch.optim.SGD``.

    The whole step is one fused op per (group, device): the norms are computed and the
    tensor updated while it is still in cache, norms never leave the device (no host
    sync), and ``torch.amp.GradScaler`` is honoured inside the kernel (a skipped step
    leaves weights and every state tensor bitwise unchanged).

    ``reuse_norms`` (default True): the update sums ``||w||^2`` of the weights it writes
    and the next step uses that number instead of reading ``w`` again, unless something
    wrote ``w`` in between (seen through its version counter and ``data_ptr``: in-place
    ops, ``copy_``, ``load_state_dict``, our other ops). The reused number is the
    recomputed one, bit for bit: the results do not depend on this flag. What it cannot
    see is a write through ``p.data`` (``p.data.mul_(2)``: ``.data`` has its own version
    counter); code that does that sets ``reuse_norms=False``.

    Example (drop-in for ``torch.optim.SGD``)::

        from lbkernels.optim import LARS, lars_param_groups
        opt = LARS(lars_param_groups(model, weight_decay=5e-5), lr=8.0, momentum=0.9)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    Compared with other implementations:

    * timm ``Lars``: adapts only when ``weight_decay != 0`` unless ``always_adapt``, and
      excludes nothing by group. ``LARS(..., always_adapt=False, clip=trust_clip)``
      reproduces it bit for bit with the reference kernel (``impl="reference"``).
    * apex ``LARC`` (``trust_coefficient=0.02, clip=True``) applies neither the ratio nor
      the weight decay when a norm is zero: ``LARS(..., trust_coefficient=0.02, clip=True,
      zero_norm_decay=False)``.

    Args:
        params: parameters or param groups (a group may set ``lars_exclude``).
        lr: learning rate (a float, or a one-element tensor for compiled/captured steps).
        momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
        trust_coefficient: ``tc`` above. eps: added to the ratio's denominator.
        clip: LARC clipping of the ratio. momentum_style: ``"torch"`` or ``"paper"``.
        always_adapt: when False, groups with ``weight_decay == 0`` are not adapted (timm).
        zero_norm_decay: when False, a tensor with a zero norm gets neither ratio nor decay (apex).
        reuse_norms: reuse ``||w||^2`` from the previous step (above).
        impl: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"`` (see ``lbkernels.ops``).
    """

    _exclude_key = "lars_exclude"
    takes_grad_norms = True
    _holds_lists = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
        momentum_style: str = "torch",
        *,
        always_adapt: bool = True,
        zero_norm_decay: bool = True,
        lars_exclude: bool = False,
        reuse_norms: bool = True,
        impl: str = "auto",
    ):
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, trust_coefficient=trust_coefficient, eps=eps, clip=clip,
            momentum_style=momentum_style, always_adapt=always_adapt,
            zero_norm_decay=zero_norm_decay, lars_exclude=lars_exclude,
            reuse_norms=reuse_norms, impl=impl,
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict, values: bool = True) -> None:
        # trust_coefficient = 0 would make every ratio 0: the adapted layers would never move.
        check_numbers(group, "lr", "momentum", "dampening", "weight_decay", "trust_coefficient",
                      "eps", positive=("trust_coefficient",), values=values)
        check_bools(group, "nesterov", "clip", "always_adapt", "zero_norm_decay", "lars_exclude",
                    "reuse_norms")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")
        if group["momentum_style"] not in _MOMENTUM_STYLES:
            raise ValueError(f"momentum_style must be one of {_MOMENTUM_STYLES}, "
                             f"got {group['momentum_style']!r}")

    def _state_kinds(self) -> dict[str, str]:
        return {"momentum_buffer": "param", "step": "count"}

    def _state_spec(self, group: dict) -> dict:
        # Buffers start at zero, so the first step (buf = d) needs a flag only when
        # dampening would otherwise scale it: a step counter per param, then.
        if group["momentum"] == 0:
            return {}
        if group["dampening"] == 0:
            return {"momentum_buffer": zeros_state}
        return {"step": self._step_counter, "momentum_buffer": zeros_state}

    def _step_counter(self, p: torch.Tensor) -> torch.Tensor:
        # A param that already has a buffer (dampening turned on mid-run, or a checkpoint
        # of torch.optim.SGD) is past its first step.
        started = self.state[p].get("momentum_buffer") is not None
        return torch.full((), float(started), dtype=torch.float32, device=p.device)

    def _upgrade_state(self, group: dict, p: torch.Tensor, st: dict) -> None:
        # torch.optim.SGD stores momentum_buffer=None without momentum.
        if st.get("momentum_buffer") is None:
            st.pop("momentum_buffer", None)
            st.pop("step", None)

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor] | None,
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        adapts, capture = self._adapts(group), capturing()
        options = dict(
            grad_scale=grad_scale,
            found_inf=found_inf,
            **group_args(group, "lr", "momentum", "dampening", "weight_decay", "nesterov",
                         "trust_coefficient", "eps", "clip", "zero_norm_decay", "momentum_style"),
            **folded_average_arguments(self, group, bucket),
            **norm_arguments(bucket),
            **norm_cache_arguments(bucket, adapts and group["reuse_norms"] and not capture),
        )
        exclude = not adapts
        if grads is None:  # the grads are gathered in bucket.held (FusedOptimizer._held_work)
            ops.lars_sgd_held_(bucket.held, exclude, **options)
            return
        lists = [bucket.state.get("momentum_buffer", []), bucket.state.get("step", [])]
        ops.lars_sgd_(bucket.params, grads, *lists, [exclude] * len(grads), **options)
        if self._holds_lists and not capture and hold(bucket, "lars_sgd_", lists, group["impl"]):
            self._holding = True


def lars_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: weights with ``weight_decay`` and LARS, and biases/normalisation
    weights (``ndim <= 1``) excluded from LARS with no weight decay."""
    decay, rest = [], []
    for p in model.parameters():
        if p.requires_grad:
            (rest if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0, "lars_exclude": True},
    ]
