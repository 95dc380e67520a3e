"""`quantize_experts`: a bf16 transformers model's experts made fp8, as a checkpoint holds them."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (moekit[transformers])")
pytest.importorskip("transformers.integrations.finegrained_fp8",
                    reason="needs transformers' fine-grained fp8 integration")

from helpers import assert_close  # noqa: E402
from moekit.e2e.families import FAMILIES  # noqa: E402
from moekit.e2e.fp8 import REFERENCE, register_reference  # noqa: E402
from moekit.e2e.model import build_model  # noqa: E402
from moekit.integrations import transformers as moekit_tf  # noqa: E402
from moekit.integrations.fp8_experts_layout import (  # noqa: E402
    fp8_experts_operands,
    fp8_experts_plan,
)
from moekit.integrations.fp8_quantize import fp8_block, quantize_experts  # noqa: E402

moekit_tf.register()


def _model(family, dtype=torch.bfloat16, layers=2):
    return build_model(FAMILIES[family].build_config("tiny", layers), dtype=dtype,
                       device="cpu", seed=0)


@torch.no_grad()
def _logits(model, implementation):
    model.set_experts_implementation(implementation)
    ids = torch.randint(0, model.config.vocab_size, (2, 12),
                        generator=torch.Generator().manual_seed(1))
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family", ["mixtral", "qwen3-moe", "deepseek-v3"])
def test_quantised_model_runs_its_fp8_experts(family):
    model = _model(family)
    dense = _logits(model, "eager")
    done = quantize_experts(model)
    assert done and all(v == "fp8 e4m3, 32x32 block scales" for v in done.values()), done
    for name in done:
        assert model.get_submodule(name).gate_up_proj.dtype == torch.float8_e4m3fn, name
    # The bf16 experts are gone from the model (their memory freed with them).
    assert not any(p.dtype == torch.bfloat16 and p.dim() == 3 for p in model.parameters())
    served = _logits(model, "moekit")
    register_reference()
    assert torch.equal(served, _logits(model, REFERENCE))  # the CPU runs the reference
    # fp8 costs ~3e-2 a position, more where it flips a near-tied route (up to 0.12 over
    # all positions seen here); a misread weight would cost ~1.
    assert_close(served, dense, 0.3, name="fp8 against bf16 logits")


def test_twin_weights_dequantise_to_the_bf16_ones():
    model = _model("olmoe", layers=1)
    bf16 = model.model.layers[0].mlp.experts
    w13, w2 = bf16.gate_up_proj.detach().float(), bf16.down_proj.detach().float()
    quantize_experts(model, block=16)
    fp8 = model.model.layers[0].mlp.experts
    assert fp8.block_size == (16, 16)
    ops = fp8_experts_operands(fp8, fp8_experts_plan(fp8))
    for name, weight in (("w13", w13), ("w2", w2)):
        err = (getattr(ops, name).dequantize() - weight).norm() / weight.norm()
        assert 0 < err < 0.05, (name, err)  # e4m3's 3 mantissa bits: ~2-3%


def test_biased_experts_stay_as_they_are():
    model = _model("gpt-oss", layers=1)
    before = model.model.layers[0].mlp.experts
    done = quantize_experts(model)
    assert done and all("expert biases" in v for v in done.values()), done
    assert model.model.layers[0].mlp.experts is before


def test_widths_without_a_block_stay_as_they_are():
    model = _model("qwen3-moe", layers=1)
    done = quantize_experts(model, block=128)  # tiny widths are not made of 128-blocks
    assert all(v.startswith("kept:") and "128x128 blocks" in v for v in done.values()), done


@pytest.mark.parametrize("hidden,inter,block", [
    (64, 96, 32), (2048, 768, 128), (7168, 2048, 128), (4096, 14336, 128), (48, 80, 16)])
def test_fp8_block_is_the_largest_shared_power_of_two(hidden, inter, block):
    assert fp8_block(hidden, inter) == block


def test_fp8_block_refuses_widths_without_one():
    with pytest.raises(ValueError, match="no power-of-two block"):
        fp8_block(40, 24)
