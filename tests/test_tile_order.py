"""The Triton GEMMs' tile order in groups that never split an expert (`_expert_tile_of`),
and the rule that picks it (`moekit._tile_order`)."""

import pytest
import torch
import triton
import triton.language as tl

import moekit
import moekit._tile_order
from helpers import (
    REL_L2_TOL,
    assert_close,
    exact_counts,
    poison_,
    poison_cuda_cache,
    random_experts,
    random_routing,
)
from moekit import reference
from moekit._experts_kernels import _ordered_tile_of
from moekit.dispatch import dispatch_plan
from moekit.tuning import ExpertsConfig, GemmConfig


@triton.jit
def _order_probe(tiles_ptr, block_experts_ptr, expert_offsets_ptr, out_ptr, num_m, num_n,
                 GROUP_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_M: tl.constexpr,
                 EXPERT_GROUPS: tl.constexpr):
    """Writes each tile id's (row tile, column tile) as the GEMMs compute it."""
    pid = tl.program_id(0)
    pid_m, pid_n = _ordered_tile_of(pid, num_m, num_n, tiles_ptr, block_experts_ptr,
                                    expert_offsets_ptr, GROUP_M, EXPERT_GROUPS, TAIL_M, BLOCK_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


def tile_order(counts, block_m, tail_m, group_m, num_n, expert_groups=True):
    """(plan, [(row tile, column tile)] by tile id, expert of each row tile) for a routing
    giving expert e exactly counts[e] rows (k = 1)."""
    ids = exact_counts(counts)(torch.zeros(sum(counts), 1, dtype=torch.int32))
    plan = dispatch_plan(ids, len(counts), tail_m or block_m,
                         tile_m=block_m if tail_m else None, backend="triton")
    num_m, _, _ = plan.row_tiles()
    out = poison_(torch.empty(num_m * num_n * 2, dtype=torch.int32))
    tiles = plan.block_experts if plan.tiles is None else plan.tiles
    _order_probe[(num_m * num_n,)](tiles, plan.block_experts, plan.expert_offsets, out,
                                   num_m, num_n, GROUP_M=group_m, TAIL_M=tail_m,
                                   BLOCK_M=block_m, EXPERT_GROUPS=expert_groups)
    if plan.tiles is None:
        experts = plan.block_experts[:num_m].tolist()
    else:
        entries = plan.tiles[:num_m].tolist()
        experts = [plan.block_experts[e >> 1].item() if e >= 0 else -1 for e in entries]
    return plan, [tuple(p) for p in out.view(-1, 2).tolist()], experts


ORDER_CASES = [
    # (counts, block_m, tail_m, group_m, num_n, why)
    ([300, 0, 130, 64, 520, 1], 128, 64, 2, 3,
     "tail tiles; runs of 3, 0, 2, 1, 5 and 1 row tiles: groups of 2 cut within an expert"),
    ([300, 0, 130, 64, 520, 1], 128, 64, 8, 4, "every expert one group"),
    ([40, 17, 0, 90, 33], 16, 0, 4, 2, "no tail tiles: plan blocks are the row tiles"),
    ([5, 6, 7], 16, 0, 8, 5, "one row tile an expert: column tiles of a row tile in turn"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("counts,block_m,tail_m,group_m,num_n,why", ORDER_CASES)
def test_expert_groups_take_every_tile_once_interpreter(counts, block_m, tail_m, group_m,
                                                        num_n, why):
    # Every (row tile, column tile) of a row tile in use exactly once; an expert's tiles
    # form one run of tile ids per group of up to GROUP_M of its row tiles, each column
    # tile's row tiles side by side; tile ids past the last run land on unused row tiles.
    plan, order, experts = tile_order(counts, block_m, tail_m, group_m, num_n)
    used = [m for m, e in enumerate(experts) if e >= 0]
    live = [(m, n) for m, n in order if experts[m] >= 0]
    assert sorted(live) == [(m, n) for m in used for n in range(num_n)]
    assert order[:len(live)] == live  # the unused row tiles are the work list's last
    for pid, (m, _) in enumerate(order):  # the group is the one its first row tile names
        assert experts[m] == experts[pid // num_n]
    first_of = {}
    for m in used:
        first_of.setdefault(experts[m], m)
    for pid, (m, n) in enumerate(live):
        place = m - first_of[experts[m]]  # row tiles of one expert are consecutive
        group_first = first_of[experts[m]] + place // group_m * group_m
        size = min(group_m, sum(1 for x in used if experts[x] == experts[m]) - place // group_m
                   * group_m)
        local = pid - group_first * num_n
        assert 0 <= local < size * num_n, f"tile {pid} left its group ({why})"
        assert (group_first + local % size, local // size) == (m, n)


@pytest.mark.interpreter
def test_groups_of_grouped_order_split_an_expert_interpreter():
    # Why the order exists: `_tile_of`'s groups of GROUP_M row tiles put one expert's row
    # tiles in two groups (expert 0's three row tiles across the first group of 2), which
    # the expert groups never do.
    counts = [300, 130, 520]
    _, plain, experts = tile_order(counts, 128, 64, 2, 3, expert_groups=False)
    _, grouped, _ = tile_order(counts, 128, 64, 2, 3)

    def runs_of(order, expert):  # tile ids of an expert's column tile 0, as runs
        pids = [p for p, (m, n) in enumerate(order) if experts[m] == expert and n == 0]
        return sum(1 for a, b in zip(pids[:-1], pids[1:], strict=True) if b != a + 1) + 1

    assert runs_of(plain, 1) == 2  # row tiles 3 and 4: the second group splits at 4
    assert runs_of(grouped, 1) == 1


TAIL_TILES = ExpertsConfig(32, GemmConfig(16, 16, 2, 1, 1), GemmConfig(32, 16, 2, 1, 1),
                           tail_block_m=16)
PLAIN_TILES = ExpertsConfig(16, GemmConfig(16, 16, 2, 1, 1), GemmConfig(16, 16, 2, 1, 1))
TMA_TILES = ExpertsConfig(128, GemmConfig(16, 32, 2, 4, 2), GemmConfig(32, 32, 2, 4, 2),
                          tail_block_m=64)

VALUE_CASES = [
    # (config, tma, counts (k = 1) or None (random, k = 2), why)
    (TAIL_TILES, False, None, "tail tiles by pointer; skewed routing, dropped ids"),
    (PLAIN_TILES, False, None, "no tail tiles"),
    (TMA_TILES, True, [330, 0, 130, 200],
     "TMA tiles and the persistent GEMM2: runs of 3, 0, 2 and 2 row tiles, groups of 2"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("config,tma,counts,why", VALUE_CASES)
def test_expert_groups_change_no_value_interpreter(monkeypatch, config, tma, counts, why):
    # The order moves tiles between programs, never what a tile computes: the layer's
    # output is bitwise the grouped order's, and the reference's.
    if tma:  # the Hopper path, which the interpreter implements
        monkeypatch.setattr("moekit._tma.device_has_tma", lambda device: True)
    E, H, I = (len(counts) if counts else 6), 64, 32
    M, k = (sum(counts), 1) if counts else (70, 2)
    w13, w2, b13, b2 = random_experts(E, H, I, gated=True, bias=True, dtype=torch.float16,
                                      seed=3)
    hidden = torch.randn(M, H, generator=torch.Generator().manual_seed(4)).half()
    ids, weights = random_routing(M, E, k, skew=2.0, seed=3)
    if counts:
        ids = exact_counts(counts)(ids)
    else:
        ids.view(-1)[::7] = -1
    outs = []
    for on in (False, True):
        monkeypatch.setattr(moekit._tile_order, "FORCED", on)
        out = poison_(torch.empty_like(hidden))
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation="silu", b13=b13,
                             b2=b2, config=config, out=out, backend="triton")
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    f64 = lambda t: t.double()  # noqa: E731
    expected = reference.fused_experts(f64(hidden), f64(w13), f64(w2), ids, weights,
                                       activation="silu", b13=f64(b13), b2=f64(b2))
    assert_close(outs[1], expected)


@pytest.mark.gpu
@pytest.mark.parametrize("counts", [[700, 0, 300, 450, 129], None], ids=["exact", "random"])
def test_expert_groups_change_no_value_gpu(monkeypatch, counts):
    # bf16 on the GPU, where both GEMMs are Triton's (I = 96 keeps GEMM1 off the Gluon
    # kernel, H = 320 GEMM2): GEMM1 one tile per program, GEMM2 persistent, both through
    # TMA; runs of up to 6 row tiles in groups of 2 (exact) or the bench's routing.
    E, H, I = (len(counts) if counts else 16), 320, 96
    M, k = (sum(counts), 1) if counts else (1500, 4)
    w13, w2, b13, b2 = random_experts(E, H, I, gated=True, bias=True, dtype=torch.bfloat16,
                                      device="cuda", seed=5)
    hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(M, E, k, device="cuda", seed=5)
    if counts:
        ids = exact_counts(counts)(ids)
    config = ExpertsConfig(128, GemmConfig(64, 64, 2, 4, 3), GemmConfig(64, 64, 2, 4, 3),
                           tail_block_m=64)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(moekit._tile_order, "FORCED", on)
        out = poison_(torch.empty_like(hidden))
        poison_cuda_cache()
        moekit.fused_experts(hidden, w13, w2, ids, weights, activation="silu", b13=b13,
                             b2=b2, config=config, out=out)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    expected = reference.fused_experts(hidden.float(), w13.float(), w2.float(), ids, weights,
                                       activation="silu", b13=b13.float(), b2=b2.float())
    assert_close(outs[1], expected.float(), REL_L2_TOL[torch.bfloat16])


def test_expert_groups_below_four_row_tiles_an_expert(monkeypatch):
    # The shipped rule (H100, session 49): on for 128-row tiles while the experts average
    # under 4 of them (deepseek-v3 and gpt-oss at M = 2048–8192), off at 4 and more
    # (deepseek-v3 at M = 16384: 0.94× and 1.03× in two A/Bs) and for smaller tiles;
    # MOEKIT_EXPERT_GROUPS forces either.
    monkeypatch.setattr(moekit._tile_order, "FORCED", None)
    rule = moekit._tile_order.expert_groups
    assert rule(8192 * 8, 256, 128)  # deepseek-v3 M = 8192: 2 row tiles an expert
    assert not rule(16384 * 8, 256, 128)  # M = 16384: 4
    assert rule(16384 * 8 - 1, 256, 128)
    assert not rule(64 * 8, 64, 16)  # decode and mid M: tiles under 128 rows
    monkeypatch.setattr(moekit._tile_order, "FORCED", True)
    assert rule(16384 * 8, 256, 128)
    monkeypatch.setattr(moekit._tile_order, "FORCED", False)
    assert not rule(8192 * 8, 256, 128)
