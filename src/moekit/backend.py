"""Which implementation runs an op: Triton kernels or the PyTorch reference.

`auto` picks Triton for CUDA tensors and the reference elsewhere. `triton` on CPU
tensors is allowed only under Triton's interpreter (`TRITON_INTERPRET=1`), which is how
CI tests kernel logic without a GPU.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: object) -> str:
    """`backend` when it names one of BACKENDS, else the ValueError every op raises (for
    holders of a backend, like `moekit.MoE`, that check it before any op runs)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Return "triton" or "reference" for an op whose main input is `tensor`."""
    check_backend(backend)
    if backend == "reference":
        return "reference"
    if tensor.is_cuda:
        return "triton"
    if backend == "triton":
        if interpreter_enabled():
            return "triton"
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels "
            f"on the CPU through Triton's interpreter; got tensors on {tensor.device}"
        )
    return "reference"
