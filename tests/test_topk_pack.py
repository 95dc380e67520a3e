"""Packed top-k (TensorRT-LLM routed-MoE input): `(id << 16) | bf16_bits(weight)`."""

import pytest
import torch

from moekit.topk import TopK, bf16_bits, pack_topk, unpack_topk

INF, NAN = float("inf"), float("nan")


def _topk(ids, weights):
    return TopK(torch.tensor(ids, dtype=torch.int32), torch.tensor(weights, dtype=torch.float32))


@pytest.mark.parametrize(
    "ids, weights",
    [
        # the everyday case: small ids, weights in (0, 1) that are bf16-exact
        ([[0, 3]], [[0.75, 0.25]]),
        # negative weights: the sign bit of the bf16 half must not leak into the id
        ([[5, 7, 32767]], [[-1.0, -0.5, -(2.0**127)]]),
        # the largest id the format holds, and id 0 with weight 0 (an all-zero word)
        ([[32767, 0]], [[1.0, 0.0]]),
        # −1 ("no expert") comes back as −1 through the arithmetic shift; so do −0 and ±inf
        ([[-1, -1, 9]], [[-0.0, INF, -INF]]),
    ],
)
def test_round_trip_is_exact_for_bf16_values(ids, weights):
    topk = _topk(ids, weights)
    packed = pack_topk(topk)
    assert packed.dtype == torch.int32 and packed.shape == topk.ids.shape
    back = unpack_topk(packed)
    assert torch.equal(back.ids, topk.ids)
    assert back.weights.dtype == torch.float32
    # Compare bit patterns so −0.0 and ±inf are checked exactly.
    assert torch.equal(back.weights.view(torch.int32), topk.weights.view(torch.int32))


def test_layout_is_id_high_weight_bits_low_without_sign_extension():
    # The format spelled out by hand: −1.0 is bf16 0xBF80, 0.5 is 0x3F00.
    packed = pack_topk(_topk([[5, 32767]], [[-1.0, 0.5]]))
    assert packed.tolist() == [[(5 << 16) | 0xBF80, (32767 << 16) | 0x3F00]]
    assert (packed >> 16).tolist() == [[5, 32767]]


def test_bf16_bits_match_torch_rounding_for_finite_values():
    # Random values plus exact round-half cases (low half 0x8000) on odd and even bf16s.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 10.0 ** torch.randint(-30, 30, (4096,), generator=g)
    ties = torch.tensor([0x3F808000, 0x3F818000, -0x40778000], dtype=torch.int32)
    x = torch.cat([x, ties.view(torch.float32), torch.tensor([3.4e38, -3.4e38, 1e-40])])
    expected = x.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(bf16_bits(x), expected)


def test_nan_weight_packs_to_canonical_nan():
    # torch's CPU cast gives 0xFFFF for NaN, CUDA 0x7FFF; the format fixes 0x7FC0.
    packed = pack_topk(_topk([[3, 4]], [[NAN, -NAN]]))
    assert ((packed & 0xFFFF) == 0x7FC0).all()
    back = unpack_topk(packed)
    assert back.ids.tolist() == [[3, 4]] and torch.isnan(back.weights).all()


def test_unpack_of_float32_weights_rounds_to_bf16():
    w = torch.tensor([[0.1, 1 / 3, -2.7182817]])
    back = unpack_topk(pack_topk(TopK(torch.zeros_like(w, dtype=torch.int32), w)))
    assert torch.equal(back.weights, w.to(torch.bfloat16).float())


def test_empty_and_wrong_dtype():
    # M = 0 packs to an empty [0, k] tensor.
    empty = pack_topk(TopK(torch.empty(0, 4, dtype=torch.int32), torch.empty(0, 4)))
    assert empty.shape == (0, 4) and unpack_topk(empty).weights.shape == (0, 4)
    with pytest.raises(TypeError, match="packed"):
        unpack_topk(torch.zeros(2, 2, dtype=torch.int64))


@pytest.mark.gpu
def test_pack_unpack_cuda_graph_gpu():
    # pack_topk/unpack_topk are plain tensor ops: capturable, and replays see new inputs.
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(-1, 300, (512, 8), generator=g, device="cuda", dtype=torch.int32)
    weights = torch.randn((512, 8), generator=g, device="cuda")
    topk = TopK(ids, weights)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        unpack_topk(pack_topk(topk))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed = pack_topk(topk)
        back = unpack_topk(packed)
    for seed in (1, 2):
        g.manual_seed(seed)
        ids.copy_(torch.randint(-1, 300, ids.shape, generator=g, device="cuda",
                                dtype=torch.int32))
        weights.copy_(-torch.rand(weights.shape, generator=g, device="cuda"))  # sign bits set
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(packed, pack_topk(topk))
        assert torch.equal(back.ids, ids)
        assert torch.equal(back.weights, weights.to(torch.bfloat16).float())
