"""`moekit._topk_cast`: the experts ops' ids to int32 and weights to float32 in one launch.

The cast must be bitwise torch's `.to` for ids in int32's range (interpreter here, GPU
below), map int64 ids outside it to −1 (truncated, 2**32 + 1 would be expert 1), leave
int32/float32 operands untouched, and let an eager call with int64 ids replay
(tests/test_replay.py's worker checks the `topk64` cases of tests/test_sm90_compile.py
launch for launch). The direct path's kernels read int64 ids and 16-bit weights
themselves, with the same meaning (ids compared with E before they narrow), so it
launches no cast. float64 weights are narrowed by the ops before any of this.
"""

import pytest
import torch

import moekit
from helpers import POISON, count_calls, poison_, random_experts, random_routing
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


# int64 ids past int32's range, each with what 32-bit truncation made of it.
WIDE_IDS = [
    (2**32 + 1, "truncated: expert 1"),
    (-(2**32) + 2, "truncated: expert 2"),
    (2**31, "truncated: −2**31, no expert either way"),
    (-(2**31) - 1, "truncated: 2**31 − 1, past any E"),
    (2**63 - 1, "truncated: −1"),
    (-(2**63), "truncated: 0, expert 0"),
]


@pytest.mark.parametrize("how", [
    pytest.param("launch", marks=pytest.mark.interpreter), "torch", "strided"])
def test_ids_outside_int32_become_no_expert(how, monkeypatch):
    # −1 ("no expert"), as the ops' docstrings promise; in-range ids narrow exactly.
    wide = torch.tensor([[i for i, _ in WIDE_IDS], [-1, 0, 3, 2**31 - 1, -(2**31), 7]])
    expected = torch.tensor([[-1] * len(WIDE_IDS), [-1, 0, 3, 2**31 - 1, -(2**31), 7]],
                            dtype=torch.int32)
    weights = torch.rand(wide.shape, dtype=torch.float64).half()
    if how == "strided":  # not contiguous: torch's conversion even when launching
        wide = wide.T.contiguous().T
    _poisoned_empty(monkeypatch)
    got_ids, _ = kernel_topk(wide, weights, launch=how != "torch")
    assert torch.equal(got_ids, expected)


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
    """Bitwise the int32/float32 call with ids past int32's range as −1 (truncated,
    2^32 + e would be expert e); a cast launch on the plan path only."""
    torch.manual_seed(1)
    M, E, k = 3, 8, 4
    w13, w2, b13, b2 = random_experts(E, 64, 32, bias=True, dtype=torch.float16)
    hidden = torch.randn(M, 64, dtype=torch.float16)
    ids, weights = random_routing(M, E, k)
    weights = weights.to(weights_dtype)
    wide = ids.long()
    wide[0, 0] += 1 << 32  # no expert (truncated: the same expert)
    wide[1, 1] = 1 << 31  # no expert (truncated: −2^31, also none)
    dropped = ids.clone()
    dropped[0, 0] = dropped[1, 1] = -1
    casts = count_calls(monkeypatch, _topk_cast, "launcher")
    config = _direct_or_plan(direct)
    run = lambda i, w: moekit.fused_experts(hidden, w13, w2, i, w, b13=b13, b2=b2,
                                            config=config, backend="triton")
    got = run(wide, weights)
    assert len(casts) == (0 if direct else 1)
    expected = run(dropped, weights.float())
    assert torch.equal(got, expected)
    assert not torch.equal(expected, run(ids, weights.float())), "the dropped slots count"


_interpreted = pytest.mark.interpreter

WIDE_ID_PATHS = [
    # (backend, direct path (else plan) on the kernels, ids strided, expert_map, why)
    ("reference", None, False, False, "torch's conversion before the reference"),
    ("reference", None, False, True, "torch's conversion before the map"),
    pytest.param("triton", False, True, False, "plan path, strided ids: torch's conversion",
                 marks=_interpreted),
    pytest.param("triton", False, False, True, "the cast launch before the map's launch",
                 marks=_interpreted),
]


@pytest.mark.parametrize("backend,direct,strided,mapped,why", WIDE_ID_PATHS)
def test_ids_outside_int32_contribute_nothing_on_every_path(backend, direct, strided, mapped,
                                                            why):
    # The kernel paths without a map: test_direct_path_reads_int64_ids_… above.
    torch.manual_seed(3)
    w13, w2, _, _ = random_experts(4, 64, 32, dtype=torch.float16)
    hidden = torch.randn(3, 64, dtype=torch.float16)
    ids, weights = random_routing(3, 4, 2)
    wide = ids.long()
    wide[0, 0] += 1 << 32  # truncated: the same expert
    wide[2, 1] -= 1 << 32
    dropped = ids.clone()
    dropped[0, 0] = dropped[2, 1] = -1
    if strided:
        wide = wide.T.contiguous().T
    table = torch.arange(4, dtype=torch.int32) if mapped else None
    run = lambda i: moekit.fused_experts(
        hidden, w13, w2, i, weights, config=_direct_or_plan(direct) if backend == "triton"
        else None, expert_map=table, out=poison_(torch.empty_like(hidden)), backend=backend)
    expected = run(dropped)
    assert torch.equal(run(wide), expected)
    assert not torch.equal(expected, run(ids)), "the dropped slots count"


FLOAT64_WEIGHT_PATHS = [
    # (fp8, backend, direct, why)
    (False, "reference", False, "the reference path"),
    pytest.param(False, "triton", False, "the plan path: its cast launch takes float32",
                 marks=_interpreted),
    pytest.param(False, "triton", True, "the direct path: its kernels read the weights",
                 marks=_interpreted),
    (True, "reference", False, "fp8, the reference path"),
    pytest.param(True, "triton", True, "fp8, the direct path", marks=_interpreted),
]


@pytest.mark.parametrize("fp8,backend,direct,why", FLOAT64_WEIGHT_PATHS)
def test_float64_weights_are_the_float32_call(fp8, backend, direct, why):
    # The docstrings promise other float dtypes are converted; float64 was refused.
    from fp8_interpreter import exact_fp8_casts
    from moekit.quant import QuantScheme, quantize_weight

    torch.manual_seed(4)
    M, E, k = 3, 8, 2
    w13, w2, _, _ = random_experts(E, 128, 128, dtype=torch.float16)
    hidden = torch.randn(M, 128, dtype=torch.float16)
    ids, weights = random_routing(M, E, k)
    config = None
    if fp8:
        scheme = QuantScheme.fp8_tensor()
        w13, w2 = (quantize_weight(w.float(), scheme.weight) for w in (w13, w2))
        if backend == "triton":
            config = moekit.experts_fp8.direct_fp8_config(M, k, 128, 128, scheme)
        op = lambda w: moekit.fused_experts_fp8(hidden, w13, w2, ids, w, scheme=scheme,
                                                config=config, backend=backend)
    else:
        if backend == "triton":
            config = _direct_or_plan(direct)
        op = lambda w: moekit.fused_experts(hidden, w13, w2, ids, w, config=config,
                                            backend=backend)
    with exact_fp8_casts():
        assert torch.equal(op(weights.double()), op(weights))


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
    wide[0, 0] += 1 << 32  # no expert (truncated: the same expert)
    dropped = ids.clone()
    dropped[0, 0] = -1
    casts = count_calls(monkeypatch, _topk_cast, "launcher")
    config = moekit.experts_fp8.direct_fp8_config(M, k, 256, 128, scheme)
    run = lambda i, w: moekit.fused_experts_fp8(
        hidden, q13, q2, i, w, scheme=scheme, config=config, backend="triton",
        apply_router_weight_on_input=weight_on_input)
    with exact_fp8_casts():
        got = run(wide, weights.bfloat16())
        assert not casts
        expected = run(dropped, weights.bfloat16().float())
        assert torch.equal(got, expected)
        assert not torch.equal(expected, run(ids, weights.bfloat16().float()))
