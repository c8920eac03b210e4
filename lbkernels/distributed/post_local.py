"""Post-local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020): synchronous data parallelism
first, then local steps on each worker with the parameters averaged every ``H`` steps.

Usage in a ``torchrun`` job::

    opt = PostLocalSGD(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                       switch_step=1000, period=8)
    ddp = DistributedDataParallel(model)
    opt.attach(ddp)                      # gradients all-reduced before step 1000, local after
    for x, y in loader:
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step()                       # local step; every 8th local step averages the params
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects
# (dist.GradBucket, torch.futures.Future[torch.Tensor]), not as strings.
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from .._validate import check_int
from .worker_mean import average_parameters

_STEP_KEY = "post_local_step"


class PostLocalSGD(torch.optim.Optimizer):
    r"""Wraps an optimizer and runs post-local SGD: global gradient averaging until
    ``switch_step``, then local steps with the parameters averaged every ``period`` steps.

    With ``K`` workers, ``t`` the number of steps taken so far, ``S = switch_step``,
    ``H = period``, ``g_k`` worker ``k``'s gradient and ``opt`` the wrapped update::

        t <  S:  w_k = opt(w_k, mean_j g_j)        (every worker holds the same w)
        t >= S:  w_k = opt(w_k, g_k)               (local step, no gradient communication)
                 w_k = mean_j w_j   if (t - S) % H == 0

    The schedule is that of ``torch.distributed.optim.PostLocalSGDOptimizer`` with
    ``PeriodicModelAverager(period=H, warmup_steps=S)`` and ``post_localSGD_hook`` with
    ``post_local_gradient_allreduce=False``: the first average follows the first local
    step, then one every ``H`` local steps. Only the parameters of the wrapped optimizer
    that have a gradient are averaged (as torch does), with one fused all-reduce
    (:func:`lbkernels.distributed.average_parameters`); buffers (BatchNorm statistics)
    and optimizer state (momentum) stay local, as in the paper.

    Turning the gradient all-reduce off. :meth:`attach` (or :meth:`comm_hook`, for code
    that registers the hook itself) installs a DDP comm hook that all-reduces before
    ``switch_step`` and from then on hands DDP back the local bucket unreduced: the
    mechanism of torch's own post-local hook. The alternative, DDP's ``no_sync()``, would
    save DDP's copies of the gradients into and out of its buckets (no communication is
    left either way), but it must wrap every forward and backward of the training loop,
    and it leaves no place for another hook in phase 1: DDP takes one comm hook only,
    and this one runs ``inner`` (e.g. ExtrapSGD's, which also keeps the local gradient)
    before the switch. The phase is decided by the steps taken, not by the backwards
    seen, so a step skipped for a non-finite loss (no ``step()``) does not shift it.

    Without an initialised process group (or with a group of one) there is nothing to
    average: the wrapper then steps the wrapped optimizer only.

    Args:
        optimizer: the local optimizer (any ``torch.optim.Optimizer``).
        switch_step: ``S >= 0``, the first step whose gradient is not all-reduced.
        period: ``H >= 1``, local steps between parameter averages.
        group: the process group to average over (default: the world).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, switch_step: int, period: int,
                 group: dist.ProcessGroup | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.switch_step = check_int("switch_step", switch_step, 0)
        self.period = check_int("period", period, 1)
        # Not Optimizer.__init__: the param groups and state are the wrapped optimizer's own
        # objects, so that LR schedulers and GradScaler act on them.
        self.optimizer = optimizer
        self.group = group
        self.step_count = 0  # steps taken (``t``)
        self._inner_hook: tuple[Any, Callable] | None = None

    # -- torch.optim.Optimizer ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        # Looked up each time: Optimizer.load_state_dict replaces the wrapped optimizer's
        # list, and a copy taken here would go stale.
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    def __repr__(self) -> str:
        return (f"PostLocalSGD(switch_step={self.switch_step}, period={self.period}, "
                f"step_count={self.step_count}, optimizer={self.optimizer!r})")

    @property
    def local(self) -> bool:
        """Whether the next step is a local one (its gradient is not all-reduced)."""
        return self.step_count >= self.switch_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of the wrapped optimizer, then the average if this step is due one."""
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        t = self.step_count
        if t >= self.switch_step and (t - self.switch_step) % self.period == 0:
            self.average()
        self.step_count = t + 1
        return loss

    @torch.no_grad()
    def average(self) -> None:
        """Average the parameters that have a gradient over the group, now (nothing
        without a process group or with a group of one)."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            average_parameters(params, self.group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, with the step count (``post_local_step``)."""
        state = self.optimizer.state_dict()
        state[_STEP_KEY] = self.step_count
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _STEP_KEY not in state_dict:
            raise ValueError(f"state_dict has no {_STEP_KEY!r} entry: it was not saved by "
                             f"PostLocalSGD.state_dict(), and the step count decides when "
                             f"to switch and to average")
        step = check_int(f"state_dict[{_STEP_KEY!r}]", state_dict[_STEP_KEY], 0)
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k != _STEP_KEY})
        self.step_count = step

    # -- DDP ------------------------------------------------------------------------------
    def comm_hook(self, inner: tuple[Any, Callable] | None = None) -> tuple[Any, Callable]:
        """``(state, hook)`` for ``DistributedDataParallel.register_comm_hook``.

        Before ``switch_step`` the hook runs ``inner = (state, hook)`` when given, else
        the mean all-reduce over ``group`` (torch's ``allreduce_hook``); from
        ``switch_step`` on it returns each bucket unreduced.
        """
        if inner is not None and not (isinstance(inner, tuple) and len(inner) == 2 and callable(inner[1])):
            raise TypeError("inner must be a (state, hook) pair with a callable hook")
        self._inner_hook = inner
        return self, post_local_hook

    def attach(self, ddp_model: torch.nn.parallel.DistributedDataParallel,
               inner: tuple[Any, Callable] | None = None) -> None:
        """Register :meth:`comm_hook` on ``ddp_model``."""
        ddp_model.register_comm_hook(*self.comm_hook(inner))


def post_local_hook(state: PostLocalSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The comm hook of :meth:`PostLocalSGD.comm_hook`."""
    if state.local:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut
    if state._inner_hook is not None:
        inner_state, inner_hook = state._inner_hook
        return inner_hook(inner_state, bucket)
    return default_hooks.allreduce_hook(state.group, bucket)
