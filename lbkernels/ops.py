"""Typed wrappers over ``torch.ops.lbkernels``: the only door from Python to the kernels.

Each wrapper takes an ``impl`` argument:

- ``"auto"``: the dispatcher decides: a compiled kernel for the tensors' device when the
  library is loaded, the reference otherwise (on CUDA, the faster of native and Triton);
- ``"reference"``: the pure-PyTorch oracle;
- ``"native"``: the compiled C++ (CPU) or CUDA kernel; an error when it is not built;
- ``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _library
from .reference import average as _ref_average
from .reference import extrap as _ref_extrap
from .reference import lars as _ref_lars

IMPLS = ("auto", "reference", "native", "triton")

_REFERENCE: dict[str, Callable] = {
    "multi_tensor_l2norm": _ref_lars.multi_tensor_l2norm,
    "lars_sgd_": _ref_lars.lars_sgd_,
    "average_": _ref_average.average_,
    "worker_mean_": _ref_average.worker_mean_,
    "extrap_sgd_": _ref_extrap.extrap_sgd_,
    "extrap_adam_": _ref_extrap.extrap_adam_,
}


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
        return _REFERENCE[name]
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
    return getattr(torch.ops.lbkernels, name)


def _as_list(xs: Sequence) -> list:
    # The optimizers pass lists already; copying 2000-entry lists every step costs ~10 us each.
    return xs if type(xs) is list else list(xs)


def multi_tensor_l2norm(xs: Sequence[torch.Tensor], *, impl: str = "auto") -> torch.Tensor:
    """L2 norm of every tensor in ``xs``, as one fp32 tensor of ``len(xs)`` values."""
    return resolve("multi_tensor_l2norm", impl, xs)(_as_list(xs))


def lars_sgd_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    exclude: Sequence[bool],
    *,
    lr: float | torch.Tensor,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    clip: bool = False,
    zero_norm_decay: bool = True,
    momentum_style: str = "torch",
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    averages: Sequence[torch.Tensor] = (),
    average_count: torch.Tensor | None = None,
    average_method: str = "swa",
    average_decay: float = 0.999,
    impl: str = "auto",
) -> None:
    """One fused LARS-SGD step in place (ALGORITHMS.md section 1).

    ``momentum_buffers`` (zero-initialised) may be empty when ``momentum == 0``;
    ``steps`` (0-dim fp32 counters; step 0 sets ``buf = d``) may be empty unless
    ``dampening != 0``. ``lr`` may be a one-element tensor on
    the params' device, so that a compiled or captured step never re-specialises.

    With ``averages`` (one per param, fp32, or fp64 for fp64 params) the same pass
    averages the new weights in, exactly as ``average_(averages, params, average_count,
    method=average_method, decay=average_decay)`` after the step, and increments
    ``average_count`` once (ALGORITHMS.md section 4): SWA without an extra read of ``w``.
    """
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = 1.0 if lr_tensor is not None else float(lr)
    resolve("lars_sgd_", impl, params)(
        _as_list(params),
        _as_list(grads),
        _as_list(momentum_buffers),
        _as_list(steps),
        _as_list(exclude),
        lr=lr_value,
        lr_tensor=lr_tensor,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        trust_coefficient=trust_coefficient,
        eps=eps,
        clip=clip,
        zero_norm_decay=zero_norm_decay,
        momentum_style=momentum_style,
        grad_scale=grad_scale,
        found_inf=found_inf,
        averages=_as_list(averages),
        average_count=average_count,
        average_method=average_method,
        average_decay=average_decay,
    )


def average_(
    averages: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    count: torch.Tensor | None = None,
    *,
    method: str = "swa",
    decay: float = 0.999,
    found_inf: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """One fused weight-averaging update in place (ALGORITHMS.md section 4).

    ``avg += r * (w - avg)`` per element with ``r = 1 / (count + 1)`` (``method="swa"``,
    the running mean) or ``r = 1 - decay`` (``method="ema"``); then ``count += 1``.
    ``averages`` are fp32 for fp16/bf16/fp32 params and fp64 for fp64 params;
    ``count`` is a one-element int64 tensor on the params' device (required for SWA,
    optional for EMA). With ``found_inf != 0`` nothing changes.
    """
    resolve("average_", impl, params)(
        _as_list(averages), _as_list(params), count, method=method, decay=decay, found_inf=found_inf
    )


def worker_mean_(
    params: Sequence[torch.Tensor],
    flat_sum: torch.Tensor,
    world_size: int,
    *,
    impl: str = "auto",
) -> None:
    """Write the cross-worker mean ``w = sum / K`` into ``params`` (ALGORITHMS.md section 4).

    ``flat_sum`` is the all-reduced (summed) flat buffer of ``params``, all of its dtype
    and device, each param's elements in row-major order; ``world_size`` is ``K``. The
    division runs in fp32 (fp64 for fp64 params), rounded once to the params' dtype.
    ``lbkernels.distributed.average_parameters`` packs, reduces and calls this.
    """
    resolve("worker_mean_", impl, [flat_sum])(_as_list(params), flat_sum, int(world_size))


def _scalar_arg(x: float | torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """(float, tensor) schema pair of an argument given as a float or one-element tensor."""
    if isinstance(x, torch.Tensor):
        return 1.0, x
    return float(x), None


def extrap_sgd_(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    local_grads: Sequence[torch.Tensor],
    exclude: Sequence[bool],
    *,
    lr: float | torch.Tensor,
    extrap_lr: float | torch.Tensor = 0.0,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    lars: bool = False,
    trust_coefficient: float = 0.001,
    eps: float = 1e-8,
    clip: bool = False,
    extrapolation: str = "past_grad",
    noise_scale: float = 0.0,
    seed: int = 0,
    offset: int = 0,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """One fused extrapolated-SGD step in place (ALGORITHMS.md sections 2 and 2.1).

    Updates the anchors ``x`` (the real iterate) with momentum SGD (optionally LARS-scaled)
    from ``grads`` and writes the next extrapolated point into ``params``:
    ``w = x - extrap_lr * local_grad`` (``extrapolation="past_grad"``; an empty
    ``local_grads`` means the all-reduced gradient) or ``w = x + noise``
    (``"gaussian" | "uniform" | "weight" | "filter"``, scale ``noise_scale``, random
    numbers keyed by ``(seed, offset)``: pass a new ``offset`` each step).
    ``momentum_buffers`` (zero-initialised) may be empty when ``momentum == 0``;
    ``lr`` and ``extrap_lr`` may be one-element tensors on the params' device.
    """
    lr_value, lr_tensor = _scalar_arg(lr)
    elr_value, elr_tensor = _scalar_arg(extrap_lr)
    resolve("extrap_sgd_", impl, params)(
        _as_list(params), _as_list(anchors), _as_list(momentum_buffers), _as_list(grads),
        _as_list(local_grads), _as_list(exclude),
        lr=lr_value, lr_tensor=lr_tensor, extrap_lr=elr_value, extrap_lr_tensor=elr_tensor,
        momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, lars=lars,
        trust_coefficient=trust_coefficient, eps=eps, clip=clip, extrapolation=extrapolation,
        noise_scale=noise_scale, seed=seed, offset=offset, grad_scale=grad_scale,
        found_inf=found_inf,
    )


def extrap_adam_(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    local_grads: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    extrap_lr: float | torch.Tensor = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    impl: str = "auto",
) -> None:
    """One fused extrap-Adam step in place (ALGORITHMS.md section 2.2).

    torch.optim.Adam (amsgrad=False, maximize=False) on the anchors, then
    ``w = x - extrap_lr * local_grad / (sqrt(v_hat) + eps)``. ``steps`` are 0-dim fp32
    counters on the params' device, incremented first; ``lr`` and ``extrap_lr`` may be
    one-element tensors on the params' device.
    """
    lr_value, lr_tensor = _scalar_arg(lr)
    elr_value, elr_tensor = _scalar_arg(extrap_lr)
    resolve("extrap_adam_", impl, params)(
        _as_list(params), _as_list(anchors), _as_list(exp_avgs), _as_list(exp_avg_sqs),
        _as_list(steps), _as_list(grads), _as_list(local_grads),
        lr=lr_value, lr_tensor=lr_tensor, extrap_lr=elr_value, extrap_lr_tensor=elr_tensor,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
        found_inf=found_inf,
    )
