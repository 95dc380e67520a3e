"""Every kernel the library launches, compiled for sm_90 (Hopper) ahead of time, on the CPU.

The interpreter (TRITON_INTERPRET=1) that runs the other tests is not type-strict, so a
kernel can pass them and still fail to compile for the GPU (a variable holding pointers
of two dtypes in two branches, a tensor-descriptor misuse, a constexpr branch never
taken on the CPU). Triton's wheel bundles ptxas, so a real sm_90 compile needs no GPU:

    case table ─► worker subprocess (TRITON_INTERPRET unset, so kernels are JITFunctions)
               ─► the public op runs on small CPU tensors with every launch recorded,
                  not run (`_recording_launches`)
               ─► each recorded launch is bound and specialised by Triton's own launch
                  path (`create_function_from_signature`, `JITFunction._pack_args`) for
                  an sm_90 target, exactly as `kernel[grid](...)` would on an H100
               ─► triton.compile → TTIR → TTGIR → LLIR → PTX → cubin (ptxas)

So the signatures, constexprs, num_warps/num_stages and launch options come from the
launchers themselves (the heuristics pick the tiles): a launcher passing an argument its
kernel does not take fails here as it would on the GPU. Two things only a GPU checks at
launch are checked too: shared memory within sm_90's 227 KB per block, and that TMA
variants really emit their instructions. And one thing only a profile would show: the
expert GEMMs' register spills (`ptxas -v` on the same PTX), which must be none — a spill
in a GEMM's K loop costs more than any tile choice gains (fp8's 128-row tiles spilled
until GEMM1 was split into column halves; bench/NOTES.md, fp8 prefill) — except the
known ones of `_KNOWN_SPILL_BYTES`, which may not grow.

Coverage is a covering set, not the cross-product (that would be hundreds of compiles):
every dtype each op accepts, every activation, every boolean constexpr both ways, the
decode (block_m 16/32), mid (64), narrow-layer and prefill (128, TMA + persistent GEMM2)
tiles, every fp8 scheme and quantisation mode. Each row says why it is there.

The workers compile in parallel (one per core, at most 4) and start when the module's
first test does; each test waits for its own case. Cold (empty TRITON_CACHE_DIR) the
module takes ~45 s on 2 cores (~75 s of compiling); with Triton's cache warm, ~4 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

import moekit
import moekit._gluon
import moekit._gluon_gemm1
import moekit._tile_order
import moekit._tma
import moekit.backend
import moekit.experts
import moekit.experts_fp8
from moekit.quant import QuantScheme, quantize_weight
from moekit.routing import Routing, router_logits
from moekit.routing.router_topk import router_topk
from moekit.tuning import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import narrow_layer, tiles_for_block_m

_SM90_SHARED_BYTES = 232448  # 227 KB: the most shared memory one block may use on sm_90
_TMA_PTX = "cp.async.bulk.tensor"
_GEMMS = ("_gemm1_kernel", "_gemm2_kernel", "_gemm1_fp8_kernel", "_gemm2_fp8_kernel",
          "_direct_gemm1_kernel", "_direct_gemm2_kernel", "_direct_gemm1_fp8_kernel",
          "_direct_gemm2_fp8_kernel", "_gemm1_ws_kernel", "_gemm2_ws_kernel",
          "_gemm1_ws16_kernel", "_gemm2_ws16_kernel")
# Spills found when this check was added (session 6), allowed at most as they are until
# fixed (bench/NOTES.md, "Next"): fp32 tiles, and one direct fp8 GEMM1 at H = 520. Rows
# of a length that is not a multiple of 16 elements (H = 1000, I = 264 or 200), whose
# loads Triton could not prove aligned and did not vectorise, spilled 0.15–4.6 KB in
# every GEMM until session 36 told it (`moekit._experts_kernels._aligned`). Preset shapes
# spill nothing.
_KNOWN_SPILL_BYTES = {
    ("experts-fp32-swigluoai-bm64-weight_on_input", "_gemm1_kernel"): 24616,
    ("experts-fp32-gelu-bm128-bias", "_gemm1_kernel"): 320,
    ("experts-fp32-gelu-bm128-bias", "_gemm2_kernel"): 2980,
    # session 8, the same cause: the direct fp8 GEMM1 reading 520-element rows
    ("fp8-block-bf16-silu-bm1-odd_h", "_direct_gemm1_fp8_kernel"): 84,
    # The Gluon fp8 GEMM1's block-scaled forms spilled 52 (gpt-oss's) and 168 bytes until
    # session 60: gpt-oss's none now (`moekit._gluon_gemm1.worker_registers`); straddling
    # up tiles without biases (no preset) spill none only with hidden's scales through the
    # stage (`stage_input_scales`, off since session 61).
    ("fp8-block-bf16-silu-bm128-tma-gluon-gluon1-straddle", "_gemm1_ws_kernel"): 168,
    # The fp8 GEMM2 with block scales on 256-column tiles (`moekit._gluon_gemm2.
    # column_halves`, session 62's default): 12–24 bytes a tile outside the K loops, none
    # in them (bench/scripts/sm90_loop_spills.py); on 128-column tiles (narrow2) none.
    ("fp8-block-bf16-silu-bm128-tma-gluon-no_tail", "_gemm2_ws_kernel"): 20,
    ("fp8-block-bf16-silu-bm128-tma-gluon-gluon1", "_gemm2_ws_kernel"): 12,
    ("fp8-block-fp16-swigluoai-bm128-tma-gluon-gluon1-no_tail", "_gemm2_ws_kernel"): 20,
    ("fp8-block-bf16-silu-bm128-tma-gluon-gluon1-straddle", "_gemm2_ws_kernel"): 12,
    ("fp8-block-bf16-silu-bm128-tma-gluon-grouped2", "_gemm2_ws_kernel"): 12,
    ("fp8-block-bf16-silu-bm128-tma-gluon-gluon1-2", "_gemm2_ws_kernel"): 24,
    ("fp8-block-bf16-silu-bm128-tma-gluon-gluon1-no_tail-prefetch", "_gemm2_ws_kernel"): 20,
    ("fp8-block-bf16-silu-bm128-tma-gluon-gluon1-gather-no_tail", "_gemm2_ws_kernel"): 20,
}
# Known spills as another ptxas counts them: the H200 lease's (CUDA 13) stored 24,640 bytes
# where Triton 3.6's own stores 24,616 (bench/NOTES.md, session 29).
_PTXAS_SLACK = 1.02
_WAIT_S = 600  # per case, while the workers are busy with the ones before it


def _ptxas_missing() -> str | None:
    try:
        knobs.nvidia.ptxas  # noqa: B018 - the knob looks the binary up and runs it
    except (RuntimeError, AttributeError) as e:
        return f"no ptxas to compile for sm_90 ({e})"
    return None


_NO_PTXAS = _ptxas_missing()
pytestmark = [
    pytest.mark.sm90_compile,
    pytest.mark.skipif(_NO_PTXAS is not None, reason=str(_NO_PTXAS)),
]


# ---------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One call of a public op; every launch of `kernels` it makes is compiled."""

    op: str  # a key of _BUILDERS
    params: dict
    why: str
    kernels: tuple[str, ...] = ()
    known_failure: str | None = None  # a GPU-only error found here, not yet fixed in src/
    slow: float | None = None  # compile seconds, where far above the op's usual

    @property
    def id(self) -> str:
        """op-value-value-flag: e.g. experts-bf16-silu-bm128-tma-bias."""
        parts = [self.op]
        for key, value in self.params.items():
            if value is True:
                parts.append(key)
            elif value is not False and value is not None:
                parts.append(_ID_PREFIX.get(key, "") + str(value))
        return "-".join(parts)

    @property
    def cost(self) -> float:
        """Rough compile seconds on one core, to balance the workers."""
        return self.slow or _OP_COST.get(self.op, 0.5)


_ID_PREFIX = {"block_m": "bm", "tokens": "M", "pairs": "pairs", "experts": "E", "top_k": "k",
              "narrow": "narrowE", "k_parts": "kparts", "persistent": "persistent_"}
_OP_COST = {"experts": 2.5, "fp8": 2.0, "dispatch": 1.0}


_EXPERTS = ("_gemm1_kernel", "_gemm2_kernel", "_combine_kernel")
_EXPERTS_GLUON = ("_gemm1_ws16_kernel", "_gemm2_ws16_kernel", "_combine_kernel")
_EXPERTS_GLUON2 = ("_gemm1_kernel", "_gemm2_ws16_kernel", "_combine_kernel")
_DIRECT = ("_direct_gemm1_kernel", "_direct_gemm2_kernel")
_FP8 = ("_gemm1_fp8_kernel", "_gemm2_fp8_kernel")
_FP8_GLUON = ("_gemm1_fp8_kernel", "_gemm2_ws_kernel", "_combine_kernel")
_FP8_GLUON_BOTH = ("_gemm1_ws_kernel", "_gemm2_ws_kernel", "_combine_kernel")
_DIRECT_FP8 = ("_quantize_rows_kernel", "_direct_gemm1_fp8_kernel", "_direct_gemm2_fp8_kernel")


def _experts(why, dtype, act, block_m, **flags):
    """fused_experts; flags: bias, weight_on_input, odd_h, odd_i, tma (expected), tail (tail
    tiles on; every other case has them off, whatever the heuristic's default), wide16
    (16-row blocks at the wide tiles of `wide_16_row_tiles`), gluon
    (both GEMMs as the 16-bit Gluon kernels, as on an sm_90 GPU), gluon2 (GEMM2 only),
    no_prefetch (the Gluon kernels loading each tile's indices at its start),
    group_m_order (the Triton GEMMs in `_tile_of`'s order, not the rule's),
    expert_groups2 (the Gluon GEMM2's groups never two experts', `_gluon.EXPERT_GROUPS`),
    chunk (the Gluon GEMMs taking that many consecutive tiles a program, `program_tiles`)."""
    kernels = (_EXPERTS_GLUON if flags.get("gluon") else
               _EXPERTS_GLUON2 if flags.get("gluon2") else _EXPERTS)
    return Case("experts", dict(dtype=dtype, act=act, block_m=block_m, **flags), why, kernels)


def _fp8(why, scheme, dtype, act, block_m, **flags):
    """fused_experts_fp8 with the heuristic's tiles (the direct path's at block_m 1); flags:
    bias, odd_h, odd_i, tma (expected); direct path: whole (GEMM2 a program per token),
    two_groups (GEMM1's K tile two scale groups deep); prefill: gluon (GEMM2 as the Gluon
    kernel, as on an sm_90 GPU; with gluon1 GEMM1 too), no_tail (tail tiles off), grouped
    (the Gluon GEMM1's grouped tile order), gather (the Gluon GEMM1 gathering A),
    partial_n (H = 336, I = 208: both GEMMs' last column tile partial), straddle (H = 256,
    I = 192: 128-row weight blocks straddle every up tile), bias_dtype (the biases' dtype,
    default fp32), prefetch (the Gluon GEMMs' producers loading each tile's indices a tile
    ahead, off by default), narrow2 (the Gluon GEMM2 with block scales on 128-column tiles,
    `moekit._gluon_gemm2.WIDE_PER_K_WEIGHTS` off; 256 by default), k_parts (the plan
    GEMM2's K loop in that many parts, `gemm2_k_parts`)."""
    if block_m == 1:  # int64 ids and bf16 weights (topk64) read by the kernels themselves
        kernels = _DIRECT_FP8
    else:
        # A per-tensor amax over more than 16 rows takes a partials launch first.
        partials = scheme == "tensor" and block_m >= 32
        gluon = _FP8_GLUON_BOTH if flags.get("gluon1") else _FP8_GLUON
        # The quantiser runs in the plan's launch, unless it writes plan-order rows (the
        # Gluon GEMM1 not gathering: block scales never do, `gather_rows`).
        scatter = flags.get("gluon1") and not (flags.get("gather") and scheme != "block")
        kernels = ((gluon if flags.get("gluon") else _FP8)
                   + ("_quantize_rows_kernel" if scatter else "_plan_quantize_kernel",)
                   + (("_amax_partials_kernel",) if partials else ())
                   + (("_cast_topk_kernel",) if flags.get("topk64") else ()))
    return Case("fp8", dict(scheme=scheme, dtype=dtype, act=act, block_m=block_m, **flags), why,
                kernels)


CASES = [
    # fused_experts: GEMM1 + GEMM2 + combine of one call. `tma` is what `use_tma` must pick.
    _experts("decode baseline: 16-row tile, 128-wide K tiles, all loads unmasked",
             "bf16", "silu", 16),
    _experts("prefill baseline: 128-row tile, TMA weight tiles, persistent GEMM2",
             "bf16", "silu", 128, tma=True),
    _experts("fp16; masked K and N loads in both GEMMs; biases in both epilogues",
             "fp16", "gelu", 16, bias=True, odd_h=True, odd_i=True),
    _experts("32-row tile; ungated GEMM1 (one accumulator); GEMM1 masks N only",
             "bf16", "relu2", 32, odd_i=True),
    _experts("64-row tile; router weight on GEMM1's input (not GEMM2's output); "
             "GEMM2 masks N only", "bf16", "gelu_tanh", 64, weight_on_input=True, odd_h=True),
    _experts("32-row tile at aligned rows: both GEMMs 128 columns × 128-deep K",
             "bf16", "silu", 32),
    _experts("16-row tile with the 32-row tile's tiles (rows of 128-element multiples), "
             "biases", "bf16", "swigluoai", 16, wide16=True, bias=True),
    _experts("64-row tile at aligned rows: GEMM1 256 columns (two [64, 256] accumulators), "
             "GEMM2 128; biases", "bf16", "swigluoai", 64, bias=True),
    _experts("the same with the router weight on GEMM1's input, fp16", "fp16", "gelu", 64,
             weight_on_input=True),
    _experts("TMA with ragged K and N (descriptor zero-fill); alpha/limit; biases",
             "bf16", "swigluoai", 128, tma=True, bias=True, odd_h=True, odd_i=True),
    _experts("fp16 TMA, ungated GEMM1", "fp16", "relu2", 128, tma=True, bias=True),
    _experts("tail tiles: GEMM1 at 128 and 64 rows in one program (TMA weights); the "
             "persistent GEMM2 masking a tail's rows", "bf16", "swigluoai", 128, tma=True,
             tail=True, bias=True, odd_i=True),
    _experts("the same in `_tile_of`'s GROUP_M order (the rule's at four row tiles an "
             "expert and more); 128-row cases otherwise take the expert groups",
             "bf16", "swigluoai", 128, tma=True, tail=True, bias=True, odd_i=True,
             group_m_order=True),
    _experts("prefill, Gluon GEMMs (16-bit, warp-specialised): GEMM1's A rows gathered by "
             "cp.async; tail tiles (both math warpgroups on a tail's 64 rows, half the "
             "columns each); GEMM2 in plan order, the combine by slot", "bf16", "silu", 128,
             tma=True, tail=True, gluon=True),
    _experts("Gluon GEMMs' tail tiles with biases (both epilogues' loads)", "bf16", "gelu",
             128, tma=True, tail=True, bias=True, gluon=True),
    _experts("Gluon GEMM1 at narrow column tiles (64 gate + 64 up, 6 stages), tail tiles "
             "(32 columns per warpgroup), biases", "bf16", "swigluoai", 128, tma=True,
             tail=True, bias=True, gluon=True, narrow_n=True),
    _experts("Gluon GEMMs, fp16: biases and the router weight on GEMM1's input (GEMM2 "
             "without it), gpt-oss activation, no tail tiles", "fp16", "swigluoai", 128,
             tma=True, bias=True, weight_on_input=True, gluon=True),
    _experts("Gluon GEMMs loading each tile's indices at its start (`PREFETCH_TILES` off, "
             "an experiment's control), tail tiles, biases", "bf16", "silu", 128, tma=True,
             tail=True, bias=True, gluon=True, no_prefetch=True),
    _experts("Gluon GEMMs, GEMM2's row tiles grouped over each column tile, tail tiles",
             "bf16", "silu", 128, tma=True, tail=True, gluon=True, grouped2=True),
    _experts("Gluon GEMM2's grouped row tiles never spanning two experts (`EXPERT_GROUPS`, "
             "staged off): the producer's and consumers' three index loads a tile, and "
             "`prefetch_entry`'s; tail tiles, biases", "bf16", "gelu", 128, tma=True, tail=True,
             bias=True, gluon=True, grouped2=True, expert_groups2=True),
    _experts("the same without tail tiles or the prefetch (`expert_offsets` is the work "
             "pointer)", "fp16", "silu", 128, tma=True, gluon=True, grouped2=True,
             expert_groups2=True, no_prefetch=True),
    _experts("both 16-bit Gluon GEMMs taking 3 consecutive tiles a program (`program_tiles`, "
             "staged): the prefetch's first and second tiles, tail tiles, biases", "bf16",
             "silu", 128, tma=True, tail=True, bias=True, gluon=True, chunk=3),
    _experts("both 16-bit Gluon GEMMs, fp16, grouped GEMM2 row tiles, no tail tiles", "fp16",
             "silu", 128, tma=True, gluon=True, grouped2=True),
    _experts("Gluon GEMM2 after Triton's GEMM1 (I = 264: a partial last K step, zero-filled "
             "by TMA); tail tiles, biases, router weight", "bf16", "gelu", 128, tma=True,
             tail=True, bias=True, odd_i=True, gluon2=True),
    _experts("narrow layer (few column tiles): both GEMMs 128 columns × 64-deep K in 3 "
             "stages, two GEMM1 programs per SM (40 experts' tiles)", "bf16", "silu", 16,
             narrow=40, tokens=8),
    _experts("narrow layer at 32 rows, fp16, biases", "fp16", "swigluoai", 32, narrow=8,
             bias=True, tokens=128),
    _experts("fp32: exact (ieee) dots, 64-wide K tiles at decode", "fp32", "silu", 16,
             odd_h=True),
    _experts("fp32 at 64 rows: the largest fp32 tiles that fit (192 KB of shared memory)",
             "fp32", "swigluoai", 64, weight_on_input=True),
    Case("experts", dict(dtype="fp32", act="gelu", block_m=128, bias=True),
         "fp32 prefill: no TMA (16-bit only), non-persistent GEMM2 at 128 rows; GEMM1's "
         "K-32 tiles (the 16-bit ones need 288 KB of shared memory)", _EXPERTS, slow=20),
    # the direct path (block_m 1): two launches, no plan, no combine
    Case("experts", dict(dtype="bf16", act="silu", block_m=1), "direct path: unmasked "
         "tiles, slots and K steps in one loop", _DIRECT),
    Case("experts", dict(dtype="fp16", act="swigluoai", block_m=1, bias=True, odd_h=True,
                         odd_i=True), "direct path: masked K and N tiles, biases (GEMM2's "
         "summed over the slots)", _DIRECT),
    Case("experts", dict(dtype="bf16", act="relu2", block_m=1, weight_on_input=True),
         "direct path: ungated, router weight on GEMM1's input", _DIRECT),
    Case("experts", dict(dtype="bf16", act="silu", block_m=1, bias=True, split=True),
         "direct path, GEMM2 a program per slot: GEMM1 zeroes the arrival counters, the "
         "last program of a token adds the parts' float32 sums", _DIRECT),
    Case("experts", dict(dtype="bf16", act="silu", block_m=1, topk64=True),
         "direct path reading int64 ids and bf16 router weights (torch.topk's, "
         "transformers') itself: no cast launch", _DIRECT),
    Case("experts", dict(dtype="bf16", act="silu", block_m=16, topk64=True),
         "plan path, int64 ids and bf16 router weights: cast to int32 and float32 in one "
         "launch first", ("_cast_topk_kernel", *_EXPERTS)),
    # the plan GEMM1 in persistent runs of tiles (MOEKIT_GEMM1_PERSISTENT, measurement)
    Case("experts", dict(dtype="bf16", act="silu", block_m=16, persistent="nested"),
         "persistent GEMM1 runs: a loop over tiles around each tile's pipelined K loop",
         _EXPERTS),
    Case("experts", dict(dtype="bf16", act="silu", block_m=16, persistent="flat"),
         "persistent GEMM1 runs as one flattened pipelined loop", _EXPERTS),
    # fused_experts_fp8: quantiser + fp8 GEMMs (the combine is the bf16 pipeline's).
    _fp8("dynamic per-tensor over 4 rows: MODE tensor_rows (no partials); GEMM2 input in "
         "1×128 groups",
         "tensor", "bf16", "silu", 16),
    _fp8("static per-tensor input scales for both GEMMs (INTER_STATIC), biases",
         "static", "fp16", "gelu", 64, bias=True),
    _fp8("per-channel weights, per-token inputs (MODE token); gpt-oss activation",
         "channel", "bf16", "swigluoai", 16, odd_i=True),
    _fp8("128×128 weight blocks, 1×128 input groups: per-K scales in both GEMMs",
         "block", "bf16", "silu", 64),
    _fp8("persistent GEMM1 runs (nested), per-tensor at decode tiles", "tensor", "bf16",
         "silu", 16, persistent="nested"),
    _fp8("persistent GEMM1 runs as one flattened loop, 128×128 blocks", "block", "bf16",
         "silu", 16, persistent="flat"),
    _fp8("decode GEMM2 with its K loop in four parts (`gemm2_k_parts`, mixtral's M = 1): "
         "float32 partial rows, the bias in part 0's, the combine adding the parts; block "
         "scales", "block", "bf16", "swigluoai", 16, bias=True, k_parts=4),
    _fp8("the same per tensor, without biases", "tensor", "bf16", "silu", 16, k_parts=2),
    _fp8("narrow layer: both GEMMs 128 columns × 128 bytes of K, 3 stages, 4 warps; block "
         "scales at 32 rows", "block", "bf16", "silu", 32, narrow=True, tokens=128),
    _fp8("narrow layer, per-channel weights and per-token inputs at 16 rows, biases",
         "channel", "bf16", "swigluoai", 16, narrow=True, bias=True, tokens=16),
    _fp8("block scales from fp32 hidden, ungated, ragged H and I", "block", "fp32", "relu2",
         16, odd_h=True, odd_i=True),
    _fp8("prefill: 128-row tiles with tail tiles, TMA weight and inter tiles, persistent "
         "GEMM2 (1×128 input groups: per-K scales in GEMM2)", "tensor", "bf16", "silu", 128,
         tma=True),
    _fp8("prefill, Gluon GEMM2 (warp-specialised): 1×128 input groups' scales per K step, "
         "tail tiles (the second math warpgroup idle), combine through pair_slots", "tensor",
         "bf16", "silu", 128, tma=True, gluon=True),
    _fp8("prefill, Gluon GEMM2: block scales (per-K scales of both operands, one per tile "
         "along N), no tail tiles", "block", "bf16", "silu", 128, tma=True, gluon=True,
         no_tail=True),
    _fp8("prefill, Gluon GEMM2: per-channel scales (a vector per tile), biases", "channel",
         "bf16", "swigluoai", 128, tma=True, gluon=True, bias=True),
    _fp8("prefill, Gluon GEMM2: static input scale (one scalar, after the loop), fp16",
         "static", "fp16", "gelu", 128, tma=True, gluon=True),
    _fp8("prefill, Gluon GEMM2 without the router weight (applied to GEMM1's input)",
         "channel", "bf16", "silu", 128, tma=True, gluon=True, weight_on_input=True),
    _fp8("prefill, both GEMMs Gluon: hidden quantised into plan order (per-tensor scale), "
         "GEMM2's input in the tile's 1×128 groups, tail tiles", "tensor", "bf16", "silu", 128,
         tma=True, gluon=True, gluon1=True),
    _fp8("prefill, Gluon GEMM1: per-channel weight scales (column vectors), per-token input "
         "scales per slot, biases, gpt-oss activation, no tail tiles", "channel", "bf16",
         "swigluoai", 128, tma=True, gluon=True, gluon1=True, bias=True, no_tail=True),
    _fp8("prefill, Gluon GEMM1: static input scales (GEMM2's input by the static scale), "
         "fp16, row tiles grouped over each column tile (w13 larger than L2)", "static",
         "fp16", "gelu", 128, tma=True, gluon=True, gluon1=True, grouped=True),
    _fp8("prefill, Gluon GEMM1: block scales (hidden's 1×128 groups per slot, w13's one per "
         "tile, scaled per K step), tail tiles", "block", "bf16", "silu", 128, tma=True,
         gluon=True, gluon1=True),
    _fp8("prefill, Gluon GEMM1: block scales, gpt-oss activation, fp16, no tail tiles",
         "block", "fp16", "swigluoai", 128, tma=True, gluon=True, gluon1=True, no_tail=True),
    _fp8("prefill, Gluon GEMM1: gpt-oss's form — block scales with bf16 biases (the biases "
         "start the sums), its activation, I = 192: every up tile straddles two 128-row "
         "blocks (two scales a step; the last tile's second clamped to the expert's rows)",
         "block", "bf16", "swigluoai", 128, tma=True, gluon=True, gluon1=True, bias=True,
         straddle=True, bias_dtype="bf16"),
    _fp8("prefill, Gluon GEMM1: straddling up tiles without biases (no preset), tail tiles",
         "block", "bf16", "silu", 128, tma=True, gluon=True, gluon1=True, straddle=True),
    _fp8("prefill, Gluon GEMM1 gathering A by cp.async (`gather_rows`): per-tensor scale, tail "
         "tiles", "tensor", "bf16", "silu", 128, tma=True, gluon=True, gluon1=True, gather=True),
    _fp8("prefill, Gluon GEMMs' producers loading each tile's indices a tile ahead "
         "(`PREFETCH_TILES_FP8`): GEMM1 gathering A (the slots' pairs carried), grouped "
         "tile order, tail tiles", "tensor", "bf16", "silu", 128, tma=True, gluon=True,
         gluon1=True, gather=True, grouped=True, prefetch=True),
    _fp8("prefill, Gluon GEMM2's row tiles grouped over each column tile: block scales, "
         "tail tiles", "block", "bf16", "silu", 128, tma=True, gluon=True, grouped2=True),
    _fp8("prefill, Gluon GEMM2 with block scales on 128-column tiles (the switch off: router "
         "weights before the K loop): tail tiles, both GEMMs Gluon", "block", "bf16", "silu",
         128, tma=True, gluon=True, gluon1=True, narrow2=True),
    _fp8("prefill, Gluon GEMM2's grouped row tiles never spanning two experts "
         "(`EXPERT_GROUPS`, staged off): per-tensor, the producer's prefetch, tail tiles",
         "tensor", "bf16", "silu", 128, tma=True, gluon=True, grouped2=True,
         expert_groups2=True, prefetch=True),
    _fp8("prefill, both Gluon GEMMs taking 2 consecutive tiles a program (`program_tiles`, "
         "staged): GEMM1 gathering A, the producers' prefetch, tail tiles", "tensor", "bf16",
         "silu", 128, tma=True, gluon=True, gluon1=True, gather=True, prefetch=True, chunk=2),
    _fp8("the same without the prefetch, block scales", "block", "bf16", "silu", 128,
         tma=True, gluon=True, gluon1=True, chunk=2),
    _fp8("the same producers' prefetch with A in plan order (block scales), no tail tiles",
         "block", "bf16", "silu", 128, tma=True, gluon=True, gluon1=True, no_tail=True,
         prefetch=True),
    _fp8("prefill, Gluon GEMM1 where rows would be gathered: block scales keep the plan order, no "
         "tail tiles", "block", "bf16", "silu", 128, tma=True, gluon=True, gluon1=True,
         gather=True, no_tail=True),
    _fp8("prefill, Gluon GEMM1 gathering A: per-token input scales, per-channel weights, "
         "biases", "channel", "bf16", "swigluoai", 128, tma=True, gluon=True, gluon1=True,
         bias=True, gather=True),
    _fp8("prefill, both Gluon GEMMs with partial last column tiles (H = 336, I = 208): "
         "per-tensor, GEMM1 gathering A, biases (masked loads), gpt-oss activation, the "
         "amax over I's columns only", "tensor", "bf16", "swigluoai", 128, tma=True,
         gluon=True, gluon1=True, bias=True, gather=True, partial_n=True),
    _fp8("prefill, both Gluon GEMMs with partial last column tiles: per-channel weight "
         "scales (masked column vectors), per-token input in plan order, fp16, no tail tiles",
         "channel", "fp16", "silu", 128, tma=True, gluon=True, gluon1=True, partial_n=True,
         no_tail=True),
    _fp8("prefill, per-channel, I = 200 (rows not 16-byte multiples): pointer tiles, one-tile-"
         "per-program GEMM2 with pointer tails; biases, gpt-oss activation", "channel",
         "bf16", "swigluoai", 128, bias=True, odd_i=True),
    # the fp8 direct path: quantisation inside both GEMMs, two launches
    _fp8("direct fp8, per-tensor: the quantiser reads every row's amax (no partials); "
         "GEMM2's 1×128 input groups' scales picked per step", "tensor", "bf16", "silu", 1),
    _fp8("direct fp8, block scales: per-K scales on both operands, read before the loop; "
         "biases", "block", "fp16", "swigluoai", 1, bias=True),
    _fp8("direct fp8, block scales, masked N (I = 200: a scale per column tile)", "block",
         "bf16", "silu", 1, odd_i=True),
    _fp8("direct fp8, block scales, masked K (H = 520)", "block", "bf16", "silu", 1,
         odd_h=True),
    _fp8("direct fp8, per-channel weights ([slots, columns] scales), per-token inputs; ungated",
         "channel", "bf16", "relu2", 1),
    _fp8("direct fp8, static input scales for both GEMMs; biases", "static", "bf16", "gelu", 1,
         bias=True),
    _fp8("direct fp8, block scales, GEMM1's 256-deep K tile in two 128-deep sub-steps",
         "block", "bf16", "silu", 1, two_groups=True),
    _fp8("direct fp8, block scales, GEMM2 a program per token (the other direct cases: a "
         "program per slot, the parts added by a token's last program)", "block", "bf16",
         "silu", 1, whole=True),
    _fp8("direct fp8 reading int64 ids and bf16 router weights itself", "block", "bf16",
         "silu", 1, topk64=True),
    _fp8("plan fp8, int64 ids and bf16 router weights: cast in one launch first", "tensor",
         "bf16", "silu", 16, topk64=True),
    # dispatch_plan
    Case("dispatch", dict(block_m=16, pairs=8),
         "decode: one chunk, count folded into the place kernel (SINGLE_CHUNK)",
         ("_place_pairs_kernel",)),
    Case("dispatch", dict(block_m=128, pairs=32768),
         "prefill: count + place over 512-pair chunks", ("_count_pairs_kernel",
                                                          "_place_pairs_kernel")),
    Case("dispatch", dict(block_m=64, pairs=32768, tile_m=128),
         "prefill with tail tiles: the place kernel writes the work list (TILE_M)",
         ("_count_pairs_kernel", "_place_pairs_kernel")),
    Case("dispatch", dict(block_m=64, pairs=24, expert_map=True),
         "expert map (HAS_MAP), one chunk", ("_place_pairs_kernel",)),
    Case("dispatch", dict(block_m=32, pairs=262144, expert_map=True, experts=96),
         "largest chunk (4096-key sort), expert map, E not a power of two",
         ("_count_pairs_kernel", "_place_pairs_kernel"), slow=9),
    Case("local_ids", dict(pairs=64), "expert parallelism: global ids to local ones",
         ("_local_ids_kernel",)),
    # permute (bits of 1, 2 or 4 bytes) / unpermute
    Case("permute", dict(dtype="bf16", tokens=4), "decode tiling, 16-bit rows",
         ("_permute_kernel",)),
    Case("permute", dict(dtype="fp16", tokens=4096, odd_h=True),
         "prefill tiling (4 rows × 1 KB), ragged H (EVEN_H off)", ("_permute_kernel",)),
    Case("permute", dict(dtype="fp8", tokens=4, scales="row"),
         "fp8 rows (int8 bits) with per-row scales (HAS_SCALES)", ("_permute_kernel",)),
    Case("permute", dict(dtype="fp8", tokens=4096, scales="group", odd_h=True),
         "fp8 with 1×128 group scales at prefill", ("_permute_kernel",)),
    Case("permute", dict(dtype="fp32", tokens=64), "fp32 rows (int32 bits)",
         ("_permute_kernel",)),
    Case("unpermute", dict(dtype="bf16", tokens=4), "decode tiling", ("_unpermute_kernel",)),
    Case("unpermute", dict(dtype="fp16", tokens=4096, odd_h=True),
         "prefill tiling (several rows per program), ragged H", ("_unpermute_kernel",)),
    Case("unpermute", dict(dtype="fp32", tokens=16, top_k=8), "fp32 rows, k = 8",
         ("_unpermute_kernel",)),
    # route (and its packed output)
    Case("route", dict(method="softmax", dtype="bf16", experts=64, top_k=8),
         "softmax over E, renormalised (Qwen-MoE)", ("_route_kernel",)),
    Case("route", dict(method="topk_softmax", dtype="fp16", experts=8, top_k=2),
         "top-k of the logits, softmax over k (Mixtral)", ("_route_kernel",)),
    Case("route", dict(method="sigmoid", dtype="fp32", experts=16, top_k=1,
                       renormalize=False), "sigmoid top-1, not renormalised (Llama-4)",
         ("_route_kernel",)),
    Case("route", dict(method="sigmoid", dtype="fp32", experts=256, top_k=8, groups=True,
                       bias=True), "grouped sigmoid + correction bias + scaling (DeepSeek-V3)",
         ("_route_kernel",)),
    Case("route", dict(method="softmax", dtype="bf16", experts=60, top_k=4, bias=True),
         "bias without groups: selection on biased scores; E not a power of two",
         ("_route_kernel",)),
    Case("route", dict(method="softmax", dtype="bf16", experts=128, top_k=8, packed=True),
         "packed (id << 16 | bf16 weight) output", ("_route_kernel",)),
    Case("route", dict(method="softmax", dtype="bf16", experts=2048, top_k=4),
         "E = 2048: one row per program (BLOCK_M 1), 8 warps", ("_route_kernel",)),
    # router_logits (the router GEMM MoE.forward runs at decode)
    Case("router_logits", dict(dtype="bf16", tokens=1, experts=128, hidden=2048),
         "qwen3's router: one expert a program, H in one 2048-column step, 4 warps",
         ("_router_gemv_kernel",)),
    Case("router_logits", dict(dtype="bf16", tokens=4, experts=257, hidden=7000),
         "two experts a program (a partial last pair), one 8192-column step, 8 warps",
         ("_router_gemv_kernel",)),
    Case("router_logits", dict(dtype="fp16", tokens=2, experts=7, hidden=9000),
         "fp16, two 8192-column steps, the second partial", ("_router_gemv_kernel",)),
    Case("router_logits", dict(dtype="fp32", tokens=3, experts=40, hidden=4096),
         "fp32, mixtral's H in one step", ("_router_gemv_kernel",)),
    Case("router_logits", dict(dtype="bf16", tokens=8, experts=128, hidden=2048),
         "8 rows: qwen3's router, 4 warps", ("_router_gemv_kernel",)),
    Case("router_logits", dict(dtype="bf16", tokens=8, experts=256, hidden=7168),
         "8 rows: deepseek-v3's router, two experts a program, 8 warps",
         ("_router_gemv_kernel",)),
    Case("router_logits", dict(dtype="bf16", tokens=16, experts=8, hidden=4096),
         "16 rows: mixtral's router, 8 warps", ("_router_gemv_kernel",)),
    # router_topk (the GEMV and route in one launch: the layer's decode)
    Case("router_topk", dict(dtype="bf16", tokens=1, experts=128, hidden=2048, top_k=8,
                             method="softmax"),
         "qwen3: 128 programs, the last routes", ("_router_topk_kernel",)),
    Case("router_topk", dict(dtype="bf16", tokens=16, experts=8, hidden=4096, top_k=2,
                             method="topk_softmax"),
         "mixtral at 16 rows", ("_router_topk_kernel",)),
    Case("router_topk", dict(dtype="fp16", tokens=3, experts=256, hidden=4096, top_k=8,
                             method="sigmoid", n_group=8, topk_group=4),
         "groups without the bias, 256 programs", ("_router_topk_kernel",)),
]
_BY_ID = {case.id: case for case in CASES}
assert len(_BY_ID) == len(CASES), "two cases share an id"


# --------------------------------------------------------------------------- the tests


def _param(case: Case):
    known = case.known_failure
    marks = [pytest.mark.xfail(strict=True, reason=known)] if known else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_compiles_for_sm90(case, sm90_compiler):
    result = sm90_compiler.result(case.id)
    if result["error"]:
        pytest.fail(f"{case.id} ({case.why}):\n{result['error']}", pytrace=False)
    compiled = result["kernels"]
    launched = {k["name"] for k in compiled}
    missing = set(case.kernels) - launched
    assert not missing, f"the op no longer launches {sorted(missing)}"
    for kernel in compiled:
        where = f"{kernel['name']} {kernel['constexprs']}"
        assert kernel["shared"] <= _SM90_SHARED_BYTES, (
            f"{where}: {kernel['shared']} bytes of shared memory; sm_90 allows "
            f"{_SM90_SHARED_BYTES} per block, so the launch would fail"
        )
        if kernel["name"] in _GEMMS:
            assert kernel["tma"] == bool(case.params.get("tma")), f"{where}: TMA use"
            known = _KNOWN_SPILL_BYTES.get((case.id, kernel["name"]), 0)
            allowed = math.ceil(known * _PTXAS_SLACK)  # no spill stays no spill
            assert kernel["spill_bytes"] <= allowed, (
                f"{where}: {kernel['spill_bytes']} bytes of register spill stores (ptxas -v), "
                f"{allowed} allowed"
            )
            # Rows of 8k elements (not 16k) loaded by pointer (a GEMM2 with TMA loads none).
            constexprs = kernel["constexprs"]
            if constexprs.get("ROW_ALIGN") == "8" and constexprs.get("TMA") != "True":
                assert kernel["vector_loads"], f"{where}: no vector loads"
        if kernel["name"] in ("_gemm1_ws16_kernel", "_gemm2_ws16_kernel"):
            # A whole tile's MMAs: one per half (tails' narrower ones): [64, 128] ([64, 64]
            # at GEMM1's narrow columns).
            gemm1 = kernel["name"] == "_gemm1_ws16_kernel"
            half = 64 if gemm1 and case.params.get("narrow_n") else 128
            assert half in kernel["mma_n"] and max(kernel["mma_n"]) == half, (
                f"{where}: MMA widths {kernel['mma_n']}")


# ------------------------------------------------------------- parent side: the workers


class _Workers:
    """Worker subprocesses compiling the selected cases; results arrive as JSON lines."""

    def __init__(self, case_ids: list[str]):
        self._results: dict[str, dict] = {}
        self._done = threading.Condition()
        self._procs = []
        self._threads = []
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        shares = _share_out(case_ids, max(1, min(4, cores, len(case_ids))))
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # the workers compile; they never interpret
        src = str(Path(moekit.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
        for ids in shares:
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen([sys.executable, __file__, *ids], env=env,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
            self._procs.append((proc, log))
            thread = threading.Thread(target=self._read, args=(proc, log, ids), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, proc, log, ids):
        for line in proc.stdout:
            result = json.loads(line)
            with self._done:
                self._results[result["case"]] = result
                self._done.notify_all()
        proc.wait()
        log.seek(0)
        tail = log.read().decode(errors="replace")[-4000:]
        with self._done:
            for case_id in ids:
                self._results.setdefault(case_id, {
                    "case": case_id, "kernels": [],
                    "error": f"worker exited ({proc.returncode}) before this case:\n{tail}",
                })
            self._done.notify_all()

    def result(self, case_id: str) -> dict:
        with self._done:
            if not self._done.wait_for(lambda: case_id in self._results, timeout=_WAIT_S):
                pytest.fail(f"no result for {case_id} after {_WAIT_S} s")
            return self._results[case_id]

    def close(self):
        for proc, _ in self._procs:
            if proc.poll() is None:
                proc.kill()
        for thread in self._threads:
            thread.join()
        for _, log in self._procs:
            log.close()


def _share_out(case_ids: list[str], workers: int) -> list[list[str]]:
    """Split the cases over the workers, longest first, each to the least loaded one."""
    loads = [[0.0, []] for _ in range(workers)]
    for case_id in sorted(case_ids, key=lambda c: -_BY_ID[c].cost):
        share = min(loads, key=lambda s: s[0])
        share[0] += _BY_ID[case_id].cost
        share[1].append(case_id)
    return [ids for _, ids in loads if ids]


@pytest.fixture(scope="module")
def sm90_compiler(request):
    selected = [item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    workers = _Workers(selected or [c.id for c in CASES])
    yield workers
    workers.close()


# ---------------------------------------------------- worker side: record, then compile


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           "fp8": torch.float8_e4m3fn}
_E, _TOP_K = 8, 2
# Tokens for which the heuristic (E = 8, k = 2) picks each row tile.
_TOKENS_FOR_BLOCK_M = {1: 2, 16: 4, 32: 48, 64: 128, 128: 256}
_H100_SMS = 132


@contextlib.contextmanager
def _recording_launches(launches: list):
    """Launch path of an sm_90 GPU on CPU tensors: `kernel[grid](...)` records, runs nothing.

    The ops check their backend (`interpreter_enabled` lets them take the Triton path on
    CPU tensors) and ask whether the device has TMA and how many SMs it has; the
    answers are an H100's.
    """
    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    saved = [(JITFunction, "run"), (moekit.backend, "interpreter_enabled"),
             (moekit._tma, "device_has_tma"), (moekit.experts, "persistent_programs"),
             (moekit.experts_fp8, "persistent_programs"),
             (moekit.experts_fp8, "use_gluon_gemm2"), (moekit.experts_fp8, "use_gluon_gemm1"),
             (moekit.experts, "use_gluon_gemm1_16bit"),
             (moekit.experts, "use_gluon_gemm2_16bit")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved]
    JITFunction.run = record
    moekit.backend.interpreter_enabled = lambda: True
    moekit._tma.device_has_tma = lambda device: True
    moekit.experts.persistent_programs = lambda device: _H100_SMS
    moekit.experts_fp8.persistent_programs = lambda device: _H100_SMS
    try:
        yield launches
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _topk_ids(p, M, k):
    """[M, k] expert ids: int32, or int64 with `topk64` (then cast by a launch of its own)."""
    return torch.zeros(M, k, dtype=torch.int64 if p.get("topk64") else torch.int32)


def _topk_weights(p, M, k):
    """[M, k] router weights: float32, or bf16 with `topk64`."""
    return torch.empty(M, k, dtype=torch.bfloat16 if p.get("topk64") else torch.float32)


def _persistent_gemm1(p):
    """The plan GEMM1 in persistent runs of tiles (`MOEKIT_GEMM1_PERSISTENT`) where the
    case's `persistent` flag says ("nested" or "flat"), else one program a tile."""
    moekit._persistent_gemm1.PROGRAMS_PER_SM = 2 if p.get("persistent") else 0
    moekit._persistent_gemm1.FLATTEN = p.get("persistent") == "flat"


def _run_experts(p):
    dtype = _DTYPES[p["dtype"]]
    H, I = 1000 if p.get("odd_h") else 1024, 264 if p.get("odd_i") else 512
    M = p.get("tokens", _TOKENS_FOR_BLOCK_M[p["block_m"]])
    act = moekit.Activation.parse(p["act"])
    if p["block_m"] == 1:  # the direct path, at a tile of each GEMM
        per = 1 if p.get("split") else _TOP_K  # GEMM2's slots per program
        config = ExpertsConfig(1, GemmConfig(32, 256, 1, 4, 3), GemmConfig(16, 256, per, 4, 4))
    elif p.get("narrow"):  # experts of I = 512 are a narrow layer: the heuristic's own
        # tiles for `narrow` experts (more than 16 at 16-row blocks: granite's 40; with
        # fewer, 16-row blocks take the wide tiles, `wide_16_row_tiles`)
        experts = p["narrow"]
        config = moekit.experts._select_config(torch.empty(M, H, dtype=dtype), experts,
                                               _TOP_K, I)
        assert narrow_layer(experts, I) and config.gemm1.block_k == 64, config
    else:  # the usual row tile's tiles, as on a layer with more column tiles
        config = tiles_for_block_m(p["block_m"], dtype.itemsize,
                                   aligned=not (p.get("odd_h") or p.get("odd_i")),
                                   wide_16=bool(p.get("wide16")))
    assert config.block_m == p["block_m"], f"heuristic picked block_m {config.block_m}"
    config = dataclasses.replace(config, tail_block_m=config.block_m // 2 if p.get("tail") else 0)
    bias = p.get("bias")
    # On the CPU the Gluon GEMMs are never taken; an sm_90 GPU's answers are forced here.
    moekit.experts.use_gluon_gemm1_16bit = lambda *args: bool(p.get("gluon"))
    moekit.experts.use_gluon_gemm2_16bit = lambda *args: bool(p.get("gluon") or p.get("gluon2"))
    moekit.experts.gluon_gemm1_narrow_columns = lambda *args: bool(p.get("narrow_n"))
    moekit._gluon.PREFETCH_TILES = not p.get("no_prefetch")
    moekit._gluon.EXPERT_GROUPS = bool(p.get("expert_groups2"))
    moekit._gluon.gemm2_group_m = (lambda w2, **_: 8) if p.get("grouped2") else _GEMM2_GROUP_M
    moekit._gluon.schedule = _chunked(p)
    # The Triton GEMMs' order: the rule's (expert groups at 128-row tiles here) or GROUP_M's.
    moekit._tile_order.FORCED = False if p.get("group_m_order") else None
    _persistent_gemm1(p)
    moekit.fused_experts(
        torch.empty(M, H, dtype=dtype), torch.empty(_E, act.gemm1_rows(I), H, dtype=dtype),
        torch.empty(_E, H, I, dtype=dtype), _topk_ids(p, M, _TOP_K), _topk_weights(p, M, _TOP_K),
        activation=act,
        b13=torch.empty(_E, act.gemm1_rows(I), dtype=dtype) if bias else None,
        b2=torch.empty(_E, H, dtype=dtype) if bias else None,
        apply_router_weight_on_input=bool(p.get("weight_on_input")), config=config,
        backend="triton",
    )


_GROUP_M = moekit._gluon_gemm1.group_m
_GEMM2_K_PARTS = moekit.experts_fp8.gemm2_k_parts
_GEMM2_GROUP_M = moekit._gluon.gemm2_group_m
_SCHEDULE = moekit._gluon.schedule


def _chunked(p):
    """The Gluon GEMMs' `schedule`: the library's, or with flag chunk that many consecutive
    tiles a program (the kernel's CHUNK; the grid does not change the compile)."""
    if not p.get("chunk"):
        return _SCHEDULE
    return lambda programs, *args, **kwargs: ((programs,), p["chunk"])


def _run_fp8(p):
    scheme = {"tensor": QuantScheme.fp8_tensor(), "static": QuantScheme.fp8_tensor(dynamic=False),
              "channel": QuantScheme.fp8_channel(), "block": QuantScheme.fp8_block()}[p["scheme"]]
    dtype = _DTYPES[p["dtype"]]
    H, I = 520 if p.get("odd_h") else 512, 200 if p.get("odd_i") else 256
    if p.get("partial_n"):  # 16-byte rows, neither a multiple of 128 (gpt-oss's 2880)
        H, I = 336, 208
    if p.get("straddle"):  # I = 64 mod 128, as gpt-oss's 2880: up tiles straddle two blocks
        H, I = 256, 192
    top_k = 1 if p.get("weight_on_input") else _TOP_K  # fp8 takes it at top-1 only
    M = p.get("tokens", _TOKENS_FOR_BLOCK_M[p["block_m"]] * _TOP_K // top_k)  # as many pairs
    act = moekit.Activation.parse(p["act"])
    static = None if scheme.activation.dynamic else torch.full((1,), 0.01)
    w13 = quantize_weight(torch.randn(_E, act.gemm1_rows(I), H) * 0.05, scheme.weight,
                          input_scale=static)
    w2 = quantize_weight(torch.randn(_E, H, I) * 0.05, scheme.weight, input_scale=static)
    bias = p.get("bias")
    # 8 experts of I = 256 are a narrow layer: the `narrow` cases take the heuristic's own
    # tiles, the others the plan path's usual ones.
    config = moekit.experts_fp8.plan_fp8_config(M, _E, top_k, scheme)
    if p.get("narrow"):
        config = moekit.experts_fp8.default_fp8_config(M, _E, top_k, H, I, scheme)
        assert narrow_layer(_E, I) and config.gemm1.num_warps == 4, config
    if p["block_m"] == 1:  # the direct path's tiles (the heuristic takes it from 32 experts)
        config = moekit.experts_fp8.direct_fp8_config(M, _TOP_K, H, I, scheme)
        if p.get("whole"):  # GEMM2 a program per token, not per slot (the heuristic's here)
            config = dataclasses.replace(
                config, gemm2=dataclasses.replace(config.gemm2, group_m=_TOP_K))
        if p.get("two_groups"):  # GEMM1's K tile two scale groups deep: two sub-steps
            config = dataclasses.replace(
                config, gemm1=dataclasses.replace(config.gemm1, block_k=256))
    if p.get("no_tail"):
        config = dataclasses.replace(config, tail_block_m=0)
    assert config.block_m == p["block_m"], f"heuristic picked block_m {config.block_m}"
    # On the CPU `use_gluon_gemm2` is always False; an sm_90 GPU's answer is forced here.
    moekit.experts_fp8.use_gluon_gemm2 = lambda w2, block_m, k_groups: bool(p.get("gluon"))
    moekit.experts_fp8.use_gluon_gemm1 = lambda *args: bool(p.get("gluon1"))
    moekit.experts_fp8.gemm2_k_parts = ((lambda *args: p["k_parts"]) if p.get("k_parts")
                                        else _GEMM2_K_PARTS)
    moekit._gluon_gemm1.GATHER_MIN_TOP_K = 1 if p.get("gather") else 10**9
    moekit._gluon.PREFETCH_TILES_FP8 = bool(p.get("prefetch"))
    moekit._gluon.EXPERT_GROUPS = bool(p.get("expert_groups2"))
    moekit._gluon_gemm2.WIDE_PER_K_WEIGHTS = not p.get("narrow2")
    moekit._gluon.gemm2_group_m = (lambda w2, **_: 8) if p.get("grouped2") else _GEMM2_GROUP_M
    moekit._gluon.schedule = _chunked(p)
    # The grouped tile order is taken for experts whose w13 outgrows L2 (mixtral's 117 MB).
    moekit._gluon_gemm1.group_m = ((lambda w13, l2=None: moekit._gluon_gemm1.GROUP_M)
                                   if p.get("grouped") else _GROUP_M)
    _persistent_gemm1(p)
    moekit.fused_experts_fp8(
        torch.empty(M, H, dtype=dtype), w13, w2, _topk_ids(p, M, top_k),
        _topk_weights(p, M, top_k), scheme=scheme, activation=act, config=config,
        b13=torch.empty(_E, act.gemm1_rows(I), dtype=_DTYPES[p.get("bias_dtype", "fp32")])
        if bias else None,
        b2=torch.empty(_E, H) if bias else None,
        apply_router_weight_on_input=bool(p.get("weight_on_input")), backend="triton",
    )


def _run_dispatch(p):
    experts = p.get("experts", _E)
    ids = torch.zeros(p["pairs"] // _TOP_K, _TOP_K, dtype=torch.int32)
    expert_map = torch.arange(2 * experts, dtype=torch.int32) if p.get("expert_map") else None
    moekit.dispatch_plan(ids, experts, p["block_m"], expert_map=expert_map,
                         tile_m=p.get("tile_m"), backend="triton")


def _run_local_ids(p):
    ids = torch.zeros(p["pairs"] // _TOP_K, _TOP_K, dtype=torch.int32)
    moekit.local_expert_ids(ids, torch.arange(2 * _E, dtype=torch.int32), _E, backend="triton")


def _plan(tokens, top_k, block_m=16):
    # The plan's tensors are only passed on; launches are recorded, so they stay unset.
    ids = torch.zeros(tokens, top_k, dtype=torch.int32)
    return moekit.dispatch_plan(ids, _E, block_m, backend="triton")


def _run_permute(p):
    M, H = p["tokens"], 2000 if p.get("odd_h") else 2048
    hidden = torch.empty(M, H, dtype=_DTYPES[p["dtype"]])
    scales = {None: None, "row": torch.empty(M), "group": torch.empty(M, -(-H // 128))}
    moekit.permute(hidden, _plan(M, _TOP_K), top_k=_TOP_K,
                   row_scales=scales[p.get("scales")], backend="triton")


def _run_unpermute(p):
    M, H, k = p["tokens"], 2000 if p.get("odd_h") else 2048, p.get("top_k", _TOP_K)
    plan = _plan(M, k)
    moekit.unpermute(torch.empty(plan.capacity, H, dtype=_DTYPES[p["dtype"]]), plan,
                     torch.empty(M, k), backend="triton")


def _run_route(p):
    E = p["experts"]
    grouped = dict(n_group=8, topk_group=4, routed_scaling_factor=2.5) if p.get("groups") else {}
    moekit.route(
        torch.empty(4, E, dtype=_DTYPES[p["dtype"]]), p["top_k"], method=p["method"],
        renormalize=p.get("renormalize"),
        e_score_correction_bias=torch.empty(E) if p.get("bias") else None,
        packed=bool(p.get("packed")), backend="triton", **grouped,
    )


def _run_router_topk(p):
    dtype = _DTYPES[p["dtype"]]
    method = Routing.parse(p["method"], n_group=p.get("n_group"),
                           topk_group=p.get("topk_group"))
    router_topk(torch.empty(p["tokens"], p["hidden"], dtype=dtype),
                torch.empty(p["experts"], p["hidden"], dtype=dtype), p["top_k"],
                torch.zeros(1, dtype=torch.int32), method=method, backend="triton")


def _run_router_logits(p):
    dtype = _DTYPES[p["dtype"]]
    router_logits(torch.empty(p["tokens"], p["hidden"], dtype=dtype),
                  torch.empty(p["experts"], p["hidden"], dtype=dtype), backend="triton")


_BUILDERS = {"experts": _run_experts, "fp8": _run_fp8, "dispatch": _run_dispatch,
             "local_ids": _run_local_ids, "permute": _run_permute,
             "unpermute": _run_unpermute, "route": _run_route,
             "router_logits": _run_router_logits, "router_topk": _run_router_topk}


def compile_launch(fn, args, kwargs):
    """Bind and specialise one recorded launch as `JITFunction.run` does, for sm_90; compile.
    Returns Triton's compiled kernel (`asm` holds its PTX and cubin) and its constexprs."""
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    source = GluonASTSource if isinstance(fn, GluonJITFunction) else ASTSource
    return triton.compile(source(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__), constexprs


def _compile_sm90(fn, args, kwargs) -> dict:
    """`compile_launch`, and what the tests check of the result."""
    kernel, constexprs = compile_launch(fn, args, kwargs)
    ptx = kernel.asm["ptx"]
    names = fn.arg_names
    spills = _spill_store_bytes(ptx) if fn.__name__ in _GEMMS else None
    return {
        "name": fn.__name__,
        "constexprs": {names[path[0]]: str(value) for path, value in constexprs.items()
                       if value is not None and not names[path[0]].endswith("_desc")},
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "shared": kernel.metadata.shared,
        "tma": _TMA_PTX in ptx,
        "spill_bytes": spills,
        # Global loads of 8 or 16 bytes (ld.global.v2/v4) or their asynchronous copies
        # (cp.async, 4 bytes or more); rows Triton cannot prove aligned load 2 at a time.
        "vector_loads": len(re.findall(r"cp\.async\.c[ag]\.shared\.global|"
                                       r"ld\.global[.\w]*\.v[24]\.", ptx)),
        # The N of each warpgroup MMA shape (wgmma …m64nNk16) the kernel issues.
        "mma_n": sorted({int(n) for n in re.findall(r"wgmma\.mma_async[.\w]*\.m64n(\d+)k", ptx)}),
    }


def ptxas_report(ptx: str) -> str:
    """What `ptxas -v` says of this PTX on sm_90a (registers, spills, warnings)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        return subprocess.run(
            [knobs.nvidia.ptxas.path, "-v", "-arch=sm_90a", src, "-o",
             os.path.join(tmp, "kernel.o")], capture_output=True, text=True, check=True,
        ).stderr


def _spill_store_bytes(ptx: str) -> int:
    """Bytes of register spill stores ptxas reports for this PTX on sm_90a."""
    report = ptxas_report(ptx)
    return sum(int(line.split(" bytes spill stores")[0].split(",")[-1])
               for line in report.splitlines() if " bytes spill stores" in line)


def _describe(error: BaseException, limit: int = 3000) -> str:
    """The error and its causes, innermost (Triton's own message) last, each trimmed."""
    chain = []
    while error is not None and len(chain) < 8:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        chain.append(text if len(text) <= limit else text[:limit] + " [...]")
        error = error.__cause__ or error.__context__
    return "\n\ncaused by: ".join(chain)


def _worker(case_ids: list[str]) -> None:
    """Compile the given cases (all when none); one JSON line per case on the original stdout.

    Run by hand (`python tests/test_sm90_compile.py [ids]`) it shows each case's compile
    seconds, by which `Case.slow` and `_OP_COST` balance the workers.
    """
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Triton prints whole PTX listings on ptxas errors: keep them off the pipe
    for case_id in case_ids or list(_BY_ID):
        case = _BY_ID[case_id]
        result = {"case": case_id, "kernels": [], "error": None}
        start = time.perf_counter()
        try:
            launches = []
            with _recording_launches(launches):
                _BUILDERS[case.op](case.params)
            seen = set()
            for fn, args, kwargs in launches:
                if fn.__name__ in case.kernels:
                    compiled = _compile_sm90(fn, args, kwargs)
                    key = json.dumps(compiled, sort_keys=True)
                    if key not in seen:
                        seen.add(key)
                        result["kernels"].append(compiled)
        except Exception as e:  # reported by the test of this case
            result["error"] = _describe(e)
        result["seconds"] = round(time.perf_counter() - start, 2)
        out.write(json.dumps(result) + "\n")
        out.flush()


if __name__ == "__main__":
    _worker(sys.argv[1:])
