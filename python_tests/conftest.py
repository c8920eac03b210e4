"""Shared test configuration.

The Triton kernels run on CPU tensors under Triton's interpreter, which must be switched
on before any kernel module is imported: it is set here, first, when no GPU is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lbkernels  # noqa: E402
from lbkernels import _library  # noqa: E402


def _triton_usable(device_type: str) -> tuple[bool, str]:
    try:
        from lbkernels import triton as lbk_triton

        return lbk_triton.available(device_type)
    except Exception as e:  # pragma: no cover - reported as the skip reason
        return False, f"Triton backend unusable: {e}"


def backend_params(device_types=("cpu", "cuda")) -> list:
    """(impl, device) pairs every kernel test runs over, with skip reasons for the
    ones this machine cannot run. The reference runs on CPU as the oracle itself."""
    out = []
    for dev in device_types:
        if dev == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
            out.append(pytest.param("native", dev, marks=pytest.mark.skip(reason=reason), id=f"native-{dev}"))
            out.append(pytest.param("triton", dev, marks=pytest.mark.skip(reason=reason), id=f"triton-{dev}"))
            continue
        native_ok = _library.has_native_kernel("lars_sgd_", dev)
        marks = [] if native_ok else [pytest.mark.skip(reason=f"compiled kernels not loaded: {lbkernels.native_unavailable_reason}")]
        out.append(pytest.param("native", dev, marks=marks, id=f"native-{dev}"))
        ok, why = _triton_usable(dev)
        marks = [] if ok else [pytest.mark.skip(reason=why)]
        out.append(pytest.param("triton", dev, marks=marks, id=f"triton-{dev}"))
    return out


def pytest_report_header(config):
    from lbkernels import triton as lbk_triton

    native = "loaded" if lbkernels.native_unavailable_reason is None else lbkernels.native_unavailable_reason
    return [
        f"lbkernels native kernels: {native}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}; triton cpu: {lbk_triton.available('cpu')}",
    ]
