"""A measurement control: the plan path's Triton GEMM1 in persistent programs, each a
contiguous run of tiles.

At decode GEMM1 runs one program per (row tile, column tile): at qwen3 M = 8, ~300 equal
programs of ~0.5 MB each on 264 slots (two an SM), and its time steps up where the
programs pass 264 and carries ~8.6 µs a launch besides its bytes (bench/NOTES.md, session
72). Persistent programs that each take an equal contiguous run of the tiles in use (the
count read from the plan on the GPU) run the runs as one loop — with `flat`, one
pipelined loop over the runs' K steps, so a tile's first loads are in flight while the
one before it finishes. The tiles are the heuristic's (a narrower column tile gives finer
runs). Off by default, unmeasured:

    MOEKIT_GEMM1_PERSISTENT=<programs per SM>[,flat]    e.g. 2  or  2,flat

It applies to the Triton GEMM1s (16-bit and fp8) without tail tiles; read at import.
"""

from __future__ import annotations

import os

import torch

from moekit._tma import persistent_programs

ENV = "MOEKIT_GEMM1_PERSISTENT"


def parse(text: str) -> tuple[int, bool]:
    """`MOEKIT_GEMM1_PERSISTENT`'s value → (programs per SM, 0 for off; flattened loop)."""
    if not text:
        return 0, False
    per_sm, comma, form = text.partition(",")
    if not per_sm.isdigit() or int(per_sm) < 1 or (comma and form != "flat"):
        raise ValueError(f"{ENV}={text!r}: expected '<programs per SM ≥ 1>' or '<n>,flat'")
    return int(per_sm), form == "flat"


PROGRAMS_PER_SM, FLATTEN = parse(os.environ.get(ENV, ""))


def gemm1_programs(device: torch.device, tail_m: int) -> int:
    """GEMM1's persistent programs under the control, or 0: one program a tile."""
    if not PROGRAMS_PER_SM or tail_m:
        return 0
    return PROGRAMS_PER_SM * persistent_programs(device)
