"""fused_moe_fp8: route() then fused_experts_fp8 as one call, against the reference routing
and the quantised reference experts.

The oracle is `moekit.reference.route` + `moekit.reference.fused_experts_quantized` on
the same `QuantizedWeight`s, so a test measures what the composition adds: the logits,
top_k, renormalisation and expert map reaching the right experts with the right weights.
Routing the wrong experts or weights costs ~1 in relative L2 at these shapes.
"""

from __future__ import annotations

import pytest
import torch

import moekit
from fp8_interpreter import exact_fp8_casts
from helpers import (
    DEEPSEEK_LIKE,
    assert_close,
    capture_cuda_graph,
    poison_cuda_cache,
    random_experts,
    seeded_randn_like,
)
from moekit import reference
from moekit.quant import QuantScheme, quantize_weight

KERNEL_TOL = 3e-3  # tests/test_experts_fp8.py: fp32 hidden, summation order only
GPU_TOL = 1e-2


def make_case(scheme, M, E, H, I, *, bias=False, expert_map=False, dtype=torch.float32,
              device="cpu", seed=0):
    """(scheme, hidden, logits, q13, q2, b13, b2, table): fresh random weights quantised in
    `scheme`, and logits over all E experts, or over 2E with a table holding the even ones."""
    scheme = QuantScheme.parse(scheme)
    w13, w2, b13, b2 = random_experts(E, H, I, bias=bias, device=device, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 3)
    hidden = torch.randn(M, H, generator=g, device=device).to(dtype)
    table = None
    if expert_map:  # this rank holds the even global experts of 2E
        table = torch.full((2 * E,), -1, dtype=torch.int32, device=device)
        table[::2] = torch.arange(E, dtype=torch.int32, device=device)
    logits = torch.randn(M, E if table is None else 2 * E, generator=g, device=device)
    q13, q2 = quantize_weight(w13, scheme.weight), quantize_weight(w2, scheme.weight)
    if b13 is not None:
        b13, b2 = b13.to(dtype), b2.to(dtype)
    return scheme, hidden, logits.to(dtype), q13, q2, b13, b2, table


def expected(scheme, hidden, logits, q13, q2, b13, b2, table, k, renormalize=True):
    ids, weights = reference.route(logits, k, renormalize=renormalize)
    if table is not None:
        ids = reference.local_expert_ids(ids, table, q13.shape[0])
    return reference.fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                             b13=b13, b2=b2)


@pytest.mark.parametrize("scheme,renormalize,bias,expert_map", [
    ("fp8_tensor", True, False, False), ("fp8_channel", False, True, False),
    ("fp8_block", True, False, True)])
def test_reference_backend_is_route_then_the_quantised_experts(scheme, renormalize, bias,
                                                               expert_map):
    case = make_case(scheme, 7, 8, 256, 128, bias=bias, expert_map=expert_map, seed=5)
    scheme, hidden, logits, q13, q2, b13, b2, table = case
    out = moekit.fused_moe_fp8(hidden, logits, q13, q2, 3, scheme=scheme,
                               renormalize=renormalize, b13=b13, b2=b2, expert_map=table)
    want = expected(*case, 3, renormalize)
    assert torch.equal(out, want)
    # The renormalisation reached the experts: the other choice is another result.
    other = expected(*case, 3, not renormalize)
    assert (out - other).abs().max() > 1e-3


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_deepseek_routing_reaches_the_experts(backend):
    # Sigmoid over 4 groups of 2, 2 kept, a score-correction bias and a scaling factor:
    # the reference's routing under the same method, whichever backend.
    case = make_case("fp8_block", 5, 8, 256, 128, seed=11)
    scheme, hidden, logits, q13, q2, *_ = case
    method = DEEPSEEK_LIKE
    correction = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with exact_fp8_casts():
        out = moekit.fused_moe_fp8(hidden, logits, q13, q2, 3, scheme=scheme, method=method,
                                   e_score_correction_bias=correction, backend=backend)
    ids, weights = reference.route(logits, 3, method=method, e_score_correction_bias=correction)
    want = reference.fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme)
    assert_close(out, want, KERNEL_TOL, name=backend)
    assert (want - expected(*case, 3)).abs().max() > 1e-3, "the method changed the result"


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme,M,expert_map", [
    ("fp8_tensor", 3, False), ("fp8_block", 3, True), ("fp8_channel", 40, False)],
    ids=["direct-tensor", "direct-block-ep", "plan-channel"])
def test_kernels_match_the_reference_interpreter(scheme, M, expert_map):
    case = make_case(scheme, M, 8, 256, 128, expert_map=expert_map, seed=M)
    scheme, hidden, logits, q13, q2, b13, b2, table = case
    with exact_fp8_casts():
        out = moekit.fused_moe_fp8(hidden, logits, q13, q2, 2, scheme=scheme,
                                   expert_map=table, backend="triton")
    assert not out.isnan().any()
    assert_close(out, expected(*case, 2), KERNEL_TOL, name=f"{scheme} M={M}")


def test_bad_inputs_name_the_argument():
    scheme, hidden, logits, q13, q2, *_ = make_case("fp8_tensor", 3, 4, 128, 64)
    with pytest.raises(ValueError, match="router_logits: expected 4 columns"):
        moekit.fused_moe_fp8(hidden, logits[:, :3], q13, q2, 2, scheme=scheme)
    with pytest.raises(ValueError, match="top_k"):
        moekit.fused_moe_fp8(hidden, logits, q13, q2, 5, scheme=scheme)
    with pytest.raises(ValueError, match="top_k"):
        moekit.fused_moe_fp8(hidden, logits, q13, q2, True, scheme=scheme)
    with pytest.raises(TypeError, match="w13: expected a QuantizedWeight"):
        moekit.fused_moe_fp8(hidden, logits, q13.q, q2, 2, scheme=scheme)
    table = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match="expert_map's length"):
        moekit.fused_moe_fp8(hidden, logits, q13, q2, 2, scheme=scheme, expert_map=table)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 64, 512])
@pytest.mark.parametrize("scheme", ["fp8_tensor", "fp8_channel", "fp8_block"])
def test_matches_route_then_experts_and_replays_gpu(scheme, M):
    """Bitwise route() + fused_experts_fp8 (the same kernels), replayed or not, inside a
    CUDA graph or not; near the reference."""
    case = make_case(scheme, M, 32, 1024, 512, expert_map=M == 4, dtype=torch.bfloat16,
                     device="cuda", seed=M)
    scheme, hidden, logits, q13, q2, b13, b2, table = case
    topk = moekit.route(logits, 4)
    poison_cuda_cache()
    want = moekit.fused_experts_fp8(hidden, q13, q2, topk.ids, topk.weights, scheme=scheme,
                                    expert_map=table)
    for _ in range(3):  # plainly, recorded, replayed
        poison_cuda_cache()
        out = moekit.fused_moe_fp8(hidden, logits, q13, q2, 4, scheme=scheme, expert_map=table)
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    assert_close(out, expected(*case, 4), GPU_TOL, name=f"{scheme} M={M}")
    graph, captured = capture_cuda_graph(lambda: moekit.fused_moe_fp8(
        hidden, logits, q13, q2, 4, scheme=scheme, expert_map=table))
    logits.copy_(seeded_randn_like(logits, M + 1))  # new routing, replayed by the graph
    graph.replay()
    topk = moekit.route(logits, 4)
    want = moekit.fused_experts_fp8(hidden, q13, q2, topk.ids, topk.weights, scheme=scheme,
                                    expert_map=table)
    torch.cuda.synchronize()
    assert torch.equal(captured.view(torch.int16), want.view(torch.int16))


def _compiled_layer(q13, q2, scheme, **options):
    @torch.compile(**options)
    def layer(x, router_logits):
        return moekit.fused_moe_fp8(x * 2, router_logits, q13, q2, 2, scheme=scheme) + 1
    return layer


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace:UserWarning")
def test_torch_compile_on_the_reference_path():
    # The reference's loop over the experts present breaks the graph here; on the GPU the
    # ops trace whole (below).
    scheme, hidden, logits, q13, q2, *_ = make_case("fp8_block", 5, 8, 256, 128, seed=9)
    torch._dynamo.reset()
    out = _compiled_layer(q13, q2, scheme, backend="aot_eager")(hidden, logits)
    eager = moekit.fused_moe_fp8(hidden * 2, logits, q13, q2, 2, scheme=scheme) + 1
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 64])
def test_torch_compile_gpu(M):
    scheme, hidden, logits, q13, q2, *_ = make_case("fp8_tensor", M, 32, 1024, 512,
                                                    dtype=torch.bfloat16, device="cuda")
    out = _compiled_layer(q13, q2, scheme, fullgraph=True)(hidden, logits)
    eager = moekit.fused_moe_fp8(hidden * 2, logits, q13, q2, 2, scheme=scheme) + 1
    assert torch.equal(out.view(torch.int16), eager.view(torch.int16))
