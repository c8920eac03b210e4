"""Every op schema of the ``lbkernels`` namespace, defined once.

Importing this module defines the ops, registers the pure-PyTorch reference as the
``CompositeExplicitAutograd`` ("default") kernel of each, and registers a fake kernel
for tracing. Compiled libraries only *implement* these ops for their dispatch keys
(``TORCH_LIBRARY_IMPL(lbkernels, CPU|CUDA, m)``): the namespace is defined here and
nowhere else, because two libraries defining it abort the process.
"""

from __future__ import annotations

import functools

import torch

from .reference import average as _ref_average
from .reference import extrap as _ref_extrap
from .reference import lamb as _ref_lamb
from .reference import lars as _ref_lars
from .reference import mean_sum_squares as _ref_mean_sum_squares

NAMESPACE = "lbkernels"
_lib = torch.library.Library(NAMESPACE, "DEF")

# name -> (schema, reference, fake). Mutated arguments carry an alias set (a!); ops that
# only mutate return nothing, in the style of torch._fused_sgd_.
SCHEMAS = {
    "multi_tensor_l2norm": "(Tensor[] xs) -> Tensor",
    # The out overload returns nothing: torch (2.13) cannot functionalize a custom op
    # whose output aliases an input ("-> Tensor(a!)"), so it could not be compiled.
    "multi_tensor_l2norm.out": "(Tensor[] xs, *, Tensor(a!) out) -> ()",
    "lars_sgd_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] steps, bool[] exclude, *, float lr, Tensor? lr_tensor=None, "
        "float momentum=0., float dampening=0., float weight_decay=0., bool nesterov=False, "
        "float trust_coefficient=0.001, float eps=1e-8, bool clip=False, "
        "bool zero_norm_decay=True, str momentum_style=\"torch\", "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(d!)[]? averages=None, "
        "Tensor(e!)? average_count=None, str average_method=\"swa\", "
        "float average_decay=0.999, Tensor? norm_sq=None, "
        "Tensor(f!)? w_norm_sq=None, Tensor(g!)? w_norm_key=None) -> ()"
    ),
    "average_": (
        "(Tensor(a!)[] averages, Tensor[] params, Tensor(b!)? count=None, *, "
        "str method=\"swa\", float decay=0.999, Tensor? found_inf=None) -> ()"
    ),
    "worker_mean_": "(Tensor(a!)[] params, Tensor flat_sum, int world_size) -> ()",
    "mean_sum_squares_": "(Tensor(a!) flat, int[] sizes, int world_size, Tensor(b!) out) -> ()",
    "extrap_sgd_": (
        "(Tensor(a!)[] params, Tensor(b!)[] anchors, Tensor(c!)[] momentum_buffers, "
        "Tensor[] grads, Tensor[] local_grads, bool[] exclude, *, float lr, "
        "Tensor? lr_tensor=None, float extrap_lr=0., Tensor? extrap_lr_tensor=None, "
        "float momentum=0., float weight_decay=0., bool nesterov=False, bool lars=False, "
        "float trust_coefficient=0.001, float eps=1e-8, bool clip=False, "
        "str extrapolation=\"past_grad\", float noise_scale=0., int seed=0, int offset=0, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? norm_sq=None) -> ()"
    ),
    "extrap_adam_": (
        "(Tensor(a!)[] params, Tensor(b!)[] anchors, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, Tensor[] grads, Tensor[] local_grads, *, "
        "float lr, Tensor? lr_tensor=None, float extrap_lr=0., Tensor? extrap_lr_tensor=None, "
        "float beta1=0.9, float beta2=0.999, float eps=1e-8, float weight_decay=0., "
        "bool decoupled_weight_decay=False, Tensor? grad_scale=None, "
        "Tensor? found_inf=None) -> ()"
    ),
    "lamb_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, bool[] exclude, *, float lr, "
        "Tensor? lr_tensor=None, float beta1=0.9, float beta2=0.999, float eps=1e-6, "
        "float weight_decay=0.01, bool bias_correction=True, bool grad_averaging=True, "
        "bool decoupled_weight_decay=True, float? max_trust=None, bool clip=False, "
        "float? max_grad_norm=None, Tensor? grad_norm=None, str style=\"timm\", "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(e!)[]? averages=None, "
        "Tensor(f!)? average_count=None, str average_method=\"swa\", "
        "float average_decay=0.999, Tensor(g!)? norm_sq=None, str stage=\"full\") -> ()"
    ),
}

REFERENCE = {
    "multi_tensor_l2norm": _ref_lars.multi_tensor_l2norm,
    "multi_tensor_l2norm.out": _ref_lars.multi_tensor_l2norm_out,
    "lars_sgd_": _ref_lars.lars_sgd_,
    "average_": _ref_average.average_,
    "worker_mean_": _ref_average.worker_mean_,
    "mean_sum_squares_": _ref_mean_sum_squares.mean_sum_squares_,
    "extrap_sgd_": _ref_extrap.extrap_sgd_,
    "extrap_adam_": _ref_extrap.extrap_adam_,
    "lamb_": _ref_lamb.lamb_,
}


def _fake_l2norm(xs):
    device = xs[0].device if xs else torch.device("cpu")
    return torch.empty(len(xs), dtype=torch.float32, device=device)


def _fake_inplace(*args, **kwargs):
    return None


# Every op but the norm only mutates its arguments: its fake returns nothing.
FAKE = {name: _fake_inplace for name in SCHEMAS} | {"multi_tensor_l2norm": _fake_l2norm}


def op(name: str, namespace: str = NAMESPACE):
    """``torch.ops.<namespace>.<name>``, where ``name`` may name an overload
    (``"multi_tensor_l2norm.out"``)."""
    base, _, overload = name.partition(".")
    packet = getattr(getattr(torch.ops, namespace), base)
    return getattr(packet, overload) if overload else packet


@functools.cache
def schema_defaults(name: str) -> tuple[tuple, dict]:
    """(defaults of the positional arguments, None where required; defaults of the
    keyword-only arguments) of op ``name``, read from SCHEMAS: the one place they are
    written."""
    schema = torch._C.parse_schema(f"{NAMESPACE}::{name}{SCHEMAS[name]}")
    positional = tuple(a.default_value if a.has_default_value() else None
                       for a in schema.arguments if not a.kwarg_only)
    keyword = {a.name: a.default_value for a in schema.arguments
               if a.kwarg_only and a.has_default_value()}
    return positional, keyword


def _with_defaults(kernel, positional: tuple, keyword: dict):
    """``kernel`` called with every argument: the dispatcher leaves out arguments equal to
    their defaults, and a launcher takes its arguments as the schema gives them."""

    def run(*args, **kwargs):
        return kernel(*args, *positional[len(args):], **{**keyword, **kwargs})

    return run


def define_ops(lib: torch.library.Library, kernels: dict | None = None, prefix: str = "") -> None:
    """Defines ``prefix + name`` in ``lib``'s namespace for every op of ``kernels`` (default:
    every op of SCHEMAS, with its reference kernel), with the op's schema, the kernel as its
    ``CompositeExplicitAutograd`` kernel and the op's fake kernel. Run once for
    ``lbkernels``; the Triton backend runs it with its launchers and ``prefix="triton_"``;
    the tests run it for another namespace to reach the reference kernels where the
    compiled ones serve ``lbkernels``. Kernels other than the reference (which has the
    defaults in its signature) are called with every argument filled in."""
    for name, kernel in (REFERENCE if kernels is None else kernels).items():
        qualname = prefix + name
        lib.define(qualname + SCHEMAS[name])
        if kernels is not None:
            kernel = _with_defaults(kernel, *schema_defaults(name))
        lib.impl(qualname, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{lib.ns}::{qualname}", FAKE[name], lib=lib)


define_ops(_lib)


# The (op, device type) pairs a compiled kernel serves, as found: a compiled step
# (torch.compile) cannot trace the dispatcher query, while it reads this set as a constant.
# Only kernels found are kept: a library loaded later (torch.ops.load_library) still shows.
NATIVE: set[tuple[str, str]] = set()


def has_native_kernel(name: str, device_type: str) -> bool:
    """True when a compiled kernel (not the reference) serves ``name`` on ``device_type``."""
    if (name, device_type) in NATIVE:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key):
        NATIVE.add((name, device_type))
        return True
    return False


# Ops of the compiled library that take an ``lbkernels.HeldLists`` (csrc/cpu/held_lists.cpp)
# and one ``bool exclude`` in place of the leading lists and the per-param ``exclude`` of
# another op, which they call with everything else as given: name -> (that op, the
# arguments replaced). Their schemas are derived from that op's, and defined once the
# library (which registers the class) is loaded.
HELD = {"lars_sgd_held_": ("lars_sgd_", "Tensor(a!)[] params, Tensor[] grads, "
                                        "Tensor(b!)[] momentum_buffers, Tensor(c!)[] steps, "
                                        "bool[] exclude, ")}
HELD_OPS: set[str] = set()  # the held ops defined


def define_held_ops() -> None:
    """Defines every op of ``HELD`` whose compiled kernel is registered."""
    for name, (target, replaced) in HELD.items():
        if name in HELD_OPS:
            continue
        try:  # raises when nothing (no compiled library) registered the name
            registered = torch._C._dispatch_has_kernel_for_dispatch_key(
                f"{NAMESPACE}::{name}", "CompositeImplicitAutograd")
        except RuntimeError:
            registered = False
        if not registered:
            continue
        schema = SCHEMAS[target]
        assert schema.startswith("(" + replaced), (name, target)
        _lib.define(f"{name}(__torch__.torch.classes.{NAMESPACE}.HeldLists lists, bool exclude, "
                    f"{schema[1 + len(replaced):]}")
        HELD_OPS.add(name)


def held_lists(params: list[torch.Tensor], lists: list[list[torch.Tensor]]):
    """An ``lbkernels.HeldLists`` of ``params`` and the per-param ``lists`` that follow
    params and grads in the target op's arguments (each empty or one tensor per param)."""
    return torch.classes.lbkernels.HeldLists(params, lists)


def read_native_kernels() -> None:
    """Records in ``NATIVE`` every kernel of the compiled library, once it is loaded."""
    for name in SCHEMAS:
        for device_type in ("cpu", "cuda"):
            has_native_kernel(name, device_type)
