"""Experiment: GEMM2 of the prefill path as a Gluon grouped GEMM (Hopper TMA + wgmma).

The 16-bit prefill GEMMs are Triton kernels at ~57–68% of the bf16 peak on qwen3 M = 4096
(bench/NOTES.md, fp8 prefill: GEMM1 443 µs, GEMM2 261 on an H100), fp8's at 32–35% of
the fp8 peak; Triton 3.6 does not partition their loops into warp-specialised producers
and consumers. Gluon (`triton.experimental.gluon`) writes the schedule by hand. Two
kernels, both persistent over (128-row block, column tile) tiles:

    grouped_gemm_kernel      one warp group set: TMA loads into a ring of shared-memory
                             stages (one mbarrier each), asynchronous `warpgroup_mma` with
                             one group in flight, loads two stages ahead
    grouped_gemm_ws_kernel   warp-specialised: a producer warpgroup only issues TMA loads;
                             two math warpgroups each multiply one 64-row half of the same
                             stage and store their half; fp8 promoted per stage

    inter [capacity, I] (plan order: each 128-row block one expert's rows) × w2[e]ᵀ
        ─► out [capacity, H] bf16 in plan order (TMA store; the scatter to pair rows, bias
           and router weight of `_gemm2_kernel`'s epilogue are left out here)

Against, in the same run: the library's bf16 GEMM2 (`moekit.experts.launch_gemm2`, with
its scatter epilogue) on the same plan, and a dense 8192³ product (torch.matmul, or
torch._scaled_mm for fp8) as the peak. Correctness: up to 16 sampled blocks against
float32 products of the same (cast) values.

    PYTHONPATH=src python3 bench/scripts/gluon_grouped_gemm_experiment.py --out $OUT [--dtype fp8]
    PYTHONPATH=src python3 bench/scripts/gluon_grouped_gemm_experiment.py --compile-only
        (on a CPU: compiles every tile for sm_90 through ptxas and prints its resources)
"""

from __future__ import annotations

import argparse
import json
import os
from typing import NamedTuple

import torch
import triton
from fp8_kernel_profile import kernel_blocks_us  # this directory: per-kernel µs by block
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

import moekit._replay

moekit._replay.enabled = False  # this script patches what the ops read: no replays


@gluon.jit
def _load_stage(counter, a_desc, b_desc, off_m, b_row, k, bars, a_bufs, b_bufs,
                NUM_BUFFERS: gl.constexpr):
    """TMA loads of one K step's A and B tiles into stage counter % NUM_BUFFERS."""
    index = counter % NUM_BUFFERS
    bar = bars.index(index)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, k], bar, a_bufs.index(index))
    tma.async_copy_global_to_shared(b_desc, [b_row, k], bar, b_bufs.index(index))
    return counter + 1


@gluon.jit
def _mma_stage(counter, acc, bars, a_bufs, b_bufs, NUM_BUFFERS: gl.constexpr,
               FIRST: gl.constexpr):
    """Wait for stage counter % NUM_BUFFERS, retire the previous MMA (none when FIRST:
    `acc` is then the zero tensor), issue this one asynchronously."""
    index = counter % NUM_BUFFERS
    mbarrier.wait(bars.index(index), (counter // NUM_BUFFERS) & 1)
    if not FIRST:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    acc = warpgroup_mma(a_bufs.index(index), b_bufs.index(index).permute((1, 0)), acc,
                        use_acc=not FIRST, is_async=True)
    return counter + 1, acc


@gluon.jit
def grouped_gemm_kernel(a_desc, b_desc, c_desc, block_experts_ptr, num_blocks, num_experts, N,
                        K, NUM_BUFFERS: gl.constexpr, num_warps: gl.constexpr):
    """Persistent: program p computes output tiles p, p + P, …, tile t = (row block
    t // (N / BLOCK_N), column tile t % (N / BLOCK_N)); a row block's expert from
    `block_experts` (blocks with an id outside [0, E) are skipped). The stage ring and its
    counters carry across tiles, so the barriers' phases stay in step."""
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    PREFETCH: gl.constexpr = NUM_BUFFERS - 2  # a stage is reloaded two MMAs after its use
    dtype: gl.constexpr = a_desc.dtype
    gl.static_assert(NUM_BUFFERS >= 3, "at least three stages")

    a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + a_desc.block_type.shape,
                                       a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                       b_desc.layout)
    c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.init(bars.index(i), count=1)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1],
        instr_shape=[16, BLOCK_N, 256 // dtype.primitive_bitwidth])
    n_tiles = N // BLOCK_N
    k_steps = gl.cdiv(K, BLOCK_K)
    loaded = 0
    used = 0
    for tile in range(gl.program_id(0), num_blocks * n_tiles, gl.num_programs(0)):
        block, col_tile, expert, valid = _tile_work(tile, n_tiles, block_experts_ptr,
                                                    num_experts)
        if valid:
            off_m = block * BLOCK_M
            off_n = col_tile * BLOCK_N
            b_row = expert * N + off_n
            for i in gl.static_range(PREFETCH + 1):
                if i < k_steps:
                    loaded = _load_stage(loaded, a_desc, b_desc, off_m, b_row, i * BLOCK_K,
                                         bars, a_bufs, b_bufs, NUM_BUFFERS)
            # Step 0 outside the loop: the loop carries an in-flight MMA's accumulator.
            zeros = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            used, acc = _mma_stage(used, zeros, bars, a_bufs, b_bufs, NUM_BUFFERS, True)
            for step in range(1, k_steps):
                if step + PREFETCH < k_steps:
                    loaded = _load_stage(loaded, a_desc, b_desc, off_m, b_row,
                                         (step + PREFETCH) * BLOCK_K, bars, a_bufs, b_bufs,
                                         NUM_BUFFERS)
                used, acc = _mma_stage(used, acc, bars, a_bufs, b_bufs, NUM_BUFFERS, False)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
            c_smem.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_smem)
    tma.store_wait(pendings=0)
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _tile_work(tile, n_tiles, block_experts_ptr, num_experts):
    """Tile → (row block, column tile, the block's expert, whether it is one to compute)."""
    block = tile // n_tiles
    expert = gl.load(block_experts_ptr + block)
    return block, tile - block * n_tiles, expert, (expert >= 0) & (expert < num_experts)


@gluon.jit
def _ws_tiles(N, num_blocks, BLOCK_N: gl.constexpr):
    """The persistent tile range both partitions walk: (first, end, step, column tiles)."""
    n_tiles = N // BLOCK_N
    return gl.program_id(0), num_blocks * n_tiles, gl.num_programs(0), n_tiles


@gluon.jit
def _ws_producer(a_desc, b_desc, block_experts_ptr, num_blocks, num_experts, N, K, a_bufs,
                 b_bufs, ready, empty, NUM_BUFFERS: gl.constexpr):
    """The producer warpgroup: TMA loads of every K step of every tile into the ring,
    each stage reloaded once both consumers have released it."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    first, end, step, n_tiles = _ws_tiles(N, num_blocks, BLOCK_N)
    counter = 0
    for tile in range(first, end, step):
        block, col_tile, expert, valid = _tile_work(tile, n_tiles, block_experts_ptr,
                                                    num_experts)
        if valid:
            b_row = expert * N + col_tile * BLOCK_N
            for k in range(0, K, BLOCK_K):
                index = counter % NUM_BUFFERS
                # A fresh barrier is in phase 0: waiting for parity 1 passes at once.
                mbarrier.wait(empty.index(index), ((counter // NUM_BUFFERS) & 1) ^ 1)
                bar = ready.index(index)
                mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [block * BLOCK_M, k], bar,
                                                a_bufs.index(index))
                tma.async_copy_global_to_shared(b_desc, [b_row, k], bar, b_bufs.index(index))
                counter += 1


@gluon.jit
def _ws_consumer(c_desc, block_experts_ptr, num_blocks, num_experts, N, K, a_bufs, b_bufs,
                 ready, empty, c_bufs, NUM_BUFFERS: gl.constexpr, CONSUMER: gl.constexpr,
                 BLOCK_K: gl.constexpr, INSTR_K: gl.constexpr, PROMOTE: gl.constexpr):
    """One math warpgroup: rows [CONSUMER·64, +64) of every tile — wgmma on its slice of
    the shared A stage, the stage released after the MMA retires — then its own epilogue
    (TMA store from its own buffer). PROMOTE (fp8): each stage's product into a fresh
    accumulator, added in fp32 (Hopper's fp8 MMA accumulates at reduced precision)."""
    HALF_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    dtype: gl.constexpr = c_desc.dtype
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, INSTR_K])
    zeros = gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
    c_smem = c_bufs.index(CONSUMER)
    first, end, step, n_tiles = _ws_tiles(N, num_blocks, BLOCK_N)
    counter = 0
    for tile in range(first, end, step):
        block, col_tile, _, valid = _tile_work(tile, n_tiles, block_experts_ptr, num_experts)
        if valid:
            acc = gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
            for k in range(0, K, BLOCK_K):
                index = counter % NUM_BUFFERS
                mbarrier.wait(ready.index(index), (counter // NUM_BUFFERS) & 1)
                a = a_bufs.index(index).slice(CONSUMER * HALF_M, HALF_M, dim=0)
                b = b_bufs.index(index).permute((1, 0))
                if PROMOTE:
                    part = warpgroup_mma(a, b, zeros, use_acc=False, is_async=True)
                    acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(part,))
                else:
                    acc = warpgroup_mma(a, b, acc, use_acc=k > 0, is_async=True)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                mbarrier.arrive(empty.index(index), count=1)
                counter += 1
            tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
            c_smem.store(acc.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(
                c_desc, [block * 2 * HALF_M + CONSUMER * HALF_M, col_tile * BLOCK_N], c_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def grouped_gemm_ws_kernel(a_desc, b_desc, c_desc, block_experts_ptr, num_blocks, num_experts,
                           N, K, NUM_BUFFERS: gl.constexpr, PROMOTE: gl.constexpr,
                           num_warps: gl.constexpr):
    """`grouped_gemm_kernel`'s work, warp-specialised: this program's own warpgroup
    (num_warps = 4) only issues TMA loads; two more warpgroups, with most of the
    registers, each multiply one 64-row half of every 128-row A stage by the same B stage
    (so each stage is loaded once for both) and store their half. A stage's `empty`
    barrier counts both consumers' releases."""
    gl.static_assert(num_warps == 4, "the producer is one warpgroup")
    dtype: gl.constexpr = a_desc.dtype
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + a_desc.block_type.shape,
                                       a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS] + b_desc.block_type.shape,
                                       b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape,
                                       c_desc.layout)
    INSTR_K: gl.constexpr = 256 // dtype.primitive_bitwidth
    ready = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_BUFFERS):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    gl.warp_specialize(
        [(_ws_producer, (a_desc, b_desc, block_experts_ptr, num_blocks, num_experts, N, K,
                         a_bufs, b_bufs, ready, empty, NUM_BUFFERS)),
         (_ws_consumer, (c_desc, block_experts_ptr, num_blocks, num_experts, N, K, a_bufs,
                         b_bufs, ready, empty, c_bufs, NUM_BUFFERS, 0, BLOCK_K, INSTR_K,
                         PROMOTE)),
         (_ws_consumer, (c_desc, block_experts_ptr, num_blocks, num_experts, N, K, a_bufs,
                         b_bufs, ready, empty, c_bufs, NUM_BUFFERS, 1, BLOCK_K, INSTR_K,
                         PROMOTE))],
        [4, 4], [232, 232])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16,
              torch.float8_e4m3fn: gl.float8e4nv}


class Tiles(NamedTuple):
    """A kernel and its tiles; each within sm_90's 227 KB of shared memory."""

    block_m: int
    block_n: int
    block_k: int
    stages: int
    warps: int  # the plain kernel's; the warp-specialised one's producer: 4
    ws: bool = False  # `grouped_gemm_ws_kernel`
    promote: bool = False  # fp8: each stage's product added in fp32 (ws only)

    def name(self) -> str:
        kind = ("_ws" if self.ws else "") + ("_promoted" if self.promote else "")
        return f"{self.block_m}x{self.block_n}x{self.block_k}_s{self.stages}{kind}"


BF16_TILES = [Tiles(128, 256, 64, 3, 8), Tiles(128, 128, 64, 4, 8), Tiles(128, 128, 64, 5, 8),
              Tiles(128, 128, 128, 3, 8), Tiles(128, 256, 64, 3, 4, True),
              Tiles(128, 128, 64, 5, 4, True), Tiles(128, 128, 64, 6, 4, True)]
FP8_TILES = [Tiles(128, 128, 128, 4, 4, True, True), Tiles(128, 128, 128, 5, 4, True, True),
             Tiles(128, 256, 128, 3, 4, True, False)]


def descriptors(inter, w2, out, tiles: Tiles):
    """TMA descriptors of A (inter), B (w2 as [E·H, I]) and C (out, in tiles of block_m
    rows, or of half that for the warp-specialised kernel's two consumers)."""
    num_experts, hidden, inter_size = w2.shape
    bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
    c_rows = bm // 2 if tiles.ws else bm
    layout = lambda shape, t: gl.NVMMASharedLayout.get_default_for(shape, _GL_DTYPES[t.dtype])
    w2_rows = w2.view(num_experts * hidden, inter_size)
    return (TensorDescriptor.from_tensor(inter, [bm, bk], layout([bm, bk], inter)),
            TensorDescriptor.from_tensor(w2_rows, [bn, bk], layout([bn, bk], w2)),
            TensorDescriptor.from_tensor(out, [c_rows, bn], layout([c_rows, bn], out)))


def _kernel_and_options(tiles: Tiles):
    if tiles.ws:
        return grouped_gemm_ws_kernel, {"NUM_BUFFERS": tiles.stages, "PROMOTE": tiles.promote,
                                        "num_warps": 4}
    return grouped_gemm_kernel, {"NUM_BUFFERS": tiles.stages, "num_warps": tiles.warps}


def launch(inter, w2, out, block_experts, num_blocks, tiles: Tiles, programs):
    """One kernel over `num_blocks` 128-row blocks of `inter`."""
    num_experts, hidden, inter_size = w2.shape
    assert hidden % tiles.block_n == 0, "column tiles must not cross experts in w2's rows"
    kernel, options = _kernel_and_options(tiles)
    kernel[(programs,)](*descriptors(inter, w2, out, tiles), block_experts, num_blocks,
                        num_experts, hidden, inter_size, **options)


def compile_only() -> None:
    """Compile every tile for sm_90 on a machine without a GPU (Triton's bundled ptxas)."""
    E, H, I, rows = 4, 1024, 768, 512
    block_experts = torch.zeros(rows // 128, dtype=torch.int32)
    for dtype, tile_list in ((torch.bfloat16, BF16_TILES), (torch.float8_e4m3fn, FP8_TILES)):
        inter = torch.zeros(rows, I, dtype=dtype)
        w2 = torch.zeros(E, H, I, dtype=dtype)
        out = torch.zeros(rows, H, dtype=torch.bfloat16)
        for tiles in tile_list:
            fn, options = _kernel_and_options(tiles)
            report = compile_sm90(fn, (*descriptors(inter, w2, out, tiles), block_experts,
                                       rows // 128, E, H, I), options)
            print(f"{str(dtype)[6:]} {tiles.name()}: {report}", flush=True)


def compile_sm90(fn, args, options) -> str:
    """Bind and compile one Gluon launch for sm_90 as `fn[grid](*args, **options)` would on
    an H100, without a GPU; returns its shared memory, wgmma/TMA counts and ptxas usage."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = {**options, "debug": False}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, options, bound,
                                                       specialization, opts)
    kernel = triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=target,
                            options=opts.__dict__)
    ptx = kernel.asm["ptx"]
    return (f"shared {kernel.metadata.shared} B, wgmma {ptx.count('wgmma.mma_async')}, tma "
            f"copies {ptx.count('cp.async.bulk.tensor')}; ptxas: {_ptxas_usage(ptx)}")


def profiled_kernel_us(call, kernel: str, calls: int = 10) -> float:
    """CUDA time per call of the kernel named `kernel` inside `call` (torch.profiler,
    after three warm-up calls)."""
    times = kernel_blocks_us(call, 1, calls).get(kernel)
    if not times:
        raise RuntimeError(f"no {kernel} in the profile")
    return times[0]


def record(row: dict, out_dir: str, filename: str) -> None:
    """Stamp a measured row with the device and commit, print it, append it to a file."""
    row.update(device=torch.cuda.get_device_name(),
               git_commit=os.environ.get("MOEKIT_GIT_COMMIT"))
    print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir, filename), "a") as f:
        f.write(json.dumps(row) + "\n")


def _ptxas_usage(ptx: str) -> str:
    """ptxas -v's register and spill lines for this PTX on sm_90a."""
    import subprocess
    import tempfile

    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([knobs.nvidia.ptxas.path, "-v", "-arch=sm_90a", src, "-o",
                                 os.path.join(tmp, "kernel.o")], capture_output=True,
                                text=True, check=True).stderr
    lines = [line.split("ptxas info    : ")[-1] for line in report.splitlines()
             if "registers" in line or "spill" in line]
    return "; ".join(lines)


def check(out, inter, w2, experts, num_blocks, block_m=128) -> float:
    """Worst relative error of up to 16 sampled row blocks against float32 products."""
    err, ids = 0.0, experts.cpu().tolist()
    for blk in range(0, num_blocks, max(1, num_blocks // 16)):
        if 0 <= ids[blk] < w2.shape[0]:
            rows = slice(blk * block_m, (blk + 1) * block_m)
            ref = inter[rows].float() @ w2[ids[blk]].float().T
            err = max(err, ((out[rows].float() - ref).norm() / ref.norm()).item())
    return err


def time_cell(preset, m, w2, dtype, rep_ms) -> dict:
    """One preset and token count: the library's bf16 GEMM2 and each Gluon tile of `dtype`
    on one plan (fp8: inter and w2 cast to e4m3, unit scales; checked against float32
    products of the fp8 values)."""
    from moekit._tma import persistent_programs
    from moekit.bench.inputs import make_tokens
    from moekit.bench.timing import graph_replay_us
    from moekit.dispatch import dispatch_plan
    from moekit.experts import launch_gemm2
    from moekit.tuning import default_config

    device = w2.device
    E, H, I = w2.shape
    _, topk = make_tokens(preset, m, torch.bfloat16, device)
    plan = dispatch_plan(topk.ids, E, 128, backend="triton")
    num_blocks = plan.capacity // 128
    inter = torch.randn(plan.capacity, I, device=device, dtype=torch.bfloat16)
    out = torch.full((plan.capacity, H), float("nan"), device=device, dtype=torch.bfloat16)
    experts = plan.block_experts[:num_blocks].to(torch.int32).contiguous()
    weights = topk.weights.float().contiguous()
    flops = 2.0 * m * preset.top_k * H * I
    programs = persistent_programs(device)
    tiles2 = default_config(m, E, preset.top_k, H, I).as_ints()[6:11]
    library_us = graph_replay_us(
        lambda: launch_gemm2(inter, w2, None, weights, plan, True, tiles2, True), rep_ms)
    row = {"preset": preset.name, "M": m, "E": E, "H": H, "I": I, "blocks": num_blocks,
           "dtype": "fp8" if dtype == torch.float8_e4m3fn else "bf16",
           "library_bf16_us": round(library_us, 2),
           "library_bf16_tflops": round(flops / library_us / 1e6, 1)}
    a, b = inter.to(dtype), w2.to(dtype)
    for tiles in FP8_TILES if dtype == torch.float8_e4m3fn else BF16_TILES:
        key = tiles.name()
        call = lambda t=tiles: launch(a, b, out, experts, num_blocks, t, programs)
        try:
            call()
            torch.cuda.synchronize()
            row[f"gluon_{key}_rel_err"] = check(out, a, b, experts, num_blocks)
            us = graph_replay_us(call, rep_ms)
            row[f"gluon_{key}_us"] = round(us, 2)
            row[f"gluon_{key}_tflops"] = round(flops / us / 1e6, 1)
        except Exception as exc:  # a tile that does not compile or fit: recorded
            row[f"gluon_{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def dense_peak_tflops(dtype, rep_ms) -> float:
    """A dense 8192³ product's rate: torch.matmul (bf16) or torch._scaled_mm (fp8)."""
    from moekit.bench.timing import graph_replay_us

    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    if dtype == torch.float8_e4m3fn:
        q, one = x.to(dtype), torch.ones((), device="cuda")
        call = lambda: torch._scaled_mm(q, q.t(), one, one, out_dtype=torch.bfloat16)
    else:
        call = lambda: x @ x
    return round(2 * 8192 ** 3 / graph_replay_us(call, rep_ms) / 1e6, 1)


def measure(args) -> None:
    from moekit.bench.presets import PRESETS

    device = torch.device("cuda")
    dtype = torch.float8_e4m3fn if args.dtype == "fp8" else torch.bfloat16
    peak = dense_peak_tflops(dtype, args.rep_ms)
    for name in args.presets:
        preset = PRESETS[name]
        w2 = (torch.randn(preset.num_experts, preset.hidden, preset.inter, device=device,
                          dtype=torch.bfloat16) * preset.inter ** -0.5)
        for m in args.tokens:
            row = time_cell(preset, m, w2, dtype, args.rep_ms)
            row["dense_8192_tflops"] = peak
            record(row, args.out, "gluon-grouped-gemm-experiment.jsonl")
        del w2
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--rep-ms", type=float, default=50)
    parser.add_argument("--presets", nargs="+", default=["qwen3-30b-a3b", "mixtral-8x7b"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--dtype", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--compile-only", action="store_true")
    args = parser.parse_args()
    if args.compile_only:
        compile_only()
    else:
        measure(args)


if __name__ == "__main__":
    main()
