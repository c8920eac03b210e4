"""Shared test configuration.

The Triton kernels run on CPU tensors under Triton's interpreter, which must be switched
on before any kernel module is imported: it is set here, first, when no GPU is present.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lbkernels  # noqa: E402


def pytest_report_header(config):
    from lbkernels import triton as lbk_triton

    native = "loaded" if lbkernels.native_unavailable_reason is None else lbkernels.native_unavailable_reason
    return [
        f"lbkernels native kernels: {native}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}; triton cpu: {lbk_triton.available('cpu')}",
    ]
