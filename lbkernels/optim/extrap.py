"""Extrapolated SGD (Lin, Kong, Stich, Jaggi, ICML 2020) as a fused optimizer, and
:class:`ExtrapOptimizer`, what it shares with :class:`~lbkernels.optim.ExtrapAdam`
(``extrap_adam.py``).

The model's parameters hold the extrapolated point ``w`` (where the next forward and
backward run); each parameter's anchor ``x`` (the real iterate) lives in the optimizer
state. See :class:`ExtrapSGD` and :func:`lbkernels.distributed.extrap_allreduce_hook`
for the DDP side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import ops
from .._validate import check_int
from ._base import (Bucket, FusedOptimizer, capturing, check_bools, check_numbers, copy_state,
                    group_args, zeros_state)
from .extrap_hook import extrap_allreduce_hook

EXTRAPOLATIONS = ("past_grad", "gaussian", "uniform", "weight", "filter")

# a_t = a * (1 + t)^(-0.55 / 2): the annealing exponent of the extrapolated-SGD framework.
NOISE_ANNEAL_POWER = -0.55 / 2

# The noise offset of step t on a device is t + (device key << 40): a group spread over
# several devices draws independent numbers on each (tensor positions restart per device),
# and 2^40 steps never reach the device bits.
DEVICE_OFFSET_SHIFT = 40


def _device_key(device: torch.device) -> int:
    return 0 if device.type == "cpu" else 1 + (device.index or 0)


def _check_seed(seed: Any) -> int:
    return check_int("seed", seed, 0, maximum=2**63 - 1, error=TypeError)  # the op's seed is an int64


class ExtrapOptimizer(FusedOptimizer):
    """Anchors, local-gradient capture, the extrapolation rate and ``anchor_weights()``,
    shared by :class:`ExtrapSGD` and :class:`~lbkernels.optim.ExtrapAdam`."""

    # docs/algorithms.md section 2: each worker's gradient is taken at its own point.
    _sharded_refusal = ("extrapolation takes each worker's gradient at its own extrapolated point, "
                        "and sharded data parallel gives every rank the same gathered weights; "
                        "train with DistributedDataParallel (attach()) instead")

    def __init__(self, params: Any, defaults: dict[str, Any], world_size: int | None):
        self.world_size = check_int("world_size", world_size, 1, error=TypeError, allow_none=True)
        self.process_group: dist.ProcessGroup | None = None  # set by attach()
        self._reset_transient()
        super().__init__(params, defaults)

    def _reset_transient(self) -> None:
        # Local gradients captured since the last step (param -> tensor), and the persistent
        # buffers they are copied into. Neither is part of the state: g^k is consumed by the
        # step that follows its capture, so a checkpoint taken after step() needs none.
        self._captured: dict[torch.Tensor, torch.Tensor] = {}
        self._local_buffers: dict[torch.Tensor, torch.Tensor] = {}
        self._in_anchor = False

    def _check_extrap(self, group: dict, values: bool) -> None:
        check_numbers(group, "lr", "weight_decay", "extrap_scale", values=values)
        if group["extrap_lr"] is not None:
            check_numbers(group, "extrap_lr", values=values)

    # -- K and gamma --------------------------------------------------------------------
    def resolved_world_size(self) -> int:
        """``K``: ``world_size`` if given, else the size of the attached DDP model's process
        group, else that of the default process group when initialised, else 1."""
        if self.world_size is not None:
            return self.world_size
        if self.process_group is not None:
            return self.process_group.size()
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
        return 1

    def extrap_lr(self, group: dict, world_size: int | None = None) -> float | torch.Tensor:
        """The extrapolation rate ``gamma`` of ``group`` now: its ``extrap_lr`` when set,
        else ``extrap_scale * lr / K`` (a one-element tensor when ``lr`` is one)."""
        if group["extrap_lr"] is not None:
            return group["extrap_lr"]
        k = self.resolved_world_size() if world_size is None else world_size
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return torch.mul(lr, group["extrap_scale"]).div_(k)
        return group["extrap_scale"] * lr / k

    # -- local gradients ----------------------------------------------------------------
    @torch.no_grad()
    def capture_local_grads(self, params: Sequence[torch.Tensor] | None = None,
                            grads: Sequence[torch.Tensor] | None = None, *, copy: bool = True) -> None:
        """Record ``grads`` (default: each param's ``.grad``) as this worker's local
        gradients ``g^k`` for the next :meth:`step`.

        The DDP comm hook calls this with each bucket's gradients before the all-reduce.
        In one process, call it between ``backward()`` and any reduction of ``p.grad``.
        ``copy=True`` copies into persistent per-parameter buffers (allocated once);
        ``copy=False`` keeps references, for gradients that stay unchanged until the step
        (e.g. local steps whose gradients are never all-reduced).
        """
        if params is None:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads is None:
            grads = [p.grad for p in params]
        if len(params) != len(grads):
            raise ValueError(f"grads has {len(grads)} entries but params has {len(params)}")
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                raise ValueError(f"grads[{i}] is None")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, {g.dtype} on {g.device}; "
                                 f"params[{i}] has {tuple(p.shape)}, {p.dtype} on {p.device}")
        if not copy:
            self._captured.update(zip(params, grads))
            return
        self._allocate_local_buffers(params)
        bufs = [self._local_buffers[p] for p in params]
        if bufs:
            torch._foreach_copy_(bufs, list(grads))
        self._captured.update(zip(params, bufs))

    def _allocate_local_buffers(self, params: Sequence[torch.Tensor]) -> None:
        # One allocation per dtype and device for the contiguous params (as _make_flat_state).
        missing: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p not in self._local_buffers:
                if p.is_contiguous():
                    missing.setdefault((p.dtype, p.device), []).append(p)
                else:
                    self._local_buffers[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        for (dtype, device), ps in missing.items():
            flat = torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=device)
            for p, view in zip(ps, flat.split([p.numel() for p in ps])):
                self._local_buffers[p] = view.view_as(p)

    def _extrapolates_from_grads(self, group: dict) -> bool:
        """Whether ``group`` reads ``g^k`` (past-gradient extrapolation, gamma not a float 0)."""
        if group.get("extrapolation", "past_grad") != "past_grad":
            return False
        gamma = group["extrap_lr"] if group["extrap_lr"] is not None else group["lr"]
        return isinstance(gamma, torch.Tensor) or (gamma != 0 and group.get("extrap_scale", 1.0) != 0)

    def _check_local_grads(self) -> None:
        """Before any tensor changes: a multi-worker step needs the captured g^k, and they
        must be scaled as the gradients are."""
        if self._captured:
            if getattr(self, "found_inf", None) is not None and getattr(self, "grad_scale", None) is None:
                raise RuntimeError(
                    f"{type(self).__name__}: GradScaler.unscale_() unscaled p.grad but not the "
                    "captured local gradients; step without unscale_() (the fused step unscales "
                    "both), or clip the gradients without a scaler")
            return
        world_size = self.resolved_world_size()
        if world_size == 1 or not any(
                self._extrapolates_from_grads(g) and any(p.grad is not None for p in g["params"])
                for g in self.param_groups):
            return
        raise RuntimeError(
            f"{type(self).__name__}: the gradients are averaged over K={world_size} workers "
            "but no local (pre-all-reduce) gradient was captured for this step. Call "
            "optimizer.attach(ddp_model) once before training (it registers the comm hook "
            "that captures them), or capture_local_grads() before the gradients are reduced; "
            "with local gradients that are never reduced, capture_local_grads(copy=False), "
            "or pass world_size=1.")

    def _local_grads(self, bucket: Bucket, grads: list[torch.Tensor],
                     gamma: float | torch.Tensor) -> list[torch.Tensor]:
        """The ``local_grads`` list of one op call: empty means ``g^k = g``."""
        if not self._captured or (not isinstance(gamma, torch.Tensor) and gamma == 0):
            return []  # one worker (checked by _check_local_grads), or g^k is not read
        # A param the hook did not see was not all-reduced: its .grad is its local gradient.
        return [self._captured.get(p, g) for p, g in zip(bucket.params, grads)]

    def attach(self, ddp_model: torch.nn.parallel.DistributedDataParallel) -> None:
        """Register :func:`lbkernels.distributed.extrap_allreduce_hook` on ``ddp_model``:
        every backward then copies each bucket's local gradient into this optimizer's
        local-gradient buffers before averaging it over ``ddp_model.process_group``.
        Call once, before the first forward."""
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"ddp_model must be a DistributedDataParallel, got {type(ddp_model).__name__}")
        mine = {p for g in self.param_groups for p in g["params"]}
        trained = [p for p in ddp_model.parameters() if p.requires_grad]
        if not any(p in mine for p in trained):
            raise ValueError("ddp_model has none of this optimizer's parameters")
        if missing := sum(p not in mine for p in trained):
            raise ValueError(f"ddp_model has {missing} trainable parameters this optimizer does not hold "
                             "(e.g. ZeroRedundancyOptimizer's local optimizer, whose owners broadcast their "
                             "own extrapolated point to every rank): extrapolation needs each worker's own "
                             "point; attach an optimizer of all the model's parameters, or pass world_size=1")
        self.process_group = ddp_model.process_group
        ddp_model.register_comm_hook(self, extrap_allreduce_hook)

    # -- the step: FusedOptimizer.step's hooks --------------------------------------------
    def _before_step(self) -> None:
        if self._in_anchor:
            raise RuntimeError("step() inside anchor_weights(): the parameters hold the anchors; "
                               "step after the with-block")

    def _check_step(self) -> None:
        self._check_local_grads()  # after the closure, whose backward captures g^k

    def _after_step(self, stepped: bool) -> None:
        self._captured.clear()  # g^k belongs to one step, also to one that raised

    @contextlib.contextmanager
    def anchor_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the anchors ``x`` (evaluate, checkpoint the
        real iterate); on exit, also on an exception, they hold the extrapolated point again.

        Costs one copy of the weights; changes made to the parameters inside the block are
        discarded. Parameters not yet stepped are their own anchors and are left alone.
        """
        if self._in_anchor:
            raise RuntimeError("anchor_weights() is already active")
        params, anchors = [], []
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if st and "anchor" in st:
                    params.append(p)
                    anchors.append(st["anchor"])
        with torch.no_grad():
            saved = [p.detach().clone(memory_format=torch.preserve_format) for p in params]
            if params:
                torch._foreach_copy_(params, anchors)
        self._in_anchor = True
        try:
            yield
        finally:
            self._in_anchor = False
            with torch.no_grad():
                if params:
                    torch._foreach_copy_(params, saved)

    # -- pickling: transient capture state is rebuilt, never copied ----------------------
    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "world_size": self.world_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("world_size", None)
        self.process_group = None
        self._reset_transient()


class ExtrapSGD(ExtrapOptimizer):
    r"""Extrapolated SGD (Lin, Kong, Stich, Jaggi, ICML 2020), one fused op per bucket.

    Each parameter keeps an anchor ``x`` (the real iterate, a copy of the initial weights
    made at the first step) and a momentum buffer; the parameter itself holds the
    extrapolated point ``w`` where the forward and backward run. With ``K`` workers, on
    worker ``k``, after the backward at ``w`` (``g^k``: this worker's gradient, captured
    before the all-reduce; ``g = mean_k g^k``)::

        d   = g + weight_decay * x
        d   = r * d                      lars=True, outside lars_exclude groups: r the LARS
                                         trust ratio of (||x||, ||g||), see LARS
        buf = momentum * buf + d         (buffers start at zero)
        u   = d + momentum * buf         nesterov,  else  u = buf
        x   = x - lr * u
        w   = x - gamma * g^k            extrapolation="past_grad"
        w   = x + eps_t                  the noise variants

    ``gamma = extrap_scale * lr / K``: the learning rate of one worker's batch, following
    the learning-rate scheduler (and a tensor ``lr``); a group's ``extrap_lr`` replaces it.
    ``K`` is ``world_size``, else the size of the process group of the model given to
    :meth:`attach`, else of the default process group when initialised, else 1. At step 0,
    ``w = x``: no extrapolation. With one worker ``g^k = g`` and this is
    extragradient-from-the-past: ``w_{t+1} = x_{t+1} - gamma * grad f(w_t)``.

    Noise variants (``extrapolation=``), ``a = noise_scale``, annealed to
    ``a_t = a * (1 + t)^(-0.55/2)`` at step ``t`` when ``noise_anneal``: ``"gaussian"``
    ``eps_t = a N(0,1)``; ``"uniform"`` ``a U(-1,1)``; ``"weight"`` ``a U(-1,1) |x|``;
    ``"filter"`` (SmoothOut) ``a r_j / (||r_j|| + 1e-6) ||x_j||`` per output filter ``j``
    (dim 0), ``r ~ U(-1,1)``. The random numbers are keyed by the group's ``seed`` (default:
    ``seed`` plus the group's position, so groups draw independent noise), the step count
    ``t`` (the op's ``offset``; it counts every step, also one the GradScaler skips, which
    draws nothing: the step never reads ``found_inf`` on the host), the device and the
    tensor's position in its group. ``t`` is part of :meth:`state_dict`: a run is
    reproducible and resumes bit for bit on the same backend.

    Data parallel: ``optimizer.attach(ddp_model)`` registers the comm hook that captures
    ``g^k`` (:func:`lbkernels.distributed.extrap_allreduce_hook`); stepping a
    multi-worker run without captured local gradients raises. One pass reads
    ``x, buf, g, g^k`` and writes ``x, buf, w``: 28 bytes per fp32 parameter; memory is
    the anchors, the buffers and the local gradients (3x the weights).

    Example::

        opt = ExtrapSGD(lars_param_groups(model, 5e-5), lr=3.2, momentum=0.9, lars=True)
        ddp = DistributedDataParallel(model)
        opt.attach(ddp)
        for x, y in loader:
            opt.zero_grad()
            loss_fn(ddp(x), y).backward()
            opt.step()
        with opt.anchor_weights():
            evaluate(model)

    Args:
        params: parameters or param groups (a group may set ``lars_exclude``, ``seed``).
        lr: learning rate (a float, or a one-element tensor).
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (no dampening).
        extrap_scale: multiplies ``lr / K`` in ``gamma``. extrap_lr: a fixed ``gamma``.
        world_size: ``K`` (default: see above).
        extrapolation: ``"past_grad"``, ``"gaussian"``, ``"uniform"``, ``"weight"``, ``"filter"``.
        noise_scale, noise_anneal, seed: the noise variants' ``a``, annealing and key.
        lars, trust_coefficient, eps, clip: LARS scaling of ``d`` (see :class:`LARS`).
        impl: ``"auto"``, ``"reference"``, ``"native"`` or ``"triton"`` (see ``lbkernels.ops``).
    """

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        extrap_scale: float = 1.0,
        extrap_lr: float | torch.Tensor | None = None,
        world_size: int | None = None,
        extrapolation: str = "past_grad",
        noise_scale: float = 0.0,
        noise_anneal: bool = False,
        seed: int = 0,
        lars: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
        impl: str = "auto",
        *,
        lars_exclude: bool = False,
    ):
        self._rng_step = 0  # noise steps taken: the random numbers' offset
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        extrap_scale=extrap_scale, extrap_lr=extrap_lr, extrapolation=extrapolation,
                        noise_scale=noise_scale, noise_anneal=noise_anneal, seed=seed, lars=lars,
                        trust_coefficient=trust_coefficient, eps=eps, clip=clip,
                        lars_exclude=lars_exclude, impl=impl)
        super().__init__(params, defaults, world_size)

    def add_param_group(self, param_group: dict) -> None:
        if "seed" not in param_group and hasattr(self, "param_groups"):
            # Independent noise per group: the key is the group's seed (and the tensor's
            # position in its group), so equal seeds would give equal noise.
            param_group = {**param_group,
                           "seed": _check_seed(self.defaults["seed"]) + len(self.param_groups)}
        super().add_param_group(param_group)

    def _check_group(self, group: dict, values: bool = True) -> None:
        self._check_extrap(group, values)
        check_numbers(group, "momentum", "noise_scale", "trust_coefficient", "eps",
                      positive=("trust_coefficient",))
        check_bools(group, "nesterov", "noise_anneal", "lars", "clip", "lars_exclude")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("nesterov=True (the default) requires momentum > 0; "
                             "pass nesterov=False for plain SGD")
        if group["extrapolation"] not in EXTRAPOLATIONS:
            raise ValueError(f"extrapolation must be one of {EXTRAPOLATIONS}, got {group['extrapolation']!r}")
        _check_seed(group["seed"])

    def _state_kinds(self) -> dict[str, str]:
        return {"anchor": "param", "momentum_buffer": "param"}

    def _state_spec(self, group: dict) -> dict:
        spec = {"anchor": copy_state}
        if group["momentum"] != 0:
            spec["momentum_buffer"] = zeros_state
        return spec

    def _upgrade_state(self, group: dict, p: torch.Tensor, st: dict) -> None:
        # torch.optim.SGD stores momentum_buffer=None without momentum.
        if st.get("momentum_buffer") is None:
            st.pop("momentum_buffer", None)

    def _before_step(self) -> None:
        super()._before_step()
        if any(g["extrapolation"] != "past_grad" for g in self.param_groups) and capturing():
            raise RuntimeError("ExtrapSGD with a noise extrapolation cannot be captured in a CUDA "
                               "graph: a replay does not advance the noise offset, so every replay "
                               "would draw the captured step's noise")

    def _after_step(self, stepped: bool) -> None:
        super()._after_step(stepped)
        if stepped and any(g["extrapolation"] != "past_grad" for g in self.param_groups):
            # Also after a step the GradScaler skipped (it drew nothing): reusing its offset
            # would take a host read of found_inf every step.
            self._next_draw()

    # Eager also inside torch.compile, which would drop the increment of this host counter
    # (every step would draw the first step's noise): a graph break for the noise variants
    # only, which fullgraph=True refuses; the changed offset guards a recompilation.
    @torch.compiler.disable
    def _next_draw(self) -> None:
        self._rng_step += 1

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor],
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        noise = group["extrapolation"] != "past_grad"
        a = group["noise_scale"]
        if noise and group["noise_anneal"]:
            a = a * (1.0 + self._rng_step) ** NOISE_ANNEAL_POWER
        if noise:
            gamma, local = 0.0, []
        else:
            gamma = self.extrap_lr(group)
            local = self._local_grads(bucket, grads, gamma)
        ops.extrap_sgd_(
            bucket.params,
            bucket.state["anchor"],
            bucket.state.get("momentum_buffer", []),
            grads,
            local,
            [group["lars_exclude"]] * len(grads),
            extrap_lr=gamma,
            noise_scale=a,
            offset=self._rng_step + (_device_key(bucket.params[0].device) << DEVICE_OFFSET_SHIFT),
            grad_scale=grad_scale,
            found_inf=found_inf,
            **group_args(group, "lr", "momentum", "weight_decay", "nesterov", "lars",
                         "trust_coefficient", "eps", "clip", "extrapolation", "seed"),
        )

    # -- state: anchors and buffers are per-param state; the noise offset is global -------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["extrap"] = {"rng_step": self._rng_step}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a checkpoint of this class, or of ``torch.optim.SGD`` (whose weights become
        the anchors: the first step after it does not extrapolate from the past)."""
        extra = state_dict.get("extrap", {"rng_step": 0})
        if not isinstance(extra, dict) or "rng_step" not in extra:
            raise ValueError("state_dict['extrap'] must be a dict with 'rng_step'")
        rng_step = check_int("state_dict['extrap']['rng_step']", extra["rng_step"], error=TypeError)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "extrap"})
        self._rng_step = rng_step

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_rng_step": self._rng_step}
