"""LAMB as a fused, drop-in ``torch.optim`` optimizer."""

from __future__ import annotations

from typing import Any

import torch

from .. import _sharded, ops
from ._base import (Bucket, FusedOptimizer, check_betas, check_bools, check_numbers, group_args,
                    iter_buckets, zeros_state)
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
    (``ops.multi_tensor_l2norm`` per device, combined there) and handed to every op; when
    one op steps every gradient (one group on one device, fp32/fp64 grads, unsharded),
    that op computes it itself (the same norm up to rounding, nothing allocated). Several
    groups on one device (fp32/16-bit grads, unsharded) also allocate nothing after the
    first step: the norms go into two tensors kept by the optimizer (``.out`` overload).

    Sharded parameters (DTensors of FSDP2's ``fully_shard``, 1-D or HSDP mesh) step their
    local shards in two calls of the op: the moments, which leave each shard's sums of
    squares of ``w`` and ``u``; one all-reduce of all of them per (process group, dtype);
    then the ratio from the whole tensors' norms and the write. The global gradient norm
    of ``max_grad_norm`` sums its shards the same way (one more all-reduce). The state
    is kept as DTensors of the params' placements.

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

    _exclude_key = "lamb_exclude"

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

    def _state_kinds(self) -> dict[str, str]:
        return {"exp_avg": "param", "exp_avg_sq": "param", "step": "count"}

    def _state_spec(self, group: dict) -> dict:
        return {"step": _step_counter, "exp_avg": zeros_state, "exp_avg_sq": zeros_state}

    def _after_step(self, stepped: bool) -> None:
        self._grad_norms = None  # the next step's gradients are new

    def _invalidate(self) -> None:
        super()._invalidate()
        # device -> (per-tensor gradient norms (n,), global norm ()): the outputs of the
        # global gradient norm, made at the first step and reused (nothing allocated per
        # step); dropped with the param set (also on load_state_dict and unpickling).
        self._norm_out: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _norm_buffers(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept (per-tensor norms, global norm) outputs of ``device`` for ``n`` grads;
        new ones when the count of grads there changed (a param without grad this step)."""
        kept = self._norm_out.get(device)
        if kept is None or kept[0].numel() != n:
            kept = self._norm_out[device] = (torch.empty(n, dtype=torch.float32, device=device),
                                             torch.empty((), dtype=torch.float32, device=device))
        return kept

    def _global_grad_norm(self, device: torch.device, impl: str) -> torch.Tensor:
        """The L2 norm of every gradient of every group (as GradScaler left them: the op
        divides by grad_scale), on ``device``: one ``multi_tensor_l2norm`` per device at
        the first op of the step, their norms combined on each device that needs it.
        Sharded gradients: the squares of their shards' norms are summed over the shards
        (one all-reduce per process group and dtype) before they are combined."""
        norms = getattr(self, "_grad_norms", None)
        if norms is None:
            by_device: dict[torch.device, tuple[list, list]] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:  # a DTensor's device is its local shard's
                        params, grads = by_device.setdefault(p.grad.device, ([], []))
                        params.append(p)
                        grads.append(p.grad)
            # multi_tensor_l2norm returns fp32: for an fp64 model that rounding (~6e-8
            # relative) would be the step's largest error, so fp64 grads keep fp64 norms.
            # The fp64 path allocates its norms (n scalars of _foreach_norm, their stack).
            per_device = []
            for device_of, (_, gs) in by_device.items():
                gs = _sharded.locals_of(gs)
                per_device.append(torch.stack(torch._foreach_norm(gs))
                                  if all(g.dtype == torch.float64 for g in gs)
                                  else ops.multi_tensor_l2norm(
                                      gs, out=self._norm_buffers(device_of, len(gs))[0],
                                      impl=impl))
            if any(_sharded.is_sharded(p) for params, _ in by_device.values() for p in params):
                squares = [n.square().view(1, -1) for n in per_device]
                _sharded.sum_sharded_columns([(params, sq) for (params, _), sq in
                                              zip(by_device.values(), squares)])
                per_device = [sq.view(-1).sqrt() for sq in squares]
            norms = self._grad_norms = {"per_device": per_device}
        if device not in norms:
            parts = norms["per_device"]
            # timm's global norm: the norm of the per-tensor norms.
            stacked = parts[0] if len(parts) == 1 else torch.cat([n.to(device) for n in parts])
            stacked = stacked.to(device)
            # One device, fp32 norms: into the kept scalar (several devices, fp64 or
            # sharded grads allocate their combined norms).
            kept = self._norm_out.get(device)
            out = kept[1] if kept is not None and kept[0] is stacked else None
            norms[device] = torch.linalg.vector_norm(stacked, out=out)
        return norms[device]

    def _step_buckets(self, work: list, grad_scale: torch.Tensor | None,
                      found_inf: torch.Tensor | None) -> None:
        """Sharded buckets step in two stages of ``lamb_``: the moments, which leave each
        local shard's sums of squares of ``w`` and ``u`` in ``norm_sq``; one all-reduce of
        all of them per (process group, dtype); then the ratio and the write
        (docs/algorithms.md section 7). Plain buckets step in one call."""
        buckets = list(iter_buckets(work))
        # One op over every gradient of the optimizer computes the global norm itself, in
        # its own pass and without a tensor (0 bytes allocated per step, as the kept
        # buffers of several groups). 16-bit grads keep the optimizer's fp32 norm: the
        # op's would be rounded to their dtype.
        own_norm = (len(buckets) == 1 and not buckets[0][2].sharded
                    and all(g.dtype in (torch.float32, torch.float64) for g in buckets[0][3]))
        staged = []
        for group, _, bucket, bgrads in buckets:
            if not bucket.sharded:
                self._step_bucket(group, bucket, bgrads, grad_scale, found_inf,
                                  own_norm=own_norm)
                continue
            local, lgrads = bucket.local(None), _sharded.locals_of(bgrads)
            # fp64 sums: the CPU kernel keeps its sums in double, so with an fp64 norm_sq
            # the two stages are the full step bit for bit (one process).
            local.norm_sq = torch.empty((2, len(lgrads)), dtype=torch.float64,
                                        device=local.params[0].device)
            self._step_bucket(group, local, lgrads, grad_scale, found_inf, stage="moments")
            staged.append((group, bucket, local, lgrads))
        if not staged:
            return
        _sharded.sum_sharded_columns([(bucket.params, local.norm_sq) for _, bucket, local, _ in staged])
        for group, _, local, lgrads in staged:
            self._step_bucket(group, local, lgrads, grad_scale, found_inf, stage="update")

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor],
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                     stage: str = "full", own_norm: bool = False) -> None:
        exclude = [not self._adapts(group)] * len(grads)
        max_grad_norm = group["max_grad_norm"]
        grad_norm = None
        if max_grad_norm is not None and stage != "update" and not own_norm:
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
            # The averaging goes with the write of w: the full step, or its update stage.
            **({} if stage == "moments" else folded_average_arguments(self, group, bucket)),
            **({} if stage == "full" else {"stage": stage, "norm_sq": bucket.norm_sq}),
        )


def lamb_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: weights with ``weight_decay`` and the trust ratio, and
    biases/normalisation weights (``ndim <= 1``) excluded from the ratio with no weight
    decay (the split of :func:`~lbkernels.optim.lars_param_groups`)."""
    return [{("lamb_exclude" if k == "lars_exclude" else k): v for k, v in g.items()}
            for g in lars_param_groups(model, weight_decay)]


def _step_counter(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=p.device)
