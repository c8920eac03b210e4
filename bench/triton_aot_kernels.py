"""The variants of every Triton kernel that ``lbkernels.triton`` launches, for the
ahead-of-time compile check (``bench/triton_aot.py``).

A variant is one kernel with the argument types and constexpr values one launch would
give it, read from the launchers: the dtype tables ELEM and ``acc_types``, the BLOCK
sizes of ``multi_tensor.block`` (16 up to ``BLOCK``; the two ends are compiled), the
HAS_* flags and the modes. Pointer arguments a flag keeps unread get the chunk table
(``*i64``), as ``multi_tensor.pointer`` passes it; read ones the dtype the op takes
(fp32 one-element scalars, an int64 count). ``SOFT_BF16`` is False: it is True only
under the interpreter.

For each dtype, a kernel whose launchers can produce at most ``FULL`` flag combinations
gets all of them; a larger one (``_lars_update`` alone can produce 576) gets every choice
at its first value, every choice at its last, and each of these two with one choice moved
to each of its other values: every value of every flag, with each dtype, in about 20
variants per dtype instead of hundreds.

Imported by the check's worker, where Triton compiles rather than interprets.
"""

from __future__ import annotations

import importlib
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton.language as tl

from lbkernels.triton import (average, extrap_adam, extrap_sgd, lamb, lars, mean_sum_squares,
                              noise, norms)
from lbkernels.triton import multi_tensor as mt
from lbkernels.triton.math import ELEM, acc_types

FULL = 16
TABLE = "*i64"  # the chunk table, and any pointer its flag keeps unread
SCALAR = "*fp32"  # lr_tensor, extrap_lr_tensor, grad_scale, found_inf
COUNT = "*i64"  # average_count / count: a one-element int64 tensor
BLOCKS = (mt.BLOCK, 16)  # multi_tensor.block's largest and smallest
MOMENTUM = {"none": (False, False), "plain": (True, False), "nesterov": (True, True)}
AVERAGING = {"none": (False, False), "ema": (True, False), "swa": (True, True)}
# lars_sgd_ / extrap_sgd_'s norm_sq: absent, or a float32 / float64 tensor (read as passed).
NORM_SQ = {"none": None, "fp32": "*fp32", "fp64": "*fp64"}
# lars_sgd_'s w_norm_sq (the cache of ||w||^2): float64 always.
W_NORM_SQ = "*fp64"
# Philox key and low counter word: i32 for small seeds and offsets, i64 above 2**31.
KEY_TYPES = {"i32": ("i32", "i32"), "i64": ("i64", "i64")}
# Spills found by this check with Triton 3.6 (sm_90), left until a GPU benchmark says
# whether a change pays: (kernel, dtype, BLOCK) -> (most bytes of spill stores and
# loads allowed, why). Any other spill, or a larger one, fails the check.
KNOWN_SPILLS = {
    ("noise._filter_write", "fp64", 1024): (
        40, "e // f (each element's filter) is a 64-bit division, 8 per thread at BLOCK "
            "1024, which ptxas expands to a subroutine: 128 registers, 16-40 B spilled; "
            "fp64 params with extrapolation='filter' only"),
    ("lars._lars_update", "fp64", 16): (
        8, "8 B stored once and never loaded back (ptxas -v), with every flag on"),
}


@dataclass
class Variant:
    fn: object  # the @triton.jit kernel
    kernel: str  # module.name, as reported
    label: str  # the launch choices that made it
    signature: dict[str, str]  # runtime argument -> Triton type
    constexprs: dict[str, object]
    num_warps: int = mt.NUM_WARPS
    known_spills: tuple[int, str] = (0, "")  # bytes allowed, why (KNOWN_SPILLS)


def cover(axes: dict[str, tuple]) -> list[dict]:
    """Every combination of ``axes`` when there are at most ``FULL``; else the two
    extremes and each with one axis moved to each of its other values (module docstring)."""
    names = list(axes)
    if len(list(itertools.product(*axes.values()))) <= FULL:
        return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]
    out = []
    for base in ({n: v[0] for n, v in axes.items()}, {n: v[-1] for n, v in axes.items()}):
        out.append(base)
        out += [{**base, n: value} for n in names for value in axes[n] if value != base[n]]
    unique = {tuple(sorted((k, str(v)) for k, v in c.items())): c for c in out}
    return list(unique.values())


def label(choice: dict) -> str:
    return " ".join(n if v is True else f"{n}={v}" for n, v in choice.items() if v is not False)


def acc_ptr(dtype) -> str:
    return f"*{acc_types(dtype)[1]}"


def ptr(flag: bool, kind: str = SCALAR) -> str:
    return kind if flag else TABLE


def per_dtype(module, name: str, axes: dict[str, tuple],
              build: Callable[[object, dict], tuple[dict, dict]], num_warps: int = mt.NUM_WARPS,
              dtypes=None) -> list[Variant]:
    """``build(dtype, choice) -> (signature, constexprs)`` for every dtype and every
    choice of ``cover(axes)``; the ``fp64`` annotations of the kernel's own floats are added."""
    fn = getattr(module, name)
    out, seen = [], set()
    for dtype in dtypes or list(ELEM):
        for choice in cover(axes):
            sig, const = build(dtype, choice)
            for p in fn.params:
                if p.annotation == "fp64" and p.name not in const:
                    sig.setdefault(p.name, "fp64")
                elif p.annotation.startswith(("'", '"')):
                    # Under `from __future__ import annotations`, `x: "fp64"` reaches Triton
                    # as "'fp64'", which it ignores: x would be passed as fp32.
                    raise ValueError(f"{kernel_name(fn)}: argument {p.name} is annotated "
                                     f"{p.annotation}, which Triton ignores; write tl.float64")
            key = (tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in const.items())))
            if key in seen:  # choices the launcher maps to the same launch
                continue
            seen.add(key)
            known = KNOWN_SPILLS.get((kernel_name(fn), str(ELEM[dtype]), const.get("BLOCK")),
                                     (0, ""))
            out.append(Variant(fn, kernel_name(fn), f"{ELEM[dtype]} {label(choice)}".strip(),
                               sig, const, num_warps, known))
    return out


def _elem(dtype) -> dict:
    return {"ELEM": ELEM[dtype], "ACC": acc_types(dtype)[1]}


def _norm_kernels() -> list[Variant]:
    # multi_tensor_l2norm: norms of w only; lars_coefs: of w and the (unscaled) g, with
    # the op's norm_sq (float32 or float64, read as passed) or without, and lars_sgd_'s
    # w_norm_sq cache (float64) or without.
    def sum_squares(dtype, c):
        acc = acc_ptr(dtype)
        lars = c["pass"] == "lars"
        given = lars and NORM_SQ[c["norm_sq"]]
        cache = lars and c["HAS_W_CACHE"]
        return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "partial": acc,
                 "scale_ptr": ptr(c["HAS_SCALE"]) if lars else acc,
                 "skip_ptr": ptr(c["HAS_SKIP"]) if lars else acc,
                 "norm_sq": given or (TABLE if lars else acc), "n_params": "i32",
                 "w_norm_sq": W_NORM_SQ if cache else (TABLE if lars else acc)},
                {**_elem(dtype), "BLOCK": c["BLOCK"], "WITH_G": lars,
                 "HAS_SCALE": lars and c["HAS_SCALE"], "HAS_SKIP": lars and c["HAS_SKIP"],
                 "HAS_NORM_SQ": bool(given), "HAS_W_CACHE": bool(cache)})

    def norms_(dtype, c):
        return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32",
                 "partial": acc_ptr(dtype), "out": "*fp32"},
                {"ACC": acc_types(dtype)[1], "RBLOCK": mt.RBLOCK})

    def lars_coefs(dtype, c):
        has_momentum, has_steps = MOMENTUM[c["momentum"]]
        given = NORM_SQ[c["norm_sq"]]
        return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32",
                 "partial": acc_ptr(dtype), "coefs": acc_ptr(dtype),
                 "lr_ptr": ptr(c["HAS_LR_TENSOR"]), "skip_ptr": ptr(c["HAS_SKIP"]),
                 "norm_sq": given or TABLE, "n_params": "i32",
                 "scale_ptr": ptr(c["HAS_SCALE"]),
                 "w_norm_sq": ptr(c["HAS_W_CACHE"], W_NORM_SQ)},
                {"ACC": acc_types(dtype)[1], "RBLOCK": mt.RBLOCK, "CLIP": c["CLIP"],
                 "ZERO_NORM_DECAY": c["ZERO_NORM_DECAY"], "HAS_LR_TENSOR": c["HAS_LR_TENSOR"],
                 "HAS_MOMENTUM": has_momentum, "HAS_STEPS": has_steps, "HAS_SKIP": c["HAS_SKIP"],
                 "HAS_NORM_SQ": bool(given), "HAS_SCALE": c["HAS_SCALE"],
                 "HAS_W_CACHE": c["HAS_W_CACHE"]})

    def store_w_norm_sq(dtype, c):
        return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32",
                 "partial": acc_ptr(dtype), "w_norm_sq": W_NORM_SQ,
                 "skip_ptr": ptr(c["HAS_SKIP"])},
                {"ACC": acc_types(dtype)[1], "RBLOCK": mt.RBLOCK, "HAS_SKIP": c["HAS_SKIP"]})

    accs = [next(d for d in ELEM if acc_types(d)[1] == a) for a in (tl.float32, tl.float64)]
    flags = (False, True)
    return (per_dtype(norms, "_sum_squares", {"pass": ("l2norm", "lars"), "HAS_SCALE": flags,
                                              "HAS_SKIP": flags, "norm_sq": tuple(NORM_SQ),
                                              "HAS_W_CACHE": flags, "BLOCK": BLOCKS},
                        sum_squares)
            + per_dtype(norms, "_norms", {}, norms_, dtypes=accs)
            # momentum "nesterov" here stands for (HAS_MOMENTUM, HAS_STEPS): steps given.
            + per_dtype(norms, "_lars_coefs", {"CLIP": flags, "ZERO_NORM_DECAY": flags,
                                               "HAS_LR_TENSOR": flags,
                                               "momentum": tuple(MOMENTUM), "HAS_SKIP": flags,
                                               "norm_sq": tuple(NORM_SQ), "HAS_SCALE": flags,
                                               "HAS_W_CACHE": flags},
                        lars_coefs, dtypes=accs)
            + per_dtype(norms, "_store_w_norm_sq", {"HAS_SKIP": flags}, store_w_norm_sq,
                        dtypes=accs))


def _lars_update(dtype, c):
    has_momentum, nesterov = MOMENTUM[c["momentum"]]
    has_avg, swa = AVERAGING[c["averaging"]]
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "coefs": acc_ptr(dtype),
             "lr_ptr": ptr(c["HAS_LR_TENSOR"]), "scale_ptr": ptr(c["HAS_SCALE"]),
             "skip_ptr": ptr(c["HAS_SKIP"]), "avg_table": TABLE, "count_ptr": COUNT,
             "partial": acc_ptr(dtype)},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "HAS_SCALE": c["HAS_SCALE"],
             "HAS_MOMENTUM": has_momentum, "NESTEROV": nesterov, "PAPER": c["PAPER"],
             "HAS_LR_TENSOR": c["HAS_LR_TENSOR"], "HAS_SKIP": c["HAS_SKIP"], "SOFT_BF16": False,
             "HAS_AVG": has_avg, "AVG": acc_types(dtype)[1], "SWA": swa, "W_SQ": c["W_SQ"]})


def _sgd_update(dtype, c):
    has_momentum, nesterov = MOMENTUM[c["momentum"]]
    key, off_lo = KEY_TYPES[c["key"]]
    mode = extrap_sgd._MODES[c["extrapolation"]]
    return ({"table": TABLE, "n_chunks": "i32",
             "coefs": acc_ptr(dtype) if c["LARS"] else TABLE,
             "lr_ptr": ptr(c["HAS_LR_TENSOR"]), "elr_ptr": ptr(c["HAS_ELR_TENSOR"]),
             "scale_ptr": ptr(c["HAS_SCALE"]), "skip_ptr": ptr(c["HAS_SKIP"]),
             "key": key, "off_lo": off_lo},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "MODE": mode, "HAS_SCALE": c["HAS_SCALE"],
             "HAS_MOMENTUM": has_momentum, "NESTEROV": nesterov, "LARS": c["LARS"],
             "HAS_LOCAL": c["local_grads"] and c["extrapolation"] == "past_grad",
             "HAS_LR_TENSOR": c["HAS_LR_TENSOR"], "HAS_ELR_TENSOR": c["HAS_ELR_TENSOR"],
             "HAS_SKIP": c["HAS_SKIP"], "SOFT_BF16": False})


def _filter_norms(dtype, c):
    key, off_lo = KEY_TYPES[c["key"]]
    return ({"ftable": TABLE, "n_filters": "i32", "factors": acc_ptr(dtype),
             "skip_ptr": ptr(c["HAS_SKIP"]), "key": key, "off_lo": off_lo},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "HAS_SKIP": c["HAS_SKIP"]})


def _filter_write(dtype, c):
    key, off_lo = KEY_TYPES[c["key"]]
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "factors": acc_ptr(dtype),
             "skip_ptr": ptr(c["HAS_SKIP"]), "key": key, "off_lo": off_lo},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "HAS_SKIP": c["HAS_SKIP"], "SOFT_BF16": False})


def _adam_bias(dtype, c):
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "bias": "*fp64",
             "skip_ptr": ptr(c["HAS_SKIP"])}, {"HAS_SKIP": c["HAS_SKIP"]})


def _adam_update(dtype, c):
    has_wd, decoupled = {"none": (False, False), "l2": (True, False),
                         "decoupled": (True, True)}[c["weight_decay"]]
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "bias": "*fp64",
             "lr_ptr": ptr(c["HAS_LR_TENSOR"]), "elr_ptr": ptr(c["HAS_ELR_TENSOR"]),
             "scale_ptr": ptr(c["HAS_SCALE"]), "skip_ptr": ptr(c["HAS_SKIP"])},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "HAS_SCALE": c["HAS_SCALE"],
             "HAS_LOCAL": c["HAS_LOCAL"], "HAS_WD": has_wd, "DECOUPLED": decoupled,
             "LERP_LOW": c["LERP_LOW"], "HAS_LR_TENSOR": c["HAS_LR_TENSOR"],
             "HAS_ELR_TENSOR": c["HAS_ELR_TENSOR"], "HAS_SKIP": c["HAS_SKIP"],
             "SOFT_BF16": False})


# lamb_'s weight decay: (WD_L2, WD_U) from decoupled_weight_decay (and wd != 0 for timm).
LAMB_DECAY = {"none": (False, False), "l2": (True, False), "decoupled": (False, True)}
# (APEX, GRAD_AVG, LERP, LERP_LOW): timm's lerp (both formulas) or m * b1 + b3 * g.
LAMB_MOMENT = {"timm-lerp-low": (False, True, True, True), "timm-lerp-high": (False, True, True, False),
               "timm-sum": (False, False, False, False), "apex": (True, True, False, False),
               "apex-sum": (True, False, False, False)}


def _lamb_flags(dtype, c) -> dict:
    l2, wd_u = LAMB_DECAY[c["decay"]]
    apex, grad_avg, lerp, lerp_low = LAMB_MOMENT[c["moment"]]
    return {**_elem(dtype), "BLOCK": c["BLOCK"], "HAS_SCALE": c["HAS_SCALE"],
            "HAS_CLIP": c["HAS_CLIP"], "WD_L2": l2, "WD_U": wd_u, "GRAD_AVG": grad_avg,
            "LERP": lerp, "LERP_LOW": lerp_low, "APEX": apex, "HAS_SKIP": c["HAS_SKIP"]}


def _lamb_scalars(c) -> dict:
    return {"clip_ptr": ptr(c["HAS_CLIP"]), "scale_ptr": ptr(c["HAS_SCALE"]),
            "skip_ptr": ptr(c["HAS_SKIP"])}


# lamb_'s stage as _lamb_coefs sees it: (STAGE, norm_sq's type: unread in the full step).
LAMB_STAGE = {"full": (lamb.STAGES["full"], TABLE),
              "moments-fp32": (lamb.STAGES["moments"], "*fp32"),
              "moments-fp64": (lamb.STAGES["moments"], "*fp64"),
              "update-fp32": (lamb.STAGES["update"], "*fp32"),
              "update-fp64": (lamb.STAGES["update"], "*fp64")}


def _lamb_moments(dtype, c):
    # STORE: the launcher stores the moments in pass 1 exactly for fp32/fp64, and for
    # every dtype in the moments stage (the full and moments stages launch this kernel).
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "partial": acc_ptr(dtype),
             **_lamb_scalars(c)},
            {**_lamb_flags(dtype, c), "BIAS": c["BIAS"], "SOFT_BF16": False,
             "STORE": dtype in (torch.float32, torch.float64) or c["stage"] == "moments"})


def _lamb_coefs(dtype, c):
    stage, norm_sq = LAMB_STAGE[c["stage"]]
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "partial": acc_ptr(dtype),
             "coefs": acc_ptr(dtype), "skip_ptr": ptr(c["HAS_SKIP"]), "norm_sq": norm_sq,
             "n_params": "i32"},
            {"ACC": acc_types(dtype)[1], "RBLOCK": mt.RBLOCK, "HAS_MAX_TRUST": c["HAS_MAX_TRUST"],
             "CLIP": c["CLIP"], "BIAS": c["BIAS"], "APEX": c["APEX"], "HAS_SKIP": c["HAS_SKIP"],
             "STAGE": stage})


def _lamb_update(dtype, c):
    # STORED: the moments read back (fp32/fp64, and every dtype in the update stage).
    has_avg, swa = AVERAGING[c["averaging"]]
    return ({"table": TABLE, "n_chunks": "i32", "n_tensors": "i32", "coefs": acc_ptr(dtype),
             "lr_ptr": ptr(c["HAS_LR_TENSOR"]), **_lamb_scalars(c), "avg_table": TABLE,
             "count_ptr": COUNT},
            {**_lamb_flags(dtype, c),
             "STORED": dtype in (torch.float32, torch.float64) or c["stage"] == "update",
             "HAS_LR_TENSOR": c["HAS_LR_TENSOR"], "SOFT_BF16": False, "HAS_AVG": has_avg,
             "AVG": acc_types(dtype)[1], "SWA": swa})


def _average(dtype, c):
    return ({"table": TABLE, "n_chunks": "i32", "count_ptr": COUNT,
             "skip_ptr": ptr(c["HAS_SKIP"])},
            {"PARAM": ELEM[dtype], "AVG": acc_types(dtype)[1], "BLOCK": c["BLOCK"],
             "SWA": c["method"] == "swa", "HAS_SKIP": c["HAS_SKIP"]})


def _worker_mean(dtype, c):
    return ({"table": TABLE, "n_chunks": "i32"},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "SOFT_BF16": False})


def _mean_squares(dtype, c):
    return ({"flat": f"*{ELEM[dtype]}", "table": TABLE, "partial": "*fp64"},
            {**_elem(dtype), "BLOCK": c["BLOCK"], "SOFT_BF16": False})


def _segment_sums(dtype, c):
    return {"partial": "*fp64", "first": TABLE, "out": "*fp64"}, {}


def kernel_name(fn) -> str:
    """module.name of a kernel, the module being the one that defines it."""
    return f"{fn.fn.__module__.rpartition('.')[2]}.{fn.__name__}"


def launched_kernels() -> set[str]:
    """``kernel_name`` of every kernel the launchers of lbkernels/triton launch (``name[(``)."""
    out = set()
    for path in Path(mt.__file__).parent.glob("*.py"):
        module = importlib.import_module(f"{mt.__package__}.{path.stem}")
        for name in re.findall(r"\b(\w+)\[\(", path.read_text()):
            out.add(kernel_name(getattr(module, name)))
    return out


def variants() -> list[Variant]:
    """Every variant compiled by the check; ValueError when a launched kernel has none
    (a new kernel adds its axes and argument types here)."""
    flags = (False, True)
    blocks = {"BLOCK": BLOCKS}
    out = _norm_kernels()
    out += per_dtype(lars, "_lars_update", {
        "HAS_SCALE": flags, "momentum": tuple(MOMENTUM), "PAPER": flags,
        "HAS_LR_TENSOR": flags, "HAS_SKIP": flags, "averaging": tuple(AVERAGING),
        "W_SQ": flags, **blocks}, _lars_update)
    out += per_dtype(extrap_sgd, "_sgd_update", {
        "extrapolation": tuple(extrap_sgd._MODES), "HAS_SCALE": flags,
        "momentum": tuple(MOMENTUM), "LARS": flags, "local_grads": flags,
        "HAS_LR_TENSOR": flags, "HAS_ELR_TENSOR": flags, "HAS_SKIP": flags,
        "key": tuple(KEY_TYPES), **blocks}, _sgd_update)
    out += per_dtype(noise, "_filter_norms", {"HAS_SKIP": flags, "key": tuple(KEY_TYPES),
                                              **blocks}, _filter_norms)
    out += per_dtype(noise, "_filter_write", {"HAS_SKIP": flags, "key": tuple(KEY_TYPES),
                                              **blocks}, _filter_write)
    # One launch per dtype group, but the kernel reads no tensor of that dtype: one dtype.
    out += per_dtype(extrap_adam, "_adam_bias", {"HAS_SKIP": flags}, _adam_bias, num_warps=1,
                     dtypes=[next(iter(ELEM))])
    out += per_dtype(extrap_adam, "_adam_update", {
        "HAS_SCALE": flags, "HAS_LOCAL": flags, "weight_decay": ("none", "l2", "decoupled"),
        "LERP_LOW": flags, "HAS_LR_TENSOR": flags, "HAS_ELR_TENSOR": flags,
        "HAS_SKIP": flags, **blocks}, _adam_update)
    lamb_chunk = {"HAS_SCALE": flags, "HAS_CLIP": flags, "decay": tuple(LAMB_DECAY),
                  "moment": tuple(LAMB_MOMENT), "HAS_SKIP": flags, **blocks}
    out += per_dtype(lamb, "_lamb_moments", {**lamb_chunk, "BIAS": flags,
                                             "stage": ("full", "moments")}, _lamb_moments,
                     num_warps=lamb.NUM_WARPS)
    out += per_dtype(lamb, "_lamb_coefs", {"HAS_MAX_TRUST": flags, "CLIP": flags, "BIAS": flags,
                                           "APEX": flags, "HAS_SKIP": flags,
                                           "stage": tuple(LAMB_STAGE)}, _lamb_coefs,
                     dtypes=[next(d for d in ELEM if acc_types(d)[1] == a)
                             for a in (tl.float32, tl.float64)])
    out += per_dtype(lamb, "_lamb_update", {**lamb_chunk, "HAS_LR_TENSOR": flags,
                                            "averaging": tuple(AVERAGING),
                                            "stage": ("full", "update")}, _lamb_update,
                     num_warps=lamb.NUM_WARPS)
    out += per_dtype(average, "_average", {"method": ("ema", "swa"), "HAS_SKIP": flags,
                                           **blocks}, _average)
    out += per_dtype(average, "_worker_mean", blocks, _worker_mean)
    out += per_dtype(mean_sum_squares, "_mean_squares", blocks, _mean_squares)
    # The per-segment sums read only float64 partials: one variant.
    out += per_dtype(mean_sum_squares, "_segment_sums", {}, _segment_sums,
                     dtypes=[next(iter(ELEM))])
    missing = launched_kernels() - {v.kernel for v in out}
    if missing:
        raise ValueError(f"launched kernels without variants in {__file__}: {sorted(missing)}")
    return out
