"""Asynchronous SGD simulated in one process: a round robin of workers with stale weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._validate import check_int
from ..optim.shifted_momentum import ShiftedMomentumSGD


class AsyncSimulator:
    r"""Train ``model`` as ``delay + 1`` asynchronous workers served in a round robin.

    Each worker holds the weights it last pulled from the server. At step ``t`` worker
    ``k = t mod (tau + 1)`` (``tau = delay``) computes its gradient on the weights it holds,
    the server applies it to the current weights, and the worker pulls the result::

        g_t     = grad L_t(w_{t-tau})             (w_{t-tau} = w_0 while t < tau)
        w_{t+1} = optimizer update of w_t with g_t
        worker k now holds w_{t+1}

    Worker ``k`` last pulled after step ``t - tau - 1``, which is why it holds
    ``w_{t-tau}``: every gradient is exactly ``tau`` steps stale, the model of
    docs/algorithms.md section 3. The optimizer sees the current weights, so weight decay and
    LARS norms are taken at ``w_t``.

    With a :class:`~lbkernels.optim.ShiftedMomentumSGD` (of the same ``delay``) the
    server steps with ``worker=k``, so every worker has its own momentum buffer ("shifted
    momentum"); any other optimizer keeps one server-side state ("standard momentum"
    with ``torch.optim.SGD``). With ``delay=0`` this is plain training, bit for bit.

    The run is deterministic. It holds ``delay + 2`` copies of the trainable parameters
    (the workers' weights and a scratch copy of the current ones); module buffers such as
    batch-norm statistics are not versioned: every forward updates the shared ones.

    Example::

        sim = AsyncSimulator(model, ShiftedMomentumSGD(model.parameters(),
                             lr=delay_scaled_lr(0.1, 4), momentum=0.9, delay=4), delay=4)
        for x, y in loader:
            def closure():
                sim.optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            sim.step(closure)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, delay: int):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        delay = check_int("delay", delay)
        if isinstance(optimizer, ShiftedMomentumSGD) and optimizer.delay != delay:
            raise ValueError(f"optimizer has delay={optimizer.delay} but the simulator delay={delay}: "
                             "shifted momentum needs one buffer per worker")
        self.model = model
        self.optimizer = optimizer
        self.delay = delay
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters")
        self._held = [[p.detach().clone() for p in self.params] for _ in range(delay + 1)]
        self._current = [torch.empty_like(p) for p in self.params]
        self._t = 0

    @property
    def next_worker(self) -> int:
        """The worker whose gradient the next :meth:`step` applies."""
        return self._t % (self.delay + 1)

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One asynchronous update. ``closure`` zeroes the grads, computes the loss and
        calls ``backward`` (as for ``torch.optim``); it runs on the stale weights of the
        worker whose turn it is. Returns its loss."""
        k = self.next_worker
        held = self._held[k]
        with torch.no_grad():
            for p, w, cur in zip(self.params, held, self._current):
                cur.copy_(p)
                p.copy_(w)
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            with torch.no_grad():
                for p, cur in zip(self.params, self._current):
                    p.copy_(cur)
        if isinstance(self.optimizer, ShiftedMomentumSGD):
            self.optimizer.step(worker=k)
        else:
            self.optimizer.step()
        with torch.no_grad():
            for p, w in zip(self.params, held):
                w.copy_(p)  # the worker pulls the new weights
        self._t += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The step count and the weights every worker holds (not the optimizer's state)."""
        return {"step": self._t, "held": [[w.clone() for w in ws] for ws in self._held]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        held, step = state["held"], check_int("step", state["step"], error=TypeError)
        if len(held) != self.delay + 1 or any(len(ws) != len(self.params) for ws in held):
            raise ValueError(f"state holds {len(held)} workers' weights; this simulator has "
                             f"{self.delay + 1} workers of {len(self.params)} tensors")
        for ws in held:
            for i, (w, p) in enumerate(zip(ws, self.params)):
                if w.shape != p.shape:
                    raise ValueError(f"held weight {i} has shape {tuple(w.shape)}, parameter {tuple(p.shape)}")
        with torch.no_grad():
            for mine, theirs in zip(self._held, held):
                for w, v in zip(mine, theirs):
                    w.copy_(v)
        self._t = step
