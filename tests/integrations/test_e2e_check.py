"""The accuracy check of `moekit run` passes moekit and fails a deliberately broken moekit.

The check compares teacher-forced logits of the baseline and of moekit, both in bf16,
with the same weights in float32 (`moekit.e2e.check`). Here it runs at tiny widths on
the CPU, in bf16, so that the bound really is bf16 rounding noise; the broken variants
are moekit's own forward with one realistic bug each, registered under another name.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (moekit[transformers])")
moe = pytest.importorskip("transformers.integrations.moe", reason="needs transformers >= 5.7")

import moekit  # noqa: E402
from moekit.e2e import check  # noqa: E402
from moekit.e2e.decode import greedy_decode  # noqa: E402
from moekit.e2e.families import FAMILIES  # noqa: E402
from moekit.e2e.model import build_model  # noqa: E402
from moekit.integrations import experts_layout  # noqa: E402
from moekit.integrations import transformers as moekit_tf  # noqa: E402


def _broken_forward(bug: str):
    """moekit's experts forward with one bug (the names of BUGS)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        plan = experts_layout.experts_plan(self)
        ops = experts_layout.experts_operands(self, plan)
        w13, w2, b13, b2 = ops.w13, ops.w2, ops.b13, ops.b2
        ids, weights = top_k_index.to(torch.int32), top_k_weights.float()  # [T, k]
        if bug == "wrong_expert":
            ids = (ids + 1) % ops.num_experts
        elif bug == "dropped_slot":
            weights = torch.cat([weights[:, :-1], torch.zeros_like(weights[:, -1:])], 1)
        elif bug == "negated_expert":  # the most-routed one: a margin on every platform
            e = int(torch.bincount(ids.flatten(), minlength=ops.num_experts).argmax())
            w2 = torch.cat([w2[:e], -w2[e:e + 1], w2[e + 1:]])  # [E, H, I]
        elif bug == "gate_up_swapped":
            half = w13.shape[1] // 2
            w13 = torch.cat([w13[:, half:], w13[:, :half]], 1)  # [E, 2I, H]
        elif bug == "missing_bias":
            b13 = b2 = None
        out = moekit.fused_experts(hidden_states, w13, w2, ids, weights,
                                   activation=plan.activation, b13=b13, b2=b2)
        return out.to(hidden_states.dtype)

    return forward


# Each bug is one a layout or routing change could plausibly introduce.
BUGS = [
    pytest.param("mixtral", "wrong_expert", id="mixtral-wrong_expert"),  # ids off by one
    pytest.param("mixtral", "dropped_slot", id="mixtral-dropped_slot"),  # k−1 of k slots
    pytest.param("olmoe", "negated_expert", id="olmoe-negated_expert"),  # 1 of 16 experts, a sign
    pytest.param("qwen3-moe", "gate_up_swapped", id="qwen3-gate_up_swapped"),  # halves swapped
    pytest.param("deepseek-v3", "dropped_slot", id="deepseek-dropped_slot"),  # + shared expert
    pytest.param("gpt-oss", "missing_bias", id="gpt-oss-missing_bias"),  # biases ignored
    pytest.param("gpt-oss", "gate_up_swapped", id="gpt-oss-gate_up_swapped"),  # de-interleave wrong
]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    moekit_tf.register()
    for bug in {p.values[1] for p in BUGS}:
        moe.ExpertsInterface.register(f"moekit-broken-{bug}", _broken_forward(bug))


_SETUPS: dict[str, tuple] = {}


def _setup(family: str):
    """A bf16 tiny model, a prompt, the baseline's greedy tokens, its logits and the oracle's."""
    if family not in _SETUPS:
        config = FAMILIES[family].build_config("tiny", 2)
        model = build_model(config, dtype=torch.bfloat16, device="cpu", seed=0)
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, config.vocab_size, (4, 24), generator=gen)  # [B, P]
        model.set_experts_implementation("eager")
        tokens = greedy_decode(model, prompt, 12).tokens  # [B, T]
        baseline = check.teacher_forced_logits(model, prompt, tokens)
        oracle = check.fp32_oracle_logits(model, prompt, tokens)
        _SETUPS[family] = (model, prompt, tokens, baseline, oracle)
    return _SETUPS[family]


def _verdict(family: str, implementation: str) -> check.OracleCheck:
    model, prompt, tokens, baseline, oracle = _setup(family)
    model.set_experts_implementation(implementation)
    return check.judge(baseline, check.teacher_forced_logits(model, prompt, tokens), oracle)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moekit_passes(family):
    verdict = _verdict(family, "moekit")
    assert verdict.passed, verdict


@pytest.mark.parametrize("family,bug", BUGS)
def test_broken_moekit_fails(family, bug):
    verdict = _verdict(family, f"moekit-broken-{bug}")
    assert not verdict.passed, verdict
    # Not a near miss: the bug is several times the bound.
    assert verdict.candidate.median_rel_l2 > 2 * verdict.bound, verdict


def test_oracle_restores_the_model_bit_for_bit():
    model, prompt, tokens, _, _ = _setup("gpt-oss")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check.fp32_oracle_logits(model, prompt, tokens)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert not any(p.is_inference() for p in model.parameters())


def test_oracle_is_float32_of_the_same_weights():
    # The oracle of a float32 model is that model's own logits (nothing to upcast).
    config = FAMILIES["mixtral"].build_config("tiny", 1)
    model = build_model(config, dtype=torch.float32, device="cpu", seed=0)
    prompt = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    tokens = prompt[:, :4]
    model.set_experts_implementation("eager")
    assert torch.equal(check.fp32_oracle_logits(model, prompt, tokens),
                       check.teacher_forced_logits(model, prompt, tokens))
    assert check.fp32_bytes(model) == 0
