"""`moekit._topk_cast`: the experts ops' ids to int32 and weights to float32 in one launch.

The cast must be bitwise torch's `.to` (interpreter here, GPU below), leave int32/float32
operands untouched, and let an eager call with int64 ids replay (tests/test_replay.py's
worker checks the `topk64` cases of tests/test_sm90_compile.py launch for launch).
"""

import pytest
import torch

import moekit
from helpers import POISON, random_experts, random_routing
from moekit import _topk_cast
from moekit._topk_cast import kernel_topk


def _poisoned_empty(monkeypatch):
    """`torch.empty` inside `moekit._topk_cast` returning poisoned buffers, so an element
    the kernel fails to write shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(POISON) if out.is_floating_point() else out.fill_(-7777)

    monkeypatch.setattr(_topk_cast.torch, "empty", empty)


@pytest.mark.interpreter
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 8), (333, 7)], ids=["decode", "ragged-blocks"])
def test_cast_is_torchs_bitwise(ids_dtype, weights_dtype, shape, monkeypatch):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 300, shape, generator=g).to(ids_dtype)  # −1 and ids ≥ E kept
    weights = torch.randn(shape, generator=g, dtype=torch.float64).to(weights_dtype)
    _poisoned_empty(monkeypatch)
    monkeypatch.setattr(_topk_cast, "BLOCK", 128)  # several programs, a ragged last one
    got_ids, got_weights = kernel_topk(ids, weights, launch=True)
    assert got_ids.dtype == torch.int32 and got_weights.dtype == torch.float32
    assert torch.equal(got_ids, ids.to(torch.int32))
    assert torch.equal(got_weights, weights.to(torch.float32))


def test_kernel_operands_pass_through_and_others_fall_back_to_torch():
    ids, weights = torch.zeros(3, 2, dtype=torch.int32), torch.rand(3, 2)
    same = kernel_topk(ids, weights, launch=True)
    assert same[0] is ids and same[1] is weights
    ids64 = torch.arange(6).reshape(2, 3).T  # not contiguous: torch's casts
    got_ids, got_weights = kernel_topk(ids64, weights.half(), launch=True)
    assert torch.equal(got_ids, ids64.int()) and torch.equal(got_weights, weights.half().float())
    got_ids, _ = kernel_topk(ids64.contiguous(), weights, launch=False)
    assert got_ids.dtype == torch.int32
    empty = kernel_topk(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), launch=True)
    assert empty[0].shape == (0, 2) and empty[0].dtype == torch.int32


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [1, 5, 40])
def test_experts_with_int64_ids_and_half_weights_match_int32_float32(M):
    torch.manual_seed(0)
    w13, w2, _, _ = random_experts(8, 64, 32, dtype=torch.float16)
    hidden = torch.randn(M, 64, dtype=torch.float16)
    ids, weights = random_routing(M, 8, 2)
    expected = moekit.fused_experts(hidden, w13, w2, ids, weights, backend="triton")
    got = moekit.fused_experts(hidden, w13, w2, ids.long(), weights.half(), backend="triton")
    assert torch.equal(got, moekit.fused_experts(hidden, w13, w2, ids, weights.half().float(),
                                                 backend="triton"))
    assert not torch.equal(expected, torch.zeros_like(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 4, 64, 1000])
@pytest.mark.parametrize("what", ["bf16", "fp8_block"])
def test_int64_ids_and_bf16_weights_are_bitwise_int32_float32_gpu(M, what, monkeypatch):
    import moekit._replay

    monkeypatch.setattr(moekit._replay, "enabled", True)  # conftest runs ops in full
    moekit._replay.clear()
    torch.manual_seed(0)
    w13, w2, _, _ = random_experts(32, 512, 256, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(M, 512, dtype=torch.bfloat16, device="cuda")
    ids, weights = random_routing(M, 32, 4, device="cuda")
    weights = weights.bfloat16()  # as transformers hands some models' weights
    if what == "bf16":
        run = lambda i, w: moekit.fused_experts(hidden, w13, w2, i, w)
    else:
        scheme = moekit.quant.QuantScheme.fp8_block()
        q13, q2 = (moekit.quant.quantize_weight(w, scheme.weight) for w in (w13, w2))
        run = lambda i, w: moekit.fused_experts_fp8(hidden, q13, q2, i, w, scheme=scheme)
    expected = run(ids, weights.float())
    for _ in range(3):  # plainly, recording, replayed
        assert torch.equal(run(ids.long(), weights), expected)
    op = moekit.fused_experts if what == "bf16" else moekit.fused_experts_fp8
    assert any(isinstance(r, moekit._replay._Replay) for r in op.replays.values())


@pytest.mark.interpreter
@pytest.mark.parametrize("M,E", [(2, 32), (24, 4)], ids=["direct", "plan"])
def test_fp8_experts_with_int64_ids_and_half_weights_match_int32_float32(M, E):
    from fp8_interpreter import exact_fp8_casts
    from moekit.quant import QuantScheme, quantize_weight

    torch.manual_seed(0)
    scheme = QuantScheme.fp8_block()
    w13, w2, _, _ = random_experts(E, 256, 128)
    q13, q2 = (quantize_weight(w, scheme.weight) for w in (w13, w2))
    hidden = torch.randn(M, 256, dtype=torch.float16)
    ids, weights = random_routing(M, E, 2)
    weights = weights.half().float()  # values a half-precision router gives
    run = lambda i, w: moekit.fused_experts_fp8(hidden, q13, q2, i, w, scheme=scheme,
                                                backend="triton")
    with exact_fp8_casts():
        expected = run(ids, weights)
        assert torch.equal(run(ids.long(), weights.half()), expected)
