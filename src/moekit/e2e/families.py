"""The model families `moekit run` builds, with the widths of their published checkpoints.

Each family names its transformers config class and the config values of one published
checkpoint (from its config.json): hidden size, expert widths, expert count, top-k,
attention heads, vocabulary. `moekit run` keeps those widths and cuts only the depth,
so one MoE layer costs what it costs in the real model, and fills the weights with
random numbers (no download). The `tiny` overrides shrink the widths for CPU runs and
tests while keeping each family's structure (routing, shared experts, MLA, biases).

Deliberate departures from the checkpoints, none of which touches the experts:
- every built layer is an MoE layer (DeepSeek-V3's first three layers are dense);
- RoPE scaling (YaRN) is dropped for plain RoPE with the same theta: the sequences here
  are short, and the experts never see positions;
- DeepSeek-V3's multi-token-prediction layer is not built.

Sizes, bf16, per MoE layer (experts only): Mixtral-8x7B 2.8 GB, Qwen3-30B-A3B 1.2 GB,
OLMoE-1B-7B 0.8 GB, DeepSeek-V3 22.5 GB, gpt-oss-120b 6.4 GB (+6.4 GB for moekit's
converted copy: gpt-oss stores its experts transposed and interleaved).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """One model family: config class, published widths, and how to shrink it.

    Attributes:
        name: the `--model` value.
        checkpoint: the published checkpoint whose widths `real` copies.
        config_class: the transformers config class name.
        real: config keyword arguments with the checkpoint's widths.
        tiny: overrides for the small CPU/test scale.
        default_layers: layers built at the real scale when `--layers` is not given.
        per_layer: config values that depend on the layer count (given the count).
    """

    name: str
    checkpoint: str
    config_class: str
    real: Mapping[str, Any]
    tiny: Mapping[str, Any]
    default_layers: int
    per_layer: Callable[[int], dict[str, Any]] = field(default=lambda n: {})

    def config_kwargs(self, scale: str, layers: int) -> dict[str, Any]:
        """Keyword arguments for the config class at `scale` ("real" or "tiny")."""
        if scale not in ("real", "tiny"):
            raise ValueError(f"scale: expected 'real' or 'tiny', got {scale!r}")
        kwargs = dict(self.real)
        if scale == "tiny":
            kwargs.update(self.tiny)
        kwargs.update(self.per_layer(layers))
        kwargs["num_hidden_layers"] = layers
        return kwargs

    def build_config(self, scale: str, layers: int):
        """The transformers config (imports transformers)."""
        import transformers

        return getattr(transformers, self.config_class)(**self.config_kwargs(scale, layers))


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


# Small widths shared by the tiny scale: a vocabulary large enough that greedy decoding
# rarely meets near-ties, everything else as small as keeps the structure.
_TINY = {"vocab_size": 1024, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512,
         # The checkpoints' special-token ids lie outside the small vocabulary.
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

MIXTRAL = Family(
    name="mixtral",
    checkpoint="mistralai/Mixtral-8x7B-v0.1",
    config_class="MixtralConfig",
    real={"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
          "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
          "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 32768, "sliding_window": None, **_rope(1e6)},
    tiny={**_TINY, "intermediate_size": 96, "head_dim": 16},
    default_layers=4,
)

QWEN3_MOE = Family(
    name="qwen3-moe",
    checkpoint="Qwen/Qwen3-30B-A3B",
    config_class="Qwen3MoeConfig",
    real={"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
          "moe_intermediate_size": 768, "num_attention_heads": 32, "num_key_value_heads": 4,
          "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
          "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
          "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
          "tie_word_embeddings": False, **_rope(1e6)},
    tiny={**_TINY, "intermediate_size": 128, "moe_intermediate_size": 32, "head_dim": 16,
          "num_experts": 16, "num_experts_per_tok": 4},
    default_layers=4,
)

OLMOE = Family(
    name="olmoe",
    checkpoint="allenai/OLMoE-1B-7B-0924",
    config_class="OlmoeConfig",
    real={"vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
          "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
          "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, **_rope(1e4)},
    tiny={**_TINY, "num_key_value_heads": 4, "intermediate_size": 32, "num_experts": 16,
          "num_experts_per_tok": 4},
    default_layers=4,
)

DEEPSEEK_V3 = Family(
    name="deepseek-v3",
    checkpoint="deepseek-ai/DeepSeek-V3",
    config_class="DeepseekV3Config",
    real={"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "num_attention_heads": 128,
          "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
          "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
          "routed_scaling_factor": 2.5, "norm_topk_prob": True, "kv_lora_rank": 512,
          "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
          "v_head_dim": 128, "first_k_dense_replace": 0, "rms_norm_eps": 1e-6,
          "max_position_embeddings": 163840, **_rope(1e4)},
    tiny={**_TINY, "num_key_value_heads": 4, "intermediate_size": 128,
          "moe_intermediate_size": 32, "n_routed_experts": 16, "num_experts_per_tok": 4,
          "n_group": 4, "topk_group": 2, "kv_lora_rank": 32, "q_lora_rank": 48,
          "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16},
    # 22.5 GB of experts per layer in bf16 (26.7 GB with attention and vocabulary for
    # one layer). Two layers (49 GB) would time on an 80 GB GPU, but the accuracy check's
    # float32 run needs the model twice over: one layer (27 + 27 GB) leaves it room.
    default_layers=1,
)

GPT_OSS = Family(
    name="gpt-oss",
    checkpoint="openai/gpt-oss-120b",
    config_class="GptOssConfig",
    real={"vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
          "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
          "num_local_experts": 128, "num_experts_per_tok": 4, "sliding_window": 128,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
          "tie_word_embeddings": False, **_rope(1.5e5)},
    tiny={**_TINY, "intermediate_size": 32, "head_dim": 16, "num_local_experts": 16,
          "num_experts_per_tok": 4, "sliding_window": 8},
    default_layers=2,
    # gpt-oss alternates sliding-window and full attention, starting with sliding.
    per_layer=lambda n: {
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    },
)

FAMILIES: dict[str, Family] = {f.name: f for f in (MIXTRAL, QWEN3_MOE, OLMOE, DEEPSEEK_V3, GPT_OSS)}


def get_family(name: str) -> Family:
    """The family called `name` (see `FAMILIES`)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model: expected one of {sorted(FAMILIES)}, got {name!r}") from None
