"""Prefill + greedy decode with a KV cache, timed; and the checks that compare two runs.

One run is: a prefill forward over the prompt [B, P] that yields the first new token,
then T−1 decode forwards of one token each, reusing the cache. The loop is written out
(rather than `model.generate`) so that the timed region holds only model forwards and
an argmax, the same for every experts implementation:

    prefill time   → prefill tokens/s = B·P / prefill time
    decode time    → time per output token (TPOT) = decode time / (T−1)

Timing synchronises the device before and after each region (no syncs inside).

What two runs' tokens say (`compare_runs`): `exact_match`, the fraction of sequences
identical; `token_match`, the fraction of positions equal (free-running: one early flip
of a near-tie costs the rest of its sequence); and `prefill_logits_rel_l2`. These are
reported, not gated on: whether moekit computes the same model is `moekit.e2e.check`'s
question, asked against a float32 run.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeRun:
    """One timed prefill + decode.

    Attributes:
        tokens: [B, T] int64 on the CPU, the greedy continuation.
        prefill_logits: [B, V] float32 on the CPU, logits at the last prompt position.
        prefill_s: seconds for the prefill forward.
        decode_s: seconds for the T−1 decode forwards.
    """

    tokens: torch.Tensor
    prefill_logits: torch.Tensor
    prefill_s: float
    decode_s: float

    def tpot_s(self) -> float:
        """Seconds per output token in the decode phase (nan when T = 1)."""
        steps = self.tokens.shape[1] - 1
        return self.decode_s / steps if steps > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_keyword(model: torch.nn.Module) -> str:
    """The name under which `model`'s forward takes and returns the KV cache: `cache` from
    transformers 5.25 (where `past_key_values` is deprecated), `past_key_values` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@torch.inference_mode()
def greedy_decode(
    model,
    prompt: torch.Tensor,
    new_tokens: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> DecodeRun:
    """Prefill `prompt` and decode `new_tokens` tokens greedily with the KV cache.

    Args:
        model: a transformers causal LM.
        prompt: [B, P] int64 token ids on the model's device.
        new_tokens: T ≥ 1.
        progress: called as progress(done, total) after each generated token.
    Returns:
        DecodeRun.
    """
    device = prompt.device
    out_tokens = torch.empty(prompt.shape[0], new_tokens, dtype=torch.long, device=device)
    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]  # [B, V]
    next_token = logits.argmax(-1, keepdim=True)  # [B, 1]
    out_tokens[:, :1] = next_token
    _sync(device)
    prefill_s = time.perf_counter() - start
    prefill_logits = logits.float().cpu()
    if progress is not None:
        progress(1, new_tokens)
    cache_name = cache_keyword(model)
    cache = getattr(out, cache_name)
    start = time.perf_counter()
    for step in range(1, new_tokens):
        out = model(input_ids=next_token, use_cache=True, **{cache_name: cache})
        cache = getattr(out, cache_name)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
        out_tokens[:, step : step + 1] = next_token
        if progress is not None:
            progress(step + 1, new_tokens)
    _sync(device)
    decode_s = time.perf_counter() - start
    return DecodeRun(out_tokens.cpu(), prefill_logits, prefill_s, decode_s)


def compare_runs(baseline: DecodeRun, candidate: DecodeRun) -> dict[str, float]:
    """Free-running token agreement and prefill-logit distance of two runs of one prompt."""
    same = baseline.tokens == candidate.tokens  # [B, T]
    diff = (candidate.prefill_logits.double() - baseline.prefill_logits.double()).norm()
    ref = baseline.prefill_logits.double().norm()
    # Position of the first differing token per sequence (T when none differs).
    first_diff = torch.where(same.all(1), same.shape[1], (~same).float().argmax(1))
    return {
        "exact_match": same.all(1).float().mean().item(),
        "token_match": same.float().mean().item(),
        "mean_first_divergence": first_diff.float().mean().item(),
        "prefill_logits_rel_l2": (diff / ref).item() if ref > 0 else diff.item(),
    }
