"""Correct float → fp8 e4m3 casts in Triton 3.6's CPU interpreter, for kernel tests.

The interpreter reads and multiplies fp8 exactly (upcasts and `tl.dot` on fp8 are
right for every finite e4m3 value), but its down-cast rounds by adding the cut-off bit
to the 3-bit mantissa without carrying into the exponent (7.78 → 4, not 8) and maps
values past ±448 to ±256. The GPU's cast (`cvt.rn.satfinite.e4m3x2.f32`) rounds to
nearest even and saturates. `exact_fp8_casts` swaps in that behaviour for the duration
of a test, through torch's cast of the same values; the kernels run unchanged, so what
is tested is the kernel code that runs on the GPU, with the one instruction the
interpreter gets wrong emulated correctly.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

_E4M3_MAX = 448.0
_NUMPY_FLOATS = {tl.float32: np.float32, tl.float16: np.float16}


@contextlib.contextmanager
def exact_fp8_casts():
    """Within the block, interpreter casts of fp32/fp16 to float8e4nv round like the GPU."""
    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in _NUMPY_FLOATS:
            values = np.frombuffer(input.tobytes(), dtype=_NUMPY_FLOATS[input_dtype])
            x = torch.from_numpy(values.astype(np.float32)).clamp(-_E4M3_MAX, _E4M3_MAX)
            q = x.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return q.reshape(input.shape)
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    try:
        yield
    finally:
        interpreter._convert_float = original
