"""moekit as transformers' fp8 experts implementation (`FP8Experts`, block-scaled e4m3).

transformers' own fp8 experts need a kernel from the Hugging Face Hub, so the oracle here
is transformers' checkpoint quantiser (`Fp8Quantize`: the weights and `*_scale_inv` a
checkpoint holds), read back by the checkpoint convention and run in fp32 by the test
itself, each GEMM's input put through fp8 in 1×bk groups as the format prescribes. The
block scales span 10^-1 to 10^1, so a scale read from the wrong block or a swapped
gate/up half moves the output by far more than fp8 rounding of the activations does.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (moekit[transformers])")
fp8_tf = pytest.importorskip("transformers.integrations.finegrained_fp8",
                             reason="needs transformers' fine-grained fp8 integration")
moe = pytest.importorskip("transformers.integrations.moe", reason="needs transformers >= 5.7")

from helpers import assert_close  # noqa: E402
from moekit.integrations import fp8_experts_layout as layout  # noqa: E402
from moekit.integrations import transformers as moekit_tf  # noqa: E402
from moekit.quant import QuantScheme  # noqa: E402

moekit_tf.register()

# DESIGN's bound for quantised paths against the reference on dequantised weights (the
# CPU measures ~1.7e-3); every misread layout below is ~1 off.
FP8_TOL = 1e-2
BLOCK = 64


def fp8_experts_class(**flags):
    """A subclass of transformers' `FP8Experts` decorated as its loader decorates it (so
    `FP8Experts` itself stays untouched)."""
    cls = type("TinyFP8Experts", (fp8_tf.FP8Experts,), {})
    return moe.use_experts_implementation(
        experts_class=cls, experts_interface=fp8_tf.ALL_FP8_EXPERTS_FUNCTIONS, **flags)


def blocky(shape, block, gen):
    """Random [E, N, K] weights whose block × block tiles differ in scale by up to 10^3."""
    e, n, k = shape
    w = torch.randn(shape, generator=gen)
    tiles = 10 ** (torch.rand(e, -(-n // block), -(-k // block), generator=gen) * 2 - 1)
    tiles = tiles.repeat_interleave(block, 1)[:, :n].repeat_interleave(block, 2)[:, :, :k]
    return w * tiles / k**0.5


def fp8_module(*, experts=8, hidden=256, inter=128, block=BLOCK, scale_fmt="float",
               hidden_act="silu", gated=True, device="cpu", seed=0, fill=True, **config):
    """An fp8 experts module holding what transformers' quantiser makes of random weights
    (with `fill` False, what its constructor allocates); `gated` False: `up_proj` only."""
    cfg = types.SimpleNamespace(hidden_size=hidden, num_experts=experts,
                                moe_intermediate_size=inter, hidden_act=hidden_act,
                                _experts_implementation="moekit", **config)
    module = fp8_experts_class(has_gate=gated)(cfg, block_size=(block, block),
                                               scale_fmt=scale_fmt, has_gate=gated)
    quantizer = fp8_tf.Fp8Quantize(types.SimpleNamespace(quantization_config=types.SimpleNamespace(
        weight_block_size=(block, block), scale_fmt=scale_fmt)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        projections = ((("gate_up_proj", (experts, 2 * inter, hidden)) if gated
                        else ("up_proj", (experts, inter, hidden))),
                       ("down_proj", (experts, hidden, inter)))
        for name, shape in projections if fill else ():
            made = quantizer._quantize_one(name, blocky(shape, block, gen))
            getattr(module, name).copy_(made[name])
            getattr(module, name + "_scale_inv").copy_(made[name + "_scale_inv"])
    return module.to(device)


def routed(module, tokens, top_k, *, device="cpu", seed=1, dtype=torch.bfloat16):
    """hidden [T, H], top-k ids [T, k] int64 (distinct per token) and weights [T, k]."""
    gen = torch.Generator().manual_seed(seed)
    experts, hidden = module.num_experts, module.hidden_dim
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return x.to(device), ids.to(device), weights.to(device)


def dequantized(module, name):
    """A checkpoint projection read by its convention (DeepSeek-V3's `weight_dequant`, which
    transformers follows): each bn × bk block of q times its `scale_inv`; fp32 [E, N, K]
    on the CPU."""
    q = getattr(module, name).detach().float().cpu()
    scale = getattr(module, name + "_scale_inv").detach().float().cpu()  # [E, N/bn, K/bk]
    bn, bk = module.block_size
    rows, cols = q.shape[1:]
    return q * scale.repeat_interleave(bn, 1)[:, :rows].repeat_interleave(bk, 2)[:, :, :cols]


def fake_fp8(a, group):
    """a [R, C] through e4m3 and back in 1×group dynamic groups (DeepSeek-V3's activations)."""
    rows, cols = a.shape
    groups = a.reshape(rows, cols // group, group)
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448.0
    q = (groups / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    return (q * scale).reshape(rows, cols)


def oracle(module, x, ids, weights, *, w13=None):
    """The experts in fp32 on the checkpoint convention's weights, each GEMM's input through
    fp8 in 1×bk groups, one (token, slot) at a time; SwiGLU, or relu² without a gate."""
    first = "gate_up_proj" if module.has_gate else "up_proj"
    w13 = dequantized(module, first) if w13 is None else w13
    w2 = dequantized(module, "down_proj")
    group = module.block_size[1]
    xq = fake_fp8(x.float().cpu(), group)  # [T, H]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for token, slot in zip(*torch.nonzero(ids.cpu() < module.num_experts, as_tuple=True),
                           strict=True):
        expert = int(ids[token, slot])
        h = xq[token : token + 1] @ w13[expert].T  # [1, 2I] or [1, I]
        if module.has_gate:
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        else:
            h = torch.relu(h) ** 2
        inter = fake_fp8(h, group)
        out[token] += float(weights[token, slot]) * (inter @ w2[expert].T)[0]
    return out


def test_operands_read_the_checkpoint_as_transformers_does():
    module = fp8_module()
    plan = layout.fp8_experts_plan(module)
    assert plan.supported, plan.reason
    assert plan.scheme == QuantScheme.fp8_block((BLOCK, BLOCK))
    ops = layout.fp8_experts_operands(module, plan)
    assert ops.w13.q.data_ptr() == module.gate_up_proj.data_ptr()  # aliased, not copied
    assert torch.equal(ops.w13.dequantize(), dequantized(module, "gate_up_proj"))
    assert torch.equal(ops.w2.dequantize(), dequantized(module, "down_proj"))


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (5, 4), (33, 2)])
def test_forward_matches_transformers_dequantised_experts(tokens, top_k):
    module = fp8_module()
    x, ids, weights = routed(module, tokens, top_k)
    with torch.no_grad():
        out = module(x, ids, weights)  # dispatched through FP8ExpertsInterface to moekit
    assert out.dtype == x.dtype and out.shape == x.shape
    expected = oracle(module, x, ids, weights)
    assert_close(out.float(), expected, FP8_TOL)
    # The bound is tight enough to see a misread layout: gate and up halves swapped, or
    # the scales of one expert read for another.
    w13 = dequantized(module, "gate_up_proj")
    for wrong in (torch.cat(w13.chunk(2, dim=1)[::-1], dim=1), w13.roll(1, dims=0)):
        misread = oracle(module, x, ids, weights, w13=wrong)
        assert (misread - expected).norm() > 5 * FP8_TOL * expected.norm()


def test_ungated_experts_are_served_as_relu2():
    module = fp8_module(gated=False, hidden_act="relu2")
    plan = layout.fp8_experts_plan(module)
    assert plan.supported and plan.activation.kind == "relu2", plan
    x, ids, weights = routed(module, 6, 2)
    with torch.no_grad():
        out = module(x, ids, weights)
    assert_close(out.float(), oracle(module, x, ids, weights), FP8_TOL)


def test_power_of_two_scales_are_widened_once():
    module = fp8_module(scale_fmt="ue8m0")
    assert module.gate_up_proj_scale_inv.dtype == torch.float8_e8m0fnu
    x, ids, weights = routed(module, 7, 2)
    with torch.no_grad():
        out = module(x, ids, weights)
    ops = layout.fp8_experts_operands(module, layout.fp8_experts_plan(module))
    assert ops.w13.scale.dtype == torch.float32
    assert torch.equal(ops.w13.scale, module.gate_up_proj_scale_inv.detach().float())
    assert_close(out.float(), oracle(module, x, ids, weights), FP8_TOL)


def test_expert_parallel_sentinels_contribute_nothing():
    module = fp8_module()
    module._is_expert_parallel = True
    x, ids, weights = routed(module, 6, 2)
    ids[::2, 1] = module.num_experts + 3  # another rank's expert
    with torch.no_grad():
        out = module(x, ids, weights)
    expected = oracle(module, x, ids, weights)  # the oracle skips ids ≥ E
    assert_close(out.float(), expected, FP8_TOL)


def test_operands_are_cached_until_a_weight_changes():
    module = fp8_module()
    plan = layout.fp8_experts_plan(module)
    first = layout.fp8_experts_operands(module, plan)
    assert layout.fp8_experts_operands(module, plan) is first
    x, ids, weights = routed(module, 3, 2)
    with torch.no_grad():
        before = module(x, ids, weights)
        module.down_proj_scale_inv.mul_(2.0)  # in place: the version counter moves
        after = module(x, ids, weights)
    assert layout.fp8_experts_operands(module, plan) is not first
    assert_close(after.float(), 2 * before.float(), 1e-2)


@pytest.mark.parametrize("change,reason", [
    (dict(activation_scheme="static"), "static fp8 activation scales"),
    (dict(block_size=None), "per-tensor fp8 weights"),
    (dict(block_size=(64, 96)), "powers of two"),
    (dict(has_post_expert_norm=True), "has_post_expert_norm"),
    (dict(has_bias=True), "biases"),
    (dict(gate_up_proj=torch.zeros(8, 256, 128, dtype=torch.int8)), "dtype torch.int8"),
    (dict(down_proj_scale_inv=torch.ones(8, 4, 4)), "down_proj_scale_inv"),
])
def test_formats_moekit_does_not_serve_are_declined(change, reason):
    module = fp8_module()
    for name, value in change.items():
        if isinstance(value, torch.Tensor):
            delattr(module, name)
        setattr(module, name, value)
    plan = layout.make_fp8_plan(module)
    assert not plan.supported
    assert reason in plan.reason, plan.reason


def test_gate_up_halves_off_the_block_grid_are_declined():
    # I = 96 with 64-row blocks: a block would straddle the separately quantised halves.
    plan = layout.make_fp8_plan(fp8_module(inter=96, hidden=128, fill=False))
    assert not plan.supported and "multiple of the block" in plan.reason


def test_clamped_silu_without_alpha_is_declined():
    # transformers' fp8 experts clamp gate and up when a limit is set without alpha; moekit
    # has no such activation, and the probe must see that rather than call it silu.
    module = fp8_module()
    module.limit = 7.0
    plan = layout.make_fp8_plan(module)
    assert not plan.supported and "_apply_gate" in plan.reason


def test_swiglu_alpha_is_served_as_swigluoai():
    module = fp8_module()
    # transformers 5.25 clamps by `limit`, 5.17 by `swiglu_limit`.
    module.swiglu_alpha, module.limit, module.swiglu_limit = 1.702, 7.0, 7.0
    plan = layout.make_fp8_plan(module)
    assert plan.supported, plan.reason
    assert (plan.activation.kind, plan.activation.alpha, plan.activation.limit) == (
        "swigluoai", 1.702, 7.0)


def test_declined_module_runs_transformers_forward(monkeypatch):
    module = fp8_module()
    module.activation_scheme = "static"
    calls = []
    monkeypatch.setattr(moekit_tf, "eager_forward",
                        lambda m: lambda self, x, ids, w: calls.append(self) or x)
    monkeypatch.setattr(moekit_tf, "_warned", set())
    x, ids, weights = routed(module, 2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = module(x, ids, weights)
    assert calls == [module] and out is x
    assert any("static fp8 activation scales" in str(w.message) for w in caught)


def test_prepare_model_plans_and_caches_fp8_modules():
    model = torch.nn.Module()
    model.experts = fp8_module()
    plans = moekit_tf.prepare_model(model)
    assert set(plans) == {"experts"} and plans["experts"].supported
    assert getattr(model.experts, layout.FP8_CACHE_ATTR) is not None
    moekit_tf.release_converted(model)
    assert not hasattr(model.experts, layout.FP8_CACHE_ATTR)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 64, 300])
def test_forward_on_gpu_matches_transformers_dequantised_experts(tokens):
    module = fp8_module(experts=32, hidden=512, inter=256, block=128, device="cuda")
    x, ids, weights = routed(module, tokens, 4, device="cuda")
    with torch.no_grad():
        out = module(x, ids, weights)
    assert_close(out.float().cpu(), oracle(module, x, ids, weights), FP8_TOL)


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "unprepared"])
def test_torch_compile_cpu(prepared):
    # aot_eager: dynamo and AOTAutograd without inductor's C++ build (inductor: GPU test).
    module = fp8_module()
    if prepared:
        container = torch.nn.Module()
        container.experts = module
        moekit_tf.prepare_model(container)
    x, ids, weights = routed(module, 5, 2)
    with torch.no_grad():
        expected = module(x, ids, weights)
        compiled = torch.compile(module, backend="aot_eager")
        assert torch.equal(compiled(x, ids, weights), expected)


@pytest.mark.gpu
def test_torch_compile_gpu():
    module = fp8_module(experts=32, hidden=512, inter=256, block=128, device="cuda")
    x, ids, weights = routed(module, 64, 4, device="cuda")
    with torch.no_grad():
        expected = module(x, ids, weights)
        compiled = torch.compile(module, fullgraph=True)
        assert torch.equal(compiled(x, ids, weights), expected)
