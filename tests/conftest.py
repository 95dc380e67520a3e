"""Test setup: without CUDA, Triton kernels run through the CPU interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` is evaluated, so it is set here,
before moekit is imported by any test module.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
