"""A causal-LM of a family, built on the target device with random weights.

The model is built directly on the device (no CPU copy of a 50 GB model) and then
re-initialised by one rule for every family, so runs are comparable and do not depend
on each version of transformers' `_init_weights`:
- weights of norm layers are ones (a norm that scales by N(0, σ) would shrink the
  residual stream to noise);
- every other tensor, biases included, is N(0, 0.02²) — the published checkpoints'
  `initializer_range`. With RMS-normalised inputs this keeps each projection's output
  O(1) for widths up to ~10k, so a few layers stay finite in bf16 and the logits have a
  spread (std ≈ 0.02·√H ≥ 1 at real widths) at which greedy decoding is not a coin toss.
  Biases are random rather than zero so that gpt-oss's bias handling is exercised.
Buffers (rotary frequencies, DeepSeek-V3's score-correction bias) keep transformers' values.
"""

from __future__ import annotations

import torch

INIT_STD = 0.02


def build_model(config, *, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """Build `AutoModelForCausalLM.from_config(config)` on `device` in `dtype`, random weights.

    Args:
        config: a transformers config (e.g. from `Family.build_config`).
        dtype: parameter dtype.
        device: where to build it.
        seed: seed of the random weights.
    Returns:
        The model, in eval mode.
    """
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    init_random_(model, seed)
    return model.eval()


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter of `model` in place (rule in the module docstring)."""
    gen_device = next(model.parameters()).device
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if is_norm and name == "weight":
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=gen)
