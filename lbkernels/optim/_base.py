"""Shared machinery of the fused optimizers: validation, lazy state, cached tensor lists,
``GradScaler`` support and state_dict policy.

A subclass declares its per-parameter state (``_state_spec``), checks its
hyper-parameters (``_check_group``) and implements ``_step_bucket``, which receives
the lists of one (param group, device) bucket and calls one op of ``lbkernels.ops``.
``step`` is this class's alone; what a subclass does around it (step options, checks
after the closure, counters) goes in ``_before_step``, ``_check_step`` and ``_after_step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from .. import ops
from .._validate import FLOAT_DTYPES, check_grads, metadata, same_metadata
from .. import _sharded
from ._bucket import HELD_IMPLS, Bucket, GradNormSource, iter_buckets, norm_arguments  # noqa: F401  (re-exported)
from ._group import (check_betas, check_bools, check_numbers,  # noqa: F401  (re-exported)
                     check_state_value, group_args)


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False without CUDA).
    A replay runs no Python: a step that advances a host counter cannot be captured."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def zeros_state(p: torch.Tensor) -> torch.Tensor:
    """Zero state shaped like ``p`` (momentum buffers); see ``_make_flat_state``."""
    return torch.zeros_like(p, memory_format=torch.preserve_format)


zeros_state.flat_zeros = True  # may be allocated as views of one buffer per bucket


def copy_state(p: torch.Tensor) -> torch.Tensor:
    """State initialised as a copy of ``p`` (anchor weights); see ``_make_flat_state``."""
    return p.detach().clone(memory_format=torch.preserve_format)


copy_state.flat_copy = True  # may be allocated as views of one buffer per bucket


def _flat(make: Callable) -> bool:
    return getattr(make, "flat_zeros", False) or getattr(make, "flat_copy", False)


class FusedOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose step is one fused op per bucket."""

    # GradScaler then hands us ``grad_scale``/``found_inf`` instead of syncing to skip steps.
    _step_supports_amp_scaling = True
    # Why this class refuses DTensor (sharded) parameters; None: it takes them.
    _sharded_refusal: str | None = None

    # The group key that excludes a group from trust ratios, for a rule with the
    # adapt-when-decayed default of timm's Lars (``_adapts``); None: no layer norms.
    _exclude_key: str | None = None
    # Whether the step hands ``||g||^2`` from a :class:`GradNormSource` to its op.
    takes_grad_norms = False
    # Whether ``_step_bucket`` gives buckets a ``held`` (then setting ``_holding``) and
    # steps them through it when ``grads`` is None (``_held_work``).
    _holds_lists = False

    def __init__(self, params: Any, defaults: dict[str, Any]):
        ops.check_impl(defaults.get("impl", "auto"))
        self._grad_norm_source: GradNormSource | None = None
        super().__init__(params, defaults)

    def take_grad_norms(self, source: GradNormSource | None) -> None:
        """Take each bucket's ``||g||^2`` from ``source`` (``lbkernels.distributed.
        grad_norms.attach`` passes its DDP hook's state) instead of reading ``g`` for it;
        None stops. Only the optimizers whose op takes them (``takes_grad_norms``: LARS,
        ShiftedMomentumSGD) accept a source; the others raise TypeError."""
        if source is not None and not self.takes_grad_norms:
            raise TypeError(f"{type(self).__name__} takes no gradient norms")
        self._grad_norm_source = source
        self._invalidate()  # the buckets carry the old source's norm_sq

    # -- subclass interface -------------------------------------------------------------
    def _check_group(self, group: dict, values: bool = True) -> None:
        """Raise ValueError/TypeError naming the bad hyper-parameter (tensor values are
        read only with ``values``)."""

    def _state_spec(self, group: dict) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """State name -> factory from the param, for the state this group needs."""
        return {}

    def _state_kinds(self) -> dict[str, str]:
        """Every per-param state name this class keeps, with ``"param"`` (a tensor shaped
        like the param) or ``"count"`` (a one-element step count): what a loaded state may hold."""
        return {}

    def _step_bucket(self, group: dict, bucket: Bucket, grads: list[torch.Tensor],
                     grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        raise NotImplementedError

    def _adapts(self, group: dict) -> bool:
        """Whether the op computes layer norms (trust ratios) for this group's params: their
        norms are then reduced across shards before the step (sharded params only). With
        ``_exclude_key``: unless the group is excluded, and then only with weight decay
        unless ``always_adapt`` (timm's rule)."""
        key = self._exclude_key
        return key is not None and not group[key] and (group["always_adapt"] or group["weight_decay"] != 0)

    # -- torch.optim.Optimizer ----------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("params must be an ordered collection (a set's order changes "
                            "between runs); pass a list")
        # Listed once, and the list handed on: a generator is consumed by listing it.
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, tuple) and len(p) == 2:  # named_parameters(): (name, tensor)
                p = p[1]
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, not a Tensor")
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"params[{i}] has dtype {p.dtype}; {type(self).__name__} "
                                "updates only floating-point parameters")
            if _sharded.is_sharded(p) and self._sharded_refusal is not None:
                raise ValueError(f"params[{i}] is a DTensor (sharded, e.g. by FSDP2's fully_shard): "
                                 f"{self._sharded_refusal}")
            _sharded.check_placements(i, p, type(self).__name__)
        param_group = {**param_group, "params": params}
        candidate = {**self.defaults, **param_group}
        self._check_group(candidate)
        ops.check_impl(candidate.get("impl", "auto"))
        super().add_param_group(param_group)
        self._invalidate()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict of this class (or of ``torch.optim.SGD``, whose
        ``momentum_buffer`` is ours); everything is checked before anything is replaced."""
        self._check_state_dict(state_dict)
        impls = [g.get("impl", "auto") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, impl in zip(self.param_groups, impls):
            # A checkpoint of another optimizer (e.g. torch.optim.SGD) lacks our keys.
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group["impl"] = impl  # the backend is a property of this process, not the file
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                if "step" in st and isinstance(st["step"], torch.Tensor):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
                self._upgrade_state(group, p, st)
        self._invalidate()

    def _check_state_dict(self, state_dict: Any) -> None:
        """What ``load_state_dict`` would load: groups and their hyper-parameters, and
        per-param state names, shapes and counts; ValueError naming the entry."""
        me = type(self).__name__
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), list)):
            raise ValueError("state_dict must be a dict with a 'state' dict and a 'param_groups' list")
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved)} param groups, this {me} has "
                             f"{len(self.param_groups)}")
        owner: dict[Any, torch.Tensor] = {}
        for g, (mine, theirs) in enumerate(zip(self.param_groups, saved)):
            if not isinstance(theirs, dict) or not isinstance(theirs.get("params"), list):
                raise ValueError(f"state_dict param group {g} is not a dict with a 'params' list")
            if len(theirs["params"]) != len(mine["params"]):
                raise ValueError(f"state_dict param group {g} has {len(theirs['params'])} params, "
                                 f"this {me}'s has {len(mine['params'])}")
            try:  # the group as it will be after loading
                self._check_group({**self.defaults, **theirs, "impl": mine.get("impl", "auto")})
            except (TypeError, ValueError) as e:
                raise ValueError(f"state_dict param group {g}: {e}") from None
            owner.update(zip(theirs["params"], mine["params"]))
        kinds = self._state_kinds()
        for key, st in state_dict["state"].items():
            where = f"state_dict['state'][{key!r}]"
            if key not in owner:
                raise ValueError(f"{where}: no param group holds a param {key!r}")
            if not isinstance(st, dict):
                raise ValueError(f"{where} must be a dict, got {type(st).__name__}")
            for name, value in st.items():
                check_state_value(f"{where}[{name!r}]", kinds.get(name), value, owner[key], me)

    def _upgrade_state(self, group: dict, p: torch.Tensor, st: dict) -> None:
        """Adapt state loaded from another optimizer (e.g. torch.optim.SGD)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._invalidate()
        self.__dict__.setdefault("_grad_norm_source", None)  # a hook is not part of the state

    def _invalidate(self) -> None:
        self._buckets: dict[tuple, tuple[list[bool], list[Bucket]]] = {}
        self._checked: dict[int, tuple[dict, list]] = {}  # id(group) -> (group, hyper-parameters)
        self._holding = False  # some bucket holds its lists (``_holds_lists``)

    # -- the step ---------------------------------------------------------------------
    def _group_buckets(self, group: dict, has_grad: list[bool]) -> list[Bucket]:
        """Per-device buckets of the params of ``group`` that have a grad, with their state.

        Cached while the group, the set of params with grads and the state layout stay
        the same: rebuilding the lists costs ~1 us per tensor, as much as the fused
        kernel itself on models of many small tensors.
        """
        spec = self._state_spec(group)
        hit = self._cache_entry(group, has_grad, spec)
        if hit is not None:
            return hit[1]
        params = group["params"]
        by_device: dict[torch.device, list[int]] = {}
        for i, p in enumerate(params):
            if has_grad[i]:
                by_device.setdefault(p.device, []).append(i)
        buckets = []
        for index in by_device.values():
            ps = [params[i] for i in index]
            # Other state first, so that its factories see which params are fresh.
            for p in ps:
                for name, make in spec.items():
                    if not _flat(make) and self.state[p].get(name) is None:
                        self.state[p][name] = make(p)
            self._make_flat_state(spec, ps)
            state_lists: dict[str, list[torch.Tensor]] = {name: [] for name in spec}
            for p in ps:
                st = self.state[p]
                for name, make in spec.items():
                    if st.get(name) is None:
                        st[name] = make(p)
                    state_lists[name].append(st[name])
            full = len(index) == len(params)
            buckets.append(Bucket(None if full else index, ps, state_lists))
        stepped = metadata([p for p, h in zip(params, has_grad) if h])  # what the grads must match
        self._buckets[(id(group), tuple(spec))] = (list(has_grad), buckets, stepped)
        return buckets

    def _cache_entry(self, group: dict, has_grad: list[bool], spec: dict) -> tuple | None:
        """(has_grad, buckets, metadata of the params with grads) cached for ``group``, or None."""
        if getattr(self, "_buckets", None) is None:
            self._invalidate()
        hit = self._buckets.get((id(group), tuple(spec)))
        return hit if hit is not None and hit[0] == has_grad else None

    def _make_flat_state(self, spec: dict, params: list[torch.Tensor]) -> None:
        """Creates the missing zero-initialised state of ``params`` (factories marked
        ``flat_zeros``), or state that starts as a copy of the param (``flat_copy``), as
        views of one buffer per dtype.

        Separately allocated small tensors land all over the heap, and a step over many
        of them becomes bound by memory latency rather than bandwidth: 2000 momentum
        buffers of 1000 floats took a LARS step from 1.7 to 2.0 ms when allocated one by
        one. Only contiguous params get views (a view keeps their layout); the state_dict
        is unchanged (each entry is a tensor of the param's shape).
        """
        for name, make in spec.items():
            if not _flat(make):
                continue
            missing: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in params:
                # A DTensor's state is a DTensor of its placements (zeros_like), not a view.
                if (self.state[p].get(name) is None and not _sharded.is_sharded(p)
                        and p.is_contiguous()):
                    missing.setdefault(p.dtype, []).append(p)
            for dtype, ps in missing.items():
                if len(ps) < 2:
                    continue
                copy = getattr(make, "flat_copy", False)
                alloc = torch.empty if copy else torch.zeros
                flat = alloc(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device)
                for p, view in zip(ps, flat.split([p.numel() for p in ps])):
                    self.state[p][name] = view.view_as(p)
                    if copy:
                        self.state[p][name].copy_(p.detach())

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None,
             **options: Any) -> torch.Tensor | None:
        """One fused op per (param group, device); ``closure`` re-evaluates the loss.

        ``options`` are the subclass's (``ShiftedMomentumSGD``: ``worker``). A
        ``GradScaler`` hands ``grad_scale``/``found_inf`` to the ops, which skip the step on
        the device: nothing here reads them on the host.
        """
        self._before_step(**options)
        stepped = False
        try:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._check_step()
            grad_scale = getattr(self, "grad_scale", None)
            found_inf = getattr(self, "found_inf", None)
            held = self._held_work()
            try:
                self._step_buckets(held or self._checked_work(), grad_scale, found_inf)
            finally:
                for _, _, buckets in held or ():
                    for bucket in buckets:
                        bucket.held.release()
            stepped = True
        finally:
            self._after_step(stepped)
        return loss

    def _held_work(self) -> list | None:
        """The work of a step whose every bucket holds its lists (``Bucket.held``, made by
        the subclass's ``_step_bucket``) and whose params all have grads of their dtype,
        shape and device, gathered in C++ (grads None in the work: the buckets' HeldLists
        have them); None otherwise, with nothing gathered. Reads no ``p.grad`` in Python:
        on 2000 small tensors whose metadata the backward evicted, that alone takes ~1 ms
        (docs/algorithms.md section 1.2)."""
        if (not self._holding or self._grad_norm_source is not None
                or torch.compiler.is_compiling() or capturing()):
            return None
        work = []
        for g, group in enumerate(self.param_groups):
            if not group["params"]:
                continue
            self._recheck_group(g, group)
            entry = self._cache_entry(group, [True] * len(group["params"]), self._state_spec(group))
            if (entry is None or group["impl"] not in HELD_IMPLS
                    or any(bucket.held is None for bucket in entry[1])):
                return None  # (impl: the group's backend may have been changed since)
            work.append((group, None, entry[1]))
        gathered = []
        for _, _, buckets in work:
            for bucket in buckets:
                if not bucket.held.gather_grads():
                    for held in gathered:
                        held.release()
                    return None
                gathered.append(bucket.held)
        return work

    def _step_buckets(self, work: list, grad_scale: torch.Tensor | None,
                      found_inf: torch.Tensor | None) -> None:
        """One ``_step_bucket`` per (group, bucket) of ``work``; a sharded bucket steps its
        local shards, with the layer norms its rule needs reduced over the shards first."""
        norms = self._sharded_norms(work)
        # ||g||^2 from DDP's averaging pass (take_grad_norms).
        grad_norms = self._grad_norm_source
        for group, grads, bucket, bgrads in iter_buckets(work):
            if bucket.sharded:
                bgrads = _sharded.locals_of(bgrads)
                bucket = bucket.local(norms.get(id(bucket)))
            elif grad_norms is not None:
                bucket.norm_sq = grad_norms.norm_sq(bucket.params, bgrads, self._adapts(group),
                                                    grad_scale, found_inf)
            self._step_bucket(group, bucket, bgrads, grad_scale, found_inf)

    def _sharded_norms(self, work: list) -> dict[int, torch.Tensor]:
        """id(bucket) -> ``norm_sq`` of each sharded bucket whose rule needs layer norms:
        every such bucket's global sums of squares in one collective per (process group,
        dtype) (``_sharded.global_norm_sq``); {} without sharded params."""
        owners, jobs = [], []
        for group, grads, buckets in work:
            for bucket in buckets:
                if bucket.sharded and self._adapts(group):
                    owners.append(id(bucket))
                    jobs.append((bucket.params, grads if bucket.index is None
                                 else [grads[i] for i in bucket.index]))
        return dict(zip(owners, _sharded.global_norm_sq(jobs))) if jobs else {}

    # Hooks of the step. None may read a tensor on the host: a step runs in a CUDA graph.
    def _before_step(self, **options: Any) -> None:
        """Before the closure: refuse the step's ``options`` (nothing has run yet)."""
        if options:
            raise TypeError(f"{type(self).__name__}.step() takes no argument {', '.join(options)}")

    def _check_step(self) -> None:
        """After the closure, before the first write: refuse a step that cannot run."""

    def _after_step(self, stepped: bool) -> None:
        """The step is over: ``stepped`` is False when it raised (also on a step that a
        ``GradScaler`` skips on the device it is True)."""

    def _checked_work(self) -> list[tuple[dict, list, list[Bucket]]]:
        """(group, grads, buckets) of every group with a gradient, once every check that
        could refuse the step has passed: nothing is written before (nor lazy state created).

        A group's op checks its own tensors before writing, so the grads of the first
        group need no check of ours when its buckets are cached and one op runs; every
        later group's are checked here against the params' cached metadata (~0.5-1 us per
        tensor, no host read). A param whose shape changed (``p.data = ...``) after its
        state was made is not caught here: its op refuses it.
        """
        work = []
        for g, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            has_grad = [x is not None for x in grads]
            if not any(has_grad):
                continue
            self._recheck_group(g, group)
            entry = self._cache_entry(group, has_grad, self._state_spec(group))
            if work or entry is None or len(entry[1]) != 1:
                full = all(has_grad)
                present = grads if full else [x for x in grads if x is not None]
                expected = entry[2] if entry is not None else metadata(
                    params if full else [p for p, h in zip(params, has_grad) if h])
                if not same_metadata(present, expected):
                    try:
                        check_grads(params, grads)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"param group {g}: {e}") from None
            work.append((group, grads, has_grad, None if entry is None else entry[1]))
        # Buckets not cached yet are made only now: making them creates lazy state.
        return [(group, grads, self._group_buckets(group, has_grad) if buckets is None else buckets)
                for group, grads, has_grad, buckets in work]

    def _recheck_group(self, g: int, group: dict) -> None:
        """Checks ``group``'s hyper-parameters again when one changed since its last step
        (``param_groups`` edited): comparing them costs ~1 us per group. Tensors are compared
        by identity, and their values not read (a host sync): a tensor lr filled with NaN
        in place is not caught."""
        values = [(k, id(v) if isinstance(v, torch.Tensor) else v)
                  for k, v in group.items() if k not in ("params", "param_names")]
        seen = self._checked.get(id(group))
        if seen is not None and seen[0] is group and seen[1] == values:
            return
        try:
            self._check_group(group, values=False)
            ops.check_impl(group.get("impl", "auto"))
        except (TypeError, ValueError) as e:
            raise type(e)(f"param group {g}: {e}") from None
        self._checked[id(group)] = (group, values)
