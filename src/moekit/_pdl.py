"""When the decode launches are chained by programmatic dependent launch (PDL, sm_90+).

Experimental and off by default: `bench/scripts/pdl_experiment.py` times it against the
plain chain, and it becomes the default only where that measurement says so
(bench/NOTES.md). Decode only: there GEMM1 leaves SMs idle for GEMM2 to prefetch its
weights on; at prefill the TMA path fills every SM.
"""

from __future__ import annotations

import torch

ENABLED = False  # flipped by the experiment script; see the module docstring
_MIN_BLOCK_K = 64  # the L2 prefetch moves 128-byte lines: at least one per row of a tile


def use_pdl(hidden: torch.Tensor, block_m: int, block_k2: int, tma: bool) -> bool:
    """Whether `fused_experts` chains GEMM1 → GEMM2 → combine with PDL."""
    return (
        ENABLED
        and not tma
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and block_k2 >= _MIN_BLOCK_K
        and hidden.device.type == "cuda"
        and torch.cuda.get_device_capability(hidden.device)[0] >= 9
    )
