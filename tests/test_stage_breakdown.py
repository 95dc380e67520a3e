"""bench/scripts/stage_breakdown.py: its stages are the call's own.

The script times each stage of `fused_experts` alone, so the stages must be the launches
the call makes: session 48 found the script still timing a plan without tail tiles and
Triton's GEMM2 where the call had moved on, and it cost a device run. Here, through the
interpreter, the stages chained reproduce the call's output bitwise, on the plan path
(with and without tail tiles) and the direct path.
"""

import dataclasses
import types

import pytest
import torch

import moekit
import moekit._replay
from helpers import bench_script, poison_, random_experts, random_routing
from moekit.tuning import ExpertsConfig, GemmConfig
from moekit.tuning.heuristic import tiles_for_block_m


@pytest.fixture(scope="module")
def stage_breakdown():
    # The script switches replayed eager calls off at import; other tests in this process
    # must not inherit that.
    enabled = moekit._replay.enabled
    module = bench_script("stage_breakdown")
    moekit._replay.enabled = enabled
    return module


_PLAN_16 = tiles_for_block_m(16, 2)
_PLAN_32_TAILS = dataclasses.replace(tiles_for_block_m(32, 2), tail_block_m=16)
# One slot a GEMM2 program: a token's parts summed by the last to arrive (the counters).
_DIRECT = ExpertsConfig(1, GemmConfig(32, 64, 1, 4, 2), GemmConfig(32, 64, 1, 4, 2))


@pytest.mark.interpreter
@pytest.mark.parametrize("config,stages", [
    (_PLAN_16, ["plan", "gemm1", "gemm2", "combine"]),
    (_PLAN_32_TAILS, ["plan", "gemm1", "gemm2", "combine"]),
    (_DIRECT, ["gemm1 (direct)", "gemm2 (direct, sums the slots)"]),
], ids=["plan", "plan-tails", "direct"])
def test_stages_chained_are_the_call(stage_breakdown, config, stages, monkeypatch):
    monkeypatch.setattr(moekit._replay, "enabled", False)
    M, E, k, H, I = 6, 4, 2, 64, 32
    w13, w2, b13, b2 = random_experts(E, H, I, bias=True, dtype=torch.float16, seed=3)
    hidden = torch.randn(M, H, generator=torch.Generator().manual_seed(5)).half()
    topk = random_routing(M, E, k, seed=7)
    ids, weights = topk.ids.to(torch.int32), topk.weights.float()
    weights_of = types.SimpleNamespace(w13=w13, w2=w2, b13=b13, b2=b2)

    plans = {"stages": [], "call": []}  # the arguments each side's plans were built with
    for side, owner in (("stages", stage_breakdown), ("call", moekit.experts)):
        monkeypatch.setattr(owner, "dispatch_plan", _recorded(plans[side], owner.dispatch_plan))

    staged = poison_(torch.empty_like(hidden))
    launches = stage_breakdown.call_stages(hidden, weights_of, ids, weights, "swigluoai",
                                           config, staged)
    assert list(launches) == stages
    assert staged.isnan().all(), "building the stages runs all but the last"
    launches[stages[-1]]()
    call = poison_(torch.empty_like(hidden))
    moekit.fused_experts(hidden, w13, w2, ids, weights, activation="swigluoai", b13=b13,
                         b2=b2, config=config, out=call, backend="triton")
    assert not call.isnan().any()
    assert torch.equal(staged, call), "the stages chained are not the call"
    # Tiles with or without tails sum each row alike: the plans must match as well.
    assert plans["stages"][:1] == plans["call"], "the stages' plan is not the call's"
    assert bool(plans["call"]) == (config.block_m > 1)


def _recorded(into: list, dispatch_plan):
    """`dispatch_plan`, recording each call's arguments but the ids."""
    def record(topk_ids, *args, **kwargs):
        into.append((args, kwargs))
        return dispatch_plan(topk_ids, *args, **kwargs)
    return record
