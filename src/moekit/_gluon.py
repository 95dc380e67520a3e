"""What the warp-specialised Gluon GEMMs (`moekit._gluon_gemm1`, `moekit._gluon_gemm2` and
their 16-bit siblings) share: the guarded import of Gluon's Hopper API, when a tensor may
take them, their TMA descriptors, the walk over the plan's row tiles, the stage ring's
barriers, and the 16-bit kernels' K loop (`paired_mainloop`).

Both kernels read and write plan-order rows by TMA in 128-row tiles (or a run's odd last
64 rows, with tail tiles); both are persistent over (row tile, column tile), row tile
major but for GEMM1 on experts whose w13 outgrows L2 and the 16-bit GEMM2 on experts whose
w2 outgrows half of it (`tile_coords`, `gemm2_group_m`).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from moekit._intmath import cdiv

try:  # Gluon's Hopper API as of Triton 3.6 (the version measured); else the Triton GEMMs
    import triton

    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 6):
        raise ImportError(f"Gluon as used here needs Triton 3.6, found {triton.__version__}")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

__all__ = ["HAVE_GLUON", "BLOCK_M", "HALF_M", "HOPPER_L2_BYTES", "DISABLE_ENV", "GEMM1_ENV",
           "GEMM2_ENV", "fp8_gemm1_allowed",
           "GEMM2_GROUP_M", "GEMM2_GROUP_M_ENV", "gemm2_allowed", "gemm2_forced", "gemm2_group_m",
           "gluon_allowed", "l2_bytes", "l2_bytes_of", "w2_outgrows_half_l2",
           "descriptor", "gluon", "gl", "fence_async_shared", "mbarrier", "tma",
           "warpgroup_mma", "warpgroup_mma_wait"]

BLOCK_M = 128  # a row tile; two math warpgroups take 64 rows each
HOPPER_L2_BYTES = 50 * 2**20  # an H100's or H200's L2, for tensors off the GPU (compiles)
HALF_M = BLOCK_M // 2
DISABLE_ENV = "MOEKIT_GLUON"  # "0": always the Triton GEMMs (a measurement's control)
# The 16-bit Gluon GEMMs load each tile's indices (work entry, expert, slots' pairs) a tile
# ahead, in the producer and the math warpgroups (the kernels' `PREFETCH`): 1.01–1.03× on
# granite's layer at M = 384–1024, GEMM2 up to 1.06×, prefill within noise. The fp8 ones
# do not: their producers with it measured 0.98× at granite M = 512 (bench/NOTES.md,
# session 25). Read at every launch, so that an experiment can flip them.
PREFETCH_TILES = True
PREFETCH_TILES_FP8 = False
# Measured and removed (their code last at a254e54; bench/NOTES.md, sessions 46–52): the
# 16-bit GEMMs as one MMA over both halves of a tile per K step (0.99–1.01× on an H200;
# at granite's narrow GEMM1 tiles 1.00–1.01× on an H100, session 57),
# the GEMM2s loading a tail tile's A as a 64-row box (0.89–1.04× bf16, 0.96–1.02× fp8 on an
# H100), and the 16-bit GEMM1 on partial column tiles (gpt-oss 0.77–1.00× against Triton's).
# The Gluon GEMM2s' grouped order (GROUP_M > 1, `gemm2_group_m`) in groups that never split
# an expert's row tiles (`expert_tile_coords`), as the Triton GEMMs' (`moekit._tile_order`):
# at deepseek-v3 bf16 M = 16384 the Gluon GEMM2 read 14.3 GB of DRAM for ~8 GB of w2 and
# rows (bench/NOTES.md, session 49); with them 10.8 GB against 12.9, but the layer moved
# 0.93–1.04× (median 1.000, three rounds on an H100, session 50), so off; read at import:
# `MOEKIT_GLUON_EXPERT_GROUPS=1` turns it on.
EXPERT_GROUPS = os.environ.get("MOEKIT_GLUON_EXPERT_GROUPS") == "1"
# Measurement controls of the GEMM2s (read at every launch): `GEMM2_ENV` "0" runs Triton's
# GEMM2 beside the Gluon GEMM1, "1" the Gluon GEMM2 wherever its shape rules allow (past
# `_gluon_gemm2_16bit.few_row_tiles_of_large_experts`); a number in `GEMM2_GROUP_M_ENV` sets
# the Gluon GEMM2s' GROUP_M (`tile_coords`; 1: row tile major), overriding `gemm2_group_m`.
GEMM2_ENV = "MOEKIT_GLUON_GEMM2"
# `GEMM1_ENV` "0" runs Triton's fp8 GEMM1 beside the Gluon GEMM2 (read at every launch).
GEMM1_ENV = "MOEKIT_GLUON_GEMM1"
GEMM2_GROUP_M_ENV = "MOEKIT_GLUON_GEMM2_GROUP_M"
GEMM2_GROUP_M = 8  # row tiles side by side over each column tile (`gemm2_group_m`)
# The Gluon GEMMs' grid. Persistent, one program per SM, each striding by the grid, the
# programs drift apart over a launch, so the neighbouring tiles that share a weight tile
# through L2 (an expert's row tiles) stop running together; where the weight tiles in
# flight at once outgrow L2 (`programs_drift_apart`), each row tile then reads its
# weights from DRAM again. One program per tile instead lets the hardware hand tiles out
# in index order as SMs free up (Triton's GEMMs' way), at the cost of each tile's
# pipeline fill and epilogue no longer overlapping the next tile's. H100, deepseek-v3 fp8
# per-tensor M = 8192 (bench/NOTES.md, session 50): GEMM1 19.1 → 9.7 GB of DRAM and
# 6.61 → 3.87 ms, GEMM2 8.4 → 3.9 GB and 3.26 → 2.17 ms, the layer 1.31–1.46× at
# M = 4096–16384; but qwen3 (whose experts in flight fit L2) 0.89–0.92× at M ≥ 4096.
# The rule, against persistent grids (two rounds): deepseek-v3 M = 4096–16384 1.33×,
# gpt-oss M = 4096 1.16×, mixtral M = 512–2048 1.03–1.09× (session 50).
# `TILE_PROGRAMS_ENV` (read at every launch) "1" launches every Gluon GEMM one program per
# tile, a larger number N that many consecutive tiles a program (each program's tiles
# then overlap as in the persistent loop, drift bounded by N), "0" every one persistent,
# "G1,G2" each GEMM its own ("r": the rule); unset, the fp8 GEMMs follow
# `programs_drift_apart` and the 16-bit ones stay persistent (H100 bf16, deepseek-v3,
# mixtral, qwen3, olmoe at M = 2048–16384, two rounds, session 51: one program per tile
# 0.91–1.08×, median 0.975; 2 tiles a program median 0.966; fp8, both GEMMs at 2 a
# program: deepseek-v3 M ≥ 8192 1.12–1.14× but gpt-oss M = 4096 0.77×, the GEMM1 alone
# never better). A number in `GEMM1_GROUP_M_ENV` sets the GEMM1s' GROUP_M
# (`_gluon_gemm1.group_m`; a measurement control).
TILE_PROGRAMS_ENV = "MOEKIT_GLUON_TILE_PROGRAMS"
SMALL_EXPERT_L2_SHARE = 8  # experts of at most L2 / 8 stay persistent (`programs_drift_apart`)
# The share of L2 the GEMM1's weight tiles in flight may fill before its programs drifting
# apart read them again (`programs_drift_apart`): the rows in flight, the outputs and the
# scales pass through L2 too. gpt-oss M = 8192 (in flight 0.93 of L2), GEMM1 one program
# per tile against persistent, H100: fp8_block 1.031–1.058× (sessions 59 and 61),
# fp8_tensor 1.043×; H200 0.990 and 1.011×. The GEMM2 keeps all of L2: at gpt-oss
# fp8_block M = 4096 (0.93 too) its one program per tile lost 0.966× (H100, session 61).
GEMM1_WEIGHT_SHARE_OF_L2 = 0.9
# The rule also leaves the persistent grid where each program would take this many tiles
# or more over the tiles the plan could hold (`programs_drift_apart`): the drift grows
# with a program's tiles. H100 fp8 per-tensor deepseek-v3 M = 8192 (the L2 term: 35 MB of
# GEMM2 tiles in flight, so persistent): GEMM2 8.8 → 4.0 GB of DRAM and 3.39 → 2.21 ms
# one tile a program (2 a program: 4.2 GB, 2.13 ms). The layer, three rounds (session 51),
# GEMM2 against persistent: deepseek-v3 M = 4096–16384 (108–271 tiles a program)
# 1.09–1.13×, gpt-oss M = 16384 (~58) one a program 0.94×, mixtral 16384 (~32)
# 0.96–1.04×; GEMM1, two rounds: deepseek-v3 M = 32768 (~280 tiles a program, the L2 term
# 30 MB) 1.28× (61.0 → 76.8% of roofline), mixtral M = 16384 (~220) 0.99×. 2 consecutive
# tiles a program against 1 for the GEMM2: deepseek-v3 M = 8192–16384 0.99–1.06×, mixtral
# M = 512–1024 0.94×; so 1.
MANY_TILES_A_PROGRAM = 128
GEMM1_GROUP_M_ENV = "MOEKIT_GLUON_GEMM1_GROUP_M"


def programs_drift_apart(programs: int, weight_tile_bytes: int, num_pairs: int,
                         num_experts: int, l2: int, expert_bytes: int,
                         tiles_a_program: float = 0, weight_share: float = 1.0) -> bool:
    """Whether `programs` persistent programs, each on one column tile of `weight_tile_bytes`
    of an expert's weights, share weight tiles and hold more of them at once than
    `weight_share` of L2 (`l2` bytes) keeps. Experts averaging a whole row tile or more
    (`num_pairs` over `num_experts`) share each weight tile among their row tiles'
    programs, so ~programs × weight_tile_bytes ÷ row tiles an expert are in flight; past
    that share of L2, a program that drifts behind its partner reads the tile from DRAM
    again. With fewer rows an expert each
    weight tile is read once whatever the order. Measured, not derived: experts of at most
    L2 ÷ SMALL_EXPERT_L2_SHARE (`expert_bytes`: this GEMM's weights of one expert) stay
    persistent (H100 fp8: qwen3's 3 MB w13 0.98×, olmoe's 4 MB 0.96× at one row tile an
    expert; 15–117 MB 1.03–1.34×). Also where each persistent program would take
    MANY_TILES_A_PROGRAM tiles or more (`tiles_a_program`): the drift grows with each
    program's tiles, so the programs sharing a weight tile end up further apart than the
    tiles in flight suggest."""
    row_tiles_per_expert = num_pairs / (num_experts * BLOCK_M)
    return (row_tiles_per_expert >= 1
            and expert_bytes > l2 // SMALL_EXPERT_L2_SHARE
            and (programs * weight_tile_bytes / row_tiles_per_expert > l2 * weight_share
                 or tiles_a_program >= MANY_TILES_A_PROGRAM))


def _tile_programs_setting(gemm: int) -> int | None:
    """`TILE_PROGRAMS_ENV` for GEMM `gemm` (1 or 2): one number for both GEMMs, or two
    ("G1,G2", each a number or "r": the rule) for each its own; None: the rule."""
    value = os.environ.get(TILE_PROGRAMS_ENV)
    if value in (None, ""):
        return None
    parts = value.split(",")
    if len(parts) not in (1, 2) or not all(p.isdigit() or p == "r" for p in parts) or (
            parts == ["r"]):
        raise ValueError(f"{TILE_PROGRAMS_ENV}={value!r}: expected 0 (persistent grids), a "
                         "number of consecutive tiles a program (1: one), two of them "
                         "('G1,G2'; 'r': the rule) or unset (the rule)")
    part = parts[min(gemm, len(parts)) - 1]
    return None if part == "r" else int(part)


def schedule(programs: int, plan, n_tiles: int, weights: torch.Tensor | None = None,
             weight_tile_bytes: int = 0, gemm: int = 1) -> tuple[tuple[int], int]:
    """(grid, the kernel's CHUNK) of a Gluon GEMM over `plan`'s row tiles by `n_tiles`
    column tiles: persistent, `programs` (one per SM); or `chunk` consecutive tiles a
    program over every tile the plan could hold (programs past the tiles in use find none
    and end), `chunk` as `TILE_PROGRAMS_ENV` says for GEMM `gemm` (1 or 2) or, unset, 1
    where `programs_drift_apart` over `weights` [E, ...] holds (`weights` None: persistent
    unless told). One tile a program runs the persistent loop (CHUNK 0) over that grid, as
    measured; CHUNK ≥ 2 is `program_tiles`' chunked form."""
    chunk = _tile_programs_setting(gemm)
    tiles = plan.row_tiles()[0] * n_tiles
    if chunk is None:
        chunk = int(weights is not None and programs_drift_apart(
            programs, weight_tile_bytes, plan.num_pairs, weights.shape[0],
            l2_bytes_of(weights), math.prod(weights.shape[1:]) * weights.element_size(),
            tiles / programs, GEMM1_WEIGHT_SHARE_OF_L2 if gemm == 1 else 1.0))
    if chunk:
        return (cdiv(tiles, chunk),), chunk if chunk > 1 else 0
    return (programs,), 0


def _gemm2_setting() -> str | None:
    value = os.environ.get(GEMM2_ENV)
    if value not in (None, "", "0", "1"):
        raise ValueError(f"{GEMM2_ENV}={value!r}: expected 0 (Triton's GEMM2) or 1 (the Gluon "
                         "GEMM2 wherever it can run), or unset")
    return value or None


def fp8_gemm1_allowed() -> bool:
    """Whether the Gluon fp8 GEMM1 may run (`GEMM1_ENV` not "0")."""
    value = os.environ.get(GEMM1_ENV)
    if value not in (None, "", "0"):
        raise ValueError(f"{GEMM1_ENV}={value!r}: expected 0 (Triton's fp8 GEMM1) or unset")
    return value != "0"


def gemm2_allowed() -> bool:
    """Whether the Gluon GEMM2s may run (`GEMM2_ENV` not "0")."""
    return _gemm2_setting() != "0"


def gemm2_forced() -> bool:
    """Whether `GEMM2_ENV` is "1": the Gluon GEMM2 past the rules that pick Triton's."""
    return _gemm2_setting() == "1"


def w2_outgrows_half_l2(w2: torch.Tensor, l2: int | None = None) -> bool:
    """Whether one expert's w2 [E, H, I] is larger than half of L2 (`l2`, default the
    device's): then a column tile's reuse across an expert's row tiles can miss L2."""
    _, hidden, inter = w2.shape
    l2 = l2_bytes_of(w2) if l2 is None else l2
    return hidden * inter * w2.element_size() > l2 // 2


def gemm2_group_m(w2: torch.Tensor, by_size: bool = True, l2: int | None = None) -> int:
    """The Gluon GEMM2s' GROUP_M for weights `w2` [E, H, I]: `GEMM2_GROUP_M_ENV` if set;
    else (`by_size`) GEMM2_GROUP_M where one expert's w2 is larger than half of L2 (`l2`,
    default the device's), else 1 (row tile major).

    Row tile major, an expert's next row tile reuses a w2 column tile only after the
    whole expert's w2 has streamed by. H100, bf16 (bench/NOTES.md, session 45): deepseek-v3
    (29 MB an expert) read 34 GB from DRAM in GEMM2 at M = 16384 against 12 for Triton's
    grouped order, the layer 26.2 → 22.0 ms grouped; mixtral (117 MB) 18.2 → 17.6 ms; both
    within 0.5% at M = 1024–4096 (one row tile an expert). The fp8 GEMM2 passes
    `by_size=False`: grouping measured mixed there on an H200 (session 15)."""
    override = os.environ.get(GEMM2_GROUP_M_ENV)
    if override is not None:
        return int(override)
    if not by_size:
        return 1
    return GEMM2_GROUP_M if w2_outgrows_half_l2(w2, l2) else 1


@functools.lru_cache(maxsize=16)
def _device_is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


@functools.lru_cache(maxsize=16)
def l2_bytes(index: int) -> int:
    """The L2 cache size of CUDA device `index` (50 MB on an H100 or H200)."""
    return torch.cuda.get_device_properties(index).L2_cache_size


def l2_bytes_of(t: torch.Tensor) -> int:
    """The L2 size of `t`'s GPU, or an H100's / H200's for tensors off the GPU (compiles)."""
    if not t.is_cuda:
        return HOPPER_L2_BYTES
    return l2_bytes(t.device.index if t.device.index is not None else torch.cuda.current_device())


def gluon_allowed(t: torch.Tensor) -> bool:
    """Gluon present and not switched off, `t` on an sm_90 GPU (wgmma and TMA as written
    here; sm_100's tensor cores take other instructions)."""
    if not HAVE_GLUON or os.environ.get(DISABLE_ENV) == "0" or t.device.type != "cuda":
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _device_is_sm90(index)


@functools.lru_cache(maxsize=16)
def _box_layout(block: tuple[int, int], dtype: torch.dtype):
    """The NVMMA-swizzled shared layout of a box (~14 µs of host time to derive)."""
    element = gl.float8e4nv if dtype == torch.float8_e4m3fn else getattr(gl, str(dtype)[6:])
    return gl.NVMMASharedLayout.get_default_for(list(block), element)


def descriptor(t: torch.Tensor, block: list[int]):
    """A Gluon TMA descriptor over `t` as a row-major matrix, NVMMA-swizzled boxes.

    Built without `TensorDescriptor`'s own checks (~8 µs of host time per descriptor, seven
    per fp8 call): the `use_gluon_*` predicates have checked the rows' 16-byte strides and
    the weights' contiguity; the base's alignment is checked here. Nor is `t` viewed as a
    matrix (a `view` is 2 µs of the 5 left): the launcher reads only the base's address and
    the descriptor's own shape and strides."""
    if t.data_ptr() % 16:
        raise ValueError("a TMA descriptor's base must be 16-byte aligned")
    cols = t.shape[-1]
    row_stride = t.stride(0) if t.dim() == 2 else cols  # [E, N, K] weights: contiguous
    return _TrustedDescriptor(t, [t.numel() // cols, cols], [row_stride, 1], block,
                              _box_layout(tuple(block), t.dtype))


def work_list(plan) -> tuple[torch.Tensor, int, int]:
    """(work, num_work, TAIL_M) for `row_tile` / `tiles_in_use`: the tail-tile work list
    and its length, or the plan's expert offsets and E."""
    _, _, tail_m = plan.row_tiles()
    if tail_m:
        return plan.tiles, plan.tiles.numel() - 1, tail_m
    return plan.expert_offsets, plan.expert_offsets.numel() - 1, 0


if HAVE_GLUON:
    class _TrustedDescriptor(TensorDescriptor):
        """A `TensorDescriptor` whose arguments the caller has checked (specialised and
        launched exactly as its base class)."""

        def __post_init__(self) -> None:
            pass

    _TILE_M = gl.constexpr(BLOCK_M)  # globals a kernel reads must be constexpr objects
    _HALF_M = gl.constexpr(HALF_M)

    @gluon.jit
    def row_tile(work_ptr, block_experts_ptr, pid_m, TAIL_M: gl.constexpr):
        """Row tile → (first plan slot, expert, its rows: TAIL_M for a tail, else
        _TILE_M): entry pid_m of the work list (block · 2 + is_tail) with tails, else plan
        block pid_m."""
        return entry_tile(tile_entry(work_ptr, pid_m, TAIL_M), block_experts_ptr, TAIL_M)

    @gluon.jit
    def tile_entry(work_ptr, pid_m, TAIL_M: gl.constexpr):
        """Row tile pid_m's work-list entry (a load) with tails, else pid_m itself: the
        first half of `row_tile` (`prefetch_entry` is its clamped form for loads ahead)."""
        entry = pid_m
        if TAIL_M:
            entry = gl.load(work_ptr + pid_m)
        return entry

    @gluon.jit
    def prefetch_entry(tile, total, used, n_tiles, work_ptr, GROUP_M: gl.constexpr,
                       TAIL_M: gl.constexpr, block_experts_ptr=None, offsets_ptr=None,
                       EXPERT_GROUPS: gl.constexpr = False):
        """The `tile_entry` of tile `tile` (in `ordered_tile_coords` order) for a load ahead
        of it: past this program's last tile, the last tile's (valid indices, values never
        used); with no tile at all (every pair dropped, as on an expert-parallel rank that
        got no tokens), plan block 0 read as a 64-row tail, whose slots every plan has."""
        last = total - 1
        pid_m, _ = ordered_tile_coords(gl.maximum(gl.minimum(tile, last), 0),
                                       gl.maximum(used, 1), n_tiles, work_ptr,
                                       block_experts_ptr, offsets_ptr, last >= 0, GROUP_M,
                                       EXPERT_GROUPS, TAIL_M)
        entry = pid_m
        if TAIL_M:
            entry = gl.load(work_ptr + pid_m, mask=last >= 0, other=1)
        return entry

    @gluon.jit
    def first_entries(first, step, total, used, n_tiles, work_ptr, block_experts_ptr,
                      GROUP_M: gl.constexpr, TAIL_M: gl.constexpr, offsets_ptr=None,
                      EXPERT_GROUPS: gl.constexpr = False):
        """The tile prefetch's start (`program_tiles`' first and step): this program's
        first tile as `entry_tile` gives it (first slot, expert, rows) and its second
        tile's work entry, all loads issued here, none waited on."""
        first_slot, expert, rows = entry_tile(
            prefetch_entry(first, total, used, n_tiles, work_ptr, GROUP_M, TAIL_M,
                           block_experts_ptr, offsets_ptr, EXPERT_GROUPS),
            block_experts_ptr, TAIL_M)
        entry = prefetch_entry(first + step, total, used, n_tiles, work_ptr, GROUP_M, TAIL_M,
                               block_experts_ptr, offsets_ptr, EXPERT_GROUPS)
        return first_slot, expert, rows, entry

    @gluon.jit
    def entry_tile(entry, block_experts_ptr, TAIL_M: gl.constexpr):
        """A `tile_entry` → (first plan slot, expert, rows), as `row_tile` returns them."""
        if TAIL_M:
            block = entry >> 1
            first_slot = block * TAIL_M
            rows = _TILE_M - (entry & 1) * (_TILE_M - TAIL_M)
        else:
            block = entry
            first_slot = entry * _TILE_M
            rows = first_slot * 0 + _TILE_M
        expert = gl.load(block_experts_ptr + block)
        return first_slot, expert, rows

    @gluon.jit
    def tile_coords(tile, used, n_tiles, GROUP_M: gl.constexpr):
        """Tile index → (row tile, column tile). GROUP_M row tiles take each column tile
        in turn, so that the programs running at once share a weight tile through L2 while
        the group's rows stay there too (1: row tile major; with I / 128 = 112 column tiles,
        mixtral's GEMM1 then streamed w13 from DRAM once per row tile)."""
        if GROUP_M == 1:
            pid_m = tile // n_tiles
            pid_n = tile - pid_m * n_tiles
        else:
            per_group = GROUP_M * n_tiles
            group = tile // per_group
            first = group * GROUP_M
            rows = gl.minimum(used - first, GROUP_M)
            within = tile - group * per_group
            pid_m = first + within % rows
            pid_n = within // rows
        return pid_m, pid_n

    @gluon.jit
    def expert_tile_coords(tile, n_tiles, work_ptr, block_experts_ptr, offsets_ptr, valid,
                           GROUP_M: gl.constexpr, TAIL_M: gl.constexpr):
        """Tile index (< row tiles in use × n_tiles) → (row tile, column tile) in groups of
        at most GROUP_M of one expert's row tiles, each taking every column tile in turn:
        `moekit._experts_kernels._expert_tile_of` for the persistent Gluon kernels. A
        group's tiles are [first · n_tiles, (first + size) · n_tiles), so row tile
        tile // n_tiles names the group, and its expert's run (`offsets_ptr`: the plan's
        expert_offsets) its first row tile and size. `valid` False (no tile at all): the
        loads are skipped and the answer is row tile 0."""
        m0 = tile // n_tiles
        if TAIL_M:  # work-list entries of two TAIL_M-row plan blocks
            block = gl.load(work_ptr + m0, mask=valid, other=0) >> 1
            plan_rows: gl.constexpr = TAIL_M
            per_tile: gl.constexpr = 2
        else:
            block = m0
            plan_rows: gl.constexpr = _TILE_M
            per_tile: gl.constexpr = 1
        expert = gl.load(block_experts_ptr + block, mask=valid, other=0)
        first_block = gl.load(offsets_ptr + expert, mask=valid, other=0) // plan_rows
        end_block = gl.load(offsets_ptr + expert + 1, mask=valid, other=plan_rows) // plan_rows
        place = (block - first_block) // per_tile
        count = (end_block - first_block + per_tile - 1) // per_tile
        start = place // GROUP_M * GROUP_M
        size = gl.minimum(count - start, GROUP_M)
        first = m0 - place + start
        local = tile - first * n_tiles
        return first + local % size, local // size

    @gluon.jit
    def ordered_tile_coords(tile, used, n_tiles, work_ptr, block_experts_ptr, offsets_ptr,
                            valid, GROUP_M: gl.constexpr, EXPERT_GROUPS: gl.constexpr,
                            TAIL_M: gl.constexpr):
        """`expert_tile_coords` with EXPERT_GROUPS (and GROUP_M > 1), else `tile_coords`."""
        if EXPERT_GROUPS and GROUP_M > 1:
            pid_m, pid_n = expert_tile_coords(tile, n_tiles, work_ptr, block_experts_ptr,
                                              offsets_ptr, valid, GROUP_M, TAIL_M)
        else:
            pid_m, pid_n = tile_coords(tile, used, n_tiles, GROUP_M)
        return pid_m, pid_n

    @gluon.jit
    def stage_ring(NUM_BUFFERS: gl.constexpr, READY_ARRIVALS: gl.constexpr):
        """The ring's barriers per stage: `ready` (the producer's expected TMA bytes, and
        READY_ARRIVALS arrivals in all) and `empty` (one release by each of the two math
        warpgroups)."""
        ready = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_BUFFERS):
            mbarrier.init(ready.index(i), count=READY_ARRIVALS)
            mbarrier.init(empty.index(i), count=2)
        return ready, empty

    @gluon.jit
    def release_steps(ready, empty, counter, K, BLOCK_K: gl.constexpr,
                      NUM_BUFFERS: gl.constexpr):
        """An idle math warpgroup (a tail tile's second half): release each K step's stage
        as it lands, so the producer can refill it. Returns the step counter."""
        for _ in range(0, K, BLOCK_K):
            index = counter % NUM_BUFFERS
            mbarrier.wait(ready.index(index), (counter // NUM_BUFFERS) & 1)
            mbarrier.arrive(empty.index(index), count=1)
            counter += 1
        return counter

    @gluon.jit
    def program_tiles(total, CHUNK: gl.constexpr):
        """This program's tiles of `total` as `range` arguments (first, end, step): CHUNK 0,
        persistent, every num_programs-th from its id; else CHUNK consecutive tiles from
        id · CHUNK (`schedule`), so that programs the hardware starts in order keep
        neighbouring tiles together while a program's own tiles still overlap each other's
        loads and epilogues."""
        if CHUNK:
            first = gl.program_id(0) * CHUNK
            end = gl.minimum(first + CHUNK, total)
            step = 1
        else:
            first = gl.program_id(0)
            end = total
            step = gl.num_programs(0)
        return first, end, step

    @gluon.jit
    def tiles_in_use(work_ptr, num_work, TAIL_M: gl.constexpr):
        """Row tiles in use, counted on the GPU: the work list's length (stored after it),
        or the plan's padded rows (`expert_offsets[E]`) over _TILE_M."""
        total = gl.load(work_ptr + num_work)
        if not TAIL_M:
            total = total // _TILE_M
        return total

    @gluon.jit
    def paired_mainloop(a_bufs, x_bufs, y_bufs, ready, empty, counter, K,
                        A_START: gl.constexpr, X_START: gl.constexpr, Y_START: gl.constexpr,
                        WIDTH: gl.constexpr, NUM_BUFFERS: gl.constexpr,
                        A_BY_CP_ASYNC: gl.constexpr):
        """A 16-bit math warpgroup's two products over K: A rows [A_START, +64) of each
        stage against B rows [X_START, +WIDTH) of `x_bufs` and [Y_START, +WIDTH) of
        `y_bufs` (GEMM1: gate and up; GEMM2: two column halves). Both MMAs of a K step
        accumulate in place and stay in flight while the next step's are issued; a stage
        is released once both MMAs that read it have retired. Returns (x, y, counter)."""
        BLOCK_K: gl.constexpr = a_bufs.shape[2]
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, WIDTH, 16])
        acc_x = gl.zeros((_HALF_M, WIDTH), dtype=gl.float32, layout=layout)
        acc_y = gl.zeros((_HALF_M, WIDTH), dtype=gl.float32, layout=layout)
        for k in range(0, K, BLOCK_K):
            index = counter % NUM_BUFFERS
            mbarrier.wait(ready.index(index), (counter // NUM_BUFFERS) & 1)
            if A_BY_CP_ASYNC:
                fence_async_shared()  # cp.async wrote A through the generic proxy
            a = a_bufs.index(index).slice(A_START, _HALF_M, dim=0)
            x = x_bufs.index(index).slice(X_START, WIDTH, dim=0).permute((1, 0))
            y = y_bufs.index(index).slice(Y_START, WIDTH, dim=0).permute((1, 0))
            acc_x = warpgroup_mma(a, x, acc_x, is_async=True)
            acc_y = warpgroup_mma(a, y, acc_y, is_async=True)
            # This step's two MMAs stay in flight; the previous step's have retired.
            acc_x, acc_y = warpgroup_mma_wait(num_outstanding=2, deps=(acc_x, acc_y))
            if k > 0:
                mbarrier.arrive(empty.index((counter - 1) % NUM_BUFFERS), count=1)
            counter += 1
        acc_x, acc_y = warpgroup_mma_wait(num_outstanding=0, deps=(acc_x, acc_y))
        mbarrier.arrive(empty.index((counter - 1) % NUM_BUFFERS), count=1)
        return acc_x, acc_y, counter
