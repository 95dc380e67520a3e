"""fp8 W8A8 fused experts: fp8 weights × fp8 activations, fp32 accumulation, scales per scheme.

    hidden [M, H] ─► _quantize_rows_kernel: xq fp8 [M, H] + scales      (once per token)
                 ─► plan (pairs grouped by expert, padded to block_m)
                    — the two in one launch (`_plan_quantize_kernel`) but where the
                    quantiser writes plan-order rows for the Gluon GEMM1
                 ─► _gemm1_fp8_kernel: gathered xq rows × w13[e]ᵀ, scales, bias, activation,
                    quantised again ─► inter fp8 [capacity, I] + scales [capacity, I/g]
                 ─► _gemm2_fp8_kernel: inter × w2[e]ᵀ, scales, bias, × router weight
                                                                    ─► pair_out [M*k, H]
                    (few programs of long K loops, as mixtral's at decode: K split into
                    parts, float32 partial sums [parts, M*k, H]; `gemm2_k_parts`)
                 ─► _combine_kernel (the bf16 pipeline's): Σ over slots (and parts)
                                                                    ─► out [M, H]

On an sm_90 GPU at 128-row tiles the GEMMs are warp-specialised Gluon kernels instead
(TMA producer warpgroup, two math warpgroups; `MOEKIT_GLUON=0` keeps the Triton ones):
    GEMM2 (`moekit._gluon_gemm2`) for H in whole 128-column tiles (256 where H allows):
          it stores plan-order tiles, [capacity, H], which the combine reads through the
          plan's `pair_slots`;
    GEMM1 (`moekit._gluon_gemm1`) for a gated activation in every scheme, except scales
          varying along K (block scales) together with biases: TMA cannot gather, so from
          4 experts per token with input scales constant along K its producer gathers the
          token rows by cp.async (`gather_rows`); otherwise the quantiser writes each
          token's fp8 row to its pairs' plan slots, [capacity, H] (k× the bytes of [M, H];
          padding slots unwritten).
Their tiles are fixed (`config.gemm1`/`gemm2` shape the Triton kernels only).

The formats are a `QuantScheme`; `moekit.reference.fused_experts_quantized` is the
oracle, and the two agree on every choice below.

GEMM1's input: hidden is quantised by one small kernel before the GEMM (two when a
dynamic per-tensor scale over more than 16,384 values first needs amax partials) — a pass
over M×H, not M·k×H, since all k pairs of a token read its one fp8 row (with the Gluon
GEMM1 on plan-order rows the pass reads M×H and writes M·k×H). Quantising inside GEMM1's
loads instead would redo it in every one of the I/BLOCK_N column programs, and a
per-token or per-tensor scale needs the whole row, or tensor, before the first value.
Tried for decode (one launch fewer), it measured 0.28–0.99× on an H100 at every token
count (bench/results/h100-sxm-20261123-fp8-fused-quant-experiment.json).

GEMM2's input is quantised in GEMM1's epilogue, where a tile holds BLOCK_N columns of
its rows: dynamically in 1×g groups (`QuantScheme.gemm2_input`: g = 128 for the
presets), so GEMM1's BLOCK_N is a multiple of g; statically by w2.input_scale.

At the 128-row tile of the compute-bound regime the GEMMs take the 16-bit pipeline's
prefill path (`moekit._tma`): TMA weight tiles, the persistent GEMM2 (reading `inter`
through TMA too) and tail tiles (`ExpertsConfig.tail_block_m`); GEMM1 there runs in two
column halves, so that its promoted fp8 accumulators fit in registers.

Everything that depends only on the weights — fp8 values, their scales, static input
scales — is prepared once in `QuantizedWeight`; a forward pass reads them through
pointers and strides and allocates only activations, so a captured CUDA graph stays
valid for as long as the weights live. No fills, no host synchronisation.

A configuration with `block_m` = 1 takes the direct path instead (`moekit.experts_direct_fp8`:
no plan, the combine fused into GEMM2, three launches); the heuristic chooses it for up to
four tokens on 32 or more experts and up to 8192 values of hidden (`default_fp8_config`).

Expert maps (expert parallelism) as in `fused_experts`: the ids are mapped to local ones
first (`moekit.local_expert_ids`). The router weight on the input (Llama-4) for top-1
routing only: hidden × weight in float32 feeds the quantiser (two small launches), and
GEMM2 weighs by one; with k > 1 every pair would need a quantised row of its own.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from moekit import _persistent_gemm1, reference
from moekit._checks import (
    FLOAT_DTYPES,
    check_fp8_weight_on_input,
    check_routed_experts,
    check_router,
    check_tensor,
    dense_bias,
    narrow_weights,
    output_like,
)
from moekit._dispatch_kernels import _place_pairs_kernel
from moekit._experts_fp8_kernels import (
    SPLIT_BLOCK_M,
    _amax_partials_kernel,
    _gemm1_fp8_kernel,
    _gemm2_fp8_kernel,
)
from moekit._fp8_quantize import (
    FMAX,
    launch_plan_and_quantize,
    quantize_rows_launch,
)
from moekit._fp8_scales import activation_mode, uniform_along_n, weight_scale_layout
from moekit._fp8_swap import launch_stages, swap_ab
from moekit._gluon_gemm1 import gather_rows, gluon_gemm1, stage_input_scales, use_gluon_gemm1
from moekit._gluon_gemm2 import BLOCK_N as GLUON_BLOCK_N
from moekit._gluon_gemm2 import gluon_gemm2, use_gluon_gemm2
from moekit._host_cache import host_cache
from moekit._intmath import cdiv, row_align
from moekit._launch import launcher
from moekit._replay import replayed
from moekit._tile_order import expert_groups
from moekit._tma import heuristic_sms, matrix_descriptor, persistent_programs, use_tma
from moekit._topk_cast import kernel_topk
from moekit.activation import Activation
from moekit.backend import resolve_backend
from moekit.dispatch import PlaceLaunch, local_expert_ids, prepared_plan
from moekit.dispatch_plan import DispatchPlan
from moekit.experts import check_config, launch_combine
from moekit.experts_direct_fp8 import gemm1_group_counts, launch_direct_experts_fp8
from moekit.quant import AMAX_FLOOR, QuantizedWeight, QuantScheme
from moekit.quant.scheme import FULL
from moekit.quant.weight import check_quantized_weights
from moekit.routing import Routing, route
from moekit.tuning import ExpertsConfig, GemmConfig
from moekit.tuning.config import DIRECT_BLOCK_M
from moekit.tuning.heuristic import (
    HOPPER_SMS,
    direct_tiles,
    gemm2_k_parts,
    narrow_row_tile,
    pick_block_m,
    use_direct_fp8_path,
)
from moekit.tuning.tables import tuned_for

# The per-tensor amax pass: 1024-value blocks, 8 warps, up to 512 programs of at least two
# blocks (bench/results/h200-20261202-amax-sweep.md: 1.4–1.8× the earlier 256 programs of
# 4 warps and ≥ 8 blocks, which read 16 MB at 1.1–1.4 TB/s).
_AMAX_BLOCK, _AMAX_WARPS, _AMAX_MIN_BLOCKS = 1024, 8, 2
_MAX_AMAX_PROGRAMS = 512  # every quantiser program reads all partials
# Up to this many values of hidden a per-tensor amax is read by the quantiser's every
# program (one launch: one load, or steps of up to 8 rows; `moekit._fp8_quantize`), not
# reduced by a partials launch first. 65,536 (M = 16–32 at H = 2048 too) was slower: the
# launch 6.5–11 µs against 1.7 + 3.1 apart (`h100-sxm-20261207-quantiser-rows-amax-s71.json`).
_TENSOR_ROWS_MAX = 16384


@replayed
def fused_experts_fp8(
    hidden: torch.Tensor,
    w13: QuantizedWeight,
    w2: QuantizedWeight,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    scheme: str | QuantScheme,
    activation: str | Activation = "silu",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    config: ExpertsConfig | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    expert_map: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """out[m] = Σ_j weights[m, j] · expert_{ids[m, j]}(hidden[m]), fp8 weights and GEMM inputs.

    Args:
        hidden: [M, H] bf16/fp16 (fp32 also runs); quantised per `scheme.activation`.
        w13: quantised [E, 2I, H] (gate rows, then up), or [E, I, H] for `relu2`; E ≥ 1.
        w2: quantised [E, H, I].
        topk_ids: [M, k] int32, or int64 (`torch.topk`'s: the direct path's kernels read
            it as it is, the plan path converts it in one launch with the weights);
            ids outside [0, E) contribute nothing, int64 ones past int32's range included.
        topk_weights: [M, k] float32 (bf16, fp16 and float64 are converted).
        scheme: a `QuantScheme` or a preset's name ("fp8_tensor", "fp8_channel",
            "fp8_block"); w13 and w2 must be in its weight format, and with static
            activations carry `input_scale`.
        activation: name or `Activation`.
        b13: optional [E, 2I] (or [E, I]); b2: optional [E, H]; added in float32.
        expert_map: optional int32 [E_global] for expert parallelism: `topk_ids` then hold
            global ids, each mapped to its local id first (`moekit.local_expert_ids`, one
            small launch); pairs whose expert is held elsewhere contribute nothing, so the
            result is this rank's partial sum.
        apply_router_weight_on_input: out[m] = expert_{ids[m, 0]}(weights[m, 0] · hidden[m])
            (Llama-4), the product in float32 before quantisation; top_k = 1 only.
        config: tile configuration; default `default_fp8_config`.
        out: optional [M, H] contiguous buffer of hidden's dtype to write the result into.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        [M, H] in hidden's dtype (`out` when given).
    """
    scheme = QuantScheme.parse(scheme)
    act = Activation.parse(activation)
    _check_args(hidden, w13, w2, topk_ids, topk_weights, scheme, act, b13, b2)
    check_fp8_weight_on_input(apply_router_weight_on_input, topk_ids.shape[1])
    check_config(config)
    topk_weights = narrow_weights(topk_weights)
    path = resolve_backend(backend, hidden)
    if path == "reference" or expert_map is not None:  # else converted where launched
        topk_ids, topk_weights = kernel_topk(topk_ids, topk_weights,
                                             launch=path != "reference")
    if expert_map is not None:
        topk_ids = local_expert_ids(topk_ids, expert_map, w13.shape[0], backend=backend)
    out = output_like(hidden, out)
    if path == "reference":
        return out.copy_(reference.fused_experts_quantized(
            hidden, w13, w2, topk_ids, topk_weights, scheme=scheme, activation=act, b13=b13,
            b2=b2, apply_router_weight_on_input=apply_router_weight_on_input,
        ))
    _check_kernel_scheme(scheme)
    b13, b2 = dense_bias(b13), dense_bias(b2)
    num_experts, _, inter = w2.shape
    if config is None:
        config = _select_fp8_config(hidden, num_experts, topk_ids.shape[1], inter, scheme)
    else:
        _check_config(config, scheme, hidden.is_cuda)
    static = not scheme.activation.dynamic
    if apply_router_weight_on_input:  # top-1: the token's row × its one weight, in fp32
        hidden = hidden.float() * topk_weights
        topk_weights = torch.ones_like(topk_weights)
    # Eager calls skip the custom-op dispatcher (tens of µs of host time per call);
    # torch.compile sees the registered op.
    launch = (torch.ops.moekit.fused_experts_fp8 if torch.compiler.is_compiling()
              else _launch_fused_experts_fp8)
    launch(
        hidden.contiguous(), w13.q.contiguous(), w13.scale, w2.q.contiguous(), w2.scale,
        w13.input_scale if static else None, w2.input_scale if static else None,
        topk_ids.contiguous(), topk_weights.contiguous(), b13, b2,
        act.kind, act.alpha, act.limit, _groups_to_list(scheme), config.as_ints(), out,
    )
    return out


@replayed
def fused_moe_fp8(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: QuantizedWeight,
    w2: QuantizedWeight,
    top_k: int,
    *,
    scheme: str | QuantScheme,
    method: str | Routing = "softmax",
    renormalize: bool | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    activation: str | Activation = "silu",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    expert_map: torch.Tensor | None = None,
    config: ExpertsConfig | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`route` (by default softmax → top-k, renormalised) followed by
    `fused_experts_fp8`: `fused_moe` on fp8 weights.

    Eager calls replay as one (`moekit._replay`): one call key for both ops, and the
    routing's ids and weights in the replay's workspace.

    Args:
        hidden: [M, H]; w13, w2, scheme, b13, b2, config: as in `fused_experts_fp8`.
        router_logits: [M, E], or [M, E_global] with `expert_map`.
        top_k: experts per token, 1 ≤ top_k ≤ the router's experts.
        method, renormalize, e_score_correction_bias: as `route`'s.
        apply_router_weight_on_input: as `fused_experts_fp8`'s (top-1 only).
        expert_map: optional int32 [E_global] for expert parallelism (as in
            `fused_experts_fp8`): this rank's partial sum.
    Returns:
        [M, H] in hidden's dtype.
    """
    if not isinstance(w13, QuantizedWeight):
        raise TypeError(f"w13: expected a QuantizedWeight, got {type(w13).__name__}")
    check_router(router_logits, w13.shape[0], top_k, expert_map)
    topk = route(router_logits, top_k, method=method, renormalize=renormalize,
                 e_score_correction_bias=e_score_correction_bias, backend=backend)
    return fused_experts_fp8(
        hidden, w13, w2, topk.ids, topk.weights, scheme=scheme, activation=activation,
        b13=b13, b2=b2, config=config, backend=backend, expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input,
    )


def _select_fp8_config(hidden: torch.Tensor, num_experts: int, top_k: int, inter: int,
                       scheme: QuantScheme) -> ExpertsConfig:
    """This device's tuned table entry (`moekit tune --dtype fp8_…`) where one beat the
    heuristic, else `default_fp8_config`. Under torch.compile only the heuristic."""
    tuned = tuned_for(hidden, scheme.preset_name, num_experts, top_k, inter)
    if tuned is not None:
        return tuned
    num_tokens, hidden_size = hidden.shape
    sms = heuristic_sms(hidden.device)
    return default_fp8_config(num_tokens, num_experts, top_k, hidden_size, inter, scheme, sms)


@host_cache(maxsize=4096)  # pure, and on every call's host path
def default_fp8_config(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int,
                       scheme: str | QuantScheme, num_sms: int = HOPPER_SMS) -> ExpertsConfig:
    """Tiles for `fused_experts_fp8` on a GPU of `num_sms` SMs: the direct path's
    (`direct_fp8_config`) for up to four tokens on 32 or more experts, and M × H ≤ 8192
    (`use_direct_fp8_path`); a narrow layer's (`narrow_fp8_config`) where the 16-bit rule
    takes them; else the plan path's (`plan_fp8_config`)."""
    if use_direct_fp8_path(num_tokens, num_experts, hidden):
        return direct_fp8_config(num_tokens, top_k, hidden, inter, scheme)
    narrow = narrow_row_tile(num_tokens, num_experts, top_k, hidden, inter, num_sms)
    if narrow:
        return narrow_fp8_config(narrow, scheme)
    return plan_fp8_config(num_tokens, num_experts, top_k, scheme)


def narrow_fp8_config(block_m: int, scheme: str | QuantScheme) -> ExpertsConfig:
    """A narrow layer's fp8 tiles (`moekit.tuning.heuristic.narrow_layer`): both GEMMs 128
    columns × 128 bytes of K in 3 stages, 4 warps — the 16-bit rule's shared memory per
    stage, two GEMM1 programs per SM. Found by `moekit tune` at granite M = 16 / 64 / 128
    (bench/results/h200-20261202-tune-fp8_*-granite-s18.json); against the plan path's
    tiles on the H200 (`h200-20261202-narrow-layer-experiment-fp8-s18.md`): 1.02–1.29×
    faster at M = 16–160 in all three schemes (M = 64: 1.23–1.29×), 1.00× at M = 8 and 192."""
    k1, k2, inter_group = _k_groups(QuantScheme.parse(scheme))
    tile = GemmConfig(128, 128, 8, 4, 3)
    g1 = dataclasses.replace(tile, block_n=max(128, inter_group or 0))
    return ExpertsConfig(block_m, _fit_k(g1, k1), _fit_k(tile, k2))


def direct_fp8_config(num_tokens: int, top_k: int, hidden: int, inter: int,
                      scheme: str | QuantScheme) -> ExpertsConfig:
    """Tiles for the fp8 direct path (`ExpertsConfig.block_m` = 1): the 16-bit rule's
    (`direct_tiles`) with GEMM2's slots split until there are twice as many programs
    (a step streams half the bytes); GEMM1's K tiles 256 one-byte values deep where no
    scale groups K, else one group — or two (run as sub-steps) from
    `TWO_GROUPS_MIN_ROWS_X_INTER`; GEMM2's pipeline 6 deep, since its steps stream only
    block_n × 128 bytes each (H200, bench/NOTES.md)."""
    k1, k2, _ = _k_groups(QuantScheme.parse(scheme))
    tiles = direct_tiles(num_tokens, top_k, hidden, dtype_bytes=1)
    g1 = _fit_k(dataclasses.replace(tiles.gemm1, block_k=256, num_stages=4), k1)
    if k1 and num_tokens * inter >= TWO_GROUPS_MIN_ROWS_X_INTER and 2 * min(k1) <= 256:
        g1 = dataclasses.replace(g1, block_k=2 * min(k1))
    g2 = dataclasses.replace(tiles.gemm2, block_k=128, num_stages=6)
    return ExpertsConfig(DIRECT_BLOCK_M, g1, _fit_k(g2, k2))


# Block scales on the direct path: GEMM1's K tile two 128-wide groups deep won 1.03–1.10×
# where tokens × I ≥ 4096 (olmoe, deepseek-v2-lite at M = 4, deepseek-v3 at M = 2, 4) and
# tied or lost (up to 1.13×) in the eight cells below it (H200,
# bench/results/h200-20261202-direct-fp8-two-groups.md).
TWO_GROUPS_MIN_ROWS_X_INTER = 4096


def plan_fp8_config(num_tokens: int, num_experts: int, top_k: int,
                    scheme: str | QuantScheme) -> ExpertsConfig:
    """The plan path's tiles: the bf16 heuristic's row tile, fp8-sized tiles.

    block_m follows `moekit.tuning.heuristic.pick_block_m`. At 128 rows (compute-bound)
    the tiles are the 16-bit pipeline's prefill shape: TMA weight tiles, the persistent
    GEMM2, tail tiles, and GEMM1 in two column halves (`_gemm1_fp8_kernel`: its promoted
    accumulators would spill at 128 × 128). K tiles are 128 deep (one 128-byte line per
    row, one group of block scales), GEMM1's 256 where no scale groups K: it then promotes
    every 256 products, not 128: measured 1.05–1.13× faster on the H100 at a relative
    error of 4.5–5.0e-3 instead of 3.8–4.1e-3 (bench/NOTES.md, fp8 prefill). GEMM1's column
    tile holds whole groups of GEMM2's input when that is quantised dynamically.
    """
    scheme = QuantScheme.parse(scheme)
    k1, k2, inter_group = _k_groups(scheme)
    block_m = pick_block_m(num_tokens, num_experts, top_k)
    block_n1 = max(64, inter_group or 0)
    if block_m == 128:
        g1, g2 = GemmConfig(max(128, block_n1), 256, 8, 8, 3), GemmConfig(128, 128, 8, 8, 4)
        return ExpertsConfig(128, _fit_k(g1, k1), _fit_k(g2, k2), tail_block_m=64)
    if block_m <= 32:
        warps1 = 8 if block_m == 32 and block_n1 >= 128 else 4
        g1, g2 = GemmConfig(block_n1, 128, 8, warps1, 4), GemmConfig(64, 128, 8, 4, 4)
    else:
        g1, g2 = GemmConfig(max(128, block_n1), 128, 8, 8, 4), GemmConfig(128, 128, 8, 4, 3)
    return ExpertsConfig(block_m, _fit_k(g1, k1), _fit_k(g2, k2))


def _fit_k(tile: GemmConfig, k_groups: tuple[int, ...]) -> GemmConfig:
    """`tile` with its K tile cut to the smallest K group, so no K tile straddles two."""
    return dataclasses.replace(tile, block_k=min([tile.block_k, *k_groups]))


@host_cache(maxsize=64)  # on every call's host path; schemes are frozen
def _k_groups(scheme: QuantScheme) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """Finite K groups of GEMM1's and GEMM2's operands, and GEMM2's dynamic input group."""
    finite = lambda *groups: tuple(g for g in groups if g != FULL)
    k1 = finite(scheme.activation.group[1], scheme.weight.group[1])
    inter = scheme.gemm2_input
    inter_group = None if not inter.dynamic else inter.group[1]
    k2 = finite(inter.group[1], scheme.weight.group[1])
    return k1, k2, inter_group


def _check_kernel_scheme(scheme: QuantScheme) -> None:
    """The kernels' limits on a scheme: token rows, power-of-two K groups of 16..512."""
    if scheme.activation.group[0] == FULL and scheme.activation.group[1] != FULL:
        raise ValueError(
            f"scheme: activation group {scheme.activation.group} spans tokens along K groups; "
            "the kernels take per-tensor, per-token or 1×g activation scales"
        )
    k1, k2, _ = _k_groups(scheme)
    for g in {*k1, *k2}:
        if g < 16 or g > 512 or g & (g - 1):
            raise ValueError(
                f"scheme: K group {g} is not a power of two in [16, 512]; the kernels need a "
                "K tile that divides it"
            )


# Triton's fp8 dots need K ≥ 32 (on sm_90, `tl.dot`'s shape check).
FP8_MIN_BLOCK_K = 32


def _check_config(config: ExpertsConfig, scheme: QuantScheme, on_gpu: bool = False) -> None:
    """A K tile must lie inside one scale group — on the direct path GEMM1's may also span
    whole groups (it runs them as sub-steps); on the plan path GEMM1's column tile must
    hold whole groups of GEMM2's dynamically quantised input (the direct path quantises it
    in GEMM2). On a GPU, K tiles of at least FP8_MIN_BLOCK_K (a shorter one would fail in
    Triton's compiler, with a message about the dot's shapes)."""
    k1, k2, inter_group = _k_groups(scheme)
    for name, gemm, groups in (("gemm1", config.gemm1, k1), ("gemm2", config.gemm2, k2)):
        if on_gpu and gemm.block_k < FP8_MIN_BLOCK_K:
            raise ValueError(f"config: {name}.block_k {gemm.block_k} is under "
                             f"{FP8_MIN_BLOCK_K}, the shortest K tile of an fp8 dot on a GPU")
        if not groups or gemm.block_k <= min(groups):
            continue
        if name == "gemm1" and config.direct:  # powers of two: whole groups, as sub-steps
            continue
        raise ValueError(
            f"config: {name}.block_k {gemm.block_k} exceeds the K group {min(groups)} of "
            "the scheme; each K tile needs one scale per operand row"
        )
    if inter_group is not None and not config.direct and config.gemm1.block_n % inter_group:
        raise ValueError(
            f"config: gemm1.block_n {config.gemm1.block_n} must be a multiple of {inter_group}, "
            "the group in which GEMM1's epilogue quantises GEMM2's input"
        )


def _check_args(hidden, w13, w2, topk_ids, topk_weights, scheme, act, b13, b2):
    """Validate shapes, dtypes and devices."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    device = hidden.device
    check_quantized_weights(w13, w2, scheme.weight, device)
    for name, w in (("w13", w13), ("w2", w2)):
        if not scheme.activation.dynamic and w.input_scale is None:
            raise ValueError(
                f"{name}: the scheme's activations are static, so {name}.input_scale is needed"
            )
    check_routed_experts(hidden, w13.q, w2.q, topk_ids, topk_weights, act, b13, b2)


def _groups_to_list(scheme: QuantScheme) -> list[int]:
    """The scheme as the custom op's ints: weight (n, k) group, activation (m, k) group,
    GEMM2 input's K group (−1: static, or whole dimension)."""
    inter = scheme.gemm2_input
    return [*scheme.weight.group, *scheme.activation.group,
            inter.group[1] if inter.dynamic else FULL]


def _gluon_gemms(tma: bool, w13_q: torch.Tensor, w2_q: torch.Tensor, block_m: int,
                 activation: str, groups: list[int], inter_static: bool,
                 has_bias13: bool) -> tuple[bool, bool]:
    """Whether (GEMM1, GEMM2) run as the Gluon kernels: TMA tiles (`tma`, `use_tma`'s
    answer), and each kernel's own predicate on its K groups (`groups`:
    `_groups_to_list`'s form of the scheme) and GEMM1's on its bias."""
    if not tma:
        return False, False
    w_group_n, w_group_k, _, a_group_k, inter_group = groups
    inter = None if inter_static else inter_group
    k2 = [g for g in (inter, w_group_k) if g is not None and g != FULL]
    return (use_gluon_gemm1(w13_q, block_m, activation, a_group_k, (w_group_n, w_group_k),
                            inter, has_bias13),
            use_gluon_gemm2(w2_q, block_m, k2))


def gluon_gemms(hidden: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
                scheme: str | QuantScheme, activation: str | Activation, block_m: int,
                b13: torch.Tensor | None = None) -> tuple[bool, bool]:
    """Whether `fused_experts_fp8` runs (GEMM1, GEMM2) as the Gluon kernels at this row
    tile — whose tiles are fixed, so `config.gemm1` / `gemm2` then change nothing (the
    tuner times such configurations once)."""
    scheme = QuantScheme.parse(scheme)
    tma = use_tma(hidden, w13.q, w2.q, block_m)
    return _gluon_gemms(tma, w13.q, w2.q, block_m, Activation.parse(activation).kind,
                        _groups_to_list(scheme), not scheme.activation.dynamic,
                        b13 is not None)


class _Gemm1Input(NamedTuple):
    """What `_gemm1_fp8_kernel` reads of hidden (its x and xs)."""

    x: torch.Tensor  # [M, H] fp8
    scale: torch.Tensor  # xs: hidden's scales (the static scale as given)
    stride_sm: int
    stride_sk: int
    group_k: int


def _amax_partials(hidden: torch.Tensor) -> torch.Tensor:
    """Launch `_amax_partials_kernel`: [P] fp32 maxima of |hidden| over P chunks."""
    numel = hidden.numel()
    programs = min(_MAX_AMAX_PROGRAMS, cdiv(numel, _AMAX_MIN_BLOCKS * _AMAX_BLOCK))
    chunk = cdiv(cdiv(numel, programs), _AMAX_BLOCK) * _AMAX_BLOCK
    partials = torch.empty(cdiv(numel, chunk), dtype=torch.float32,
                           device=hidden.device)
    launcher(_amax_partials_kernel)[(partials.numel(),)](
        hidden, partials, numel, chunk, BLOCK=_AMAX_BLOCK, num_warps=_AMAX_WARPS)
    return partials


def _gemm1_input(hidden: torch.Tensor, group_m: int, group_k: int,
                 static_scale: torch.Tensor | None, plan: DispatchPlan | None = None,
                 clear: torch.Tensor | None = None, place: PlaceLaunch | None = None,
                 scales_by_column: bool = False) -> _Gemm1Input:
    """hidden [M, H] as GEMM1 reads it: quantised to fp8 here (`_quantize_rows_kernel`;
    first `_amax_partials_kernel` for a dynamic per-tensor scale over many rows). With a
    `plan`, each row (and its per-row scales) is written to its pairs' plan slots instead:
    [capacity, H] in plan order, for the Gluon GEMM1. `clear` (int32) is zeroed on the way
    (GEMM1's group counters). With `place` (`moekit.dispatch.prepared_plan`'s) the
    quantiser runs in the plan's launch (`launch_plan_and_quantize`). `scales_by_column`:
    1×g group scales written transposed, [groups, rows rounded up to 4] (16-byte rows for
    the Gluon GEMM1's TMA boxes of them, `moekit._gluon_gemm1.stage_input_scales`)."""
    num_tokens, hidden_size = hidden.shape
    rows = num_tokens if plan is None else plan.capacity
    mode = activation_mode(group_m, group_k, static_scale)
    few_rows = mode == "tensor" and num_tokens * hidden_size <= _TENSOR_ROWS_MAX
    partials = _amax_partials(hidden) if mode == "tensor" and not few_rows else None
    group = group_k if mode == "group" else 1
    xq = torch.empty((rows, hidden_size), dtype=torch.float8_e4m3fn, device=hidden.device)
    if mode == "static":
        scale, strides = static_scale, (0, 0)
    elif mode == "tensor":
        scale = torch.empty(1, dtype=torch.float32, device=hidden.device)
        strides = (0, 0)
    elif mode == "token":
        scale = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        strides = (1, 0)
    elif scales_by_column:
        scale = torch.empty((cdiv(hidden_size, group_k), cdiv(rows, 4) * 4),
                            dtype=torch.float32, device=hidden.device)
        strides = (1, scale.stride(0))
    else:
        scale = torch.empty((rows, cdiv(hidden_size, group_k)),
                            dtype=torch.float32, device=hidden.device)
        strides = (scale.stride(0), 1)
    quantize = quantize_rows_launch(hidden, xq, scale, strides[0],
                                    "tensor_rows" if few_rows else mode, group, partials,
                                    None if plan is None else plan.pair_slots, clear,
                                    stride_sk=strides[1])
    launch_plan_and_quantize(place, quantize)
    return _Gemm1Input(xq, scale, strides[0], strides[1], group)


def _launch_fused_experts_fp8(
    hidden: torch.Tensor,
    w13_q: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_q: torch.Tensor,
    w2_scale: torch.Tensor,
    input_scale13: torch.Tensor | None,
    input_scale2: torch.Tensor | None,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    groups: list[int],
    config: list[int],
    out: torch.Tensor,
) -> None:
    """Launch plan and quantise (one launch), GEMM1, GEMM2 and combine (or the direct path's
    quantise and two GEMMs).

    `groups` is `_groups_to_list`'s form of the scheme, `config` `ExpertsConfig.as_ints`'s;
    the input scales are given exactly when the scheme's activations are static.
    """
    num_tokens, hidden_size = hidden.shape
    if num_tokens == 0:
        return
    w_group_n, w_group_k, a_group_m, a_group_k, inter_group = groups
    if config[0] == DIRECT_BLOCK_M:
        counts = gemm1_group_counts(topk_ids, w2_q.shape[2], inter_group,
                                    input_scale2 is not None, config[1])
        hidden_in = _gemm1_input(hidden, a_group_m, a_group_k, input_scale13, clear=counts)
        launch_direct_experts_fp8(hidden_in.x, hidden_in.scale, hidden_in.stride_sm, w13_q,
                                  w13_scale, w2_q, w2_scale, input_scale2, topk_ids,
                                  topk_weights, b13, b2, activation, alpha, limit, groups,
                                  config, out, counts)  # reads int64 ids, 16-bit weights
        return
    topk_ids, topk_weights = kernel_topk(topk_ids, topk_weights, launch=True)
    num_experts, _, inter = w2_q.shape
    top_k = topk_ids.shape[1]
    block_m, tail_m = config[0], config[11]
    c1, c2 = config[1:6], config[6:11]
    w_per_k = w_group_k != FULL
    dummy = topk_weights  # stands in for absent biases; never read

    tma = use_tma(hidden, w13_q, w2_q, block_m)
    inter_static = input_scale2 is not None
    gluon1, gluon2 = _gluon_gemms(tma, w13_q, w2_q, block_m, activation, groups, inter_static,
                                  b13 is not None)
    # The Gluon GEMM1 reads A by TMA, so the quantiser writes the rows in plan order —
    # unless it gathers them itself; otherwise it runs in the plan's launch.
    gather = gluon1 and gather_rows(top_k, hidden, a_group_k)
    scatter = gluon1 and not gather
    plan, place = prepared_plan(topk_ids, num_experts, tail_m or block_m,
                                tile_m=block_m if tail_m else None)
    if scatter:
        launcher(_place_pairs_kernel)[(place.programs,)](*place.args, **place.constexprs)
    num_tiles, _, tail_m = plan.row_tiles()
    staged = scatter and a_group_k != FULL and stage_input_scales()
    hidden_in = _gemm1_input(hidden, a_group_m, a_group_k, input_scale13,
                             plan if scatter else None, place=None if scatter else place,
                             scales_by_column=staged)

    inter_q = torch.empty((plan.capacity, inter), dtype=torch.float8_e4m3fn, device=hidden.device)
    if inter_static:
        inter_scale, stride_ism, stride_isk, inter_group = input_scale2, 0, 0, 1
    else:
        inter_scale = torch.empty((plan.capacity, cdiv(inter, inter_group)),
                                  dtype=torch.float32, device=hidden.device)
        stride_ism, stride_isk = inter_scale.stride(0), 1
    work_list = plan.block_experts if plan.tiles is None else plan.tiles
    ws1 = weight_scale_layout(w13_scale, w_group_n, w_group_k)
    gated = activation != "relu2"
    split = gated and block_m >= SPLIT_BLOCK_M  # see _gemm1_fp8_kernel
    swap1 = swap_ab("plan1", block_m, c1[0] // 2 if split else c1[0], w_per_k)
    swap2 = swap_ab("plan2", block_m, c2[0], w_per_k)
    gemm1_programs = _persistent_gemm1.gemm1_programs(hidden.device, tail_m)  # 0: one a tile
    grid1 = (gemm1_programs or num_tiles * cdiv(inter, c1[0]),)
    grouped = expert_groups(plan.num_pairs, num_experts, block_m)  # the Triton GEMMs' order
    programs = persistent_programs(hidden.device) if tma else 0
    if gluon1:
        gluon_gemm1(hidden_in.x, hidden_in.scale, (hidden_in.stride_sm, hidden_in.stride_sk),
                    hidden_in.group_k if a_group_k != FULL else None, w13_q, w13_scale, ws1,
                    uniform_along_n(ws1, GLUON_BLOCK_N, inter), b13, inter_q, inter_scale,
                    inter_static, plan, activation, alpha, limit, FMAX, AMAX_FLOOR, programs,
                    gather_top_k=top_k if gather else None, x_staged=staged)
    else:
        launcher(_gemm1_fp8_kernel)[grid1](
            hidden_in.x, hidden_in.scale, w13_q,
            matrix_descriptor(w13_q, c1[0] // 2 if split else c1[0], c1[1]) if tma else None,
            w13_scale, dummy if b13 is None else b13,
            inter_q, inter_scale, plan.sorted_pairs, plan.block_experts, work_list,
            plan.expert_offsets, num_experts, plan.num_pairs, num_tiles, hidden_size, inter,
            top_k,
            hidden_in.x.stride(0), hidden_in.stride_sm, hidden_in.stride_sk,
            w13_q.stride(0), w13_q.stride(1), *ws1[:3],
            0 if b13 is None else b13.stride(0), inter_q.stride(0), stride_ism,
            float(alpha), float(limit),
            ACTIVATION=activation, GATED=gated, HAS_BIAS=b13 is not None,
            EVEN_K=hidden_size % c1[1] == 0, EVEN_N=inter % c1[0] == 0, W_TMA=tma,
            X_PER_K=a_group_k != FULL, X_GROUP_K=hidden_in.group_k,
            W_PER_K=w_per_k, W_GROUP_N=ws1[3], W_GROUP_K=ws1[4],
            W_UNIFORM_N=uniform_along_n(ws1, c1[0], inter),
            INTER_STATIC=inter_static, INTER_GROUP=inter_group, SPLIT_N=split,
            FMAX=FMAX, AMAX_FLOOR=AMAX_FLOOR, TAIL_M=tail_m,
            ROW_ALIGN=row_align(hidden_size, inter, hidden_in.x.stride(0), w13_q.stride(0),
                                w13_q.stride(1), inter_q.stride(0)),
            BLOCK_M=block_m, BLOCK_N=c1[0], BLOCK_K=c1[1], GROUP_M=c1[2],
            EXPERT_GROUPS=grouped, SWAP_AB=swap1, PERSISTENT=gemm1_programs > 0,
            FLATTEN=_persistent_gemm1.FLATTEN, num_warps=c1[3],
            num_stages=launch_stages(swap1, c1[4], cdiv(hidden_size, c1[1])),
        )

    ws2 = weight_scale_layout(w2_scale, w_group_n, w_group_k)
    a_group_k = None if inter_static else inter_group
    if gluon2:
        plan_rows = gluon_gemm2(
            inter_q, inter_scale, (stride_ism, stride_isk), a_group_k, w2_q, w2_scale, ws2,
            uniform_along_n(ws2, GLUON_BLOCK_N, 0), b2, topk_weights, plan,
            hidden.dtype, programs)
        launch_combine(plan_rows, topk_ids, num_experts, out, pair_slots=plan.pair_slots)
        return
    # Few programs of long K loops split K (`gemm2_k_parts`): float32 partial rows.
    k_parts = 1 if tma else gemm2_k_parts(num_tiles * cdiv(hidden_size, c2[0]),
                                          cdiv(inter, c2[1]), heuristic_sms(hidden.device))
    pair_rows = (plan.num_pairs, hidden_size)
    pair_out = (torch.empty(pair_rows, dtype=hidden.dtype, device=hidden.device) if k_parts == 1
                else torch.empty((k_parts, *pair_rows), dtype=torch.float32, device=hidden.device))
    grid2 = (programs or num_tiles * cdiv(hidden_size, c2[0]), k_parts)
    launcher(_gemm2_fp8_kernel)[grid2](
        inter_q, matrix_descriptor(inter_q, block_m, c2[1]) if tma else None, inter_scale,
        w2_q, matrix_descriptor(w2_q, c2[0], c2[1]) if tma else None, w2_scale,
        dummy if b2 is None else b2, topk_weights, pair_out, plan.sorted_pairs,
        plan.block_experts, plan.expert_offsets, work_list,
        num_experts, plan.num_pairs, num_tiles, hidden_size, inter,
        inter_q.stride(0), stride_ism, stride_isk, w2_q.stride(0), w2_q.stride(1), *ws2[:3],
        0 if b2 is None else b2.stride(0), pair_out.stride(-2), pair_out.stride(0),
        HAS_BIAS=b2 is not None, EVEN_K=inter % c2[1] == 0, EVEN_N=hidden_size % c2[0] == 0,
        TMA=tma, PERSISTENT=tma, NUM_PROGRAMS=max(programs, 1),
        A_PER_K=not inter_static, A_GROUP_K=inter_group,
        W_PER_K=w_per_k, W_GROUP_N=ws2[3], W_GROUP_K=ws2[4],
        W_UNIFORM_N=uniform_along_n(ws2, c2[0], 0), TAIL_M=tail_m,
        ROW_ALIGN=row_align(hidden_size, inter, inter_q.stride(0), w2_q.stride(0),
                            w2_q.stride(1), pair_out.stride(-2)),
        BLOCK_M=block_m, BLOCK_N=c2[0], BLOCK_K=c2[1], GROUP_M=c2[2],
        EXPERT_GROUPS=grouped, SWAP_AB=swap2, K_PARTS=k_parts,
        num_warps=c2[3],
        num_stages=launch_stages(swap2, c2[4], cdiv(inter, c2[1])),
    )
    launch_combine(pair_out, topk_ids, num_experts, out)


_fused_experts_fp8_op = torch.library.custom_op(
    "moekit::fused_experts_fp8", _launch_fused_experts_fp8, mutates_args=("out",)
)


@_fused_experts_fp8_op.register_fake
def _(hidden, w13_q, w13_scale, w2_q, w2_scale, input_scale13, input_scale2, topk_ids,
      topk_weights, b13, b2, activation, alpha, limit, groups, config, out):
    return None

