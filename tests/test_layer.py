"""The MoE module: same result as the functional reference, prepared once, graph-safe."""

import dataclasses

import pytest
import torch

from fp8_interpreter import exact_fp8_casts
from helpers import DEEPSEEK_LIKE, assert_close
from moekit import reference
from moekit.layer import MoE
from moekit.quant import QuantScheme, quantize_weight
from moekit.routing import Routing


def expected_output(layer, hidden):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ layer.router.weight.T
    f = lambda t: None if t is None else t.detach()
    out = reference.fused_moe(
        hidden.reshape(-1, hidden.shape[-1]).detach(), logits.detach(), f(layer.w13), f(layer.w2),
        layer.top_k, method=layer.routing, e_score_correction_bias=layer.e_score_correction_bias,
        activation=layer.activation, b13=f(layer.b13), b2=f(layer.b2),
        apply_router_weight_on_input=layer.apply_router_weight_on_input,
    )
    return out.reshape(hidden.shape)


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_layer_matches_reference(backend):
    torch.manual_seed(0)
    layer = MoE(6, 2, 64, 32, activation="swigluoai", bias=True, backend=backend)
    with torch.no_grad():
        layer.b13.normal_(std=0.1)
        layer.b2.normal_(std=0.1)
    hidden = torch.randn(2, 5, 64)  # leading dims are flattened and restored
    with torch.no_grad():
        out = layer(hidden)
    assert out.shape == hidden.shape
    assert_close(out, expected_output(layer, hidden))


def test_loaded_weights_are_seen_after_prepare():
    # load_state_dict copies into the prepared (contiguous) parameters in place.
    torch.manual_seed(0)
    layer = MoE(4, 2, 32, 16).prepare()
    other = MoE(4, 2, 32, 16)
    layer.load_state_dict(other.state_dict())
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(layer(hidden), other(hidden))


@pytest.mark.parametrize("quant", [None, "fp8_tensor"], ids=["bf16", "fp8"])
def test_a_prepared_layer_moved_or_cast_prepares_again(quant):
    # `.to()` gives the parameters new tensors; the prepared copies held the old ones
    # (a forward after `.to(torch.float16)` failed on float32 copies before session 34).
    torch.manual_seed(0)
    layer = MoE(4, 2, 32, 16, quant=quant, backend="reference")
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        layer(hidden)
        layer.to(torch.float16)
        fresh = MoE(4, 2, 32, 16, quant=quant, backend="reference", dtype=torch.float16)
        fresh.load_state_dict(layer.state_dict())
        assert torch.equal(layer(hidden.half()), fresh(hidden.half()))


def test_from_weights():
    torch.manual_seed(0)
    src = MoE(4, 2, 32, 16)
    layer = MoE.from_weights(src.router.weight, src.w13, src.w2, 2)
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(layer(hidden), src(hidden))


@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_expert_parallel_layers_sum_to_the_whole_layer(backend):
    # Two ranks, each holding half of 8 experts (rank 1 in a shuffled order), one router.
    torch.manual_seed(0)
    whole = MoE(8, 3, 64, 32, bias=True, backend=backend)
    with torch.no_grad():
        whole.b13.normal_(std=0.1)
        whole.b2.normal_(std=0.1)
    hidden = torch.randn(2, 5, 64)
    out = torch.zeros_like(hidden)
    for held in ([0, 2, 4, 6], [7, 1, 5, 3]):
        rank = MoE.from_weights(whole.router.weight, whole.w13[held], whole.w2[held], 3,
                                b13=whole.b13[held], b2=whole.b2[held], local_experts=held,
                                backend=backend)
        assert "local_experts=4" in repr(rank)
        with torch.no_grad():
            out += rank(hidden)
    with torch.no_grad():
        assert_close(out, whole(hidden), name="the ranks' sum")


@pytest.mark.parametrize("M", [4, 20], ids=["decode", "router-module"])
@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_layer_routes_like_deepseek(backend, M):
    # Sigmoid over expert groups with a score-correction bias (a buffer, in the state
    # dict): the router module runs at every M, the one-launch kernel takes no bias.
    torch.manual_seed(0)
    layer = MoE(8, 3, 64, 32, method=DEEPSEEK_LIKE, e_score_correction_bias=True,
                backend=backend)
    with torch.no_grad():
        layer.e_score_correction_bias.normal_()
    assert "e_score_correction_bias" in layer.state_dict()
    assert "n_group=4" in repr(layer) and "e_score_correction_bias" in repr(layer)
    hidden = torch.randn(M, 64)
    assert not layer._router_kernel_serves(hidden)
    with torch.no_grad():
        out = layer(hidden)
        assert_close(out, expected_output(layer, hidden))
        layer.e_score_correction_bias.zero_()
        assert (layer(hidden) - out).abs().max() > 1e-3, "the bias moved the selection"


@pytest.mark.interpreter
def test_decode_router_kernel_takes_expert_groups(monkeypatch):
    # Groups without a bias at M ≤ 16: the one-launch router top-k routes them.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    layer = MoE(8, 3, 64, 32, method=Routing("sigmoid", n_group=4, topk_group=2),
                backend="triton")
    hidden = torch.randn(4, 64)
    with torch.no_grad():
        assert layer._router_kernel_serves(hidden)
        assert_close(layer(hidden), expected_output(layer, hidden))


@pytest.mark.parametrize("M", [4, 20], ids=["decode", "router-module"])
@pytest.mark.parametrize("quant", [None, "fp8_tensor"], ids=["bf16", "fp8"])
@pytest.mark.parametrize(
    "backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_layer_routes_like_llama4(backend, quant, M):
    # Sigmoid top-1, not renormalised, the weight on the expert's input: the layer's
    # result is the reference's with those options, and not the weight-on-output one's.
    torch.manual_seed(0)
    layer = MoE(8, 1, 64, 32, method="sigmoid", renormalize=False,
                apply_router_weight_on_input=True, quant=quant, backend=backend)
    assert "apply_router_weight_on_input" in repr(layer)
    hidden = torch.randn(M, 64)
    expected = expected_output if quant is None else expected_fp8_output
    with torch.no_grad(), exact_fp8_casts():  # (the interpreter's own fp8 casts are not)
        out = layer(hidden)
        assert_close(out, expected(layer, hidden), 1e-2 if quant else None)
        layer.apply_router_weight_on_input = False
        assert (expected(layer, hidden) - out).abs().max() > 1e-3, "the option was used"


def test_routing_is_settable_and_checked():
    torch.manual_seed(0)
    layer = MoE(8, 3, 32, 16, backend="reference")
    hidden = torch.randn(20, 32)
    layer.routing = DEEPSEEK_LIKE
    with torch.no_grad():
        assert_close(layer(hidden), expected_output(layer, hidden))
    with pytest.raises(ValueError, match="top_k: 3 exceeds"):
        layer.routing = Routing("sigmoid", n_group=8, topk_group=2)
    assert layer.routing == DEEPSEEK_LIKE, "a refused routing leaves the layer's"
    layer.renormalize = False  # a field of the routing, settable on its own
    assert layer.routing == dataclasses.replace(DEEPSEEK_LIKE, renormalize=False)
    with torch.no_grad():
        assert_close(layer(hidden), expected_output(layer, hidden))


def test_backend_is_settable_and_checked_at_once():
    # An unknown backend fails when set, with the ops' message, not at the next forward.
    layer = MoE(4, 2, 32, 16, backend="reference")
    with pytest.raises(ValueError, match="backend: expected one of"):
        layer.backend = "cuda"
    assert layer.backend == "reference", "a refused backend leaves the layer's"
    layer.backend = "auto"
    with torch.no_grad():
        assert layer(torch.randn(3, 32)).shape == (3, 32)


def test_a_routing_the_bias_cannot_take_is_refused_at_once():
    # The score-correction bias needs the scores of all E experts: top-k-then-softmax
    # (gpt-oss, Mixtral) is refused when the layer is built or the routing set, not at
    # the first forward.
    with pytest.raises(ValueError, match="score_then_topk"):
        MoE(8, 2, 32, 16, method="topk_softmax", e_score_correction_bias=True)
    layer = MoE(8, 2, 32, 16, method="sigmoid", e_score_correction_bias=True)
    with pytest.raises(ValueError, match="score_then_topk"):
        layer.routing = "topk_softmax"
    assert layer.routing == Routing.parse("sigmoid")


def test_layer_from_weights_takes_the_score_correction_bias():
    torch.manual_seed(0)
    src = MoE(8, 3, 32, 16, method=DEEPSEEK_LIKE, e_score_correction_bias=True)
    with torch.no_grad():
        src.e_score_correction_bias.normal_()
    layer = MoE.from_weights(src.router.weight, src.w13, src.w2, 3, method=DEEPSEEK_LIKE,
                             e_score_correction_bias=src.e_score_correction_bias)
    assert torch.equal(layer.e_score_correction_bias, src.e_score_correction_bias)
    hidden = torch.randn(20, 32)
    with torch.no_grad():
        assert torch.equal(layer(hidden), src(hidden))


def test_a_cast_keeps_the_score_correction_bias_in_float32():
    layer = MoE(8, 3, 32, 16, method=DEEPSEEK_LIKE, e_score_correction_bias=True)
    with torch.no_grad():
        layer.e_score_correction_bias.normal_()
    before = layer.e_score_correction_bias.clone()
    layer.to(torch.bfloat16)
    assert layer.w13.dtype == torch.bfloat16
    assert torch.equal(layer.e_score_correction_bias, before), "float32, unrounded"
    assert "e_score_correction_bias" in dict(layer.named_buffers())


@pytest.mark.parametrize("assign", [False, True])
def test_a_16_bit_checkpoint_bias_loads_as_float32(assign):
    # A checkpoint's bias in bf16 is widened on load; with assign=True the buffer would
    # otherwise become the checkpoint's tensor, and later casts would keep its dtype.
    layer = MoE(8, 3, 32, 16, method=DEEPSEEK_LIKE, e_score_correction_bias=True)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
             for k, v in layer.state_dict().items()}
    state["e_score_correction_bias"] = torch.randn(8).to(torch.bfloat16)
    layer.load_state_dict(state, assign=assign)
    bias = layer.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert torch.equal(bias, state["e_score_correction_bias"].float())
    for cast in (torch.float16, torch.float32):
        layer.to(cast)
        assert layer.e_score_correction_bias.dtype == torch.float32, cast


def test_fp8_layer_routes_like_deepseek():
    torch.manual_seed(0)
    layer = MoE(8, 3, 64, 32, method=DEEPSEEK_LIKE, e_score_correction_bias=True,
                quant="fp8_block", backend="reference")
    with torch.no_grad():
        layer.e_score_correction_bias.normal_()
        hidden = torch.randn(20, 64)
        assert_close(layer(hidden), expected_fp8_output(layer, hidden))


@pytest.mark.parametrize("local_experts,why", [
    ([], "empty"),
    ([0, 0], "an expert twice"),
    ([4], "outside [0, E)"),
    ([1.0], "not an int"),
])
def test_bad_local_experts(local_experts, why):
    with pytest.raises(ValueError, match="local_experts"):
        MoE(4, 2, 32, 16, local_experts=local_experts)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"top_k": 5}, "top_k"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"method": Routing("sigmoid", n_group=3)}, "n_group: 3 does not divide E = 4"),
    ({"method": Routing("sigmoid", n_group=4, topk_group=1)}, "top_k: 2 exceeds"),
    ({"method": "sigmod"}, "method"),
    ({"quant": "fp8_tensor", "apply_router_weight_on_input": True},
     "apply_router_weight_on_input: fp8 experts support it for top_k = 1 only"),
    ({"activation": "tanh"}, "activation"),
    ({"backend": "cuda"}, r"backend: expected one of \('auto', 'triton', 'reference'\)"),
])
def test_bad_construction(kwargs, fragment):
    args = {"num_experts": 4, "top_k": 2, "hidden_size": 32, "intermediate_size": 16} | kwargs
    with pytest.raises(ValueError, match=fragment):
        MoE(**args)


@pytest.mark.parametrize("hidden,error,fragment", [
    (torch.randn(3, 32, dtype=torch.float16), TypeError, r"hidden: expected dtype torch.float32"),
    (torch.randn(3, 31), ValueError, r"hidden: expected \[\.\.\., 32\]"),
    (torch.randn(2, 3, 16), ValueError, r"hidden: expected \[\.\.\., 32\]"),
], ids=["dtype", "hidden-size", "3-d"])
def test_bad_input_names_hidden(hidden, error, fragment):
    # The router's matmul used to fail first, naming neither the argument nor the layer.
    layer = MoE(4, 2, 32, 16, backend="reference")
    with pytest.raises(error, match=fragment):
        layer(hidden)


def expected_fp8_output(layer, hidden):
    """The layer's routing, then the fp8 reference on its weights quantised afresh."""
    flat = hidden.reshape(-1, hidden.shape[-1]).detach()
    topk = reference.route(flat @ layer.router.weight.detach().T, layer.top_k,
                           method=layer.routing,
                           e_score_correction_bias=layer.e_score_correction_bias)
    w13, w2 = (quantize_weight(w.detach(), layer.scheme.weight) for w in (layer.w13, layer.w2))
    f = lambda t: None if t is None else t.detach()
    out = reference.fused_experts_quantized(
        flat, w13, w2, topk.ids, topk.weights, scheme=layer.scheme, activation=layer.activation,
        b13=f(layer.b13), b2=f(layer.b2),
        apply_router_weight_on_input=layer.apply_router_weight_on_input)
    return out.reshape(hidden.shape)


@pytest.mark.parametrize("quant", [
    "fp8_tensor", "fp8_channel", QuantScheme.fp8_block((32, 32))], ids=str)
def test_fp8_layer_matches_quantised_reference(quant):
    torch.manual_seed(0)
    layer = MoE(6, 2, 64, 32, bias=True, quant=quant, backend="reference")
    with torch.no_grad():
        layer.b13.normal_(std=0.1)
        layer.b2.normal_(std=0.1)
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad():
        out = layer(hidden)
        assert_close(out, expected_fp8_output(layer, hidden))
        # fp8 is not the 16-bit layer (the quantised path ran), but close to it.
        dense = expected_output(layer, hidden)
        assert not torch.equal(out, dense)
        assert_close(out, dense, 0.1)
    assert "quant=" in repr(layer)


def test_fp8_layer_requantises_weights_changed_in_place():
    torch.manual_seed(0)
    layer = MoE(4, 2, 64, 32, quant="fp8_channel", backend="reference").prepare()
    other = MoE(4, 2, 64, 32, quant="fp8_channel", backend="reference")
    hidden = torch.randn(3, 64)
    with torch.no_grad():
        before = layer(hidden)
        layer.load_state_dict(other.state_dict())  # copies in place: the versions move
        after = layer(hidden)
        assert not torch.equal(after, before)
        assert torch.equal(after, other(hidden))


@pytest.mark.parametrize("quant", ["fp8_tensor", "fp8_channel"])
def test_fp8_expert_parallel_layers_sum_to_the_whole_layer(quant):
    # Weights are quantised per expert and activations from the same hidden on every rank,
    # so the ranks' fp8 partial sums add up to the whole fp8 layer.
    torch.manual_seed(0)
    whole = MoE(8, 3, 64, 32, quant=quant, backend="reference")
    hidden = torch.randn(7, 64)
    out = torch.zeros_like(hidden)
    for held in ([0, 2, 4, 6], [7, 1, 5, 3]):
        rank = MoE.from_weights(whole.router.weight, whole.w13[held], whole.w2[held], 3,
                                local_experts=held, quant=quant, backend="reference")
        with torch.no_grad():
            out += rank(hidden)
    with torch.no_grad():
        assert_close(out, whole(hidden), 1e-5, name="the ranks' sum")


def test_fp8_layer_refuses_static_activation_scales():
    with pytest.raises(ValueError, match="static activation scales"):
        MoE(4, 2, 32, 16, quant=QuantScheme.fp8_tensor(dynamic=False))
    with pytest.raises(ValueError, match="scheme"):
        MoE(4, 2, 32, 16, quant="fp4")


_GRAPH_ROUTINGS = {  # (top_k, MoE's routing options)
    "softmax": (4, {}),
    "deepseek": (4, dict(method=Routing("sigmoid", n_group=8, topk_group=4,
                                        routed_scaling_factor=2.5),
                         e_score_correction_bias=True)),
    "llama4": (1, dict(method="sigmoid", renormalize=False, apply_router_weight_on_input=True)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("routing", list(_GRAPH_ROUTINGS))
@pytest.mark.parametrize("quant", [None, "fp8_block"], ids=["bf16", "fp8_block"])
def test_layer_cuda_graph_gpu(quant, routing):
    torch.manual_seed(0)
    top_k, options = _GRAPH_ROUTINGS[routing]
    layer = MoE(32, top_k, 512, 256, quant=quant, device="cuda", dtype=torch.bfloat16,
                **options).prepare()
    if layer.e_score_correction_bias is not None:  # small: the tokens' scores still choose
        with torch.no_grad():
            layer.e_score_correction_bias.normal_(std=0.05)
    hidden = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(hidden)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(hidden)
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        expected = expected_output if quant is None else expected_fp8_output
        assert_close(out, expected(layer, hidden).to(out.dtype))
