"""Experiment: GEMM2's per-pair rows and the combine pass, against adding each row into
its token's float32 row with atomics.

At prefill the plan path writes one bf16 row per pair from GEMM2 ([capacity, H], plan
order) and `_combine_kernel` reads them back, k per token: at qwen3 M = 4096 that is
134 MB written and read again, the combine 54 µs of the bf16 layer's 693 (session 48's
stage breakdown) and ~10% of the fp8 layer's 478; at granite M = 16384 403 MB. The
alternative (issue 3's "combine fused into GEMM2"): GEMM2's epilogue adds its weighted
rows into a zeroed float32 [M, H] (`red.add.f32`: L2 resolves them; 33.5 MB at qwen3
M = 4096 fits in L2), and one pass casts it to the output dtype. Not deterministic (the
adds' order varies), so the combine would stay as the deterministic mode.

A deterministic variant: store and combine by column slabs (each slab's combine right
after its rows, while they are in L2), as a GEMM2 in column-slab order could fold the
combine in behind each slab.

This times the epilogue's memory traffic alone, without GEMM2's math: a kernel writes
synthetic weighted [64, 128] tiles (the Gluon GEMM2's per-warpgroup tile) in plan order,
either stored as bf16 rows (today) or added with float32 atomics into token rows
(`tl.atomic_add`, scalar `atom.add.f32` in Triton 3.6's sm_90 PTX; or 2 and 4 columns an
instruction, `red.global.add.v2/v4.f32`, sm_90's vector reductions, through inline PTX in
a Gluon kernel whose layout gives each thread 4 consecutive columns), or with bf16
atomics into the output (precision lost per add: reported only). Each stage and each
whole variant is captured in a CUDA graph and replayed with L2 emptied before each
replay (`graph_replay_us`); the outputs are compared (max abs difference against the
combine's), and the atomic variant is run twice to count the bf16 elements whose value
changes with the adds' order.

    PYTHONPATH=src python3 bench/scripts/combine_atomics_experiment.py --out $OUT
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

import moekit
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.experts import launch_combine

CELLS = [("qwen3-30b-a3b", 4096), ("qwen3-30b-a3b", 16384), ("olmoe-1b-7b", 4096),
         ("granite-3.0-3b-a800m", 16384), ("gpt-oss-120b", 8192), ("deepseek-v3", 8192)]
BLOCK_M, BLOCK_N = 64, 128
STORE, ATOMIC_F32, ATOMIC_BF16 = 0, 1, 2


@triton.jit
def _epilogue_kernel(sorted_pairs_ptr, topk_weights_ptr, pair_out_ptr, out_ptr, num_pairs, H,
                     stride_row, col0, TOP_K: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of plan slots × columns (of H columns from col0, rows
    stride_row apart): a synthetic value times the pair's router weight, stored to
    pair_out (STORE) or added into the token's row of out (ATOMIC_F32 / ATOMIC_BF16)."""
    slots = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    pairs = tl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    weights = tl.load(topk_weights_ptr + tl.where(row_ok, pairs, 0), mask=row_ok, other=0.0)
    value = ((slots[:, None] * 7 + col0 + cols[None, :]) % 61).to(tl.float32) * 0.01 - 0.3
    value = value * weights[:, None]
    if MODE == 0:
        tl.store(pair_out_ptr + slots.to(tl.int64)[:, None] * stride_row + cols[None, :],
                 value.to(pair_out_ptr.dtype.element_ty), mask=col_ok[None, :])
    else:
        tokens = (tl.where(row_ok, pairs, 0) // TOP_K).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_row + cols[None, :],
                      value.to(out_ptr.dtype.element_ty),
                      mask=row_ok[:, None] & col_ok[None, :], sem="relaxed")


@gluon.jit
def _vector_red_kernel(sorted_pairs_ptr, topk_weights_ptr, out_ptr, num_pairs, H, stride_om,
                       TOP_K: gl.constexpr, VEC: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """ATOMIC_F32's tile with VEC (2 or 4) consecutive columns a `red.global.add.vN.f32`,
    predicated off on padding slots (out's rows are padded to whole column tiles, so the
    columns past H add 0 there). Session 53's first form sent the padding slots' zeros to
    one scratch row instead: thousands of reductions into one row serialised, 10× slower."""
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [1, 32], [4, 1], [1, 0])
    slots = gl.program_id(0) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
    pairs = gl.load(sorted_pairs_ptr + slots)
    row_ok = pairs < num_pairs
    weights = gl.load(topk_weights_ptr + gl.where(row_ok, pairs, 0), mask=row_ok, other=0.0)
    value = ((slots[:, None] * 7 + cols[None, :]) % 61).to(gl.float32) * 0.01 - 0.3
    value = gl.where((cols < H)[None, :], value * weights[:, None], 0.0)
    rows = gl.where(row_ok, pairs // TOP_K, 0).to(gl.int64)
    addresses = (out_ptr + rows[:, None] * stride_om + cols[None, :]).to(gl.int64)
    live = gl.where(row_ok[:, None] & (cols >= 0)[None, :], 1, 0).to(gl.int32)
    if VEC == 4:
        gl.inline_asm_elementwise(
            "{\n.reg .pred p;\nsetp.ne.b32 p, $12, 0;\n"
            "@p red.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n}\n"
            "mov.b32 $0, 0;\nmov.b32 $1, 0;\nmov.b32 $2, 0;\nmov.b32 $3, 0;",
            "=r,=r,=r,=r,l,l,l,l,r,r,r,r,r,r,r,r", [addresses, value, live], dtype=gl.int32,
            is_pure=False, pack=4)
    else:
        gl.inline_asm_elementwise(
            "{\n.reg .pred p;\nsetp.ne.b32 p, $6, 0;\n"
            "@p red.global.add.v2.f32 [$2], {$4, $5};\n}\nmov.b32 $0, 0;\nmov.b32 $1, 0;",
            "=r,=r,l,l,r,r,r,r", [addresses, value, live], dtype=gl.int32, is_pure=False,
            pack=2)


def vector_red(vec: int, plan, weights, out_padded, top_k: int, hidden: int) -> None:
    _vector_red_kernel[(plan.sorted_pairs.numel() // BLOCK_M, triton.cdiv(hidden, BLOCK_N))](
        plan.sorted_pairs, weights, out_padded, plan.num_pairs, hidden, out_padded.stride(0),
        TOP_K=top_k, VEC=vec, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)


def epilogue(mode: int, plan, weights, pair_out, out, top_k: int, col0: int = 0) -> None:
    """`_epilogue_kernel` over pair_out's (STORE) or out's columns — a column slab's view
    starting at column col0 of the whole rows."""
    capacity = plan.sorted_pairs.numel()
    rows = pair_out if mode == STORE else out
    _epilogue_kernel[(capacity // BLOCK_M, triton.cdiv(rows.shape[1], BLOCK_N))](
        plan.sorted_pairs, weights, pair_out, out, plan.num_pairs, rows.shape[1],
        rows.stride(0), col0, TOP_K=top_k, MODE=mode, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        num_warps=4)


def cell(name: str, m: int) -> dict:
    preset = PRESETS[name]
    k, hidden, experts = preset.top_k, preset.hidden, preset.num_experts
    _, topk = make_tokens(preset, m, torch.bfloat16, torch.device("cuda"))
    plan = moekit.dispatch_plan(topk.ids, experts, 128, tile_m=None)
    weights = topk.weights.reshape(-1).contiguous()
    pair_out = torch.empty((plan.sorted_pairs.numel(), hidden), dtype=torch.bfloat16,
                           device="cuda")
    out = torch.empty((m, hidden), dtype=torch.bfloat16, device="cuda")
    out32 = torch.empty((m, hidden), dtype=torch.float32, device="cuda")
    out16 = torch.empty_like(out)
    # The vector reductions' float32 rows, padded to whole column tiles.
    out32p = torch.empty((m, triton.cdiv(hidden, BLOCK_N) * BLOCK_N), dtype=torch.float32,
                         device="cuda")

    def store() -> None:
        epilogue(STORE, plan, weights, pair_out, None, k)

    def combine() -> None:
        launch_combine(pair_out, topk.ids, experts, out, plan.pair_slots)

    def atomics() -> None:
        epilogue(ATOMIC_F32, plan, weights, None, out32, k)

    def cast() -> None:
        out16.copy_(out32)

    def by_slabs(width: int) -> None:
        """Each column slab stored, then combined while its pair rows are in L2: what a
        GEMM2 in column-slab order with the combine folded in behind each slab would read."""
        for col0 in range(0, hidden, width):
            epilogue(STORE, plan, weights, pair_out[:, col0:col0 + width], None, k, col0)
            launch_combine(pair_out[:, col0:col0 + width], topk.ids, experts,
                           out[:, col0:col0 + width], plan.pair_slots)

    def cast_padded() -> None:
        out16.copy_(out32p[:m, :hidden])

    def atomics_bf16() -> None:
        out16.zero_()
        epilogue(ATOMIC_BF16, plan, weights, None, out16, k)

    stages = {
        "store": store, "combine": combine,
        "store+combine": lambda: (store(), combine()),
        "store+combine by 256-column slabs": lambda: by_slabs(256),
        "store+combine by 128-column slabs": lambda: by_slabs(128),
        "zero": out32.zero_, "atomic": atomics, "cast": cast,
        "zero+atomic+cast": lambda: (out32.zero_(), atomics(), cast()),
        "atomic v2": lambda: vector_red(2, plan, weights, out32p, k, hidden),
        "atomic v4": lambda: vector_red(4, plan, weights, out32p, k, hidden),
        "zero+atomic v4+cast": lambda: (out32p.zero_(),
                                        vector_red(4, plan, weights, out32p, k, hidden),
                                        cast_padded()),
        "zero+atomic v2+cast": lambda: (out32p.zero_(),
                                        vector_red(2, plan, weights, out32p, k, hidden),
                                        cast_padded()),
        "atomic_bf16 (zeroed)": atomics_bf16,
    }
    row = dict(preset=name, M=m, top_k=k, H=hidden,
               pair_rows_MB=round(plan.num_pairs * hidden * 2 / 1e6, 1),
               token_rows_f32_MB=round(m * hidden * 4 / 1e6, 1))
    for label, fn in stages.items():
        row[f"{label} µs"] = round(graph_replay_us(fn), 2)
    # Outputs: the combine's against the atomics' (one more run each, outside the graphs).
    by_slabs(256)
    slabs = out.clone()
    store(), combine()
    row["slabs bitwise the combine's"] = bool(torch.equal(slabs, out))
    out32.zero_(), atomics(), cast()
    first = out16.clone()
    row["max |combine − atomic|"] = float((out.float() - first.float()).abs().max())
    out32.zero_(), atomics(), cast()
    row["bf16 elements changed between atomic runs"] = int((out16 != first).sum())
    for vec in (2, 4):
        out32p.zero_(), vector_red(vec, plan, weights, out32p, k, hidden), cast_padded()
        row[f"max |combine − atomic v{vec}|"] = float((out.float() - out16.float()).abs().max())
    atomics_bf16()
    row["max |combine − atomic_bf16|"] = float((out.float() - out16.float()).abs().max())
    row["speedup (store+combine ÷ zero+atomic+cast)"] = round(
        row["store+combine µs"] / row["zero+atomic+cast µs"], 3)
    for vec in (2, 4):
        row[f"speedup (store+combine ÷ zero+atomic v{vec}+cast)"] = round(
            row["store+combine µs"] / row[f"zero+atomic v{vec}+cast µs"], 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--cells", nargs="*", help="preset:M (default: CELLS)")
    args = parser.parse_args()
    cells = ([(c.split(":")[0], int(c.split(":")[1])) for c in args.cells] if args.cells
             else CELLS)
    rows = []
    for name, m in cells:
        rows.append(cell(name, m))
        print(rows[-1], flush=True)
    table = rows_table(rows, list(rows[0]))
    write_experiment(
        args.out, "combine-atomics-experiment", experiment_meta(), rows,
        "GEMM2's per-pair rows + combine against float32 atomics into token rows",
        ["- the epilogue's traffic alone (synthetic [64, 128] tiles, no GEMM math); each "
         "stage graph-replayed alone, L2 emptied before each replay (~5 µs floor each)",
         "- the slab stages launch two kernels a slab (~1–2 µs each in a graph), which a "
         "GEMM2 folding the combine in would not"],
        table)


if __name__ == "__main__":
    main()
