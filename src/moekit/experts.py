"""The fused experts pipeline: dispatch plan → GEMM1 + activation → GEMM2 × weight → combine.

    hidden [M, H] ─► plan (pairs grouped by expert, padded to block_m)
                 ─► _gemm1_kernel: gathered rows × w13[e]ᵀ (+b13), activation ─► inter [cap, I]
                 ─► _gemm2_kernel: inter × w2[e]ᵀ (+b2), × router weight      ─► pair_out [M*k, H]
                 ─► _combine_kernel: Σ over the k slots of each token          ─► out [M, H]

Four launches (two on the direct path for a handful of tokens, `moekit.experts_direct`),
no host synchronisation and no fills, so a CUDA graph captures it; the
combine sums slots in a fixed order, so the result is bitwise deterministic. The
launcher is a `torch.library.custom_op` with a fake implementation, so `torch.compile`
traces it as one node. Each stage has its own launcher (`launch_gemm1`, `launch_gemm2`,
`launch_combine`) so that benchmarks can time them apart. On sm_90+ the 128-row
(compute-bound) tiles take their weights through TMA descriptors and GEMM2 runs
persistent (`moekit._tma`). With tail tiles (`ExpertsConfig.tail_block_m`, the
heuristic's choice at 128 rows) the plan is padded to 64 rows and carries the GEMMs'
work list (`DispatchPlan.tiles`). There, for 16-bit gated layers, both GEMMs may run as
warp-specialised Gluon kernels (`moekit._gluon_gemm1_16bit`, `moekit._gluon_gemm2_16bit`);
the Gluon GEMM2 writes rows in plan order, which the combine reads through the plan's
`pair_slots`.
"""

from __future__ import annotations

import torch

from moekit import _persistent_gemm1, reference
from moekit._checks import (
    FLOAT_DTYPES,
    check_routed_experts,
    check_router,
    check_tensor,
    dense_bias,
    dense_weight,
    narrow_weights,
    output_like,
)
from moekit._dot_precision import dot_precision
from moekit._experts_kernels import _combine_kernel, _gemm1_kernel, _gemm2_kernel
from moekit._gluon_gemm1_16bit import (
    BLOCK_N,
    NARROW_N,
    gluon_gemm1_16bit,
    use_gluon_gemm1_16bit,
)
from moekit._gluon_gemm2_16bit import gluon_gemm2_16bit, use_gluon_gemm2_16bit
from moekit._intmath import cdiv, row_align
from moekit._launch import launcher
from moekit._replay import replayed
from moekit._tile_order import expert_groups
from moekit._tma import heuristic_sms, matrix_descriptor, persistent_programs, use_tma
from moekit._topk_cast import kernel_topk
from moekit.activation import Activation
from moekit.backend import resolve_backend
from moekit.dispatch import dispatch_plan, local_expert_ids
from moekit.experts_direct import launch_direct_experts
from moekit.routing import Routing, route
from moekit.tuning import ExpertsConfig, default_config
from moekit.tuning.config import DIRECT_BLOCK_M
from moekit.tuning.heuristic import gluon_gemm1_narrow_columns
from moekit.tuning.tables import tuned_for

_COMBINE_BLOCK_H = 1024
_TABLE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@replayed
def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    activation: str | Activation = "silu",
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    apply_router_weight_on_input: bool = False,
    config: ExpertsConfig | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
    expert_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[m] = Σ_j weights[m, j] · expert_{ids[m, j]}(hidden[m]).

    Args:
        hidden: [M, H] bf16/fp16 (fp32 also runs, slowly, through exact fp32 dots).
        w13: [E, 2I, H] (gate rows, then up rows), or [E, I, H] for `relu2`; hidden's dtype;
            E ≥ 1.
        w2: [E, H, I], hidden's dtype. Weights should be contiguous: a strided view is
            copied on every call (with a warning).
        topk_ids: [M, k] int32, or int64 (`torch.topk`'s: the direct path's kernels read
            it as it is, the plan path converts it in one launch with the weights);
            ids outside [0, E) contribute nothing, int64 ones past int32's range included.
        topk_weights: [M, k] float32 (bf16, fp16 and float64 are converted).
        activation: name or `Activation`.
        b13: optional [E, 2I] (or [E, I]) bias of GEMM1; b2: optional [E, H] bias of GEMM2.
        apply_router_weight_on_input: scale each expert's input instead of its output.
        expert_map: optional int32 [E_global] for expert parallelism: `topk_ids` then hold
            global ids, each mapped to its local id first (`moekit.local_expert_ids`, one
            small launch); pairs whose expert is held elsewhere contribute nothing, so the
            result is this rank's partial sum.
        config: tile configuration; default from `moekit.tuning.default_config`.
        out: optional [M, H] contiguous buffer of hidden's dtype to write the result into.
        backend: "auto", "triton" or "reference" (see `moekit.backend`).
    Returns:
        [M, H] in hidden's dtype (`out` when given).
    """
    act = Activation.parse(activation)
    _check_experts_args(hidden, w13, w2, topk_ids, topk_weights, act, b13, b2)
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
        return out.copy_(reference.fused_experts(
            hidden, w13, w2, topk_ids, topk_weights, activation=act, b13=b13, b2=b2,
            apply_router_weight_on_input=apply_router_weight_on_input,
        ))
    if config is None:
        config = _select_config(hidden, w13.shape[0], topk_ids.shape[1], w2.shape[2])
    # Eager calls skip the custom-op dispatcher (tens of µs of host time per call);
    # torch.compile sees the registered op.
    launch = (
        torch.ops.moekit.fused_experts if torch.compiler.is_compiling() else _launch_fused_experts
    )
    launch(
        hidden.contiguous(), dense_weight("w13", w13), dense_weight("w2", w2),
        topk_ids.contiguous(), topk_weights.contiguous(), dense_bias(b13), dense_bias(b2),
        act.kind, act.alpha, act.limit,
        apply_router_weight_on_input, config.as_ints(), out,
    )
    return out


@replayed
def fused_moe(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    top_k: int,
    *,
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
    """`route` (by default softmax → top-k, renormalised) followed by `fused_experts`.

    Eager calls replay as one (`moekit._replay`): one call key for both ops, and the
    routing's ids and weights in the replay's workspace.

    Args:
        hidden: [M, H]; w13, w2, b13, b2: as in `fused_experts`.
        router_logits: [M, E], or [M, E_global] with `expert_map`.
        top_k: experts per token, 1 ≤ top_k ≤ the router's experts.
        method, renormalize, e_score_correction_bias: as `route`'s (a preset name or a
            `Routing`, e.g. DeepSeek-V3's sigmoid over expert groups; the bias [E_global]).
        apply_router_weight_on_input: as `fused_experts`' (Llama-4: sigmoid top-1,
            `renormalize=False`).
        expert_map: optional int32 [E_global] for expert parallelism (as in
            `fused_experts`): the router chooses among all E_global experts, this rank
            computes the pairs of its own E and returns their partial sum.
    Returns:
        [M, H] in hidden's dtype.
    """
    check_tensor("w13", w13, ndim=3)
    check_router(router_logits, w13.shape[0], top_k, expert_map)
    topk = route(router_logits, top_k, method=method, renormalize=renormalize,
                 e_score_correction_bias=e_score_correction_bias, backend=backend)
    return fused_experts(
        hidden, w13, w2, topk.ids, topk.weights, activation=activation, b13=b13, b2=b2,
        apply_router_weight_on_input=apply_router_weight_on_input, expert_map=expert_map,
        config=config, backend=backend,
    )


def check_config(config: object) -> None:
    """`config` must be None or an `ExpertsConfig`: the kernels read it through its
    methods, so anything else would fail later with an error that does not name it."""
    if config is not None and not isinstance(config, ExpertsConfig):
        raise TypeError(f"config: expected an ExpertsConfig, got {type(config).__name__}")


def _select_config(hidden: torch.Tensor, num_experts: int, top_k: int, inter: int):
    """A tuned table's entry for this device and shape where one won, else the heuristic.

    Under torch.compile only the heuristic is consulted (pure arithmetic, traceable).
    """
    tuned = tuned_for(hidden, _TABLE_DTYPES.get(hidden.dtype), num_experts, top_k, inter)
    if tuned is not None:
        return tuned
    num_tokens, hidden_size = hidden.shape
    sms = heuristic_sms(hidden.device)
    return default_config(num_tokens, num_experts, top_k, hidden_size, inter,
                          hidden.element_size(), sms)


def _check_experts_args(hidden, w13, w2, topk_ids, topk_weights, act, b13, b2):
    """Validate shapes, dtypes and devices."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w13", w13, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor("w2", w2, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
    check_routed_experts(hidden, w13, w2, topk_ids, topk_weights, act, b13, b2)


def _launch_fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    b13: torch.Tensor | None,
    b2: torch.Tensor | None,
    activation: str,
    alpha: float,
    limit: float,
    apply_router_weight_on_input: bool,
    config: list[int],
    out: torch.Tensor,
) -> None:
    """Launch plan, GEMM1, GEMM2 and combine (or the direct path's two GEMMs); `config` is
    `ExpertsConfig.as_ints`'s flat form."""
    if hidden.shape[0] == 0:
        return
    block_m, tail_m = config[0], config[11]
    if block_m == DIRECT_BLOCK_M:
        # The direct kernels read int64 ids and 16-bit weights themselves: no cast launch.
        launch_direct_experts(hidden, w13, w2, b13, b2, topk_ids, topk_weights, activation,
                              alpha, limit, apply_router_weight_on_input, config, out)
        return
    topk_ids, topk_weights = kernel_topk(topk_ids, topk_weights, launch=True)
    plan = dispatch_plan(topk_ids, w2.shape[0], tail_m or block_m,
                         tile_m=block_m if tail_m else None, backend="triton")
    tma = use_tma(hidden, w13, w2, block_m)
    inter = launch_gemm1(hidden, w13, b13, topk_weights, plan, activation, alpha, limit,
                         apply_router_weight_on_input, config[1:6], tma)
    if tma and use_gluon_gemm2_16bit(w2, block_m, plan.num_pairs):
        plan_rows = gluon_gemm2_16bit(inter, w2, b2, None if apply_router_weight_on_input
                                      else topk_weights, plan, persistent_programs(out.device))
        launch_combine(plan_rows, topk_ids, w2.shape[0], out, pair_slots=plan.pair_slots)
        return
    pair_out = launch_gemm2(inter, w2, b2, topk_weights, plan, not apply_router_weight_on_input,
                            config[6:11], tma)
    launch_combine(pair_out, topk_ids, w2.shape[0], out)


def launch_gemm1(hidden, w13, b13, topk_weights, plan, activation, alpha, limit,
                 weight_on_input, tiles, tma) -> torch.Tensor:
    """GEMM1 + activation over the plan's slots; returns `inter` [capacity, I].

    `tiles` is (block_n, block_k, group_m, num_warps, num_stages); `tma` from `use_tma`;
    a plan with a work list (`plan.tiles`) runs tail tiles.
    """
    num_tokens, hidden_size = hidden.shape
    num_blocks, block_m, tail_m = plan.row_tiles()
    if tma and use_gluon_gemm1_16bit(hidden, w13, block_m, activation):
        narrow = gluon_gemm1_narrow_columns(num_tokens, w13.shape[0], plan.num_pairs // num_tokens,
                                            w13.shape[1] // 2, heuristic_sms(hidden.device))
        return gluon_gemm1_16bit(hidden, w13, b13, topk_weights, plan, activation, alpha,
                                 limit, weight_on_input, persistent_programs(hidden.device),
                                 NARROW_N if narrow else BLOCK_N)
    gated = activation != "relu2"
    inter_size = w13.shape[1] // 2 if gated else w13.shape[1]
    block_n, block_k, group_m, warps, stages = tiles
    bias = topk_weights if b13 is None else b13  # a stand-in when absent; never read
    inter = torch.empty((plan.capacity, inter_size), dtype=hidden.dtype, device=hidden.device)
    programs = _persistent_gemm1.gemm1_programs(hidden.device, tail_m)  # 0: one a tile
    launcher(_gemm1_kernel)[(programs or num_blocks * cdiv(inter_size, block_n),)](
        hidden, w13, matrix_descriptor(w13, block_n, block_k) if tma else None,
        bias, topk_weights, inter, plan.sorted_pairs, plan.block_experts,
        plan.block_experts if plan.tiles is None else plan.tiles, plan.expert_offsets,
        w13.shape[0], plan.num_pairs, num_blocks, hidden_size, inter_size,
        plan.num_pairs // num_tokens, hidden.stride(0), w13.stride(0), w13.stride(1),
        0 if b13 is None else b13.stride(0), inter.stride(0), float(alpha), float(limit),
        ACTIVATION=activation, GATED=gated, HAS_BIAS=b13 is not None,
        WEIGHT_ON_INPUT=weight_on_input, EVEN_K=hidden_size % block_k == 0,
        EVEN_N=inter_size % block_n == 0, W_TMA=tma, DOT_PRECISION=dot_precision(hidden),
        TAIL_M=tail_m,
        ROW_ALIGN=row_align(hidden_size, inter_size, hidden.stride(0), w13.stride(0),
                            w13.stride(1), inter.stride(0)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        EXPERT_GROUPS=expert_groups(plan.num_pairs, w13.shape[0], block_m),
        PERSISTENT=programs > 0, FLATTEN=_persistent_gemm1.FLATTEN,
        num_warps=warps, num_stages=stages,
    )
    return inter


def launch_gemm2(inter, w2, b2, topk_weights, plan, weight_on_output, tiles, tma) -> torch.Tensor:
    """GEMM2 (+bias, × router weight) of `inter`; returns one row per pair [M*k, H].

    With TMA the grid is persistent (one program per SM), measured better on every cell.
    Tail tiles as in `launch_gemm1`.
    """
    num_experts, hidden_size, inter_size = w2.shape
    num_blocks, block_m, tail_m = plan.row_tiles()
    block_n, block_k, group_m, warps, stages = tiles
    bias = topk_weights if b2 is None else b2  # a stand-in when absent; never read
    pair_out = torch.empty((plan.num_pairs, hidden_size), dtype=inter.dtype, device=inter.device)
    programs = persistent_programs(inter.device) if tma else 0
    launcher(_gemm2_kernel)[(programs or num_blocks * cdiv(hidden_size, block_n),)](
        inter, matrix_descriptor(inter, block_m, block_k) if tma else None,
        w2, matrix_descriptor(w2, block_n, block_k) if tma else None,
        bias, topk_weights, pair_out, plan.sorted_pairs, plan.block_experts,
        plan.expert_offsets, plan.expert_offsets if plan.tiles is None else plan.tiles,
        num_experts, plan.num_pairs, num_blocks, hidden_size, inter_size,
        inter.stride(0), w2.stride(0), w2.stride(1), 0 if b2 is None else b2.stride(0),
        pair_out.stride(0),
        WEIGHT_ON_OUTPUT=weight_on_output, HAS_BIAS=b2 is not None,
        EVEN_K=inter_size % block_k == 0, EVEN_N=hidden_size % block_n == 0, TMA=tma,
        PERSISTENT=tma, NUM_PROGRAMS=max(programs, 1), DOT_PRECISION=dot_precision(inter),
        TAIL_M=tail_m,
        ROW_ALIGN=row_align(hidden_size, inter_size, inter.stride(0), w2.stride(0),
                            w2.stride(1), pair_out.stride(0)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        EXPERT_GROUPS=expert_groups(plan.num_pairs, num_experts, block_m),
        num_warps=warps, num_stages=stages,
    )
    return pair_out


def launch_combine(pair_out, topk_ids, num_experts, out, pair_slots=None) -> None:
    """out[m] = Σ_j pair_out[m*k + j] over the valid slots, in slot order; with
    `pair_slots` (the plan's) pair_out is in plan order: row pair_slots[m*k + j]. A 3-D
    pair_out [parts, M*k, H] holds partial sums (the fp8 GEMM2's K parts): each slot's
    parts are added in order."""
    num_tokens, hidden_size = out.shape
    parts = pair_out.shape[0] if pair_out.dim() == 3 else 1
    launcher(_combine_kernel)[(num_tokens, cdiv(hidden_size, _COMBINE_BLOCK_H))](
        pair_out, topk_ids, topk_ids if pair_slots is None else pair_slots, out, hidden_size,
        num_experts, pair_out.stride(-2), pair_out.stride(0) if parts > 1 else 0,
        out.stride(0), TOP_K=topk_ids.shape[1], BY_SLOT=pair_slots is not None, PARTS=parts,
        BLOCK_H=_COMBINE_BLOCK_H,
    )


_fused_experts_op = torch.library.custom_op(
    "moekit::fused_experts", _launch_fused_experts, mutates_args=("out",)
)


@_fused_experts_op.register_fake
def _(hidden, w13, w2, topk_ids, topk_weights, b13, b2, activation, alpha, limit,
      apply_router_weight_on_input, config, out):
    return None
