"""Shifted momentum for delayed gradients (Giladi, Shpigel Nacson, Hoffer, Soudry, ICLR 2020)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import ops
from .._validate import check_int
from ._base import (Bucket, FusedOptimizer, capturing, check_bools, check_numbers, group_args,
                    norm_arguments, zeros_state)
from ._bucket import norm_cache_arguments
from ._folded import folded_average_arguments


class ShiftedMomentumSGD(FusedOptimizer):
    r"""SGD with one momentum buffer per asynchronous worker ("shifted momentum"), fused.

    Asynchronous SGD with delay ``tau = delay``: the gradient ``g`` applied at step ``t``
    was computed on the weights ``w_{t-tau}`` by worker ``k = t mod (tau + 1)`` of a round
    robin of ``tau + 1`` workers. Each worker keeps its own buffer ``v_k``, so the momentum
    is delayed by the same ``tau`` as the gradient::

        k   = t mod (tau + 1)                  (or the ``worker`` given to ``step``)
        d   = r * (g + wd * w_t)               weight decay at the current weights
        v_k = d (first step of worker k),  then  v_k = momentum * v_k + d
        u   = d + momentum * v_k  if nesterov  else  v_k
        w_{t+1} = w_t - lr * u

    ``r = 1`` unless ``lars=True``, where ``r`` is the LARS trust ratio
    ``trust_coefficient * ||w_t|| / (||g|| + wd * ||w_t|| + 1e-8)`` (1 when a norm is 0) of
    every tensor outside the groups marked ``lars_exclude=True``. With ``delay=0`` this
    is :class:`torch.optim.SGD` (``lars=False``) or :class:`~lbkernels.optim.LARS`.

    On a quadratic, standard momentum (one server buffer) with delay ``tau`` is stable for
    ``lr * lambda`` below the threshold of ``(z-1)(z-m) z^tau + a z``, shifted momentum for
    that of ``(z-1)(z^(tau+1) - m) + a z``, which is larger (0.0245 against 0.0139 at
    ``tau = 8, m = 0.9``): see :func:`lbkernels.schedules.stability_threshold`, and
    :func:`lbkernels.schedules.delay_scaled_lr` for the learning rate to pair with it.

    Weight decay belongs on the weights of convolution and linear layers only: build the
    groups with :func:`lbkernels.optim.lars_param_groups`, which gives tensors of
    ``ndim <= 1`` (biases, normalisation weights) ``weight_decay=0`` and
    ``lars_exclude=True``::

        opt = ShiftedMomentumSGD(lars_param_groups(model, 5e-4), lr=delay_scaled_lr(0.1, 4),
                                 momentum=0.9, delay=4)

    Every step is one fused ``lbkernels.ops.lars_sgd_`` call per (group, device) on the
    selected worker's buffers, so every backend serves it. The round-robin position
    counts the steps taken, with or without ``worker=``; it is part of :meth:`state_dict`.
    A step that a ``torch.amp.GradScaler`` skips changes no tensor but takes its worker's
    turn, as a step without gradients does (an asynchronous server that drops one
    worker's gradient goes on with the next worker's): the step never reads the scaler's
    ``found_inf`` on the host, so it can be captured in a CUDA graph.

    Args:
        params: parameters or param groups (a group may set ``lars_exclude``).
        lr: learning rate (a float, or a one-element tensor).
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (no dampening).
        delay: ``tau >= 0``; the optimizer holds ``delay + 1`` buffers per parameter.
        lars: apply LARS trust ratios. trust_coefficient: their ``tc``.
        lars_exclude: the default of the group flag of the same name.
        reuse_norms: with ``lars``, reuse ``||w||^2`` summed by the previous step's update
            unless ``w`` changed since (bitwise the same results; a write through
            ``p.data`` is not seen: set False for code that does that). See ``LARS``.
        impl: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"`` (see ``lbkernels.ops``).
    """

    takes_grad_norms = True

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor,
        momentum: float,
        delay: int,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        lars: bool = False,
        trust_coefficient: float = 0.001,
        *,
        lars_exclude: bool = False,
        reuse_norms: bool = True,
        impl: str = "auto",
    ):
        self.delay = check_int("delay", delay, error=TypeError)
        self._position = 0
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        lars=lars, trust_coefficient=trust_coefficient,
                        lars_exclude=lars_exclude, reuse_norms=reuse_norms, impl=impl)
        super().__init__(params, defaults)

    @property
    def next_worker(self) -> int:
        """The worker (buffer) the next ``step()`` without ``worker=`` uses."""
        return self._position % (self.delay + 1)

    def _check_group(self, group: dict, values: bool = True) -> None:
        check_numbers(group, "lr", "momentum", "weight_decay", "trust_coefficient",
                      positive=("trust_coefficient",), values=values)
        check_bools(group, "nesterov", "lars", "lars_exclude", "reuse_norms")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("nesterov=True requires momentum > 0")

    def _state_kinds(self) -> dict[str, str]:
        return {f"momentum_buffer_{k}": "param" for k in range(self.delay + 1)}

    def _state_spec(self, group: dict) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        # Buffers start at zero, so a worker's first step (v_k = d) needs no step counter.
        if group["momentum"] == 0:
            return {}
        return {f"momentum_buffer_{k}": zeros_state for k in range(self.delay + 1)}

    # -- the step: FusedOptimizer.step's hooks; step(worker=k) takes worker k's buffers ------
    def _before_step(self, worker: int | None = None) -> None:
        """``worker``: whose buffers the step updates (default: the next in the round robin)."""
        if worker is None and capturing():
            raise RuntimeError("ShiftedMomentumSGD.step() captured in a CUDA graph needs worker=: "
                               "a replay does not advance the round robin, so every replay would "
                               "update the captured worker's buffers; capture one graph per worker")
        self._worker = self.next_worker if worker is None else check_int(
            "worker", worker, 0, maximum=self.delay, error=TypeError)

    # Run eagerly also inside torch.compile: a compiled step would drop the increment of
    # this host counter (measured: the position stayed 0 over 3 compiled steps), so every
    # step would use worker 0's buffer. Here the compiled step breaks its graph instead
    # (fullgraph=True refuses it) and the position changes guard a recompilation.
    @torch.compiler.disable
    def _after_step(self, stepped: bool) -> None:
        # Also after a step the GradScaler skipped (no tensor changed): that worker's turn
        # is taken, as when a server drops one worker's gradient and takes the next one's.
        # Keeping the position would take a host read of found_inf every step.
        if stepped:
            self._position += 1

    def _adapts(self, group: dict) -> bool:
        return group["lars"] and not group["lars_exclude"]

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor],
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        adapts = self._adapts(group)
        ops.lars_sgd_(
            bucket.params,
            grads,
            bucket.state.get(f"momentum_buffer_{self._worker}", []),
            [],
            [not adapts] * len(grads),
            grad_scale=grad_scale,
            found_inf=found_inf,
            **group_args(group, "lr", "momentum", "weight_decay", "nesterov", "trust_coefficient"),
            **folded_average_arguments(self, group, bucket),
            **norm_arguments(bucket),
            **norm_cache_arguments(bucket, adapts and group["reuse_norms"] and not capturing()),
        )

    # -- state: the buffers are per-param state, the round-robin position is global ------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["round_robin"] = {"delay": self.delay, "position": self._position}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rr = state_dict.get("round_robin") if isinstance(state_dict, dict) else None
        if not isinstance(rr, dict) or "position" not in rr:
            raise ValueError("state_dict has no 'round_robin' entry: not a ShiftedMomentumSGD state")
        if rr.get("delay") != self.delay:
            raise ValueError(f"state_dict was saved with delay={rr.get('delay')}, "
                             f"this optimizer has delay={self.delay}")
        position = check_int("state_dict['round_robin']['position']", rr["position"], 0)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "round_robin"})
        self._position = position

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups.
        return {**super().__getstate__(), "delay": self.delay, "_position": self._position}
