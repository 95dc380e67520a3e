"""bench/scripts/plan_launches_experiment.py: a plan made in one launch past the shipped
limit is the plan count + scan + place make, and the script's comparison can tell plans apart."""

import pytest
import torch

from helpers import bench_script


@pytest.fixture(scope="module")
def experiment():
    return bench_script("plan_launches_experiment")


@pytest.mark.interpreter
@pytest.mark.parametrize("block_m, tail_m", [(128, 64), (64, 0)])
def test_one_launch_past_the_limit_makes_the_same_plan_interpreter(experiment, block_m, tail_m):
    g = torch.Generator().manual_seed(block_m + tail_m)
    ids = torch.randint(0, 40, (640, 8), generator=g, dtype=torch.int32)  # 5,120 pairs
    assert experiment.launches(ids.numel(), experiment.SHIPPED) == 3
    assert experiment.launches(ids.numel(), 8192) == 1
    scanned = experiment.layer_plan(ids, 40, block_m, tail_m, experiment.SHIPPED, "triton")
    fused = experiment.layer_plan(ids, 40, block_m, tail_m, 8192, "triton")
    expected = experiment.layer_plan(ids, 40, block_m, tail_m, 8192, "reference")
    assert experiment.same_plans(fused, scanned)
    assert experiment.same_plans(fused, expected)
    other = experiment.layer_plan(ids.roll(1, 0), 40, block_m, tail_m, 8192, "reference")
    assert not experiment.same_plans(fused, other)
