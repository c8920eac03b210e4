"""Reference LARS-SGD step and multi-tensor L2 norm (docs/algorithms.md section 1).

Written for clarity, not speed: one tensor at a time, fp32 arithmetic for fp16/bf16
tensors, and the same operation order as timm's ``Lars`` and apex's ``LARC`` so that
their compatibility flags reproduce them bit for bit.
"""

from __future__ import annotations

import torch

from .._validate import FLOAT_DTYPES, check_tensor_lists
from . import average as _average
from ._checks import Tensors, check_norm_sq, check_scalars, check_steps


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: fp64 for fp64 tensors, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_l2norm_args(xs, out: torch.Tensor | None = None) -> None:
    """Every check of ``multi_tensor_l2norm`` and, with ``out``, of its ``.out`` overload
    (the messages of csrc/include/lbkernels/host.h check_l2norm_out)."""
    device = xs[0].device if xs else None
    for i, x in enumerate(xs):
        if x.device != device:
            raise ValueError(f"xs[{i}] is on {x.device} but xs[0] is on {device}")
        if x.dtype not in FLOAT_DTYPES or x.layout != torch.strided:
            raise TypeError(f"xs[{i}] must be a dense floating-point tensor, got {x.dtype} {x.layout}")
    if out is None:
        return
    if out.layout != torch.strided or out.dtype != torch.float32:
        raise TypeError(f"out must be a dense float32 tensor, got {out.dtype} {out.layout}")
    if out.dim() != 1 or out.shape[0] != len(xs):
        raise ValueError(f"out must have shape (len(xs),) = ({len(xs)},), got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if xs and out.device != device:
        raise ValueError(f"out is on {out.device} but xs[0] is on {device}")


def multi_tensor_l2norm(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norms as one fp32 tensor (accumulated in fp64 for fp64 inputs)."""
    out = torch.empty(len(xs), dtype=torch.float32, device=xs[0].device if xs else None)
    multi_tensor_l2norm_out(xs, out=out)
    return out


def multi_tensor_l2norm_out(xs: list[torch.Tensor], *, out: torch.Tensor) -> None:
    """``multi_tensor_l2norm`` written into ``out`` (float32, shape ``(len(xs),)``, on xs'
    device, contiguous), checked before it is written."""
    check_l2norm_args(xs, out)
    if xs:
        norms = [torch.linalg.vector_norm(x, dtype=opmath_dtype(x.dtype)).float() for x in xs]
        torch.stack(norms, out=out)


def trust_ratio(
    w: torch.Tensor,
    g: torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    clip: bool,
    given_sq: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    cached_w_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LARS trust ratio ``r`` of one tensor and whether both norms are non-zero.

    ``w`` and ``g`` are already in the arithmetic dtype (``g`` unscaled)::

        r = tc * ||w|| / (||g|| + wd * ||w|| + eps)   (1 if either norm is 0)
        r = min(r / lr, 1)                              if clip

    ``given_sq``: this tensor's column of the op's ``norm_sq`` (``(||w||^2, ||g_scaled||^2)``,
    ``g`` still multiplied by the loss scale); an entry >= 0 replaces the computed norm by
    ``sqrt(entry)`` in the arithmetic dtype (``/ grad_scale`` for ``g``), a negative one
    keeps it. Selected on the device (``torch.where``): no host sync.

    ``cached_w_sq``: this tensor's ``w_norm_sq`` entry when its key matches (float64, 0-d);
    an entry >= 0 is ``||w||^2`` as :func:`cached_norm_sq` stored it: its float64 square
    root rounded to the arithmetic dtype is the norm computed here, bit for bit (the
    square of an fp32 number is exact in fp64; ``sqrt(fl(x * x)) == x`` in fp64).
    """
    n_w = torch.linalg.vector_norm(w)
    n_g = torch.linalg.vector_norm(g)
    if cached_w_sq is not None:
        cached = cached_w_sq.to(w.device)
        n_w = torch.where(cached >= 0, cached.sqrt().to(w.dtype), n_w)
    if given_sq is not None:
        # "Given" is decided on the entry as passed (a tiny negative fp64 entry would
        # round to -0.0 in fp32), the value used is the entry in the arithmetic dtype.
        is_given = given_sq.to(w.device) >= 0
        given = given_sq.to(w.device, w.dtype).sqrt()
        given_g = given[1] if grad_scale is None else given[1] / grad_scale.reshape(())
        n_w = torch.where(is_given[0], given[0], n_w)
        n_g = torch.where(is_given[1], given_g, n_g)
    valid = (n_w > 0) & (n_g > 0)
    r = trust_coefficient * n_w / (n_g + n_w * weight_decay + eps)
    r = torch.where(valid, r, 1.0)
    if clip:
        r = torch.clamp(r / lr, max=1.0)
    return r, valid


def cached_norm_sq(w: torch.Tensor) -> torch.Tensor:
    """``||w||^2`` (0-d float64) as the norm cache stores it: the square of the norm
    :func:`trust_ratio` computes for ``w`` (in its arithmetic dtype)."""
    return torch.linalg.vector_norm(w.to(opmath_dtype(w.dtype))).double().square()


def w_norm_key_matches(w_norm_key: torch.Tensor, i: int, w: torch.Tensor) -> bool:
    """Whether the cache's key of param ``i`` is ``w``'s (version counter, data_ptr): nothing
    wrote ``w`` since the op that stored its entry (host metadata only, no sync)."""
    # torch.equal, not int(): the key is on the CPU, but a step refuses every host read
    # of a tensor (python_tests/test_no_host_sync.py), whatever its device.
    return not w.is_inference() and torch.equal(
        w_norm_key[:, i], torch.tensor((w._version, w.data_ptr()), dtype=torch.int64))


def check_w_norm_cache(params, w_norm_sq: torch.Tensor | None, w_norm_key: torch.Tensor | None) -> None:
    """The norm cache's two tensors: both or neither; ``w_norm_sq`` float64 of shape
    ``(len(params),)`` on the params' device, ``w_norm_key`` int64 of shape
    ``(2, len(params))`` on the CPU, both contiguous."""
    if w_norm_sq is None and w_norm_key is not None:
        raise ValueError("w_norm_sq is missing: w_norm_key is given (pass both or neither)")
    if w_norm_key is None and w_norm_sq is not None:
        raise ValueError("w_norm_key is missing: w_norm_sq is given (pass both or neither)")
    if w_norm_sq is None:
        return
    n = len(params)
    if w_norm_sq.layout != torch.strided or w_norm_sq.dtype != torch.float64:
        raise ValueError(f"w_norm_sq must be a dense float64 tensor, got {w_norm_sq.dtype}")
    if tuple(w_norm_sq.shape) != (n,):
        raise ValueError(f"w_norm_sq must have shape (len(params),) = ({n},), got {tuple(w_norm_sq.shape)}")
    if params and w_norm_sq.device != params[0].device:
        raise ValueError(f"w_norm_sq is on {w_norm_sq.device} but params[0] is on {params[0].device}")
    if not w_norm_sq.is_contiguous():
        raise ValueError("w_norm_sq must be contiguous")
    if w_norm_key.layout != torch.strided or w_norm_key.dtype != torch.int64:
        raise ValueError(f"w_norm_key must be a dense int64 tensor, got {w_norm_key.dtype}")
    if tuple(w_norm_key.shape) != (2, n):
        raise ValueError(f"w_norm_key must have shape (2, len(params)) = (2, {n}), "
                         f"got {tuple(w_norm_key.shape)}")
    if w_norm_key.device.type != "cpu":
        raise ValueError(f"w_norm_key must be on the CPU, got {w_norm_key.device}")
    if not w_norm_key.is_contiguous():
        raise ValueError("w_norm_key must be contiguous")


def check_lars_sgd_args(params, grads, momentum_buffers, steps, exclude, *, momentum,
                        dampening, momentum_style, lr_tensor, grad_scale, found_inf, averages,
                        average_count, average_method, norm_sq=None, w_norm_sq=None,
                        w_norm_key=None, **_) -> None:
    """Every check of ``lars_sgd_``, before any write (the other keyword arguments of the op
    need none); the Triton launcher runs it too."""
    check_tensor_lists(
        params,
        same_shape={"grads": grads},
        optional={"momentum_buffers": momentum_buffers, "steps": steps},
        flags={"exclude": exclude},
    )
    if momentum != 0.0:
        if len(momentum_buffers) != len(params):
            raise ValueError(f"momentum_buffers has {len(momentum_buffers)} entries but params has {len(params)}")
        if dampening != 0.0 and len(steps) != len(params):
            raise ValueError(f"steps has {len(steps)} entries but params has {len(params)} "
                             "(dampening != 0 needs a step counter per param)")
        check_tensor_lists(params, same_shape={"momentum_buffers": momentum_buffers})
        check_steps(params, steps)
    if momentum_style not in ("torch", "paper"):
        raise ValueError(f"momentum_style must be 'torch' or 'paper', got {momentum_style!r}")
    check_scalars(lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)
    check_folded_average_args(params, averages, average_count, average_method, found_inf)
    check_norm_sq(params, norm_sq)
    check_w_norm_cache(params, w_norm_sq, w_norm_key)


def check_folded_average_args(params, averages, average_count, average_method, found_inf) -> None:
    """The weight averaging folded into a step (``lars_sgd_``, ``lamb_``), after the
    step's own checks."""
    if averages:
        _average.check_average_args(averages, params, average_count, average_method, found_inf,
                                    count_name="average_count", method_name="average_method")
    else:
        if average_method not in _average.METHODS:
            raise ValueError(f"average_method must be one of {_average.METHODS}, got {average_method!r}")
        if average_count is not None:
            raise ValueError("average_count is given but averages is empty: nothing to average")


def lars_sgd_(
    params: Tensors, grads: Tensors, momentum_buffers: Tensors, steps: Tensors,
    exclude: list[bool], *, lr: float, lr_tensor: torch.Tensor | None = None,
    momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False, trust_coefficient: float = 0.001, eps: float = 1e-8,
    clip: bool = False, zero_norm_decay: bool = True, momentum_style: str = "torch",
    grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
    averages: Tensors | None = None, average_count: torch.Tensor | None = None,
    average_method: str = "swa", average_decay: float = 0.999,
    norm_sq: torch.Tensor | None = None, w_norm_sq: torch.Tensor | None = None,
    w_norm_key: torch.Tensor | None = None,
) -> None:
    """One LARS-SGD step over lists of tensors, in place.

    Per tensor ``i`` (``r = 1`` when ``exclude[i]``)::

        r = tc * ||w|| / (||g|| + wd * ||w|| + eps)   (1 if either norm is 0)
        r = min(r / lr, 1)                              if clip
        d = r * (g + wd * w)                            (d = g if a norm is 0 and not zero_norm_decay)
        buf = d on the first step (steps[i] == 0), else m * buf + (1 - dampening) * d
        u = d + m * buf if nesterov else buf;  w -= lr * u

    Buffers start at zero, so without dampening the first step needs no flag
    (``m * 0 + d == d``): ``steps`` may then be empty, and is required only with
    ``dampening != 0``. ``momentum_style="paper"`` keeps the learning rate in the buffer: ``d`` is scaled by
    ``lr`` and ``w -= u``. ``g`` is divided by ``grad_scale`` when given; with
    ``found_inf != 0`` nothing (weights, buffers, steps) changes.

    Weight averaging folded into the step (docs/algorithms.md section 4): with ``averages``
    non-empty, each new ``w`` (as stored, in the param's dtype) is averaged in exactly as
    ``average_(averages, params, average_count, method=average_method,
    decay=average_decay)`` would, and ``average_count`` is incremented once per call;
    the kernels do it in the pass that writes ``w``. ``found_inf != 0`` leaves the
    averages and the count unchanged too.

    ``norm_sq`` (optional, shape ``(2, len(params))``, float32/float64, contiguous, on the
    params' device): precomputed squared norms, e.g. the all-reduced sums of the shards of
    a sharded model. ``norm_sq[0, i] = ||w_i||^2`` and ``norm_sq[1, i] = ||g_i||^2`` of the
    gradient as passed (still multiplied by the loss scale: ``||g||`` is divided by
    ``grad_scale`` here). An entry ``>= 0`` replaces that norm by ``sqrt(entry)`` in the
    arithmetic dtype; a negative entry means "not given": that norm is computed (all -1 is
    ``norm_sq=None`` bit for bit). Entries of excluded tensors are never read; the tensor is
    read on the device only and never written (docs/algorithms.md section 1).

    ``w_norm_sq`` / ``w_norm_key`` (both or neither): the norm cache, see ``ops.lars_sgd_``.
    Here the entry is :func:`cached_norm_sq` of the new ``w``, written also on a skipped
    step (``w`` then unchanged: the entry stays true; telling a skip on the host would be
    a sync).
    """
    check_lars_sgd_args(params, grads, momentum_buffers, steps, exclude, momentum=momentum,
                        dampening=dampening, momentum_style=momentum_style, lr_tensor=lr_tensor,
                        grad_scale=grad_scale, found_inf=found_inf, averages=averages,
                        average_count=average_count, average_method=average_method,
                        norm_sq=norm_sq, w_norm_sq=w_norm_sq, w_norm_key=w_norm_key)
    has_momentum = momentum != 0.0
    averages = averages or []
    paper = momentum_style == "paper"

    for i, (w, g) in enumerate(zip(params, grads)):
        ct = opmath_dtype(w.dtype)
        w32, g32 = w.to(ct), g.to(ct)
        if grad_scale is not None:
            g32 = g32 / grad_scale.to(w.device, ct)
        lr_i = lr if lr_tensor is None else lr_tensor.to(w.device, ct)
        d = g32.add(w32, alpha=weight_decay)
        if not exclude[i]:
            cached = (w_norm_sq[i] if w_norm_sq is not None and w_norm_key_matches(w_norm_key, i, w)
                      else None)
            r, valid = trust_ratio(w32, g32, lr_i, weight_decay, trust_coefficient, eps, clip,
                                   None if norm_sq is None else norm_sq[:, i],
                                   None if grad_scale is None else grad_scale.to(w.device, ct),
                                   cached)
            d = d.mul(r)
            if not zero_norm_decay:
                d = torch.where(valid, d, g32)
        if paper:
            d = d * lr_i
        if has_momentum:
            buf = momentum_buffers[i].to(ct).mul(momentum).add(d, alpha=1.0 - dampening)
            if steps:
                buf = torch.where(steps[i].to(w.device) == 0, d, buf)
            u = d.add(buf, alpha=momentum) if nesterov else buf
        else:
            u = d
        if paper:
            w_new = w32.sub(u)
        elif lr_tensor is None:
            w_new = w32.add(u, alpha=-lr)
        else:
            w_new = w32 - lr_i * u
        if found_inf is not None:
            skip = found_inf.to(w.device) != 0
            w_new = torch.where(skip, w32, w_new)
            if has_momentum:
                buf = torch.where(skip, momentum_buffers[i].to(ct), buf)
        w.copy_(w_new)
        if has_momentum:
            momentum_buffers[i].copy_(buf)
        if w_norm_sq is not None and not exclude[i]:
            w_norm_sq[i].copy_(cached_norm_sq(w))
    if has_momentum:
        inc = 1.0 if found_inf is None else (found_inf == 0).to(torch.float32)
        for s in steps:
            s.add_(inc if isinstance(inc, float) else inc.to(s.device, s.dtype))
    if averages:
        _average.average_(averages, params, average_count, method=average_method,
                          decay=average_decay, found_inf=found_inf)
    if w_norm_key is not None:  # last: the versions after every write of this op
        for i, w in enumerate(params):
            if not exclude[i] and not w.is_inference():
                w_norm_key[0, i] = w._version
                w_norm_key[1, i] = w.data_ptr()
