"""Permute and unpermute: move token rows into the plan's grouped layout and back.

    hidden [M, H] ──permute──► grouped [capacity, H]      slot s holds hidden[pair // k]
                               (run of each expert, padded to block_m: `DispatchPlan`)
    grouped [capacity, H] ──unpermute──► out [M, H]       out[m] = Σ_j w[m, j] · grouped[slot(m, j)]

The layout is the `DispatchPlan` the grouped GEMMs use, so there is one description of
which rows go to which expert. A consumer between the two (an expert computation that
reads contiguous per-expert rows, a quantiser, an all-to-all) sees each expert's rows
back to back. Decisions:

- Padding slots inside an expert's run are written with zeros (and zero scales): a
  GEMM that computes whole block_m tiles without masking rows then reads finite values.
  Slots past `expert_offsets[E]` belong to no block (`block_experts` is −1 there, every
  consumer skips them) and are NOT written: on the decode-to-prefill range that tail is
  up to E·(block_m − 1) rows of pure traffic.
- permute copies bits, so any 1-, 2- or 4-byte element type moves (fp8 activations
  with their per-row or per-group scales included) and the copy is exact.
- Both ops walk tokens and find slots through `plan.pair_slots`, the inverse map the
  plan builder writes alongside `sorted_pairs`: permute reads each hidden row once and
  stores it to its k slots (a slot-major gather reads it k times from DRAM at prefill),
  unpermute gathers a token's k slots. A dropped pair (id outside [0, E), or an expert
  of another rank under an `expert_map`) has slot −1 and moves nothing: permute skips
  it, unpermute reads neither its row nor its weight. The k terms are summed in slot
  order in fp32, so the result is deterministic (no atomics).
- Tiling (`row_config`) depends on (M, H, element size) only; `run_permute` /
  `run_unpermute` take an explicit one (`bench/scripts/sweep_permute.py` times them).

Each launcher is a `torch.library.custom_op` (namespace `moekit`) with a fake
implementation, so `torch.compile` traces through it; eager calls skip the dispatcher.
Nothing here reads device data or sizes an allocation by it, so both ops can be
captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from moekit import reference
from moekit._checks import check_shape, check_tensor
from moekit._intmath import cdiv, next_power_of_2
from moekit._launch import launcher
from moekit._permute_kernels import _permute_kernel, _unpermute_kernel
from moekit.backend import resolve_backend
from moekit.dispatch_plan import DispatchPlan

# Row element types permute moves (as bits) and unpermute sums (in fp32).
PERMUTE_DTYPES = (
    torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2,
)
UNPERMUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32}

_TILE_BYTES = 8192  # largest row tile per program: two 16-byte vectors per thread at 8 warps
_MIN_PROGRAMS = 512  # ≈ 4 per SM on an H100: below it, smaller tiles buy parallelism
_MAX_ROWS = 4  # tokens per program at most


_PERMUTE_TILE_BYTES = 4096  # permute's prefill tile: 4 tokens × 1 KB of each row
_PERMUTE_PREFILL_TOKENS = 4096  # from here on the sweep measured that tile best


def permute_row_config(num_tokens: int, hidden_size: int, elem_bytes: int) -> dict[str, int]:
    """permute's tiling: `row_config`, except at prefill, where 4 tokens × 1 KB tiles won.

    permute stores each loaded tile k times at scattered slots; shorter row pieces of more
    tokens per program kept more stores in flight. On an H100 (sweep_permute, M = 4096 and
    16384, `bench/results/h100-sxm-20261123-sweep-permute.json`) BLOCK_H 512 × 4 tokens ×
    4 warps was within 0.3% of the best config of every cell (79.9–91.2% of the copy
    bandwidth), against 9.5% off for the 8 KB one-token tiles unpermute prefers.
    """
    config = row_config(num_tokens, hidden_size, elem_bytes)
    if num_tokens < _PERMUTE_PREFILL_TOKENS:
        return config
    block_h = max(16 // elem_bytes, _PERMUTE_TILE_BYTES // (_MAX_ROWS * elem_bytes))
    block_h = min(block_h, next_power_of_2(max(hidden_size, 1)))
    # Two 16-byte vectors per thread: 4 warps for the 4 KB tile, as measured.
    num_warps = max(1, min(8, _MAX_ROWS * block_h * elem_bytes // (32 * 2 * 16)))
    return {"BLOCK_H": block_h, "ROWS": _MAX_ROWS, "num_warps": num_warps}


def row_config(num_tokens: int, hidden_size: int, elem_bytes: int) -> dict[str, int]:
    """BLOCK_H, ROWS (tokens per program) and warps from (M, H, element size) only.

    A [ROWS, BLOCK_H] tile is at most 8 KB. While the grid would have fewer than ~512
    programs (decode), tiles halve — down to one 16-byte vector per thread of one warp —
    so the copy is spread over more SMs. With many programs, up to 4 tokens share one
    (more bytes in flight per program, fewer programs to schedule). Every thread always
    holds whole 16-byte vectors. `bench/scripts/sweep_permute.py` times alternatives.
    """
    vec = 16 // elem_bytes
    block_h = min(next_power_of_2(max(hidden_size, 1)), _TILE_BYTES // elem_bytes)
    block_h = max(block_h, vec)
    tiles = lambda b: cdiv(hidden_size, b)  # noqa: E731
    while block_h > 32 * vec and num_tokens * tiles(block_h) < _MIN_PROGRAMS:
        block_h //= 2
    rows = 1
    while (rows < _MAX_ROWS and 2 * rows * block_h * elem_bytes <= _TILE_BYTES
           and cdiv(num_tokens, 2 * rows) * tiles(block_h) >= 8 * _MIN_PROGRAMS):
        rows *= 2
    num_warps = max(1, min(8, rows * block_h // (32 * vec)))
    return {"BLOCK_H": block_h, "ROWS": rows, "num_warps": num_warps}


def _check_plan(plan: object, device: torch.device) -> DispatchPlan:
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"plan: expected a DispatchPlan, got {type(plan).__name__}")
    check_tensor("plan.sorted_pairs", plan.sorted_pairs, ndim=1, dtypes=(torch.int32,),
                 device=device)
    if plan.pair_slots is None:
        raise ValueError(
            "plan: has no pair_slots (the pair → slot map); build it with "
            "moekit.dispatch_plan or moekit.reference.dispatch_plan"
        )
    return plan


def _check_rows_out(name: str, out: torch.Tensor, shape, dtype, device, what: str) -> None:
    check_tensor(name, out, ndim=len(shape), dtypes=(dtype,), device=device)
    check_shape(name, out, shape, what)
    if out.dim() == 2 and out.shape[1] > 1 and out.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride along the last dimension")
    if out.dim() == 1 and out.numel() > 1 and out.stride(0) != 1:
        raise ValueError(f"{name}: expected a contiguous tensor")


# ------------------------------------------------------------------------------ permute


def permute(
    hidden: torch.Tensor,
    plan: DispatchPlan,
    *,
    top_k: int,
    row_scales: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_scales: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copy each pair's token row into its plan slot: grouped[s] = hidden[sorted_pairs[s] // k].

    Args:
        hidden: [M, H] bf16/fp16/fp32/fp8 (e4m3fn, e5m2); rows copied bit for bit.
        plan: the `DispatchPlan` of the routing (with `pair_slots`), num_pairs = M·top_k.
        top_k: k, slots per token.
        row_scales: optional float32 [M] (per row) or [M, G] (per group) activation
            scales; they travel with their rows.
        out: optional [capacity, H] buffer of hidden's dtype (unit column stride).
        out_scales: optional float32 [capacity] or [capacity, G] buffer for the scales.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        (grouped [capacity, H] in hidden's dtype, grouped_scales float32 [capacity] or
        [capacity, G], or None without `row_scales`). Padding slots of an expert's run
        hold zeros (scale 0); slots past plan.expert_offsets[E] are left unwritten.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=PERMUTE_DTYPES)
    device = hidden.device
    plan = _check_plan(plan, device)
    num_tokens, hidden_size = hidden.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    if plan.num_pairs != num_tokens * top_k:
        raise ValueError(
            f"plan: built for {plan.num_pairs} pairs, but hidden has {num_tokens} tokens × "
            f"top_k {top_k} = {num_tokens * top_k}"
        )
    capacity = plan.capacity
    if row_scales is not None:
        check_tensor("row_scales", row_scales, dtypes=(torch.float32,), device=device)
        if row_scales.dim() not in (1, 2) or row_scales.shape[0] != num_tokens:
            raise ValueError(
                f"row_scales: expected shape ({num_tokens},) or ({num_tokens}, G), "
                f"got {tuple(row_scales.shape)}"
            )
    if out is None:
        out = torch.empty((capacity, hidden_size), dtype=hidden.dtype, device=device)
    else:
        _check_rows_out("out", out, (capacity, hidden_size), hidden.dtype, device,
                        "[plan capacity, H]")
    if row_scales is None:
        if out_scales is not None:
            raise ValueError("out_scales: given without row_scales")
    else:
        scales_shape = (capacity, *row_scales.shape[1:])
        if out_scales is None:
            out_scales = torch.empty(scales_shape, dtype=torch.float32, device=device)
        else:
            _check_rows_out("out_scales", out_scales, scales_shape, torch.float32, device,
                            "capacity rows of row_scales' shape")

    if resolve_backend(backend, hidden) == "reference":
        grouped, scales = reference.permute(hidden, plan, top_k=top_k, row_scales=row_scales)
        _copy_bits(out, grouped)
        if out_scales is not None:
            out_scales.copy_(scales)
        return out, out_scales
    if hidden.shape[1] > 1 and hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if row_scales is not None:
        row_scales = row_scales.contiguous()
    launch = torch.ops.moekit.permute if torch.compiler.is_compiling() else _launch_permute
    launch(hidden, plan.sorted_pairs, plan.expert_offsets, plan.pair_slots, row_scales, top_k,
           plan.block_m, out, out_scales)
    return out, out_scales


def _copy_bits(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src, through integer views (fp8 copies are not implemented everywhere)."""
    bits = _BITS[dst.element_size()]
    dst.view(bits).copy_(src.to(dst.device).view(bits))


def _launch_permute(
    hidden: torch.Tensor,
    sorted_pairs: torch.Tensor,
    expert_offsets: torch.Tensor,
    pair_slots: torch.Tensor,
    row_scales: torch.Tensor | None,
    top_k: int,
    block_m: int,
    grouped: torch.Tensor,
    grouped_scales: torch.Tensor | None,
) -> None:
    """Launch `_permute_kernel` with the heuristic's tiling (see `run_permute`)."""
    config = permute_row_config(hidden.shape[0], hidden.shape[1], hidden.element_size())
    run_permute(hidden, sorted_pairs, expert_offsets, pair_slots, row_scales, top_k, block_m,
                grouped, grouped_scales, config)


def run_permute(hidden, sorted_pairs, expert_offsets, pair_slots, row_scales, top_k, block_m,
                grouped, grouped_scales, config: dict[str, int]) -> None:
    """Launch `_permute_kernel` with an explicit `config` (BLOCK_H, ROWS, num_warps).

    Token programs first, then one program per plan block for the padding; programs of
    blocks without padding (or past the used slots) exit after one small load.
    """
    capacity = sorted_pairs.numel()
    num_tokens, hidden_size = hidden.shape
    if capacity == 0 or hidden_size == 0:
        return
    bits = _BITS[hidden.element_size()]
    block_h, rows = config["BLOCK_H"], config["ROWS"]
    has_scales = row_scales is not None
    groups = 1 if not has_scales or row_scales.dim() == 1 else row_scales.shape[1]
    grid = (cdiv(num_tokens, rows) + capacity // block_m, cdiv(hidden_size, block_h))
    launcher(_permute_kernel)[grid](
        hidden.view(bits), row_scales if has_scales else sorted_pairs,  # placeholder, never read
        pair_slots, sorted_pairs, expert_offsets, grouped.view(bits),
        grouped_scales if has_scales else sorted_pairs,  # placeholder, never written
        num_tokens, expert_offsets.numel() - 1, hidden_size, groups,
        hidden.stride(0), grouped.stride(0),
        row_scales.stride(0) if has_scales else 0,
        grouped_scales.stride(0) if has_scales else 0,
        TOP_K=top_k, ROWS=rows, BLOCK_H=block_h, BLOCK_M=block_m,
        PAD_ROWS=max(1, min(block_m, _TILE_BYTES // (block_h * hidden.element_size()))),
        BLOCK_G=next_power_of_2(groups), HAS_SCALES=has_scales,
        EVEN_H=hidden_size % block_h == 0, num_warps=config["num_warps"],
    )


_permute_op = torch.library.custom_op(
    "moekit::permute", _launch_permute, mutates_args=("grouped", "grouped_scales")
)


@_permute_op.register_fake
def _(hidden, sorted_pairs, expert_offsets, pair_slots, row_scales, top_k, block_m, grouped,
      grouped_scales):
    return None


# ---------------------------------------------------------------------------- unpermute


def unpermute(
    grouped: torch.Tensor,
    plan: DispatchPlan,
    topk_weights: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum of each token's slots: out[m] = Σ_j w[m, j] · grouped[slot of m*k + j].

    Which pairs count comes from the plan alone (`plan.pair_slots`): dropped pairs — ids
    outside [0, E), or experts of other ranks under an `expert_map` — have no slot and
    contribute nothing, so the ids need not be passed again. The k terms are summed in
    order j = 0..k−1 in fp32.

    Args:
        grouped: [capacity, H] bf16/fp16/fp32 rows in the plan's layout (unit column stride).
        plan: the `DispatchPlan` that laid `grouped` out, with `pair_slots`.
        topk_weights: [M, k] float32 (other float dtypes are converted), M·k = num_pairs.
        out: optional [M, H] buffer of grouped's dtype (unit column stride).
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        [M, H] in grouped's dtype (`out` when given).
    """
    check_tensor("grouped", grouped, ndim=2, dtypes=UNPERMUTE_DTYPES)
    device = grouped.device
    plan = _check_plan(plan, device)
    check_tensor("topk_weights", topk_weights, ndim=2, device=device)
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights: expected a float dtype, got {topk_weights.dtype}")
    num_tokens, top_k = topk_weights.shape
    hidden_size = grouped.shape[1]
    if top_k < 1 or num_tokens * top_k != plan.num_pairs:
        raise ValueError(
            f"topk_weights: expected shape (M, k) with M·k = {plan.num_pairs} (the plan's "
            f"pairs), got {tuple(topk_weights.shape)}"
        )
    check_shape("grouped", grouped, (plan.capacity, hidden_size), "[plan capacity, H]")
    if out is None:
        out = torch.empty((num_tokens, hidden_size), dtype=grouped.dtype, device=device)
    else:
        _check_rows_out("out", out, (num_tokens, hidden_size), grouped.dtype, device,
                        "[M, H] with M of topk_weights and H of grouped")
    if resolve_backend(backend, grouped) == "reference":
        return out.copy_(reference.unpermute(grouped, plan, topk_weights))
    if hidden_size > 1 and grouped.stride(1) != 1:
        grouped = grouped.contiguous()
    if topk_weights.dtype != torch.float32:
        topk_weights = topk_weights.float()
    topk_weights = topk_weights.contiguous()
    launch = torch.ops.moekit.unpermute if torch.compiler.is_compiling() else _launch_unpermute
    launch(grouped, plan.pair_slots, topk_weights, out)
    return out


def _launch_unpermute(
    grouped: torch.Tensor,
    pair_slots: torch.Tensor,
    topk_weights: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Launch `_unpermute_kernel` with the heuristic's tiling (see `run_unpermute`)."""
    config = row_config(out.shape[0], out.shape[1], grouped.element_size())
    run_unpermute(grouped, pair_slots, topk_weights, out, config)


def run_unpermute(grouped, pair_slots, topk_weights, out, config: dict[str, int]) -> None:
    """Launch `_unpermute_kernel` with an explicit `config`: one program per ROWS tokens
    and BLOCK_H columns."""
    num_tokens, top_k = topk_weights.shape
    hidden_size = out.shape[1]
    if num_tokens == 0 or hidden_size == 0:
        return
    block_h, rows = config["BLOCK_H"], config["ROWS"]
    grid = (cdiv(num_tokens, rows), cdiv(hidden_size, block_h))
    launcher(_unpermute_kernel)[grid](
        grouped, topk_weights, pair_slots, out,
        num_tokens, hidden_size, grouped.stride(0), topk_weights.stride(0), out.stride(0),
        TOP_K=top_k, ROWS=rows, BLOCK_H=block_h, EVEN_H=hidden_size % block_h == 0,
        num_warps=config["num_warps"],
    )


_unpermute_op = torch.library.custom_op(
    "moekit::unpermute", _launch_unpermute, mutates_args=("out",)
)


@_unpermute_op.register_fake
def _(grouped, pair_slots, topk_weights, out):
    return None
