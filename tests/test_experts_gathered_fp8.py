"""The fp8 gathered experts path (`ExpertsConfig.gathered` in `fused_experts_fp8`): against
the quantised reference and bitwise against the fp8 plan path at the same tiles."""

import dataclasses

import pytest
import torch

import moekit
from helpers import assert_close, capture_cuda_graph, poison_, random_routing, seeded_randn_like
from moekit.bench.presets import PRESETS
from moekit.experts_fp8 import plan_fp8_config
from moekit.quant import QuantScheme
from moekit.reference import fused_experts_quantized
from moekit.tuning import ExpertsConfig, GemmConfig
from test_experts_fp8 import (
    GPU_SCHEMES,
    GPU_TOL,
    KERNEL_TOL,
    SMALL_BLOCKS,
    STATIC,
    bf16_experts,
    drop_some,
    make_case,
    quantize_by_chunks,
    run_triton,
)
from test_experts_gathered import mostly_one_expert

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def gathered(n1, k1, n2, k2, block_m=16):
    """A gathered configuration with these (block_n, block_k) tiles."""
    return ExpertsConfig(block_m, GemmConfig(n1, k1, 1, 4, 2), GemmConfig(n2, k2, 1, 4, 2),
                         gathered=True)


GATHERED_CASES = [
    # (scheme, M, E, k, H, I, activation, bias, dtype, config, extra, why)
    ("fp8_tensor", 10, 4, 2, 256, 192, "silu", False, torch.float32,
     gathered(128, 128, 32, 64), {},
     "dynamic per-tensor over 10 rows; GEMM2's input in 1×128 groups, I a partial group"),
    ("fp8_channel", 9, 5, 2, 160, 128, "swigluoai", True, torch.float16,
     gathered(128, 64, 32, 64), {},
     "per-channel weights, per-token rows; gpt-oss activation + biases; H a partial tile"),
    ("fp8_block", 12, 4, 3, 300, 200, "silu", True, torch.float16, gathered(128, 64, 64, 64),
     {"ids_transform": drop_some},
     "128×128 blocks with partial edges (per-K scales in both GEMMs); dropped ids"),
    (STATIC, 11, 4, 2, 128, 128, "silu", True, torch.float32, gathered(64, 64, 32, 64), {},
     "static calibrated input scales for both GEMMs, biases"),
    (SMALL_BLOCKS, 17, 5, 2, 96, 72, "gelu", False, torch.float32, gathered(32, 32, 32, 16),
     {}, "32×32 blocks: several K groups and column tiles per program"),
    (SMALL_BLOCKS, 7, 3, 1, 64, 64, "relu2", False, torch.float32, gathered(32, 32, 32, 16),
     {}, "no gate; k = 1"),
    ("fp8_tensor", 24, 4, 2, 128, 128, "silu", False, torch.float32,
     gathered(128, 64, 32, 64), {"ids_transform": lambda ids: torch.full_like(ids, 2)},
     "all 48 pairs on one expert: three 16-row steps, three programs a column tile"),
    ("fp8_block", 40, 6, 2, 128, 128, "silu", True, torch.float32,
     gathered(128, 64, 32, 64, block_m=64), {"ids_transform": mostly_one_expert},
     "64-row steps over 128 pairs, an expert's pairs ranked 64 ids at a time (`MATCH_MAX`); "
     "72 pairs on one expert: two steps, the first's ranks in both chunks"),
    ("fp8_channel", 6, 3, 2, 128, 128, "silu", False, torch.float32,
     gathered(128, 64, 32, 64, block_m=32),
     {"ids_transform": lambda ids: ids.long().index_fill(0, torch.tensor([4]), -1)},
     "int64 ids read as they are; a token with no expert gets a zero row; 32-row steps"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("scheme,M,E,k,H,I,act,bias,dtype,config,extra,why", GATHERED_CASES)
def test_gathered_path_matches_quantised_reference_interpreter(scheme, M, E, k, H, I, act,
                                                               bias, dtype, config, extra, why):
    case = make_case(scheme, M, E, k, H, I, act, bias=bias, dtype=dtype, **extra)
    out, expected = run_triton(*case, act=act, config=config)
    assert_close(out, expected, KERNEL_TOL, name=why)
    plan, _ = run_triton(*case, act=act, config=dataclasses.replace(config, gathered=False))
    assert torch.equal(out, plan), "not the plan path's output at the same tiles"


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*GPU_SCHEMES, "static"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_gathered_path_gpu(monkeypatch, preset, name):
    # The plan path's decode tiles, gathered, against the quantised reference and bitwise
    # against the plan path (its GEMM2 held to one K part, as the gathered one runs).
    monkeypatch.setattr("moekit.experts_fp8.gemm2_k_parts", lambda *args: 1)
    monkeypatch.setattr(moekit._replay, "enabled", False)  # no recording made without it
    p = PRESETS[preset]
    w13, w2, b13, b2 = bf16_experts(preset)
    E, k, H, act = w13.shape[0], p.top_k, p.hidden, p.activation
    scheme = STATIC if name == "static" else QuantScheme.parse(name)
    spec = scheme.weight
    for M, skew in ((8, 0.0), (16, 0.0), (64, 0.0), (64, 4.0)):
        hidden = seeded_randn_like(torch.empty(M, H, device="cuda", dtype=torch.bfloat16), M)
        ids, weights = random_routing(M, E, k, skew=skew, device="cuda", seed=M)
        s1 = s2 = None
        if name == "static":
            s1 = hidden.abs().max().float().reshape(1) / 448
            s2 = torch.full((1,), 0.05, device="cuda")
        q13 = dataclasses.replace(quantize_by_chunks(w13, spec), input_scale=s1)
        q2 = dataclasses.replace(quantize_by_chunks(w2, spec), input_scale=s2)
        config = dataclasses.replace(plan_fp8_config(M, E, k, scheme), gathered=True)

        def run(c, hidden=hidden, ids=ids, weights=weights, q13=q13, q2=q2):
            return moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                            activation=act, b13=b13, b2=b2, config=c,
                                            out=poison_(torch.empty_like(hidden)))

        out = run(config)
        expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                           activation=act, b13=b13, b2=b2)
        where = f"{preset} {name} M={M} skew={skew} {config}"
        assert_close(out, expected, GPU_TOL, where)
        assert torch.equal(out, run(dataclasses.replace(config, gathered=False))), where
        for _ in range(3):
            assert torch.equal(out, run(config)), where


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", GPU_SCHEMES)
def test_gathered_path_cuda_graph_replay_gpu(scheme):
    E, k, H, I, M = 64, 8, 1024, 512, 16
    scheme, hidden, q13, q2, ids, weights, b13, b2 = make_case(
        scheme, M, E, k, H, I, dtype=torch.bfloat16, device="cuda")
    config = dataclasses.replace(plan_fp8_config(M, E, k, scheme), gathered=True)
    call = lambda: moekit.fused_experts_fp8(hidden, q13, q2, ids, weights, scheme=scheme,
                                            b13=b13, b2=b2, config=config)
    graph, out = capture_cuda_graph(call)
    for seed in (1, 2):
        new_ids, new_weights = random_routing(M, E, k, device="cuda", seed=seed, skew=4.0 * seed)
        hidden.copy_(seeded_randn_like(hidden, seed) * seed)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        out.fill_(float("nan"))
        graph.replay()
        replayed = out.clone()
        assert torch.equal(replayed, call()), f"replay {seed}"
        expected = fused_experts_quantized(hidden, q13, q2, ids, weights, scheme=scheme,
                                           b13=b13, b2=b2)
        assert_close(replayed, expected, GPU_TOL, name=f"replay {seed}")
