"""`moekit run` pieces: the family registry's widths and the CPU (tiny) end-to-end run."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip(
    "transformers", reason="`moekit run` needs transformers (moekit[transformers])"
)
pytest.importorskip("transformers.integrations.moe", reason="needs transformers >= 5.7")

from moekit.e2e import add_run_arguments, run_command  # noqa: E402
from moekit.e2e.families import FAMILIES  # noqa: E402

# (family, H, expert I, E, k) from each checkpoint's config.json: the registry must
# keep these, since `moekit run` claims to time one real MoE layer of each.
PUBLISHED = [
    ("mixtral", 4096, 14336, 8, 2),  # Mixtral-8x7B: few huge experts, k=2
    ("qwen3-moe", 2048, 768, 128, 8),  # Qwen3-30B-A3B: many small experts
    ("olmoe", 2048, 1024, 64, 8),  # OLMoE-1B-7B
    ("deepseek-v3", 7168, 2048, 256, 8),  # DeepSeek-V3: the largest layer
    ("gpt-oss", 2880, 2880, 128, 4),  # gpt-oss-120b
]

_KEYS = {
    "expert_i": ("moe_intermediate_size", "intermediate_size"),
    "experts": ("n_routed_experts", "num_local_experts", "num_experts"),
}


def _first(config, names):
    return next(getattr(config, n) for n in names if getattr(config, n, None) is not None)


@pytest.mark.parametrize("family,hidden,inter,experts,top_k", PUBLISHED,
                         ids=[p[0] for p in PUBLISHED])
def test_real_widths_are_the_published_ones(family, hidden, inter, experts, top_k):
    config = FAMILIES[family].build_config("real", layers=2)
    assert config.hidden_size == hidden
    assert _first(config, _KEYS["expert_i"]) == inter
    assert _first(config, _KEYS["experts"]) == experts
    assert config.num_experts_per_tok == top_k
    assert config.num_hidden_layers == 2


def test_every_built_layer_is_moe():
    # DeepSeek-V3's checkpoint starts with dense layers; a 2-layer cut must not.
    assert FAMILIES["deepseek-v3"].build_config("real", 2).first_k_dense_replace == 0
    assert FAMILIES["gpt-oss"].build_config("tiny", 3).layer_types == [
        "sliding_attention", "full_attention", "sliding_attention"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moekit run")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def test_run_cpu_tiny_writes_results(tmp_path):
    args = _parse(["--model", "olmoe", "--scale", "tiny", "--device", "cpu", "--batch", "2",
                   "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
                   "--out-dir", str(tmp_path)])
    args.command_line = "moekit run --model olmoe (test)"
    assert run_command(args) == 0
    (json_path,) = tmp_path.glob("cpu-*-e2e-olmoe.json")
    record = json.loads(json_path.read_text())
    for key in ("device", "torch", "triton", "transformers", "date", "command"):
        assert key in record, key
    assert record["command"] == "moekit run --model olmoe (test)"
    assert record["scale"] == "tiny" and record["experts"]["served"] == 2
    assert record["check"]["passed"], record["check"]
    assert record["check"]["candidate"]["median_rel_l2"] < 0.05
    assert record["runs"].keys() == {record["experts"]["baseline"], "moekit"}
    md = json_path.with_suffix(".md").read_text()
    assert "tiny widths" in md and "TPOT" in md and "**passed**" in md


def test_run_warms_up_as_many_tokens_as_it_times(tmp_path, monkeypatch):
    """Session 33: a 3-token warm-up left transformers' first timed run 5–9× slower at
    decode, which one-repeat runs reported as moekit's speedup."""
    import moekit.e2e.decode as decode

    lengths = []
    real = decode.greedy_decode
    monkeypatch.setattr(decode, "greedy_decode",
                        lambda model, prompt, n, **kw: lengths.append(n) or real(model, prompt,
                                                                                 n, **kw))
    args = _parse(["--model", "olmoe", "--scale", "tiny", "--device", "cpu", "--batch", "2",
                   "--prompt-len", "8", "--new-tokens", "6", "--repeats", "1",
                   "--out-dir", str(tmp_path)])
    assert run_command(args) == 0
    assert lengths[:4] == [6, 6, 6, 6], "warm-ups, then one timed run per implementation"


def _fp8_run_args(tmp_path, family="mixtral"):
    return _parse(["--model", family, "--scale", "tiny", "--device", "cpu", "--batch", "2",
                   "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--fp8-experts",
                   "--out-dir", str(tmp_path)])


def test_run_cpu_tiny_fp8_experts(tmp_path):
    assert run_command(_fp8_run_args(tmp_path)) == 0
    (json_path,) = tmp_path.glob("cpu-*-e2e-mixtral-fp8.json")
    record = json.loads(json_path.read_text())
    assert record["experts"]["moekit_format"] == "fp8 e4m3, 32x32 block scales"
    assert record["experts"]["served"] == 2, record["experts"]
    check = record["check"]
    assert check["passed"] and check["noise"] == "moekit-fp8-reference (bf16)", check
    # moekit ran the fp8 modules: fp8 costs ~3e-2 against the bf16 model here, several
    # times bf16's own rounding (6e-3).
    assert 0.01 < check["fp8_vs_bf16"]["median_rel_l2"] < 0.1, check
    md = json_path.with_suffix(".md").read_text()
    assert "moekit's in fp8 e4m3" in md and "**passed**" in md and "what fp8 costs" in md


def test_run_fp8_check_fails_a_broken_fp8_forward(tmp_path, monkeypatch):
    # moekit's fp8 forward with each token's router weights handed to the wrong experts:
    # the check (against the fp8 model's own reference) must fail the run.
    from moekit.integrations import transformers as moekit_tf

    served = moekit_tf.fp8_experts_forward
    monkeypatch.setattr(moekit_tf, "fp8_experts_forward",
                        lambda self, x, ids, w: served(self, x, ids, w.flip(-1)))
    try:
        assert run_command(_fp8_run_args(tmp_path)) == 1
    finally:
        monkeypatch.undo()
        moekit_tf.register()  # the registry holds the function registered last
    (json_path,) = tmp_path.glob("cpu-*-e2e-mixtral-fp8.json")
    check = json.loads(json_path.read_text())["check"]
    assert not check["passed"] and check["candidate"]["median_rel_l2"] > 3 * check["bound"]


def test_fp8_experts_refuse_biased_experts():
    args = _parse(["--model", "gpt-oss", "--scale", "tiny", "--device", "cpu", "--fp8-experts",
                   "--out-dir", ""])
    assert run_command(args) == 2


def test_fp8_swap_holds_the_experts_quantised():
    from moekit.e2e.fp8 import Fp8ExpertsSwap
    from moekit.e2e.model import build_model
    from moekit.integrations.fp8_experts_layout import fp8_experts_operands, fp8_experts_plan

    config = FAMILIES["qwen3-moe"].build_config("tiny", 1)
    model = build_model(config, dtype=torch.bfloat16, device="cpu", seed=0)
    bf16 = model.model.layers[0].mlp.experts
    swap = Fp8ExpertsSwap(model, 32)
    swap.use(fp8=True)
    fp8 = model.model.layers[0].mlp.experts
    assert fp8 is not bf16 and fp8.gate_up_proj.dtype == torch.float8_e4m3fn
    ops = fp8_experts_operands(fp8, fp8_experts_plan(fp8))
    for name, weight in (("w13", bf16.gate_up_proj), ("w2", bf16.down_proj)):
        restored = getattr(ops, name).dequantize()
        err = (restored - weight.float()).norm() / weight.float().norm()
        assert err < 0.05, (name, err)  # e4m3's 3 mantissa bits: ~2-3%
    swap.use(fp8=False)
    assert model.model.layers[0].mlp.experts is bf16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_real_scale_needs_cuda():
    assert run_command(_parse(["--model", "mixtral", "--scale", "real"])) == 2


def test_greedy_decode_with_cache_is_the_cache_free_argmax():
    """The cached decode loop continues exactly as full forwards over the growing sequence
    would (fp32, so no near-ties), in inference mode, and passes the cache under the name
    the installed transformers takes, with no deprecation warning."""
    import warnings

    from moekit.e2e.decode import cache_keyword, greedy_decode
    from moekit.e2e.model import build_model

    config = FAMILIES["qwen3-moe"].build_config("tiny", 2)
    model = build_model(config, dtype=torch.float32, device="cpu", seed=0)
    prompt = torch.randint(0, config.vocab_size, (2, 9),
                           generator=torch.Generator().manual_seed(3))  # [B, P]
    modes = []  # the timed forwards run without autograd's bookkeeping
    model.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning)
        tokens = greedy_decode(model, prompt, 5).tokens  # [B, T]
    assert modes == [True] * 5
    sequence = prompt
    with torch.no_grad():
        for step in range(tokens.shape[1]):
            logits = model(input_ids=sequence, use_cache=False).logits[:, -1]  # [B, V]
            expected = logits.argmax(-1, keepdim=True)
            assert torch.equal(tokens[:, step : step + 1], expected), step
            sequence = torch.cat([sequence, expected], dim=1)
    assert cache_keyword(model) in ("cache", "past_key_values")
