"""Kernel tests run the Triton kernels under the interpreter when there is no GPU. The
variable must be set before the kernel modules are imported (`triton.jit` reads it then)."""

from __future__ import annotations

import os

import pytest

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
except ImportError:  # no triton: the kernel tests skip (see pytest_collection_modifyitems)
    triton = None


def pytest_collection_modifyitems(config, items):
    if triton is None:
        skip = pytest.mark.skip(reason="triton is not installed")
        for item in items:
            if item.nodeid.startswith("tests/kernels/"):
                item.add_marker(skip)
