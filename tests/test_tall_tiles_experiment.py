"""bench/scripts/tall_tiles_experiment.py: its routings give every expert the same whole number
of 192- and 128-row tiles, its plans need no padding, and its GEMM1 refuses other plans.
(The kernels themselves are Gluon: they run on the device only.)"""

import pytest
import torch

from helpers import bench_script
from moekit.dispatch import dispatch_plan


@pytest.fixture(scope="module")
def experiment():
    return bench_script("tall_tiles_experiment")


def test_every_shape_gives_each_expert_whole_tiles_of_both_heights(experiment):
    for name, experts, top_k, _, _, tokens in experiment.SHAPES:
        ids = experiment.even_ids(tokens, experts, top_k, "cpu")
        # Distinct experts per token (a token's k picks), the same count for each expert.
        assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), name
        counts = torch.bincount(ids.flatten().long(), minlength=experts)
        assert (counts == tokens * top_k // experts).all(), name
        assert int(counts[0]) % 384 == 0, name
        plan = dispatch_plan(ids, experts, experiment.PLAN_BLOCK, backend="reference")
        assert int(plan.expert_offsets[-1]) == tokens * top_k, name  # no padding slots


def test_tall_gemm1_refuses_a_plan_it_cannot_tile(experiment):
    ids = experiment.even_ids(96, 8, 2, "cpu")  # 24 pairs an expert
    plan = dispatch_plan(ids, 8, experiment.PLAN_BLOCK, backend="reference")
    hidden = torch.empty(96, 64, dtype=torch.bfloat16)
    w13 = torch.empty(8, 256, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 192 slots"):
        experiment.tall_gemm1(hidden, w13, plan, 192 + 64, 3, 128, 132)
    other = dispatch_plan(ids, 8, 64, backend="reference")
    with pytest.raises(ValueError, match="128-row blocks"):
        experiment.tall_gemm1(hidden, w13, other, 192, 3, 128, 132)
