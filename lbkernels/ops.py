"""Typed wrappers over ``torch.ops.lbkernels``: the only door from Python to the kernels.

Each wrapper takes an ``impl`` argument:

- ``"auto"``: the dispatcher decides: a compiled kernel for the tensors' device when the
  library is loaded, the reference otherwise; on CUDA the native kernel, or the Triton
  one for the ops that ``lbkernels/triton/auto_pick.json`` names (``make gpu-proof``
  measures which is faster on a GPU; the shipped table is empty);
- ``"reference"``: the pure-PyTorch oracle;
- ``"native"``: the compiled C++ (CPU) or CUDA kernel; an error when it is not built;
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _library

IMPLS = ("auto", "reference", "native", "triton")

Tensors = Sequence[torch.Tensor]


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def _device_type(tensors: Sequence[torch.Tensor]) -> str:
    return tensors[0].device.type if len(tensors) else "cpu"


def _triton_op(name: str, device_type: str) -> Callable:
    from . import triton as _triton  # imported lazily: Triton is optional

    return _triton.get_op(name, device_type)


def resolve(name: str, impl: str, tensors: Sequence[torch.Tensor]) -> Callable:
    """The callable that runs op ``name`` for ``impl`` on the device of ``tensors``."""
    check_impl(impl)
    device_type = _device_type(tensors)
    if impl == "reference":
        return _library.REFERENCE[name]
    if impl == "triton":
        return _triton_op(name, device_type)
    if impl == "native" and not _library.has_native_kernel(name, device_type):
        raise RuntimeError(
            f"impl='native': no compiled lbkernels kernel for {name} on {device_type}. "
            "Build the extension (pip install --no-build-isolation .) without LBK_SKIP_CPP=1, "
            "or use impl='auto' or 'reference'."
        )
    if impl == "auto" and device_type == "cuda":
        from . import triton as _triton

        pick = _triton.auto_pick(name, device_type)
        if pick is not None:
            return pick
    return _library.op(name)


def _as_list(xs: Sequence) -> list:
    # The optimizers pass lists already; copying 2000-entry lists every step costs ~10 us each.
    return xs if type(xs) is list else list(xs)


def multi_tensor_l2norm(xs: Tensors, *, out: torch.Tensor | None = None,
                        impl: str = "auto") -> torch.Tensor:
    """L2 norm of every tensor in ``xs``, as one fp32 tensor of ``len(xs)`` values.

    ``out``: written instead of a new tensor (the ``.out`` overload) and returned: a
    contiguous float32 tensor of shape ``(len(xs),)`` on the device of ``xs``, checked
    before it is written."""
    if out is None:
        return resolve("multi_tensor_l2norm", impl, xs)(_as_list(xs))
    resolve("multi_tensor_l2norm.out", impl, xs or [out])(_as_list(xs), out=out)
    return out


def _scalar_arg(x: float | torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """(float, tensor) schema pair of an argument given as a float or one-element tensor."""
    if isinstance(x, torch.Tensor):
        return 1.0, x
    return float(x), None


# Read once here: parsing a schema inside a compiled step would break the graph.
_OPTIONS = {name: frozenset(_library.schema_defaults(name)[1]) for name in _library.SCHEMAS}


def _check_options(name: str, options: dict) -> None:
    """A TypeError naming an option the op does not take, before anything runs."""
    unknown = options.keys() - _OPTIONS[name]
    if unknown:
        raise TypeError(f"{name}() got an unexpected keyword argument {sorted(unknown)[0]!r}")


def lars_sgd_(params: Tensors, grads: Tensors, momentum_buffers: Tensors, steps: Tensors,
              exclude: Sequence[bool], *, lr: float | torch.Tensor, impl: str = "auto",
              **options) -> None:
    """One fused LARS-SGD step in place (docs/algorithms.md section 1).

    ``options``: the op's other keyword arguments, with the meaning that
    ``lbkernels.reference.lars.lars_sgd_`` documents and the defaults of its schema
    (``_library.SCHEMAS``): momentum, dampening, weight_decay, nesterov,
    trust_coefficient, eps, clip, zero_norm_decay, momentum_style, grad_scale, found_inf,
    averages, average_count, average_method, average_decay, norm_sq, w_norm_sq,
    w_norm_key.

    ``norm_sq``: optional precomputed squared norms, a contiguous float32/float64 tensor
    of shape ``(2, len(params))`` on the params' device: row 0 ``||w_i||^2``, row 1
    ``||g_i||^2`` of the gradient as passed (still loss-scaled). An entry >= 0 is used
    (``sqrt`` in the arithmetic dtype) and that norm is not computed; a negative entry is
    computed as without ``norm_sq``. Read on the device only (it may be the output of an
    all-reduce still in flight), never written.

    ``w_norm_sq``, ``w_norm_key`` (both or neither): the norm cache (docs/algorithms.md
    section 1). ``w_norm_sq``: float64, shape ``(len(params),)``, on the params' device;
    ``w_norm_key``: int64, shape ``(2, len(params))``, on the CPU; both contiguous, written
    by the op (start them at -1 and 0). For an adapted param ``i`` whose ``||w||^2`` is
    not given by ``norm_sq``: if ``w_norm_key[:, i] == (params[i]._version,
    params[i].data_ptr())`` and ``w_norm_sq[i] >= 0``, ``w_norm_sq[i]`` is ``||w_i||^2``
    and ``w_i`` is not read for its norm. After the update every adapted param gets
    ``w_norm_sq[i]`` = the sum of squares of the new ``w_i`` exactly as this backend's
    norm would sum it at the next call (so a step with the cache equals the step
    without, bit for bit) and its key after the op; excluded params' entries are left
    alone. A write to ``w`` by any op (ours bump the version counter too) invalidates its
    entry; a write through ``w.data`` does not (``.data`` has its own counter).

    ``momentum_buffers`` (zero-initialised) may be empty when ``momentum == 0``;
    ``steps`` (0-dim fp32 counters; step 0 sets ``buf = d``) may be empty unless
    ``dampening != 0``. ``lr`` may be a one-element tensor on
    the params' device, so that a compiled or captured step never re-specialises.

    With ``averages`` (one per param, fp32, or fp64 for fp64 params) the same pass
    averages the new weights in, exactly as ``average_(averages, params, average_count,
    method=average_method, decay=average_decay)`` after the step, and increments
    ``average_count`` once (docs/algorithms.md section 4): SWA without an extra read of ``w``.
    """
    _check_options("lars_sgd_", options)
    lr_value, lr_tensor = _scalar_arg(lr)
    resolve("lars_sgd_", impl, params)(
        _as_list(params), _as_list(grads), _as_list(momentum_buffers), _as_list(steps),
        _as_list(exclude), lr=lr_value, lr_tensor=lr_tensor, **options,
    )


def lars_sgd_held_(held, exclude: bool, *, lr: float | torch.Tensor, impl: str = "auto",
                   **options) -> None:
    """:func:`lars_sgd_` over the params, grads, momentum buffers and step counters that
    ``held`` holds, with ``exclude`` for every param: ``held`` is an ``lbkernels.HeldLists``
    (``_library.held_lists(params, [momentum_buffers, steps])``) whose ``gather_grads()``
    has just returned True. The same op runs with the same checks; the lists are not
    converted from Python, and the grads were gathered in C++ (docs/algorithms.md section
    1.2). Compiled library only (``_library.HELD_OPS``), eager steps only: its schema does
    not show what it writes. ``impl``: "auto" or "native"."""
    if check_impl(impl) not in ("auto", "native"):
        raise ValueError(f"lars_sgd_held_ runs the compiled op only, got impl={impl!r}")
    _check_options("lars_sgd_", options)
    lr_value, lr_tensor = _scalar_arg(lr)
    _library.op("lars_sgd_held_")(held, bool(exclude), lr=lr_value, lr_tensor=lr_tensor, **options)


def average_(averages: Tensors, params: Tensors, count: torch.Tensor | None = None, *,
             impl: str = "auto", **options) -> None:
    """One fused weight-averaging update in place (docs/algorithms.md section 4).

    ``options``: ``method`` (``"swa"``), ``decay`` (0.999), ``found_inf`` (None).
    ``avg += r * (w - avg)`` per element with ``r = 1 / (count + 1)`` (``method="swa"``,
    the running mean) or ``r = 1 - decay`` (``method="ema"``); then ``count += 1``.
    ``averages`` are fp32 for fp16/bf16/fp32 params and fp64 for fp64 params;
    ``count`` is a one-element int64 tensor on the params' device (required for SWA,
    optional for EMA). With ``found_inf != 0`` nothing changes.
    """
    _check_options("average_", options)
    resolve("average_", impl, params)(_as_list(averages), _as_list(params), count, **options)


def worker_mean_(params: Tensors, flat_sum: torch.Tensor, world_size: int, *,
                 impl: str = "auto") -> None:
    """Write the cross-worker mean ``w = sum / K`` into ``params`` (docs/algorithms.md section 4).

    ``flat_sum`` is the all-reduced (summed) flat buffer of ``params``, all of its dtype
    and device, each param's elements in row-major order; ``world_size`` is ``K``. The
    division runs in fp32 (fp64 for fp64 params), rounded once to the params' dtype.
    ``lbkernels.distributed.average_parameters`` packs, reduces and calls this.
    """
    resolve("worker_mean_", impl, [flat_sum])(_as_list(params), flat_sum, int(world_size))


def mean_sum_squares_(flat: torch.Tensor, sizes: Sequence[int], world_size: int,
                      out: torch.Tensor, *, impl: str = "auto") -> None:
    """Average a summed gradient bucket and sum each gradient's squares in one pass
    (docs/algorithms.md section 1.1): ``flat /= world_size`` in place (as ``worker_mean_``
    divides: fp32, or fp64 for fp64, rounded once), then ``out[j] = sum(g_j^2)`` (float64)
    of the stored quotients of the ``j``-th run of ``sizes[j]`` consecutive elements.

    ``flat``: contiguous 1-D, its ``sizes`` adding up to its length (a DDP bucket);
    ``out``: contiguous float64 of ``len(sizes)`` elements on ``flat``'s device.
    ``lbkernels.distributed.grad_norms`` hands ``out`` to ``lars_sgd_`` as ``norm_sq[1]``.
    """
    resolve("mean_sum_squares_", impl, [flat])(flat, _as_list(sizes), int(world_size), out)


def extrap_sgd_(params: Tensors, anchors: Tensors, momentum_buffers: Tensors, grads: Tensors,
                local_grads: Tensors, exclude: Sequence[bool], *, lr: float | torch.Tensor,
                extrap_lr: float | torch.Tensor = 0.0, impl: str = "auto", **options) -> None:
    """One fused extrapolated-SGD step in place (docs/algorithms.md sections 2 and 2.1).

    ``options``: the op's other keyword arguments, with the meaning that
    ``lbkernels.reference.extrap.extrap_sgd_`` documents and the defaults of its schema
    (``_library.SCHEMAS``): momentum, weight_decay, nesterov, lars, trust_coefficient,
    eps, clip, extrapolation, noise_scale, seed, offset, grad_scale, found_inf, norm_sq
    (as in ``lars_sgd_``, row 0 holding ``||anchor_i||^2``; read only with ``lars``).

    Updates the anchors ``x`` (the real iterate) with momentum SGD (optionally LARS-scaled)
    from ``grads`` and writes the next extrapolated point into ``params``:
    ``w = x - extrap_lr * local_grad`` (``extrapolation="past_grad"``; an empty
    ``local_grads`` means the all-reduced gradient) or ``w = x + noise``
    (``"gaussian" | "uniform" | "weight" | "filter"``, scale ``noise_scale``, random
    numbers keyed by ``(seed, offset)``: pass a new ``offset`` each step).
    ``momentum_buffers`` (zero-initialised) may be empty when ``momentum == 0``;
    ``lr`` and ``extrap_lr`` may be one-element tensors on the params' device.
    """
    _check_options("extrap_sgd_", options)
    lr_value, lr_tensor = _scalar_arg(lr)
    elr_value, elr_tensor = _scalar_arg(extrap_lr)
    resolve("extrap_sgd_", impl, params)(
        _as_list(params), _as_list(anchors), _as_list(momentum_buffers), _as_list(grads),
        _as_list(local_grads), _as_list(exclude),
        lr=lr_value, lr_tensor=lr_tensor, extrap_lr=elr_value, extrap_lr_tensor=elr_tensor,
        **options,
    )


def extrap_adam_(params: Tensors, anchors: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
                 steps: Tensors, grads: Tensors, local_grads: Tensors, *,
                 lr: float | torch.Tensor, extrap_lr: float | torch.Tensor = 0.0,
                 impl: str = "auto", **options) -> None:
    """One fused extrap-Adam step in place (docs/algorithms.md section 2.2).

    ``options``: the op's other keyword arguments, with the meaning that
    ``lbkernels.reference.extrap.extrap_adam_`` documents and the defaults of its schema
    (``_library.SCHEMAS``): beta1, beta2, eps, weight_decay, decoupled_weight_decay,
    grad_scale, found_inf.

    torch.optim.Adam (amsgrad=False, maximize=False) on the anchors, then
    ``w = x - extrap_lr * local_grad / (sqrt(v_hat) + eps)``. ``steps`` are 0-dim fp32
    counters on the params' device, incremented first; ``lr`` and ``extrap_lr`` may be
    one-element tensors on the params' device.
    """
    _check_options("extrap_adam_", options)
    lr_value, lr_tensor = _scalar_arg(lr)
    elr_value, elr_tensor = _scalar_arg(extrap_lr)
    resolve("extrap_adam_", impl, params)(
        _as_list(params), _as_list(anchors), _as_list(exp_avgs), _as_list(exp_avg_sqs),
        _as_list(steps), _as_list(grads), _as_list(local_grads),
        lr=lr_value, lr_tensor=lr_tensor, extrap_lr=elr_value, extrap_lr_tensor=elr_tensor,
        **options,
    )


def lamb_(params: Tensors, grads: Tensors, exp_avgs: Tensors, exp_avg_sqs: Tensors,
          steps: Tensors, exclude: Sequence[bool], *, lr: float | torch.Tensor,
          impl: str = "auto", **options) -> None:
    """One fused LAMB step in place (docs/algorithms.md section 7).

    ``options``: the op's other keyword arguments, with the meaning that
    ``lbkernels.reference.lamb.lamb_`` documents and the defaults of its schema
    (``_library.SCHEMAS``): beta1, beta2, eps, weight_decay, bias_correction,
    grad_averaging, decoupled_weight_decay, max_trust, clip, max_grad_norm, grad_norm,
    style, grad_scale, found_inf, averages, average_count, average_method, average_decay,
    norm_sq, stage.

    ``exp_avgs`` and ``exp_avg_sqs`` start at zero; ``steps`` are 0-dim fp32 counters on
    the params' device, incremented first. ``lr`` may be a one-element tensor on the
    params' device. ``grad_norm`` (a one-element tensor: the L2 norm of the scaled
    gradients of the whole optimizer) spares the op its own norm over ``grads`` when
    ``max_grad_norm`` clips. ``exclude[i]`` sets the trust ratio of tensor ``i`` to 1.
    Averaging folded into the write pass, as in ``lars_sgd_``.

    ``stage`` splits the step where a sharded tensor's norms must be summed over its
    shards (docs/algorithms.md section 7): ``"moments"`` updates ``m``, ``v`` and
    ``steps`` and writes the local sums of squares ``norm_sq[0, i] = ||w_i||^2``,
    ``norm_sq[1, i] = ||u_i||^2`` (a contiguous float32/float64 tensor of shape
    ``(2, len(params))`` on the params' device; 0 for excluded tensors); the caller sums
    them over the shards (one all-reduce); ``"update"`` then takes the norms as
    ``sqrt(norm_sq)``, recomputes ``u`` from the stored moments and writes ``w`` (and the
    folded average). Both stages get the same arguments; ``"full"`` (the default, no
    ``norm_sq``) does both at once. Moments then update with an unreduced ``norm_sq``
    equals the full step bit for bit on fp32/fp64 tensors when ``norm_sq`` is float64
    (float32 too on the reference, CUDA and Triton, whose norms are float32 sums).
    """
    _check_options("lamb_", options)
    lr_value, lr_tensor = _scalar_arg(lr)
    resolve("lamb_", impl, params)(
        _as_list(params), _as_list(grads), _as_list(exp_avgs), _as_list(exp_avg_sqs),
        _as_list(steps), _as_list(exclude), lr=lr_value, lr_tensor=lr_tensor, **options,
    )
