"""`router_topk` (the router GEMV and `route` in one launch) against `route(router_logits)`
and the reference, and its arrival counter.

Both sides run the same GEMV and the same routing code; only the routing's reductions may
order their sums differently (another block of rows), so ids must match and weights agree
to float32 rounding.
"""

import importlib

import pytest
import torch

from helpers import poison_
from moekit import reference
from moekit.routing import Routing, route, router_logits
from moekit.routing.logits import GEMV_ROWS
from moekit.routing.router_topk import launch_router_topk, one_launch_serves, router_topk


def _case(M, E, H, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed + M * 1000 + E + H)
    hidden = torch.randn(M, H, generator=g, device=device).to(dtype)
    weight = (torch.randn(E, H, generator=g, device=device) / H**0.5).to(dtype)
    return hidden, weight


def _check(M, E, H, k, method, dtype, device):
    hidden, weight = _case(M, E, H, dtype, device)
    routing = Routing.parse(method)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    ids = poison_(torch.empty(M, k, dtype=torch.int32, device=device))
    weights = poison_(torch.empty(M, k, dtype=torch.float32, device=device))
    for _ in range(2):  # the counter is back at zero for the second call
        launch_router_topk(hidden, weight, routing, counter, ids, weights)
        assert counter.item() == 0, "the last program resets the counter"
        expected = route(router_logits(hidden, weight, backend="triton"), k, method=routing,
                         backend="triton")
        assert torch.equal(ids, expected.ids)
        torch.testing.assert_close(weights, expected.weights, rtol=1e-6, atol=1e-7)
        oracle = reference.route(reference.router_logits(hidden, weight), k, method=routing)
        assert torch.equal(ids, oracle.ids)
        torch.testing.assert_close(weights, oracle.weights, rtol=1e-5, atol=1e-6)
        hidden = hidden.flip(0).contiguous()


_METHODS = [
    "softmax",  # Qwen-MoE / OLMoE: softmax over E, top-k, renormalised or not
    Routing.parse("softmax", renormalize=False),
    "topk_softmax",  # Mixtral: top-k of the logits, softmax over k
    "sigmoid",
    Routing.parse("softmax", n_group=4, topk_group=2),  # groups, without the bias
]


@pytest.mark.interpreter
@pytest.mark.parametrize("method", _METHODS, ids=["softmax", "no-renorm", "topk-softmax",
                                                  "sigmoid", "groups"])
@pytest.mark.parametrize("M, E, H, k", [(1, 16, 64, 4), (3, 40, 1500, 6), (11, 8, 100, 2)])
def test_router_topk_matches_route_of_router_logits(M, E, H, k, method):
    _check(M, E, H, k, method, torch.float32, "cpu")


@pytest.mark.interpreter
def test_router_topk_in_fp16_and_its_entry_point():
    hidden, weight = _case(GEMV_ROWS, 64, 2048, torch.float16, "cpu")
    counter = torch.zeros(1, dtype=torch.int32)
    got = router_topk(hidden, weight, 8, counter, backend="triton")
    expected = route(router_logits(hidden, weight, backend="triton"), 8, backend="triton")
    assert torch.equal(got.ids, expected.ids)
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-6, atol=1e-7)
    assert counter.item() == 0
    ref = router_topk(hidden, weight, 8, counter, backend="reference")
    assert torch.equal(ref.ids, got.ids)
    more = torch.cat([hidden, hidden.flip(0)])  # past GEMV_ROWS: router_logits, then route
    got = router_topk(more, weight, 8, counter, backend="triton")
    expected = route(router_logits(more, weight, backend="triton"), 8, backend="triton")
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.weights, expected.weights)


@pytest.mark.interpreter
def test_router_topk_launches_once_only_where_it_measured_faster(monkeypatch):
    """One launch where the GEMV gives each program one expert (H ≤ 4096); on a wider
    router, whose programs take two experts (deepseek-v3's: 0.5–1.2 µs slower as one launch
    on an H200, session 34), `router_logits` then `route`, with the same result."""
    module = importlib.import_module("moekit.routing.router_topk")  # the package's
    # attribute of that name is the function
    launches = []
    real = module.launch_router_topk
    monkeypatch.setattr(module, "launch_router_topk",
                        lambda *a: launches.append(a[0].shape[1]) or real(*a))
    assert one_launch_serves(16, 4096) and not one_launch_serves(1, 4097)
    counter = torch.zeros(1, dtype=torch.int32)
    for h in (4096, 5000):
        hidden, weight = _case(2, 8, h, torch.float32, "cpu")
        got = router_topk(hidden, weight, 2, counter, backend="triton")
        expected = route(router_logits(hidden, weight, backend="triton"), 2, backend="triton")
        assert torch.equal(got.ids, expected.ids)
        torch.testing.assert_close(got.weights, expected.weights, rtol=1e-6, atol=1e-7)
    assert launches == [4096] and counter.item() == 0


def test_router_topk_checks_its_arguments():
    hidden, weight = torch.randn(2, 16), torch.randn(8, 16)
    counter = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="counter"):
        router_topk(hidden, weight, 2, counter.long())
    with pytest.raises(ValueError, match="counter: expected one element"):
        router_topk(hidden, weight, 2, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="weight: expected"):
        router_topk(hidden, torch.randn(8, 4), 2, counter)
    with pytest.raises(ValueError, match="top_k"):
        router_topk(hidden, weight, 9, counter)
    with pytest.raises(TypeError, match="top_k"):
        router_topk(hidden, weight, 2.0, counter)
    with pytest.raises(ValueError, match="n_group"):
        router_topk(hidden, weight, 2, counter, method=Routing.parse("softmax", n_group=3))
    with pytest.raises(ValueError, match="does not serve 17 tokens"):
        launch_router_topk(torch.randn(GEMV_ROWS + 1, 16), weight, Routing.parse("softmax"),
                           counter, torch.empty(GEMV_ROWS + 1, 2, dtype=torch.int32),
                           torch.empty(GEMV_ROWS + 1, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("M, E, H, k, method", [
    (1, 128, 2048, 8, "softmax"), (4, 128, 2048, 8, "softmax"), (16, 64, 2048, 8, "softmax"),
    (1, 8, 4096, 2, "topk_softmax"), (7, 40, 1536, 8, "softmax"),
    (3, 256, 7168, 8, Routing.parse("sigmoid", n_group=8, topk_group=4)),
])
def test_router_topk_matches_route_of_router_logits_gpu(M, E, H, k, method, dtype):
    _check(M, E, H, k, method, dtype, "cuda")


@pytest.mark.gpu
def test_router_topk_replays_in_a_cuda_graph_gpu():
    """Captured once, replayed on new hidden states: the counter stays consistent."""
    hidden, weight = _case(4, 128, 2048, torch.bfloat16, "cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    router_topk(hidden, weight, 8, counter)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = router_topk(hidden, weight, 8, counter)
    for seed in range(3):
        hidden.copy_(_case(4, 128, 2048, torch.bfloat16, "cuda", seed=seed + 1)[0])
        graph.replay()
        expected = route(router_logits(hidden, weight), 8)
        assert torch.equal(out.ids, expected.ids)
        torch.testing.assert_close(out.weights, expected.weights, rtol=1e-6, atol=1e-7)
    assert counter.item() == 0


@pytest.mark.interpreter
def test_the_layer_at_decode_traces_whole():
    """Dynamo traces `MoE.forward` through the `moekit::router_topk` op with fullgraph."""
    from moekit.layer import MoE

    torch.manual_seed(0)
    layer = MoE(8, 2, 64, 32, backend="triton").prepare()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    with torch.no_grad():
        hidden = torch.randn(2, 64)
        assert torch.equal(compiled(hidden), layer(hidden))
    assert layer.router_arrivals.item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, GEMV_ROWS], ids=["M1", "gemv-rows"])
def test_the_layer_at_decode_compiles_whole_gpu(M):
    """`MoE.forward` through `router_topk` (a custom op mutating the counter) under
    torch.compile(fullgraph=True): the same output as eager, the counter left at zero."""
    from moekit.layer import MoE

    torch.manual_seed(0)
    layer = MoE(64, 8, 512, 256, device="cuda", dtype=torch.bfloat16).prepare()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for seed in range(2):
            hidden = _case(M, 64, 512, torch.bfloat16, "cuda", seed=seed)[0]
            torch.testing.assert_close(compiled(hidden), layer(hidden), rtol=0, atol=0)
    assert layer.router_arrivals.item() == 0
