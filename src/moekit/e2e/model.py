"""A causal-LM of a family, built on the target device with random weights.

The model is built directly on the device (no CPU copy of a 50 GB model) and then
re-initialised by one rule for every family, so runs are comparable and do not depend
on each version of transformers' `_init_weights`. The rule keeps every activation O(1)
at any width, so that the tiny CPU models and the real-width GPU models are alike:
- a projection's weight is N(0, 1/fan_in) (fan_in: the input width; experts stored
  transposed, like gpt-oss's, read it from the other axis), so each matmul maps unit-
  variance inputs to unit-variance outputs; the router's logits and the lm_head's
  logits have unit spread;
- token embeddings are N(0, 1): the residual stream starts at unit scale and each
  attention and experts block adds a comparable amount, so the experts' output is a
  large part of what the logits see (a wrong expert moves them visibly);
- norm weights are ones; biases and other vectors (gpt-oss's attention sinks) are
  N(0, BIAS_STD²), large enough that a dropped bias is seen.
Why not transformers' N(0, 0.02²) everywhere: its scale depends on the width. At the
tiny widths an expert's output was ~1% of the residual (a wrong expert moved the logits
by 2%, below bf16 noise at real width), at Mixtral's real width each layer amplified its
input several-fold (bf16 rounding grew through the layers).
Buffers (rotary frequencies, DeepSeek-V3's score-correction bias) keep transformers' values.
"""

from __future__ import annotations

import torch

BIAS_STD = 0.1


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
    done: set[int] = set()  # tied weights are initialised once, by their first owner
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        is_embedding = isinstance(module, torch.nn.Embedding)
        transposed = bool(getattr(module, "is_transposed", False))  # [E, in, out] experts
        for name, param in module.named_parameters(recurse=False):
            if id(param) in done:
                continue
            done.add(id(param))
            if is_norm and name == "weight":
                param.fill_(1.0)
            elif param.dim() < 2:
                param.normal_(0.0, BIAS_STD, generator=gen)
            elif is_embedding:
                param.normal_(0.0, 1.0, generator=gen)
            else:
                fan_in = param.shape[-2] if transposed and param.dim() == 3 else param.shape[-1]
                param.normal_(0.0, fan_in ** -0.5, generator=gen)
