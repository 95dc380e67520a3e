"""The accuracy check of `moekit run`: each bf16 implementation against a float32 run.

Why not "moekit's tokens equal transformers'": with random weights two correct bf16
implementations of one model do not agree token for token. They round in different
places (moekit accumulates the k expert outputs in float32 and rounds once;
transformers' loops round per expert or per GEMM), and the differences grow through
the layers: a router near a tie picks another expert, and the next-token logits of a
random model are close together (at Mixtral's widths the median gap between the top
two logits is a tenth of their spread). On the H100, Mixtral at real width agreed with
transformers on 85% of teacher-forced tokens while transformers agreed with itself (one
forward vs. cached decode) on only 91%: a fixed token-agreement gate measures noise.

So the check needs the size of the noise, measured in the same run. The *oracle* is
the same model evaluated in float32: the same weights (bf16 values, upcast in place
and restored bit for bit afterwards) with transformers' eager experts loop, teacher-
forced on the baseline's continuation. Each bf16 implementation's logits [B, T, V] are
compared with the oracle's, position by position (relative L2 over the vocabulary),
and moekit passes when the *median* over positions is of the size of bf16 rounding,
i.e. not much above transformers' own bf16 implementation's:

    median_rel_l2(moekit) ≤ RATIO · median_rel_l2(baseline) + SLACK

The median, because routing flips are discrete events: one near-tie in one router
sends one token to another expert, and its logits (and, through attention, some later
ones) move by a lot. At the CPU's tiny widths (4×48 positions, 6 seeds, all families)
that took the global relative L2 of a correct implementation from 0.006 to 0.05 (6.6×
the baseline's in the worst seed), while the median stayed at 0.005–0.010 and within
1.02× of the baseline's. A real bug moves most positions: the deliberate bugs of
tests/integrations/test_e2e_check.py (a wrong expert, a dropped top-k slot, one
expert's down projection negated, gate and up swapped, gpt-oss's biases dropped) gave
medians of 0.03–0.8, 6× to 100× the baseline's. The global relative L2 and the argmax
agreement with the oracle are reported beside it, not gated on: argmax flips at the
near-ties of a random model are what made the old token gate fail.

The oracle needs the model in float32 (twice its bf16 size) for one forward;
`oracle_fits` says whether the device has the room, and `moekit run` reports the check
as skipped, not passed, when it does not.

An fp8 model (`moekit run --fp8-experts`) is judged the same way against its own plainest
implementation: its experts run by moekit's fp8 reference (`moekit.e2e.fp8.REFERENCE`),
in bf16 for the noise and upcast to float32 for the oracle, its fp8 values unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

# Bounds on the median per-position distance (numbers in the module docstring): twice
# the baseline's, plus an absolute allowance so that a baseline that happens to sit very
# close to the oracle does not demand the impossible.
RATIO = 2.0
SLACK = 5e-3

ORACLE_EXPERTS = "eager"


@dataclass(frozen=True)
class Distance:
    """One implementation's teacher-forced logits against the float32 oracle's.

    rel_l2: over all positions at once; median_rel_l2: the median over positions of each
    position's relative L2; agreement: fraction of positions with the oracle's argmax.
    """

    rel_l2: float
    median_rel_l2: float
    agreement: float


@dataclass(frozen=True)
class OracleCheck:
    """The verdict: both implementations' distances to the oracle and the bound moekit met."""

    baseline: Distance
    candidate: Distance
    bound: float

    @property
    def passed(self) -> bool:
        return self.candidate.median_rel_l2 <= self.bound

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    diff = (actual.double() - expected.double()).norm()
    ref = expected.double().norm()
    return (diff / ref).item() if ref > 0 else diff.item()


def distance(logits: torch.Tensor, oracle: torch.Tensor) -> Distance:
    """Logits [..., V] of one implementation against the oracle's."""
    agreement = (logits.argmax(-1) == oracle.argmax(-1)).float().mean().item()
    diff = (logits.double() - oracle.double()).norm(dim=-1)  # [B, T]
    per_position = diff / oracle.double().norm(dim=-1).clamp_min(1e-30)  # [B, T]
    return Distance(rel_l2(logits, oracle), per_position.median().item(), agreement)


def judge(baseline: torch.Tensor, candidate: torch.Tensor, oracle: torch.Tensor) -> OracleCheck:
    """Compare baseline and candidate logits [B, T, V] with the oracle's (module docstring)."""
    base, cand = distance(baseline, oracle), distance(candidate, oracle)
    return OracleCheck(base, cand, RATIO * base.median_rel_l2 + SLACK)


@torch.inference_mode()
def teacher_forced_logits(model, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of `model` predicting `tokens` from prompt + tokens[:, :-1].

    Args:
        model: a transformers causal LM.
        prompt: [B, P] int64 on the model's device.
        tokens: [B, T] int64 (any device): a continuation of `prompt`.
    Returns:
        [B, T, V] float32 on the CPU; position 0 is the prompt's last (the prefill's).
    """
    tokens = tokens.to(prompt.device)
    sequence = torch.cat([prompt, tokens[:, :-1]], dim=1)  # [B, P+T-1]
    logits = model(input_ids=sequence, use_cache=False, logits_to_keep=tokens.shape[1]).logits
    return logits.float().cpu()  # [B, T, V]


def _floating_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors the oracle upcasts: floating parameters and buffers, but fp8 values
    (exact in their format, beside float32 scales: an fp8 model's oracle keeps them)."""
    tensors = [*model.parameters(), *model.buffers()]
    return [t for t in tensors if t.is_floating_point() and t.element_size() > 1]


def fp32_bytes(model: torch.nn.Module) -> int:
    """Extra bytes that upcasting `model`'s sub-float32 tensors to float32 takes."""
    return sum(t.numel() * (4 - t.element_size()) for t in _floating_tensors(model)
               if t.element_size() < 4)


def oracle_fits(model: torch.nn.Module, device: torch.device, headroom: float = 1.15) -> bool:
    """True when the device has room for the model upcast to float32 (with some headroom)."""
    if device.type != "cuda":
        return True
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return fp32_bytes(model) * headroom < free


@torch.no_grad()  # not inference_mode: the restored weights must stay ordinary tensors
def fp32_oracle_logits(model, prompt: torch.Tensor, tokens: torch.Tensor,
                       experts: str = ORACLE_EXPERTS) -> torch.Tensor:
    """`teacher_forced_logits` of `model` evaluated in float32, then the model restored.

    Every floating parameter and buffer is upcast in place (tensor by tensor, so the peak
    is the float32 model plus one bf16 tensor) and cast back afterwards; bf16 → fp32 →
    bf16 is exact, so the model is bit for bit what it was. The tensors get new storage,
    which moekit's conversion cache notices (gpt-oss is converted again on next use).
    The experts run `experts` (transformers' eager loop: the plainest implementation).
    """
    previous = model.config._experts_implementation
    originals = [(t, t.dtype) for t in _floating_tensors(model) if t.dtype != torch.float32]
    try:
        for t, _ in originals:
            t.data = t.data.float()
        model.set_experts_implementation(experts)
        return teacher_forced_logits(model, prompt, tokens)
    finally:
        for t, dtype in originals:
            t.data = t.data.to(dtype)
        model.set_experts_implementation(previous)
