"""Weight averaging of a model's parameters: SWA running mean and EMA, one fused op.

See :class:`WeightAverager`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import ops
from .._validate import check_int, tensor_list
from ..reference.average import METHODS, average_dtype
from .. import _sharded


class _Applied:
    """Handle returned by :meth:`WeightAverager.apply_to`: restores on ``__exit__``."""

    def __init__(self, averager: WeightAverager) -> None:
        self._averager = averager

    def __enter__(self) -> WeightAverager:
        return self._averager

    def __exit__(self, *exc: Any) -> None:
        self._averager.restore()


class WeightAverager:
    r"""Running average of parameters, updated in place by one fused op per call.

    ``mode="swa"`` (stochastic weight averaging) keeps the arithmetic mean of the
    snapshots passed to :meth:`update`: with ``n`` snapshots already averaged,

    .. math::  \bar w \leftarrow \bar w + \frac{w - \bar w}{n + 1}, \qquad n \leftarrow n + 1,

    so after ``k`` updates :math:`\bar w = \frac1k \sum_{j=1}^k w_j` (the averages start
    at zero and the first update sets them to the weights exactly).

    ``mode="ema"`` keeps an exponential moving average, starting from the parameters
    at construction (:math:`\bar w_0 = w_0`):

    .. math::  \bar w \leftarrow \bar w + (1 - \beta)(w - \bar w), \qquad
               \bar w_k = \beta^k w_0 + (1 - \beta) \sum_{j=1}^k \beta^{k-j} w_j

    with :math:`\beta` = ``decay`` in ``[0, 1)``.

    Averages are kept in fp32 for fp16/bf16/fp32 parameters (fp64 for fp64 ones): a
    16-bit running mean would drop the late snapshots' contributions. The update count
    is an int64 tensor on the parameters' device, so :meth:`update` never synchronises
    with the host; :attr:`n_averaged` reads it (a sync). Only parameters are averaged;
    batch-norm statistics of the averaged model are recomputed with
    :func:`lbkernels.bn_stats.update_bn`.

    Args:
        model_or_params: a ``torch.nn.Module`` (its ``parameters()``) or an iterable of
            tensors, all on one device.
        mode: ``"swa"`` or ``"ema"``.
        decay: the EMA decay :math:`\beta`, in ``[0, 1)`` (ignored by SWA).
        impl: the kernel backend, as for every op in :mod:`lbkernels.ops`.
        fused_with: ``None`` (call :meth:`update` after each step) or the optimizer whose
            step averages (below); that step runs with the optimizer's ``impl``.

    Evaluating the averaged model: ``with averager.apply_to(model): evaluate(model)``
    swaps the averages into the parameters and back (bitwise); ``apply_to`` and
    :meth:`restore` can also be called separately.

    **Folded into the optimizer step** (``fused_with=optimizer``, a
    :class:`~lbkernels.optim.LARS`, :class:`~lbkernels.optim.ShiftedMomentumSGD` or
    :class:`~lbkernels.optim.LAMB`): every ``optimizer.step()`` averages the weights it has
    just written, in the same fused pass (``lbkernels.ops.lars_sgd_`` or ``lamb_`` with
    ``averages``), so SWA/EMA costs no extra read of the weights. The same update as
    above, applied after each step; a step skipped by ``GradScaler`` (``found_inf``)
    averages nothing. Then:

    * :meth:`update` raises (calling it would average the same weights twice);
    * the averaged parameters must be exactly the optimizer's, all on one device, and
      every parameter of a param group needs a gradient at every step (the step visits
      only those; a partial group raises rather than silently skip an average);
    * the count is kept per param group (one int64 per group, on the device: each group
      is its own ``lars_sgd_`` / ``lamb_`` call, and all of a call's averages share one
      ``r``); it is in :meth:`state_dict` and survives a checkpoint;
    * the averaging starts with the next step: create the averager when averaging
      should start (e.g. at the SWA epoch), after the optimizer.
    """

    def __init__(self, model_or_params: torch.nn.Module | Iterable[torch.Tensor],
                 mode: str = "swa", decay: float = 0.999, impl: str = "auto",
                 fused_with: torch.optim.Optimizer | None = None) -> None:
        if mode not in METHODS:
            raise ValueError(f"mode must be one of {METHODS}, got {mode!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)):
            raise TypeError(f"decay must be a number, got {type(decay).__name__}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        ops.check_impl(impl)
        params = tensor_list("model_or_params", model_or_params)
        if not params:
            raise ValueError("no parameters to average")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                raise TypeError(f"parameter {i} is not a floating-point tensor")
            if p.device != params[0].device:
                raise ValueError(f"parameter {i} is on {p.device} but parameter 0 is on "
                                 f"{params[0].device}; average each device separately")
        self.mode = mode
        self.decay = float(decay)
        self.impl = impl
        self._params = [p.detach() for p in params]
        # DTensor params (FSDP2): the ops average their local shards.
        self._sharded = any(_sharded.is_sharded(p) for p in self._params)
        with torch.no_grad():
            if mode == "ema":
                self._averages = [p.to(average_dtype(p.dtype), copy=True) for p in self._params]
            else:
                self._averages = [torch.zeros_like(p, dtype=average_dtype(p.dtype))
                                  for p in self._params]
        self._count = torch.zeros((), dtype=torch.int64, device=params[0].device)
        self._backup: list[torch.Tensor] | None = None
        self._applied_to: list[torch.Tensor] | None = None
        self._fused_with: torch.optim.Optimizer | None = None
        self._fused_groups: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
        if fused_with is not None:
            self._fuse(fused_with, params)

    # ------------------------------------------------------------ folded averaging

    def _fuse(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
        from .lamb import LAMB
        from .lars import LARS
        from .shifted_momentum import ShiftedMomentumSGD

        if not isinstance(optimizer, (LARS, ShiftedMomentumSGD, LAMB)):
            raise TypeError("fused_with must be a lbkernels.optim.LARS, ShiftedMomentumSGD or "
                            "LAMB (whose step is lars_sgd_ or lamb_), got "
                            f"{type(optimizer).__name__}; use fused_with=None and call update() "
                            "after each step instead")
        if getattr(optimizer, "_fused_averager", None) is not None:
            raise ValueError("fused_with: this optimizer already updates another WeightAverager")
        position = {id(p): i for i, p in enumerate(params)}
        seen = set()
        groups = []
        for g, group in enumerate(optimizer.param_groups):
            index = []
            for p in group["params"]:
                if id(p) not in position:
                    raise ValueError(f"fused_with: param group {g} has a parameter of shape "
                                     f"{tuple(p.shape)} that this averager does not average; "
                                     "average exactly the optimizer's parameters")
                index.append(position[id(p)])
                seen.add(id(p))
            groups.append((group, index))
        if len(seen) != len(params):
            raise ValueError(f"fused_with: {len(params) - len(seen)} averaged parameters are not "
                             "in the optimizer; average exactly the optimizer's parameters")
        # One count per group, each a 0-dim view of one int64 tensor (one host read for
        # n_averaged, one entry in the state_dict).
        self._count = torch.zeros(len(groups), dtype=torch.int64, device=params[0].device)
        for g, (group, index) in enumerate(groups):
            self._fused_groups[id(group["params"])] = ([self._averages[i] for i in index], self._count[g])
        self._fused_with = optimizer
        optimizer._fused_averager = self
        # Checked before the step writes anything: a step that cannot average every
        # group it updates is refused whole, not half-applied.
        optimizer.register_step_pre_hook(self._check_step)

    def _check_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._backup is not None:
            raise RuntimeError("optimizer step while the averages are applied to the model; "
                               "call restore() first")
        for g, group in enumerate(optimizer.param_groups):
            has_grad = [p.grad is not None for p in group["params"]]
            if not any(has_grad):
                continue  # not stepped, not averaged: this group's count stays
            if id(group["params"]) not in self._fused_groups:
                raise RuntimeError(f"param group {g} was added to the optimizer after "
                                   "WeightAverager(fused_with=...): its parameters are not averaged")
            if not all(has_grad):
                raise RuntimeError(f"WeightAverager(fused_with=...) needs a gradient for every "
                                   f"parameter of a param group at every step (group {g} has "
                                   f"{has_grad.count(False)} without); use fused_with=None and "
                                   "update() for models with unused parameters")

    def _step_arguments(self, group: dict, bucket: Any) -> dict[str, Any]:
        """The averaging arguments of ``lars_sgd_`` / ``lamb_`` for one bucket of the
        fused optimizer."""
        # _check_step has refused, before the step, every case where this lookup fails.
        averages, count = self._fused_groups[id(group["params"])]
        assert bucket.index is None
        if self._sharded:  # the bucket holds the local shards: so do their averages
            averages = _sharded.locals_of(averages)
        return {"averages": averages, "average_count": count, "average_method": self.mode,
                "average_decay": self.decay}

    @property
    def fused_with(self) -> torch.optim.Optimizer | None:
        """The optimizer whose step updates the averages, or None."""
        return self._fused_with

    # ------------------------------------------------------------------ averaging

    def op_arguments(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the ``ops.average_`` call that :meth:`update` makes."""
        if self._fused_with is not None:
            raise RuntimeError("op_arguments(): this averager is updated by its fused "
                               "optimizer's step, not by an average_ call")
        return ((self._averages, self._params, self._count),
                {"method": self.mode, "decay": self.decay, "impl": self.impl})

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor | None = None) -> None:
        """Average the current parameters in (one fused op call).

        ``found_inf`` (the AMP grad scaler's flag): when nonzero nothing changes.
        """
        if self._fused_with is not None:
            raise RuntimeError(f"update() on a WeightAverager fused with a "
                               f"{type(self._fused_with).__name__}: its step() already averages "
                               "(calling update() too would average the same weights twice)")
        if self._backup is not None:
            raise RuntimeError("update() while the averages are applied to the model; "
                               "call restore() first")
        (averages, params, count), kwargs = self.op_arguments()
        if self._sharded:
            averages, params = _sharded.locals_of(averages), _sharded.locals_of(params)
        ops.average_(averages, params, count, found_inf=found_inf, **kwargs)

    @property
    def n_averaged(self) -> int:
        """Number of updates made so far (reads the device counter: a host sync).

        Fused with an optimizer: the largest per-group count (the counts are equal when
        every param group steps every time).
        """
        return int(self._count.max().item())

    @property
    def averages(self) -> list[torch.Tensor]:
        """The averages, aligned with the parameters (fp32, or fp64 for fp64 params)."""
        return list(self._averages)

    # ------------------------------------------------------- swapping into a model

    def _targets(self, model: torch.nn.Module | Iterable[torch.Tensor] | None) -> list[torch.Tensor]:
        if model is None:
            return self._params
        params = list(model.parameters() if isinstance(model, torch.nn.Module) else model)
        if len(params) != len(self._averages):
            raise ValueError(f"the model has {len(params)} parameters but {len(self._averages)} "
                             "are averaged")
        for i, (p, a) in enumerate(zip(params, self._averages)):
            if p.shape != a.shape:
                raise ValueError(f"parameter {i} has shape {tuple(p.shape)} but its average "
                                 f"has {tuple(a.shape)}")
        return [p.detach() for p in params]

    @torch.no_grad()
    def apply_to(self, model: torch.nn.Module | Iterable[torch.Tensor] | None = None) -> _Applied:
        """Copy the averages into ``model``'s parameters (default: the averaged ones),
        keeping the weights for :meth:`restore`. Usable as a context manager.

        The averages are rounded to each parameter's dtype.
        """
        if self._backup is not None:
            raise RuntimeError("the averages are already applied; call restore() first")
        targets = self._targets(model)
        self._backup = [p.clone() for p in targets]
        for p, a in zip(targets, self._averages):
            p.copy_(a)
        self._applied_to = targets
        return _Applied(self)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights that :meth:`apply_to` replaced (bitwise)."""
        if self._backup is None:
            raise RuntimeError("restore() without apply_to(): nothing to restore")
        for p, b in zip(self._applied_to, self._backup):
            p.copy_(b)
        self._backup = None
        self._applied_to = None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Averages and update count (tensors, not copies), with mode and decay."""
        return {"mode": self.mode, "decay": self.decay, "averages": list(self._averages),
                "count": self._count}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into this averager's tensors (devices kept); every
        entry is checked first, so a refused state changes nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"the state must be a dict, got {type(state).__name__}")
        for key in ("mode", "decay", "averages", "count"):
            if key not in state:
                raise ValueError(f"the state has no {key!r} entry")
        if state["mode"] != self.mode:
            raise ValueError(f"the state is for mode={state['mode']!r}, this averager "
                             f"has mode={self.mode!r}")
        averages = state["averages"]
        if not isinstance(averages, (list, tuple)) or len(averages) != len(self._averages):
            n = len(averages) if isinstance(averages, (list, tuple)) else type(averages).__name__
            raise ValueError(f"the state has {n} averages, this averager {len(self._averages)}")
        for i, (mine, theirs) in enumerate(zip(self._averages, averages)):
            if not (isinstance(theirs, torch.Tensor) and mine.shape == theirs.shape
                    and mine.dtype == theirs.dtype):
                got = (f"{theirs.dtype} {tuple(theirs.shape)}" if isinstance(theirs, torch.Tensor)
                       else type(theirs).__name__)
                raise ValueError(f"average {i}: {got} in the state, {mine.dtype} "
                                 f"{tuple(mine.shape)} expected")
        decay = state["decay"]
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        count = self._checked_count(state["count"])
        for mine, theirs in zip(self._averages, averages):
            mine.copy_(theirs)
        self._count.copy_(count.reshape(()) if count.numel() == 1 else count.reshape(self._count.shape))
        self.decay = float(decay)

    def _checked_count(self, count: Any) -> torch.Tensor:
        """The state's update count(s) as int64: integers >= 0 (a negative count would make
        the next SWA weight 1/0, a fraction is no count), one or one per group when fused."""
        if not isinstance(count, torch.Tensor):
            count = check_int("count", count)
        elif count.is_floating_point() or count.is_complex() or count.dtype == torch.bool:
            raise ValueError(f"count must be an integer or an integer tensor, got {count!r}")
        count = torch.as_tensor(count, dtype=torch.int64)
        if count.numel() not in (1, self._count.numel()):
            raise ValueError(f"the state has {count.numel()} counts, this averager "
                             f"{self._count.numel()} (one per param group when fused)")
        if int(count.min()) < 0:
            raise ValueError(f"count must be >= 0, got {count.tolist()}")
        return count
