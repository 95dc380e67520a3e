"""Quantisation formats as values: one `QuantSpec` per operand, a `QuantScheme` per layer.

A GEMM operand is a matrix [R, C] whose columns C run along the reduction dimension K:
a weight is [N, K] per expert (`w13[e]` is [2I, H], `w2[e]` is [H, I]), an activation is
[M, K] (one row per token, or per token–expert pair for GEMM2's input). The operand is
cut into groups of `group = (rows, cols)` elements; every group shares one scale. A size
of −1 spans the whole dimension, so one tuple expresses every granularity in use:

    group        name        weight [E, N, K] scale        activation [M, K] scale
    (-1, -1)     "tensor"    [E]  (one per expert)          [1]
    (1, -1)      "channel"   [E, N]  (one per output row)   [M]  ("token": one per row)
    (128, 128)   block       [E, ceil(N/128), ceil(K/128)]  (not for activations)
    (1, 128)     group       [E, N, ceil(K/128)]            [M, ceil(K/128)]

The scale layout keeps the leading expert dimension of a weight, then one dimension per
group axis that does not span its whole dimension; when nothing is left (a per-tensor
activation) it is [1]. Partial groups at the end of a dimension (N or K not a multiple of
the group) are ordinary groups over the elements that exist.

Scale convention — the scale is the *dequantisation multiplier*, like transformers'
and DeepSeek-V3's `weight_scale_inv` and vLLM's `*_scale`:

    x ≈ q · scale,    q = fp8(clamp(x / scale, −fmax, fmax))    (fmax = 448 for e4m3fn)
    scale = max(amax(|x| over the group), AMAX_FLOOR) / fmax      (dynamic scales)

Clamping comes before the cast because e4m3fn has no infinity, and whether a cast of a
value past ±448 saturates or gives NaN depends on the implementation (older PyTorch casts
and conversions without `satfinite` give NaN). Such values arise with a static scale, or
from fp32 rounding of x / scale at a group's maximum; clamped, every path agrees.
The floor keeps an all-zero group's scale positive, so x / scale never divides by zero.

Dynamic vs static: a dynamic spec computes its scales from the data each time it
quantises (weights once when loaded, activations on every forward); a static spec
carries a calibrated per-tensor scale (a checkpoint's `input_scale`). Only per-tensor
scales can be static: any finer group of an activation depends on the token count.

Presets (`QuantScheme`), for the two GEMMs of an MoE layer alike:

    fp8_tensor   per-expert per-tensor weights; per-tensor activations, dynamic or static
    fp8_channel  per-output-channel weights; dynamic per-token activations
    fp8_block    128×128 weight blocks; dynamic 1×128 activation groups (DeepSeek-V3)

A scheme describes the format only. Scales are data: a weight's scales live in its
`QuantizedWeight`, and so do the static input scales of the GEMM it feeds, because
GEMM1's and GEMM2's inputs have a calibrated scale each.

GEMM2's input — the activation's output, [pairs, I] — is quantised where it is made, in
GEMM1's epilogue, and a tile there sees BLOCK_N columns of a row, never a whole row or
the whole tensor. So `QuantScheme.gemm2_input` is the scheme's activation spec only when
that is static (one calibrated scale); a dynamic one becomes 1×g groups, g the K group
of the activations or weights if either groups K (128 for fp8_block), else
`GEMM2_INPUT_GROUP`. A per-token or per-tensor amax of that tensor would need a second
pass over it, or a grid-wide reduction, before a single value could be quantised; 1×128
groups cost nothing extra and are finer (more accurate) than either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moekit._host_cache import host_cache

FP8_DTYPES = (torch.float8_e4m3fn,)

#: Smallest amax a dynamic scale is computed from, so all-zero groups get a positive scale.
#: Values below it quantise relative to the floor, i.e. to (near) zero, which is harmless
#: next to anything a model computes.
AMAX_FLOOR = 1e-10

#: The group names accepted in place of a tuple; "channel" and "token" are one format (a
#: scale per row), named for the operand that usually carries it.
GROUP_ALIASES = {"tensor": (-1, -1), "channel": (1, -1), "token": (1, -1)}

FULL = -1

#: The K group of GEMM2's input when it is quantised dynamically and neither operand of a
#: scheme groups K: 128 columns, one fp8 K tile (see the module doc).
GEMM2_INPUT_GROUP = 128


@dataclass(frozen=True)
class QuantSpec:
    """How one GEMM operand is quantised: element dtype, scale group, and scale source.

    Attributes:
        dtype: the quantised element dtype (float8_e4m3fn).
        group: (rows, cols) elements per scale, −1 spanning the whole dimension, or one of
            "tensor", "channel", "token" (normalised to the tuple).
        scale: a static per-tensor scale, float32 with one element; None when dynamic
            (or when a static scale is supplied per operand, see `QuantizedWeight`).
        dynamic: True when scales are computed from the data as it is quantised.

    Equality compares the format (dtype, group, dynamic), not the static scale's value:
    a scale is data, and comparing tensors would need a device synchronisation.
    """

    dtype: torch.dtype = torch.float8_e4m3fn
    group: tuple[int, int] | str = "tensor"
    scale: torch.Tensor | None = field(default=None, compare=False)
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in FP8_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in FP8_DTYPES)
            raise TypeError(f"dtype: expected one of ({names}), got {self.dtype}")
        object.__setattr__(self, "group", _parse_group(self.group))
        if not isinstance(self.dynamic, bool):
            raise TypeError(f"dynamic: expected a bool, got {type(self.dynamic).__name__}")
        if self.dynamic and self.scale is not None:
            raise ValueError(
                "scale: a dynamic spec computes its scales; pass dynamic=False for a static one"
            )
        if not self.dynamic and self.group != GROUP_ALIASES["tensor"]:
            raise ValueError(
                f"dynamic: only per-tensor scales can be static (a finer group depends on the "
                f"token count); got group {self.group}"
            )
        if self.scale is not None:
            _check_static_scale("scale", self.scale)

    @property
    def fmax(self) -> float:
        """The largest finite magnitude of `dtype` (448 for e4m3fn); q is clamped to ±fmax."""
        return float(torch.finfo(self.dtype).max)

    @property
    def is_tensorwise(self) -> bool:
        """True when one scale covers the whole matrix (per expert, for a weight)."""
        return self.group == (FULL, FULL)

    def group_size(self, rows: int, cols: int) -> tuple[int, int]:
        """The group's extent in a [rows, cols] matrix: −1 resolved, at least 1 each."""
        gr, gc = self.group
        return (max(rows, 1) if gr == FULL else gr, max(cols, 1) if gc == FULL else gc)

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        """Groups along each axis of a [rows, cols] matrix (ceil division: partial groups count)."""
        gr, gc = self.group
        return (
            1 if gr == FULL else math.ceil(rows / gr),
            1 if gc == FULL else math.ceil(cols / gc),
        )

    def scale_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """The scale tensor's shape for an operand of `shape` ([..., R, C]); see the module doc.

        Leading (expert) dimensions are kept, then each group axis that does not span its
        dimension; an operand with neither gets [1].
        """
        if len(shape) < 2:
            raise ValueError(f"shape: expected [..., rows, cols], got {tuple(shape)}")
        *batch, rows, cols = shape
        nr, nc = self.grid(rows, cols)
        kept = [n for n, g in zip((nr, nc), self.group, strict=True) if g != FULL]
        out = (*batch, *kept)
        return out if out else (1,)

    def with_scale(self, scale: torch.Tensor) -> QuantSpec:
        """This format with a static per-tensor `scale` (float32, one element)."""
        return QuantSpec(self.dtype, self.group, scale=scale, dynamic=False)


# The named schemes: `QuantScheme.parse` takes these names (each a constructor below).
PRESET_NAMES = ("fp8_tensor", "fp8_channel", "fp8_block")


@dataclass(frozen=True)
class QuantScheme:
    """The quantisation of an MoE layer: one spec for the weights, one for GEMM inputs.

    Both GEMMs use the same pair: `weight` for `w13` and `w2`, `activation` for hidden
    (GEMM1's input) and, when static, for the activation's output (GEMM2's input);
    `gemm2_input` gives that operand's spec (dynamic: 1×g groups, see the module doc).

    Attributes:
        weight: a dynamic spec (weight scales are computed once, when the weights load).
        activation: rows of 1 or −1 (a group never mixes tokens, whose order the dispatch
            permutes); when both specs group K in finite steps, the steps are equal, so
            a kernel's K tile meets one activation scale and one weight scale.
    """

    weight: QuantSpec
    activation: QuantSpec

    def __post_init__(self) -> None:
        for name in ("weight", "activation"):
            value = getattr(self, name)
            if not isinstance(value, QuantSpec):
                raise TypeError(f"{name}: expected a QuantSpec, got {type(value).__name__}")
        if not self.weight.dynamic:
            raise ValueError(
                "weight: expected a dynamic spec; a quantised weight's scales are data "
                "(give them through QuantizedWeight)"
            )
        if self.activation.group[0] not in (1, FULL):
            raise ValueError(
                f"activation: a group must not span several tokens (rows 1 or -1), "
                f"got group {self.activation.group}"
            )
        if self.activation.scale is not None:
            raise ValueError(
                "activation: GEMM1 and GEMM2 inputs need a static scale each; give them as "
                "QuantizedWeight.input_scale of w13 and w2, and here only dynamic=False"
            )
        ka, kw = self.activation.group[1], self.weight.group[1]
        if FULL not in (ka, kw) and ka != kw:
            raise ValueError(
                f"activation: K group {ka} must equal the weight's K group {kw} when both "
                "group K, so each K tile of a kernel has one scale of each"
            )
        # Read on every fp8 call's host path, so made once; an attribute, not a
        # `functools.cached_property`, whose lock (Python 3.11) torch.compile cannot trace.
        object.__setattr__(self, "_gemm2_input", self._make_gemm2_input())

    @property
    def gemm2_input(self) -> QuantSpec:
        """The spec of GEMM2's input [pairs, I]: static as `activation`, else 1×g groups.

        g is the K group of `activation` if it has one, else the weights' K group if they
        have one, else `GEMM2_INPUT_GROUP`; GEMM1's epilogue computes these scales.
        """
        return self._gemm2_input

    def _make_gemm2_input(self) -> QuantSpec:
        if not self.activation.dynamic:
            return self.activation
        ka, kw = self.activation.group[1], self.weight.group[1]
        k_group = ka if ka != FULL else kw if kw != FULL else GEMM2_INPUT_GROUP
        return QuantSpec(self.activation.dtype, (1, k_group))

    @classmethod
    def fp8_tensor(cls, *, dynamic: bool = True) -> QuantScheme:
        """Per-tensor fp8: one scale per expert weight, one per activation tensor.

        Args:
            dynamic: compute activation scales on the fly (True), or take the calibrated
                per-tensor `input_scale` of each GEMM's weight (False).
        """
        return cls(QuantSpec(group="tensor"), QuantSpec(group="tensor", dynamic=dynamic))

    @classmethod
    def fp8_channel(cls) -> QuantScheme:
        """Per-output-channel fp8 weights with dynamic per-token activations."""
        return cls(QuantSpec(group="channel"), QuantSpec(group="token"))

    @classmethod
    def fp8_block(cls, block: tuple[int, int] = (128, 128)) -> QuantScheme:
        """Block fp8 (DeepSeek-V3): `block` weight tiles, dynamic 1×block[1] activation groups."""
        return cls(QuantSpec(group=block), QuantSpec(group=(1, block[1])))

    @classmethod
    def parse(cls, value: str | QuantScheme) -> QuantScheme:
        """Accept a `QuantScheme` or a preset's name ("fp8_tensor", "fp8_channel", "fp8_block")."""
        if isinstance(value, QuantScheme):
            return value
        if not isinstance(value, str):
            raise TypeError(f"scheme: expected a str or QuantScheme, got {type(value).__name__}")
        if value not in PRESET_NAMES:
            raise ValueError(f"scheme: expected one of {PRESET_NAMES}, got {value!r}")
        return getattr(cls, value)()

    @property
    def preset_name(self) -> str | None:
        """The preset this scheme is ("fp8_block", ...), or None; tuned tables are per preset."""
        return _preset_schemes().get(self)


def _parse_group(group: object) -> tuple[int, int]:
    if isinstance(group, str):
        if group not in GROUP_ALIASES:
            raise ValueError(
                f"group: expected (rows, cols) or one of {tuple(GROUP_ALIASES)}, got {group!r}"
            )
        return GROUP_ALIASES[group]
    if (
        not isinstance(group, tuple | list)
        or len(group) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in group)
        or not all(g == FULL or g >= 1 for g in group)
    ):
        raise ValueError(
            f"group: expected (rows, cols) of ints ≥ 1 or -1 (whole dimension), got {group!r}"
        )
    return (group[0], group[1])


def _check_static_scale(name: str, scale: object) -> None:
    """A static scale is per tensor: float32 with one element ([] or [1], as checkpoints store)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}: expected a float32 scale, got {scale.dtype}")
    if scale.numel() != 1 or scale.dim() > 1:
        raise ValueError(
            f"{name}: expected one per-tensor scale (shape [] or [1]), got {tuple(scale.shape)}"
        )


@host_cache(maxsize=None)
def _preset_schemes() -> dict[QuantScheme, str]:
    """Each named scheme → its name, built once (`preset_name` runs on every fp8 call)."""
    return {QuantScheme.parse(name): name for name in PRESET_NAMES}
