"""Shared test configuration.

The Triton kernels run on CPU tensors under Triton's interpreter, which must be switched
on before any kernel module is imported: it is set here, first, when no GPU is present.
What test files share lives in helpers.py; here are only the settings and the fixtures
that span files.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lbkernels  # noqa: E402
from helpers import GlooGroup  # noqa: E402


def pytest_report_header(config):
    from lbkernels import triton as lbk_triton

    native = "loaded" if lbkernels.native_unavailable_reason is None else lbkernels.native_unavailable_reason
    return [
        f"lbkernels native kernels: {native}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}; triton cpu: {lbk_triton.available('cpu')}",
    ]


def pytest_collection_modifyitems(items):
    # Every test that starts processes is slow (seconds each): `make test-fast` leaves them out.
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def gloo(tmp_path_factory):
    """gloo(world) -> a GlooGroup of that many processes, shared by the session's tests."""
    groups: dict[int, GlooGroup] = {}

    def get(world: int) -> GlooGroup:
        if world not in groups or groups[world].closed:
            groups[world] = GlooGroup(world, tmp_path_factory.mktemp(f"gloo{world}"))
        return groups[world]

    yield get
    for group in groups.values():
        group.close()
