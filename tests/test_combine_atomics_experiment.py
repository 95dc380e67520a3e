"""bench/scripts/combine_atomics_experiment.py: its variants compute the same layer output.

The script times GEMM2's epilogue traffic three ways (pair rows stored and combined,
float32 atomics into token rows, the store and combine by column slabs); a timing of a
variant that wrote something else would compare nothing. Here, through the interpreter,
on a few tokens: the slab variant is bitwise the whole combine's, the atomics' sum matches
it within the pair rows' 16-bit rounding, and every output element is written.
"""

import pytest
import torch

import moekit
from helpers import bench_script
from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS
from moekit.experts import launch_combine


@pytest.fixture(scope="module")
def experiment():
    return bench_script("combine_atomics_experiment")


# granite: H = 1536 (three 512-column slabs), k = 8 of 40 experts; 24 tokens keep the
# interpreter quick and still put several pairs in most experts' tiles.
@pytest.mark.parametrize("num_tokens", [1, 24])
def test_variants_agree(experiment, num_tokens):
    preset = PRESETS["granite-3.0-3b-a800m"]
    k, hidden, experts = preset.top_k, preset.hidden, preset.num_experts
    _, topk = make_tokens(preset, num_tokens, torch.float32, torch.device("cpu"))
    plan = moekit.dispatch_plan(topk.ids, experts, 128)
    weights = topk.weights.reshape(-1).contiguous()

    def poisoned(shape):
        return torch.full(shape, float("nan"), dtype=torch.float16)

    pair_out, out = poisoned((plan.sorted_pairs.numel(), hidden)), poisoned((num_tokens, hidden))
    experiment.epilogue(experiment.STORE, plan, weights, pair_out, None, k)
    launch_combine(pair_out, topk.ids, experts, out, plan.pair_slots)
    assert not out.isnan().any()

    slab_rows, slab_out = poisoned(pair_out.shape), poisoned(out.shape)
    for col0 in range(0, hidden, 512):
        experiment.epilogue(experiment.STORE, plan, weights, slab_rows[:, col0:col0 + 512],
                            None, k, col0)
        launch_combine(slab_rows[:, col0:col0 + 512], topk.ids, experts,
                       slab_out[:, col0:col0 + 512], plan.pair_slots)
    assert torch.equal(slab_out, out)

    sums = torch.zeros((num_tokens, hidden), dtype=torch.float32)
    experiment.epilogue(experiment.ATOMIC_F32, plan, weights, None, sums, k)
    # Each of the k pair rows was rounded to fp16 (|value| < 0.31) before the combine.
    torch.testing.assert_close(out.float(), sums, atol=k * 2**-12, rtol=0)
    assert sums.abs().max() > 0.01  # the synthetic values are not all zero
