"""bench/scripts/tail_cost_experiment.py: its even routings give the plans they claim."""

import pytest
import torch

from helpers import bench_script


@pytest.fixture(scope="module")
def experiment():
    return bench_script("tail_cost_experiment")


@pytest.mark.parametrize("rows, tiles, tails", [(512, 32, 0), (544, 40, 8), (576, 40, 8),
                                                (640, 40, 0)])
def test_even_routing_plans(experiment, rows, tiles, tails):
    ids = experiment.even_ids(rows, 2, 8, "cpu")
    assert ids.shape == (rows * 4, 2)
    assert (ids[:, 0] != ids[:, 1]).all(), "a token's experts are distinct"
    assert torch.bincount(ids.reshape(-1).long(), minlength=8).tolist() == [rows] * 8
    assert experiment.tile_counts(ids, 8) == (tiles, tails)


def test_even_routing_refuses_a_partial_token(experiment):
    with pytest.raises(ValueError, match="whole number of tokens"):
        experiment.even_ids(3, 2, 3, "cpu")
