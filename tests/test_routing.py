"""Routing: every method on both backends against the reference, plus the contract's edges.

Ids are integer metadata and are compared exactly. Without a bias or groups the kernel
ranks raw logits, so its ids cannot depend on rounding and match everywhere. With a bias
or groups it ranks fp32 scores, and an ulp of exp() can legitimately swap two experts
whose keys tie to within rounding; those cases compare exactly on every row whose
float64 keys are separated by more than rounding (`_determined_rows`), which the test
data makes nearly all rows.
"""

from dataclasses import dataclass, field

import pytest
import torch

from helpers import poison_
from moekit import reference
from moekit.routing import Routing, route
from moekit.routing.ops import launch_route
from moekit.topk import TopK, pack_topk, unpack_topk

INF, NAN = float("inf"), float("nan")
# Triton tests run on the GPU when there is one, else on the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 logits: kernel and reference differ by ulps of exp and of the sum order (the
# interpreter uses numpy's exp; the GPU's ex2.approx and approximate division add a few).
WEIGHT_RTOL = 1e-5 if DEVICE == "cuda" else 1e-6
BF16_RTOL = 2.0**-8  # a packed weight is the fp32 weight rounded to bf16

# The interpreter computes −inf − (−inf) for padded rows and all-(−inf) rows on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@dataclass(frozen=True)
class Case:
    """One routing configuration: E experts, k per token, keyword arguments of `route`."""

    num_experts: int
    top_k: int
    kwargs: dict = field(default_factory=dict)
    bias: bool = False


DEEPSEEK = {"method": "sigmoid", "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5}

# fmt: off
CPU_CASES = {
    # the default (softmax → top-k → renormalise) that the fused MoE layer uses
    "softmax-E8-k2": Case(8, 2),
    # E not a power of two, no renormalisation: raw softmax probabilities come back
    "softmax-E60-k4-raw": Case(60, 4, {"renormalize": False}),
    # a single expert: the only id is 0 and the weight is 1
    "softmax-E1-k1": Case(1, 1),
    # k = E: every expert is chosen, padded lanes never are
    "softmax-E5-k5": Case(5, 5, {"renormalize": False}),
    # sigmoid scoring with renormalisation
    "sigmoid-E64-k6": Case(64, 6, {"method": "sigmoid"}),
    # Llama-4: sigmoid of the top-1 logit, not renormalised
    "sigmoid-E16-k1-llama4": Case(16, 1, {"method": "sigmoid", "renormalize": False}),
    # Mixtral: top-2 of 8 logits, softmax over the two
    "topk_softmax-E8-k2": Case(8, 2, {"method": "topk_softmax"}),
    # gpt-oss: top-4 of 32, softmax over the four, with a scaling factor on top
    "topk_softmax-E32-k4-scaled": Case(32, 4, {"method": "topk_softmax",
                                                "routed_scaling_factor": 0.5}),
    # a negative scale makes negative weights: their packed bf16 half must not touch the id
    "sigmoid-E16-k3-negative": Case(16, 3, {"method": "sigmoid", "routed_scaling_factor": -1.5}),
    # DeepSeek-V3 at small E: 8 groups, keep 4, bias, renormalise, scale 2.5
    "grouped-E64-k8-bias": Case(64, 8, DEEPSEEK, bias=True),
    # group size 12 is not a power of two, so groups have padded lanes
    "grouped-E48-k6-bias": Case(48, 6, {"method": "sigmoid", "n_group": 4, "topk_group": 2},
                                bias=True),
    # Kimi-K2 style: bias without groups, no renormalisation
    "sigmoid-E24-k4-bias-raw": Case(24, 4, {"method": "sigmoid", "renormalize": False},
                                    bias=True),
    # softmax scores ranked in groups (no bias): the softmax tile path
    "grouped-softmax-E12-k3": Case(12, 3, {"n_group": 4, "topk_group": 2}),
    # group size 1: a group's top-2 sum degenerates to its single key
    "grouped-E8-k3-size1": Case(8, 3, {"method": "sigmoid", "n_group": 8, "topk_group": 3},
                                bias=True),
    # k equals all experts of the kept groups
    "grouped-E16-k8-all-kept": Case(16, 8, {"method": "sigmoid", "n_group": 4,
                                           "topk_group": 2}, bias=True),
    # beyond E = 512: a 1024-wide tile, and the largest k
    "softmax-E1000-k16": Case(1000, 16),
}
# fmt: on


def _routing(case: Case) -> Routing:
    kw = {k: v for k, v in case.kwargs.items() if k != "method"}
    return Routing.parse(case.kwargs.get("method", "softmax"), **kw)


def _inputs(case: Case, m: int, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(m, case.num_experts, generator=g, device=device).to(dtype)  # [M, E]
    bias = None
    if case.bias:
        bias = 0.1 * torch.randn(case.num_experts, generator=g, device=device)  # [E]
    return logits, bias


def _determined_rows(logits, top_k, routing, bias, tol=1e-5):
    """Rows whose top-k does not hinge on a near-tie of keys (or group scores) in float64."""
    if routing.selects_on_logits(bias is not None):
        return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    keys, group_scores = reference.routing.selection_keys(
        logits.double(), routing, None if bias is None else bias.double()
    )
    ok = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    if group_scores is not None and routing.topk_group < routing.n_group:
        gs = group_scores.sort(dim=-1, descending=True).values
        ok &= (gs[:, routing.topk_group - 1] - gs[:, routing.topk_group]) > tol
    ids = reference.route(logits.double(), top_k, method=routing,
                          e_score_correction_bias=None if bias is None else bias.double()).ids
    chosen = keys.gather(1, ids.long())  # [M, k], descending
    ok &= ((chosen[:, :-1] - chosen[:, 1:]) > tol).all(dim=1)
    rest = keys.scatter(1, ids.long(), -INF)
    if group_scores is not None:
        m, e = keys.shape
        kept = torch.zeros_like(group_scores, dtype=torch.bool)
        kept.scatter_(1, group_scores.sort(dim=-1, descending=True, stable=True)
                      .indices[:, : routing.topk_group], True)
        rest = rest.masked_fill(~kept.repeat_interleave(e // routing.n_group, 1), -INF)
    if rest.shape[1] > top_k:
        ok &= (chosen[:, -1] - rest.max(dim=1).values) > tol
    return ok


def _assert_same_routes(actual, expected, rows=None, rtol=WEIGHT_RTOL, min_rows=0.95):
    """Ids exactly equal, weights within `rtol` (NaN where the reference has NaN)."""
    ids, weights = actual
    if rows is not None:
        # Small M may lose its one row to a near-tie; min_rows=1 demands every row.
        m = rows.numel()
        needed = m if min_rows >= 1 else min(min_rows * m, m - 1)
        assert rows.sum() >= needed, f"test data has too many near-ties ({rows.sum()}/{m})"
        ids, weights = ids[rows], weights[rows]
        expected = (expected.ids[rows], expected.weights[rows])
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    mismatch = (ids != expected[0]).any(dim=1).nonzero().flatten()
    assert mismatch.numel() == 0, (
        f"ids differ in {mismatch.numel()} rows, first row {mismatch[0].item()}: "
        f"{ids[mismatch[0]].tolist()} != {expected[0][mismatch[0]].tolist()}"
    )
    torch.testing.assert_close(weights, expected[1], rtol=rtol, atol=1e-30, equal_nan=True)


def _check_against_reference(case, logits, bias, min_rows=0.95):
    routing = _routing(case)
    kw = dict(case.kwargs, e_score_correction_bias=bias)
    expected = reference.route(logits, case.top_k, **kw)
    rows = _determined_rows(logits, case.top_k, routing, bias)
    got = route(logits, case.top_k, backend="triton", **kw)
    _assert_same_routes(got, expected, rows, min_rows=min_rows)
    # Packed output of the same kernel: same ids, the weight rounded to bf16.
    packed = unpack_topk(route(logits, case.top_k, packed=True, backend="triton", **kw))
    _assert_same_routes(packed, expected, rows, rtol=BF16_RTOL, min_rows=min_rows)


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("method_kwargs", [
    {},  # softmax
    {"method": "sigmoid"},
    {"method": "topk_softmax"},
    {"method": "sigmoid", "n_group": 4, "topk_group": 2},
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ties_break_to_lower_ids(method_kwargs, backend):
    # All-equal logits: every expert ties, so the ids are 0..k-1 (groups 0..topk_group-1).
    logits = torch.full((3, 8), 0.25, device=DEVICE)
    bias = torch.zeros(8, device=DEVICE) if "n_group" in method_kwargs else None
    ids, weights = route(logits, 3, backend=backend, e_score_correction_bias=bias,
                         **method_kwargs)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(weights.cpu(), torch.full((3, 3), 1 / 3), rtol=1e-6, atol=0)


def test_reference_grouped_selection_by_hand():
    # Expert 0 has the best logit, but its group (0, 1) has the worst top-2 sum after
    # group 3; groups 1 and 2 are kept; expert 4 wins, then 2 and 3 tie → 2.
    logits = torch.tensor([[3.0, -5.0, 1.0, 1.0, 2.0, 0.0, -1.0, -1.0]])
    ids, weights = reference.route(logits, 2, method="sigmoid", n_group=4, topk_group=2,
                                   renormalize=False, e_score_correction_bias=torch.zeros(8))
    assert ids.tolist() == [[4, 2]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[2.0, 1.0]])))


def test_reference_bias_selects_but_does_not_weigh():
    # The bias moves expert 2 to the top; its weight is its own sigmoid, then scaled.
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    for renormalize, expected in [(False, 0.5 * 2.5), (True, 2.5)]:
        ids, weights = reference.route(logits, 1, method="sigmoid", renormalize=renormalize,
                                       routed_scaling_factor=2.5, e_score_correction_bias=bias)
        assert ids.tolist() == [[2]] and weights.tolist() == [[expected]]


def test_reference_topk_then_softmax_by_hand():
    ids, weights = reference.route(torch.tensor([[1.0, 2.0, 0.0]]), 2, method="topk_softmax")
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))


def test_reference_default_is_softmax_renormalised():
    # moekit.reference.experts calls route(logits, k, renormalize=...) with these defaults.
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ids, weights = reference.route(logits, 2)
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(ids, top.indices.int())
    torch.testing.assert_close(weights, top.values / top.values.sum(-1, keepdim=True))


# --------------------------------------------------------------- interpreter (Triton on CPU)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", list(CPU_CASES.values()), ids=list(CPU_CASES))
def test_triton_matches_reference_fp32(case):
    m = 3 if case.num_experts > 512 else 13  # 13: not a multiple of BLOCK_M
    logits, bias = _inputs(case, m)
    _check_against_reference(case, logits, bias)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["softmax-E60-k4-raw", "topk_softmax-E8-k2",
                                  "grouped-E64-k8-bias"])
def test_triton_matches_reference_fp16(name):
    # fp16 logits are loaded and widened in the kernel; the reference widens the same values.
    logits, bias = _inputs(CPU_CASES[name], 9, dtype=torch.float16)
    _check_against_reference(CPU_CASES[name], logits, bias)


@pytest.mark.interpreter
def test_triton_exact_ids_with_bias_when_sigmoid_is_exact():
    # Logits in {0, 40} give sigmoid 0.5 or exactly 1.0 on any backend, so even the
    # grouped, biased ranking is determined bit for bit: all rows must match.
    case = CPU_CASES["grouped-E64-k8-bias"]
    g = torch.Generator().manual_seed(3)
    logits = 40.0 * torch.randint(0, 2, (16, 64), generator=g).float()
    bias = torch.randn(64, generator=g)
    _check_against_reference(case, logits.to(DEVICE), bias.to(DEVICE), min_rows=1.0)


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["expert-strided", "transposed"])
def test_triton_non_contiguous_logits(layout):
    # Logits are read through both strides; no copy is made.
    g = torch.Generator().manual_seed(2)
    if layout == "expert-strided":
        logits = torch.randn(7, 40, generator=g)[:, ::2]  # [7, 20], stride (40, 2)
    else:
        logits = torch.randn(20, 7, generator=g).t()  # [7, 20], stride (1, 7)
    _check_against_reference(Case(20, 3), logits.to(DEVICE), None)


NONFINITE_ROWS = torch.tensor([
    [NAN] * 8,  # all NaN: ids 0..k-1, softmax weights NaN
    [1.0, NAN, 2.0, NAN, -1.0, NAN, 0.5, NAN],  # NaN ranks below every number
    [0.0, 1.0, 2.0, INF, 3.0, -INF, 4.0, 5.0],  # +inf ranks first; softmax weights NaN
    [-INF] * 7 + [1.0],  # one finite logit, then the lowest ids among −inf
    [-INF] * 8,  # nothing above −inf
    [INF, INF, -INF, NAN, 0.0, 0.0, INF, 1.0],  # tied +infs break to the lower id
])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method_kwargs", [
    {},  # softmax
    {"method": "sigmoid"},
    {"method": "topk_softmax"},
    {"method": "sigmoid", "n_group": 4, "topk_group": 2},  # biased keys, group sums
])
def test_nonfinite_logits_give_in_range_ids(backend, method_kwargs):
    bias = 0.01 * torch.arange(8.0, device=DEVICE) if "n_group" in method_kwargs else None
    kw = dict(method_kwargs, e_score_correction_bias=bias)
    logits = NONFINITE_ROWS.to(DEVICE)
    ids, weights = route(logits, 3, backend=backend, **kw)
    assert ((ids >= 0) & (ids < 8)).all()
    assert all(len(set(row)) == 3 for row in ids.tolist())  # distinct experts
    expected = reference.route(logits, 3, **kw)
    _assert_same_routes((ids, weights), expected)
    if not method_kwargs:
        assert ids[:2].tolist() == [[0, 1, 2], [2, 0, 6]]
        assert ids[2:].tolist() == [[3, 7, 6], [7, 0, 1], [0, 1, 2], [0, 1, 6]]
        assert torch.isnan(weights[[0, 2, 4, 5]]).all() and torch.isfinite(weights[[1, 3]]).all()
    if method_kwargs.get("method") == "sigmoid":
        assert torch.isfinite(weights).all()  # sigmoid of ±inf is 1 or 0


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["softmax-E8-k2", "grouped-E48-k6-bias",
                                  "topk_softmax-E32-k4-scaled"])
@pytest.mark.parametrize("packed", [False, True], ids=["topk", "packed"])
def test_triton_writes_every_output_and_nothing_else(name, packed):
    # Outputs are views of poisoned buffers one row longer: every element of the first M
    # rows must be written, the extra row never.
    case, m = CPU_CASES[name], 19
    logits, bias = _inputs(case, m)
    routing = _routing(case)
    k = case.top_k
    if packed:
        buf = poison_(torch.empty(m + 1, k, dtype=torch.int32, device=DEVICE))
        launch_route(logits, bias, k, routing, packed=buf[:m])
        assert (buf[:m] != -7777).all() and (buf[m] == -7777).all()
        got = unpack_topk(buf[:m])
    else:
        ids = poison_(torch.empty(m + 1, k, dtype=torch.int32, device=DEVICE))
        weights = poison_(torch.empty(m + 1, k, device=DEVICE))
        launch_route(logits, bias, k, routing, ids=ids[:m], weights=weights[:m])
        assert (ids[m] == -7777).all() and torch.isnan(weights[m]).all()
        got = (ids[:m], weights[:m])
    expected = reference.route(logits, k, method=routing, e_score_correction_bias=bias)
    _assert_same_routes(got, expected, _determined_rows(logits, k, routing, bias),
                        rtol=BF16_RTOL if packed else WEIGHT_RTOL)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("packed", [False, True])
def test_zero_tokens(backend, packed):
    out = route(torch.empty(0, 16, device=DEVICE), 4, backend=backend, packed=packed)
    if packed:
        assert out.shape == (0, 4) and out.dtype == torch.int32
    else:
        assert out.ids.shape == (0, 4) and out.ids.dtype == torch.int32
        assert out.weights.shape == (0, 4) and out.weights.dtype == torch.float32


def test_reference_backend_packed_is_pack_of_topk():
    logits, _ = _inputs(Case(16, 4), 5)
    packed = route(logits, 4, packed=True, backend="reference")
    assert torch.equal(packed, pack_topk(reference.route(logits, 4)))


@pytest.mark.interpreter
def test_torch_compile_traces_the_custom_op():
    # fullgraph: the launcher is an opaque custom op with a fake implementation.
    logits, bias = _inputs(CPU_CASES["grouped-E64-k8-bias"], 4)

    def fn(x, b):
        ids, weights = route(x, 8, backend="triton", e_score_correction_bias=b, **DEEPSEEK)
        return ids, weights * 2

    ids, weights = torch.compile(fn, backend="aot_eager", fullgraph=True)(logits, bias)
    expected = reference.route(logits, 8, e_score_correction_bias=bias, **DEEPSEEK)
    assert torch.equal(ids, expected.ids)
    torch.testing.assert_close(weights, expected.weights * 2, rtol=WEIGHT_RTOL, atol=0)


@pytest.mark.interpreter
def test_custom_ops_pass_opcheck():
    logits, bias = _inputs(CPU_CASES["grouped-E16-k8-all-kept"], 3)
    args = (logits, bias, 8, "sigmoid", "score_then_topk", True, 4, 2, 1.0)
    torch.library.opcheck(torch.ops.moekit.route.default, args)
    torch.library.opcheck(torch.ops.moekit.route_packed.default, args)


_COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moekit.routing._kernels import _route_kernel
from moekit._intmath import next_power_of_2
from moekit.routing.ops import _launch_config
sig = {"logits_ptr": "*bf16", "bias_ptr": "*fp32", "ids_ptr": "*i32", "weights_ptr": "*fp32",
       "packed_ptr": "*i32", "M": "i32", "stride_lm": "i32", "stride_le": "i32",
       "stride_b": "i32", "routed_scaling_factor": "fp32"}
for e, g, k, grouped in [(256, 8, 8, True), (1000, 1, 16, False)]:
    cfg = _launch_config(e, g)
    warps = cfg.pop("num_warps")
    flags = dict(SOFTMAX=not grouped, SOFTMAX_OVER_TOPK=False, SELECT_ON_LOGITS=not grouped,
                 HAS_BIAS=grouped, RENORMALIZE=True, PACKED=grouped, TOP_K=k, N_GROUP=g,
                 TOPK_GROUP=min(4, g), GROUP_SIZE=e // g, BLOCK_G=next_power_of_2(g),
                 BLOCK_S=next_power_of_2(e // g), BLOCK_K=next_power_of_2(k), **cfg)
    src = ASTSource(_route_kernel, dict(sig, **dict.fromkeys(flags, "constexpr")), flags)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernel")
def test_kernel_compiles_for_hopper_without_a_gpu():
    # The interpreter never runs Triton's compiler, whose type rules (e.g. loop-carried
    # shapes) are stricter; compile for sm_90 in a process without TRITON_INTERPRET.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ------------------------------------------------------------------------------ bad input

X = torch.zeros(4, 8)
BAD_INPUTS = [
    # (arguments, keyword arguments, exception, text naming the argument)
    ((X[0], 2), {}, ValueError, "router_logits"),  # 1-d logits
    ((X.int(), 2), {}, TypeError, "router_logits"),  # integer logits
    ((X.tolist(), 2), {}, TypeError, "router_logits"),  # not a tensor
    ((torch.zeros(4, 0), 1), {}, ValueError, "router_logits"),  # E = 0
    ((X, 0), {}, ValueError, "top_k"),  # k = 0
    ((X, 9), {}, ValueError, "top_k"),  # k > E
    ((X, 2.0), {}, TypeError, "top_k"),  # k not an int
    ((X, 2), {"e_score_correction_bias": torch.zeros(7)}, ValueError, "e_score_correction_bias"),
    ((X, 2), {"e_score_correction_bias": torch.zeros(8, dtype=torch.int64)}, TypeError,
     "e_score_correction_bias"),
    ((X, 2), {"n_group": 3}, ValueError, "n_group"),  # 3 does not divide 8
    ((X, 2), {"n_group": 2, "topk_group": 3}, ValueError, "topk_group"),  # more than n_group
    ((X, 5), {"n_group": 4, "topk_group": 2}, ValueError, "top_k"),  # k > 2 groups × 2
    ((X, 2), {"method": "softmax_topk"}, ValueError, "method"),  # unknown name
    ((X, 2), {"method": 3}, TypeError, "method"),
    ((X, 2), {"method": "topk_softmax", "e_score_correction_bias": torch.zeros(8)}, ValueError,
     "e_score_correction_bias"),  # bias needs scores of all E
    ((X, 2), {"method": "topk_softmax", "n_group": 2}, ValueError, "n_group"),
    ((X, 2), {"backend": "cuda"}, ValueError, "backend"),
]


@pytest.mark.parametrize("args, kwargs, exc, name", BAD_INPUTS)
def test_bad_input_names_the_argument(args, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        route(*args, **kwargs)


def test_bad_routing_fields():
    with pytest.raises(ValueError, match="scoring"):
        Routing(scoring="relu")
    with pytest.raises(ValueError, match="order"):
        Routing(order="topk_first")


# ------------------------------------------------------------------------------------ GPU

# fmt: off
GPU_CASES = {
    # Mixtral
    "topk_softmax-E8-k2": Case(8, 2, {"method": "topk_softmax"}),
    # Qwen3-MoE shape, the default method
    "softmax-E128-k8": Case(128, 8),
    # E not a power of two, raw probabilities
    "softmax-E160-k6-raw": Case(160, 6, {"renormalize": False}),
    # Qwen3-Next: E = 512, k = 10 (the largest "fast" E)
    "softmax-E512-k10": Case(512, 10),
    # beyond 512: one row per program, 8 warps
    "softmax-E1024-k16": Case(1024, 16),
    # gpt-oss-120b
    "topk_softmax-E128-k4": Case(128, 4, {"method": "topk_softmax"}),
    # Llama-4 Maverick
    "sigmoid-E128-k1-llama4": Case(128, 1, {"method": "sigmoid", "renormalize": False}),
    # DeepSeek-V3 / R1
    "grouped-E256-k8-deepseek": Case(256, 8, DEEPSEEK, bias=True),
    # Kimi-K2: E = 384, one group, bias, scale 2.827
    "sigmoid-E384-k8-bias-kimi": Case(384, 8, {"method": "sigmoid",
                                               "routed_scaling_factor": 2.827}, bias=True),
    # grouped with E = 1024 (group size 128)
    "grouped-E1024-k8": Case(1024, 8, DEEPSEEK, bias=True),
}
# fmt: on


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 4096])
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_gpu_bf16_matches_reference(case, m):
    logits, bias = _inputs(case, m, dtype=torch.bfloat16, device="cuda")
    # The GPU's exp differs from torch's by an ulp or two; weights to 1e-5.
    routing = _routing(case)
    expected = reference.route(logits, case.top_k, e_score_correction_bias=bias, **case.kwargs)
    rows = _determined_rows(logits, case.top_k, routing, bias)
    got = route(logits, case.top_k, e_score_correction_bias=bias, **case.kwargs)
    _assert_same_routes(got, expected, rows, rtol=1e-5)
    packed = unpack_topk(route(logits, case.top_k, e_score_correction_bias=bias, packed=True,
                               **case.kwargs))
    _assert_same_routes(packed, expected, rows, rtol=BF16_RTOL)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_gpu_fp32_weights_within_1e6_of_float64(case):
    # The bar: fp32 logits, weights within 1e-6 relative of the exact (float64)
    # reference, ids exact on every row that does not hinge on a near-tie.
    logits, bias = _inputs(case, 4096, device="cuda", seed=3)
    kw = dict(case.kwargs, e_score_correction_bias=bias)
    exact = reference.route(logits.double(), case.top_k, **dict(
        kw, e_score_correction_bias=None if bias is None else bias.double()))
    expected = TopK(exact.ids, exact.weights.float())
    rows = _determined_rows(logits, case.top_k, _routing(case), bias)
    got = route(logits, case.top_k, **kw)
    _assert_same_routes(got, expected, rows, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
@pytest.mark.parametrize("packed", [False, True], ids=["topk", "packed"])
def test_gpu_cuda_graph_replay_with_new_inputs(name, packed):
    # Every method, both outputs: captured once, replayed on new logits in place.
    case = GPU_CASES[name]
    static, bias = _inputs(case, 333, dtype=torch.bfloat16, device="cuda")
    kw = dict(case.kwargs, e_score_correction_bias=bias, packed=packed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        route(static, case.top_k, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = route(static, case.top_k, **kw)
    for seed in (11, 12):
        static.copy_(_inputs(case, 333, dtype=torch.bfloat16, device="cuda", seed=seed)[0])
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.route(static, case.top_k, e_score_correction_bias=bias,
                                   **case.kwargs)
        got = unpack_topk(out) if packed else out
        rows = _determined_rows(static, case.top_k, _routing(case), bias)
        _assert_same_routes(got, expected, rows, rtol=BF16_RTOL if packed else 1e-5)
