"""fp8 formats: descriptors, scale layouts, quantise/dequantise numerics, and bad inputs.

The round-trip bound, derived from e4m3fn's encoding: y = x / scale lies in [−448, 448].
Normal values (|y| ≥ 2^-6) carry 3 mantissa bits, so round-to-nearest moves them by at
most half a step, 2^-4·|y|; subnormals are spaced 2^-9 apart, an error of at most 2^-10.
Multiplying back by the scale: |x̂ − x| ≤ 2^-4·|x| + 2^-10·scale, which is ≈ 2^-4 of the
group's max (= 448·scale). Float32 rounding of x / scale and q · scale adds ~2^-23·|x|.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.quant import (
    AMAX_FLOOR,
    QuantizedWeight,
    QuantScheme,
    QuantSpec,
    dequantize,
    quantize,
    quantize_activation,
    quantize_weight,
)

E4M3_MAX = 448.0
BLOCK = (128, 128)


def spread(*shape, seed=0, dtype=torch.float32):
    """Gaussian values whose magnitude varies ~e^±2 across rows and columns, so groups
    get different scales and a wrong group assignment shows up."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    x = x * torch.exp(2 * torch.randn(*shape[:-1], 1, generator=g))
    x = x * torch.exp(torch.randn(shape[-1], generator=g))
    return x.to(dtype)


def expected_scale_by_loops(x, gr, gc):
    """The dynamic scales of one matrix [R, C], one group at a time: an independent oracle
    for the vectorised grouping (gr / gc of −1 span the dimension)."""
    rows, cols = x.shape
    gr = rows if gr == -1 else gr
    gc = cols if gc == -1 else gc
    nr, nc = max(1, math.ceil(rows / gr)), max(1, math.ceil(cols / gc))
    out = torch.empty(nr, nc)
    for i in range(nr):
        for j in range(nc):
            block = x[i * gr : (i + 1) * gr, j * gc : (j + 1) * gc].float()
            amax = block.abs().max() if block.numel() else torch.tensor(0.0)
            out[i, j] = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    return out


SCALE_SHAPE_CASES = [
    # (group, operand shape, scale shape, why)
    ("tensor", (4, 256, 512), (4,), "weights per tensor: one scale per expert"),
    ("channel", (4, 200, 96), (4, 200), "weights per output channel"),
    (BLOCK, (4, 256, 512), (4, 2, 4), "128×128 blocks that tile exactly"),
    (BLOCK, (3, 200, 300), (3, 2, 3), "partial blocks on both N and K"),
    (BLOCK, (2, 100, 50), (2, 1, 1), "a matrix smaller than one block"),
    ((1, 128), (2, 64, 300), (2, 64, 3), "1×128 groups on a weight (group shapes are general)"),
    ("tensor", (17, 64), (1,), "activations per tensor: [1]"),
    ("token", (17, 64), (17,), "activations per token"),
    ((1, 128), (17, 300), (17, 3), "activation groups with a partial last group"),
    ((1, 128), (5, 128), (5, 1), "exactly one activation group per row"),
    ("token", (0, 64), (0,), "M = 0: no tokens, no scales"),
    ("tensor", (0, 64), (1,), "M = 0: the per-tensor scale still exists"),
]


@pytest.mark.parametrize("group, shape, scale_shape, why", SCALE_SHAPE_CASES)
def test_scale_shapes(group, shape, scale_shape, why):
    spec = QuantSpec(group=group)
    assert spec.scale_shape(shape) == scale_shape
    q, scale = quantize(spread(*shape), spec)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape
    assert scale.is_contiguous()
    assert torch.isfinite(scale).all() and (scale > 0).all()


ROUND_TRIP_CASES = [
    # (group, shape, dtype, why)
    ("tensor", (3, 96, 80), torch.float32, "one scale per expert spans a wide value range"),
    ("channel", (3, 96, 80), torch.float32, "per-row scales"),
    (BLOCK, (2, 300, 260), torch.float32, "blocks with partial edges on both axes"),
    (BLOCK, (2, 256, 256), torch.bfloat16, "bf16 weights, whole blocks"),
    ("tensor", (33, 200), torch.float32, "per-tensor activations"),
    ("token", (33, 200), torch.float16, "per-token activations from fp16"),
    ((1, 128), (33, 200), torch.bfloat16, "1×128 groups from bf16, partial last group"),
    ((64, 32), (2, 100, 70), torch.float32, "a non-square block shape, partial edges"),
]


@pytest.mark.parametrize("group, shape, dtype, why", ROUND_TRIP_CASES)
def test_round_trip_within_e4m3_resolution(group, shape, dtype, why):
    spec = QuantSpec(group=group)
    x = spread(*shape, dtype=dtype)
    q, scale = quantize(x, spec)
    x_hat = dequantize(q, scale, spec)
    # Each element's own scale, by dequantising ones-of-the-right-kind: q=1 gives scale.
    elem_scale = dequantize(torch.ones_like(q), scale, spec)
    x32 = x.float()
    bound = 2**-4 * x32.abs() + 2**-10 * elem_scale + 2**-20 * x32.abs()
    err = (x_hat - x32).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{why}: error reaches {worst:.3f}× the e4m3 bound"
    # The bound is tight: some element must come close (else scales are too fine/coarse).
    assert worst > 0.5


@pytest.mark.parametrize(
    "group, shape",
    [("tensor", (2, 70, 50)), ("channel", (2, 70, 50)), (BLOCK, (2, 300, 260)),
     ((1, 128), (9, 300)), ("token", (9, 300))],
)
def test_dynamic_scales_match_group_by_group_oracle(group, shape):
    """The vectorised grouping assigns every element (partial groups included) correctly."""
    spec = QuantSpec(group=group)
    x = spread(*shape, seed=3)
    _, scale = quantize(x, spec)
    mats = x if x.dim() == 3 else x.unsqueeze(0)
    expected = torch.stack([expected_scale_by_loops(m, *spec.group) for m in mats])
    assert torch.equal(scale, expected.reshape(scale.shape))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dynamic_scale_is_correctly_rounded_division(device):
    # Kernels compute amax / 448 with a correctly rounded division; a scale 1 ulp apart
    # (CUDA divides by a Python number as a multiply by its reciprocal) re-rounds whole
    # groups (seen on the H100: 10–25% of GEMM2's fp8 input, 1–2% output error).
    x = spread(512, 1024, seed=3).to(device)
    _, scale = quantize(x, QuantSpec(group=(1, 128)))
    amax = x.abs().reshape(512, 8, 128).amax(dim=-1).clamp(min=AMAX_FLOOR)
    exact = (amax.double() / E4M3_MAX).float()  # one rounding: of the exact quotient
    assert torch.equal(scale, exact)


def test_group_maximum_quantises_to_fmax():
    """scale = amax / 448, so the largest magnitude of each group lands on ±448 exactly."""
    spec = QuantSpec(group=(1, 128))
    x = spread(6, 256)
    q, _ = quantize(x, spec)
    qg = q.float().reshape(6, 2, 128).abs().amax(dim=-1)
    assert torch.equal(qg, torch.full_like(qg, E4M3_MAX))


def test_static_scale_saturates_instead_of_nan():
    """Values past the static scale's range clamp to ±448 (inf too) instead of NaN."""
    spec = QuantSpec(group="tensor", scale=torch.tensor([0.5]), dynamic=False)
    x = torch.tensor([[1000.0, -1000.0, 224.0, -0.25, float("inf"), float("-inf")]])
    q, scale = quantize_activation(x, spec)
    assert torch.equal(scale, torch.tensor([0.5]))
    assert torch.equal(q.float(), torch.tensor([[448.0, -448.0, 448.0, -0.5, 448.0, -448.0]]))
    assert torch.equal(dequantize(q, scale, spec),
                       torch.tensor([[224.0, -224.0, 224.0, -0.25, 224.0, -224.0]]))


def test_static_scale_scalar_and_with_scale():
    """Checkpoints store input scales as [] or [1]; both work, and the result is [1]."""
    x = spread(4, 64)
    a = quantize_activation(x, QuantSpec(scale=torch.tensor(0.01), dynamic=False))
    b = quantize_activation(x, QuantSpec(dynamic=False).with_scale(torch.tensor([0.01])))
    assert torch.equal(a[0].float(), b[0].float()) and a[1].shape == b[1].shape == (1,)
    expected = (x / 0.01).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    assert torch.equal(a[0].float(), expected.float())


ZERO_CASES = [
    # (group, shape, zero region, why)
    (BLOCK, (2, 200, 300), (0, slice(128, 200), slice(0, 128)), "one zero block (partial)"),
    ("channel", (2, 16, 40), (1, slice(3, 4), slice(None)), "one zero output channel"),
    ("token", (8, 40), (slice(2, 5), slice(None)), "zero tokens (e.g. padding rows)"),
    ((1, 128), (4, 300), (slice(1, 2), slice(256, 300)), "a zero partial activation group"),
    ("tensor", (3, 8, 8), (slice(None), slice(None), slice(None)), "an all-zero weight"),
]


@pytest.mark.parametrize("group, shape, region, why", ZERO_CASES)
def test_zero_groups_get_a_safe_scale(group, shape, region, why):
    spec = QuantSpec(group=group)
    x = spread(*shape)
    x[region] = 0
    q, scale = quantize(x, spec)
    assert torch.isfinite(scale).all() and (scale > 0).all(), why
    assert (q.float()[region] == 0).all()
    x_hat = dequantize(q, scale, spec)
    assert torch.isfinite(x_hat).all() and (x_hat[region] == 0).all()


def test_quantize_weight_and_checkpoint_import():
    """A DeepSeek-V3-style checkpoint (fp8 weight + weight_scale_inv [E, ⌈N/128⌉, ⌈K/128⌉])
    enters through QuantizedWeight and dequantises block by block."""
    w = spread(3, 200, 300, seed=5)
    spec = QuantSpec(group=BLOCK)
    qw = quantize_weight(w, spec)
    ckpt = QuantizedWeight(qw.q.clone(), qw.scale.clone(), QuantSpec(group=(128, 128)))
    assert ckpt.shape == (3, 200, 300) and ckpt.scale.shape == (3, 2, 3)
    expected = qw.q.float().clone()
    for e in range(3):
        for i in range(2):
            for j in range(3):
                expected[e, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= qw.scale[e, i, j]
    assert torch.equal(ckpt.dequantize(), expected)
    assert torch.equal(ckpt.dequantize(expert=2), expected[2])
    assert ckpt.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_spec_values_and_presets():
    """Group names are aliases of one tuple; equality is by format; presets are as documented."""
    assert QuantSpec(group="channel") == QuantSpec(group="token") == QuantSpec(group=(1, -1))
    assert QuantSpec(group=[128, 128]).group == (128, 128)
    assert hash(QuantSpec(group="tensor")) == hash(QuantSpec())
    tensor, channel, block = (QuantScheme.parse(n) for n in ("fp8_tensor", "fp8_channel",
                                                             "fp8_block"))
    assert tensor.weight.group == tensor.activation.group == (-1, -1)
    assert not QuantScheme.fp8_tensor(dynamic=False).activation.dynamic
    assert channel.weight.group == channel.activation.group == (1, -1)
    assert block.weight.group == (128, 128) and block.activation.group == (1, 128)
    assert QuantScheme.fp8_block((64, 64)).activation.group == (1, 64)
    assert QuantSpec().fmax == E4M3_MAX


GEMM2_INPUTS = [
    # (scheme, GEMM2 input group, why)
    (QuantScheme.fp8_tensor(), (1, 128), "dynamic per-tensor cannot be computed in an epilogue"),
    (QuantScheme.fp8_channel(), (1, 128), "nor can per-token over a whole row of I"),
    (QuantScheme.fp8_block(), (1, 128), "block: the scheme's own 1×128 groups"),
    (QuantScheme.fp8_block((64, 64)), (1, 64), "groups follow the scheme's K group"),
    (QuantScheme(QuantSpec(group=(128, 32)), QuantSpec(group="token")), (1, 32),
     "the weights' K group when only they group K"),
    (QuantScheme.fp8_tensor(dynamic=False), (-1, -1), "static: the calibrated scale"),
]


@pytest.mark.parametrize("scheme, group, why", GEMM2_INPUTS)
def test_gemm2_input_spec(scheme, group, why):
    spec = scheme.gemm2_input
    assert spec.group == group
    assert spec.dynamic == scheme.activation.dynamic


def test_gemm2_input_spec_traces_under_torch_compile():
    # Read first while tracing (a fresh scheme): no lock for dynamo to stop at (Python
    # 3.11's functools.cached_property has one).
    scheme = QuantScheme.fp8_block((64, 64))
    torch._dynamo.reset()
    traced = torch.compile(lambda x: x * scheme.gemm2_input.group[1], backend="eager",
                           fullgraph=True)
    assert traced(torch.ones(2)).tolist() == [64.0, 64.0]
    assert scheme == QuantScheme.fp8_block((64, 64)) and "_gemm2_input" not in repr(scheme)


fp8 = torch.float8_e4m3fn
W = quantize_weight(spread(2, 16, 8), QuantSpec(group="channel"))

BAD_SPECS = [
    # (make, error, argument named, why)
    (lambda: QuantSpec(dtype=torch.bfloat16), TypeError, "dtype", "not an fp8 dtype"),
    (lambda: QuantSpec(group="row"), ValueError, "group", "unknown group name"),
    (lambda: QuantSpec(group=(0, 128)), ValueError, "group", "a zero group size"),
    (lambda: QuantSpec(group=(128,)), ValueError, "group", "one axis only"),
    (lambda: QuantSpec(group=(True, 128)), ValueError, "group", "a bool is not a size"),
    (lambda: QuantSpec(scale=torch.tensor([1.0])), ValueError, "scale", "dynamic with a scale"),
    (lambda: QuantSpec(group="token", dynamic=False), ValueError, "dynamic",
     "static per-token scales would fix the token count"),
    (lambda: QuantSpec(scale=torch.tensor([1.0], dtype=torch.float16), dynamic=False),
     TypeError, "scale", "static scale not float32"),
    (lambda: QuantSpec(scale=torch.ones(2), dynamic=False), ValueError, "scale",
     "static scale with two elements"),
    (lambda: QuantSpec(dynamic=1), TypeError, "dynamic", "not a bool"),
    (lambda: QuantScheme(QuantSpec(dynamic=False), QuantSpec()), ValueError, "weight",
     "weights are never static"),
    (lambda: QuantScheme(QuantSpec(), QuantSpec(group=(128, 128))), ValueError, "activation",
     "an activation group spanning tokens"),
    (lambda: QuantScheme(QuantSpec(group=BLOCK), QuantSpec(group=(1, 64))), ValueError,
     "activation", "K groups of weight and activation differ"),
    (lambda: QuantScheme(QuantSpec(), QuantSpec(scale=torch.ones(1), dynamic=False)),
     ValueError, "activation", "one static scale cannot serve both GEMMs"),
    (lambda: QuantScheme("tensor", QuantSpec()), TypeError, "weight", "not a QuantSpec"),
    (lambda: QuantScheme.parse("fp8"), ValueError, "scheme", "unknown preset"),
    (lambda: QuantScheme.parse(3), TypeError, "scheme", "not a name"),
]

BAD_CALLS = [
    (lambda: quantize(torch.ones(8), QuantSpec()), ValueError, "x", "1-d"),
    (lambda: quantize(torch.ones(2, 2, dtype=torch.int32), QuantSpec()), TypeError, "x",
     "integer input"),
    (lambda: quantize(torch.ones(2, 2), QuantSpec(dynamic=False)), ValueError, "spec",
     "static spec without its scale"),
    (lambda: quantize_activation(torch.ones(2, 2, 2), QuantSpec()), ValueError, "x",
     "activations are 2-d"),
    (lambda: quantize_activation(torch.ones(2, 2), QuantSpec(group=BLOCK)), ValueError, "spec",
     "activation group spanning tokens"),
    (lambda: dequantize(W.q, W.scale[:, :3], W.spec), ValueError, "scale", "wrong scale shape"),
    (lambda: dequantize(W.q.float(), W.scale, W.spec), TypeError, "q", "q not fp8"),
    (lambda: quantize_weight(torch.ones(4, 4), QuantSpec()), ValueError, "w", "weights are 3-d"),
    (lambda: QuantizedWeight(W.q.float(), W.scale, W.spec), TypeError, "q", "q not fp8"),
    (lambda: QuantizedWeight(W.q[0], W.scale, W.spec), ValueError, "q", "q not [E, N, K]"),
    (lambda: QuantizedWeight(W.q, W.scale.bfloat16(), W.spec), TypeError, "scale",
     "checkpoint scale in bf16"),
    (lambda: QuantizedWeight(W.q, W.scale.unsqueeze(-1), W.spec), ValueError, "scale",
     "per-channel scale as [E, N, 1]"),
    (lambda: QuantizedWeight(W.q, W.scale, QuantSpec(group=BLOCK)), ValueError, "scale",
     "scale layout of another group"),
    (lambda: QuantizedWeight(W.q, W.scale, "channel"), TypeError, "spec", "spec not a value"),
    (lambda: QuantizedWeight(W.q, W.scale, W.spec, torch.ones(2)), ValueError, "input_scale",
     "per-expert input scales (reduce with max when loading)"),
]


@pytest.mark.parametrize("make, error, name, why", BAD_SPECS + BAD_CALLS)
def test_bad_inputs_name_the_argument(make, error, name, why):
    with pytest.raises(error, match=rf"^{name}: "):
        make()
