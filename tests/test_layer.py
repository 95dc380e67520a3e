"""The MoE module: same result as the functional reference, prepared once, graph-safe."""

import pytest
import torch

from helpers import assert_close
from moekit import reference
from moekit.layer import MoE


def expected_output(layer, hidden):
    logits = hidden.reshape(-1, hidden.shape[-1]) @ layer.router.weight.T
    f = lambda t: None if t is None else t.detach()
    out = reference.fused_moe(
        hidden.reshape(-1, hidden.shape[-1]).detach(), logits.detach(), f(layer.w13), f(layer.w2),
        layer.top_k, renormalize=layer.renormalize, activation=layer.activation,
        b13=f(layer.b13), b2=f(layer.b2),
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
    ({"activation": "tanh"}, "activation"),
])
def test_bad_construction(kwargs, fragment):
    args = {"num_experts": 4, "top_k": 2, "hidden_size": 32, "intermediate_size": 16} | kwargs
    with pytest.raises(ValueError, match=fragment):
        MoE(**args)


@pytest.mark.gpu
def test_layer_cuda_graph_gpu():
    torch.manual_seed(0)
    layer = MoE(32, 4, 512, 256, device="cuda", dtype=torch.bfloat16).prepare()
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
        assert_close(out, expected_output(layer, hidden).to(out.dtype))
