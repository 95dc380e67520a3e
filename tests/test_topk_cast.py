"""`moekit._topk_cast`: the experts ops' ids to int32 and weights to float32 in one launch.

The cast must be bitwise torch's `.to` (interpreter here, GPU below), leave int32/float32
operands untouched, and let an eager call with int64 ids replay (tests/test_replay.py's
worker checks the `topk64` cases of tests/test_sm90_compile.py launch for launch). The
direct path's kernels read int64 ids and 16-bit weights themselves, with the same
meaning (ids truncated to 32 bits as torch's cast does), so it launches no cast.
"""

import pytest
import torch

import moekit
from helpers import POISON, count_calls, random_experts, random_routing
from moekit import _topk_cast
from moekit._topk_cast import kernel_topk
from moekit.tuning import ExpertsConfig, GemmConfig


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


def _direct_or_plan(direct: bool) -> ExpertsConfig:
    if direct:  # block_m 1: the direct path, GEMM2 summing 2 of a token's slots per program
        return ExpertsConfig(1, GemmConfig(32, 64, 1, 4, 2), GemmConfig(32, 32, 2, 4, 2))
    return ExpertsConfig(16, GemmConfig(32, 32, 1, 4, 2), GemmConfig(32, 32, 1, 4, 2))


@pytest.mark.interpreter
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "plan"])
@pytest.mark.parametrize("weights_dtype", [torch.float16, torch.bfloat16])
def test_direct_path_reads_int64_ids_and_16_bit_weights_itself(direct, weights_dtype,
                                                                monkeypatch):
    """Bitwise the int32/float32 call, ids past 32 bits truncated as torch's cast does
    (2^32 + e is expert e; 2^31 is negative: no expert); a cast launch on the plan path
    only."""
    torch.manual_seed(1)
    M, E, k = 3, 8, 4
    w13, w2, b13, b2 = random_experts(E, 64, 32, bias=True, dtype=torch.float16)
    hidden = torch.randn(M, 64, dtype=torch.float16)
    ids, weights = random_routing(M, E, k)
    weights = weights.to(weights_dtype)
    wide = ids.long()
    wide[0, 0] += 1 << 32  # the same expert after truncation
    wide[1, 1] = 1 << 31  # −2^31 after truncation: dropped
    casts = count_calls(monkeypatch, _topk_cast, "launcher")
    config = _direct_or_plan(direct)
    run = lambda i, w: moekit.fused_experts(hidden, w13, w2, i, w, b13=b13, b2=b2,
                                            config=config, backend="triton")
    got = run(wide, weights)
    assert len(casts) == (0 if direct else 1)
    expected = run(wide.to(torch.int32), weights.float())
    assert torch.equal(got, expected)
    assert not torch.equal(expected, run(ids, weights.float())), "the dropped slot counts"


@pytest.mark.interpreter
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_fp8_direct_path_reads_int64_ids_and_16_bit_weights_itself(weight_on_input,
                                                                   monkeypatch):
    from fp8_interpreter import exact_fp8_casts
    from moekit.quant import QuantScheme, quantize_weight

    torch.manual_seed(2)
    M, E, k = 2, 32, 1 if weight_on_input else 4
    scheme = QuantScheme.fp8_tensor()
    w13, w2, _, _ = random_experts(E, 256, 128)
    q13, q2 = (quantize_weight(w, scheme.weight) for w in (w13, w2))
    hidden = torch.randn(M, 256, dtype=torch.float16)
    ids, weights = random_routing(M, E, k)
    wide = ids.long()
    wide[0, 0] += 1 << 32
    casts = count_calls(monkeypatch, _topk_cast, "launcher")
    config = moekit.experts_fp8.direct_fp8_config(M, k, 256, 128, scheme)
    run = lambda i, w: moekit.fused_experts_fp8(
        hidden, q13, q2, i, w, scheme=scheme, config=config, backend="triton",
        apply_router_weight_on_input=weight_on_input)
    with exact_fp8_casts():
        got = run(wide, weights.bfloat16())
        assert not casts
        assert torch.equal(got, run(wide.to(torch.int32), weights.bfloat16().float()))
