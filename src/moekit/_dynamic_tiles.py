"""Persistent Gluon programs that claim their tiles from a counter, in order (an experiment).

A persistent program takes every num_programs-th tile, so programs whose tiles take
unequal times (mixtral's tail tiles: half a whole tile's work) fall out of step, and the
programs that share a weight column through L2 stop finding it there: with tail tiles
mixtral's bf16 GEMMs read 28–41% more DRAM (bench/NOTES.md, session 54). Claimed from one
atomic counter instead, the tiles in flight stay a contiguous window of the tile order
whatever each takes, as with one program per tile, while each program still overlaps one
tile's epilogue with the next tile's loads.

Within a program the producer warpgroup claims (`claim_tile`) and hands each tile index to
the two math warpgroups through a two-slot ring in global scratch (`publish_tile`,
`receive_tile`: an mbarrier pair per slot; the index is written by one thread before the
partition's barrier and the arrive, and read back volatile after the wait). An index of
`total` or more ends every partition's loop. The counter must be zero at launch
(`tile_claims`: a fresh zeroed buffer per launch, captured by CUDA graphs as a memset).

`DYNAMIC_TILES_ENV` = "1" (read at every launch) turns it on for the 16-bit Gluon GEMM2's
persistent grid; off by default until measured.
"""

from __future__ import annotations

import os

import torch

from moekit._gluon import HAVE_GLUON

DYNAMIC_TILES_ENV = "MOEKIT_GLUON_DYNAMIC_TILES"
SLOTS = 2  # tile indices in flight from a producer to its math warpgroups


def dynamic_tiles() -> bool:
    """Whether the Gluon GEMM2's persistent programs claim their tiles (`DYNAMIC_TILES_ENV`)."""
    value = os.environ.get(DYNAMIC_TILES_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{DYNAMIC_TILES_ENV}={value!r}: expected 0, 1 or unset")
    return value == "1"


def tile_claims(programs: int, device) -> torch.Tensor:
    """The counter (element 0) and each program's SLOTS-entry ring after it, zeroed."""
    return torch.zeros(1 + SLOTS * programs, dtype=torch.int32, device=device)


if HAVE_GLUON:
    from moekit._gluon import gl, gluon, mbarrier

    _SLOTS = gl.constexpr(SLOTS)  # globals a kernel reads must be constexpr objects

    @gluon.jit
    def claim_ring():
        """Each slot's `full` barrier (the producer's one arrival) and `free` (one release
        by each of the two math warpgroups)."""
        full = gl.allocate_shared_memory(gl.int64, [_SLOTS, 1], mbarrier.MBarrierLayout())
        free = gl.allocate_shared_memory(gl.int64, [_SLOTS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(_SLOTS):
            mbarrier.init(full.index(i), count=1)
            mbarrier.init(free.index(i), count=2)
        return full, free

    @gluon.jit
    def program_ring(claims_ptr):
        """This program's ring of tile indices in the scratch after the counter."""
        return claims_ptr + 1 + gl.program_id(0) * _SLOTS

    @gluon.jit
    def claim_tile(claims_ptr):
        """The next unclaimed tile index (one atomic for the program)."""
        return gl.atomic_add(claims_ptr, 1)

    @gluon.jit
    def publish_tile(ring_ptr, full, free, n, tile):
        """The producer's n-th tile index into its slot, once both math warpgroups have
        read the slot's previous one."""
        slot = n % _SLOTS
        mbarrier.wait(free.index(slot), ((n // _SLOTS) & 1) ^ 1)
        gl.store(ring_ptr + slot, tile)
        mbarrier.arrive(full.index(slot), count=1)

    @gluon.jit
    def receive_tile(ring_ptr, full, free, n):
        """A math warpgroup's n-th tile index, its slot released once read."""
        slot = n % _SLOTS
        mbarrier.wait(full.index(slot), (n // _SLOTS) & 1)
        tile = gl.load(ring_ptr + slot, volatile=True)
        mbarrier.arrive(free.index(slot), count=1)
        return tile
