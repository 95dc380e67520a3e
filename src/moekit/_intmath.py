"""Integer helpers for host code (grids, tile sizes).

Triton 3.6's `triton.cdiv` and `triton.next_power_of_2` are constexpr functions: called
from Python they unwrap every argument and cost ~5 µs each on a slow host, against
~0.1 µs for the plain arithmetic. Launchers call them several times per layer, on the
eager path's critical host time, so host code uses these; kernels keep Triton's.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for non-negative a and positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n for n ≥ 1, and 0 for 0, as `triton.next_power_of_2`."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def row_align(*values: int, limit: int = 16) -> int:
    """The largest power of two, at most `limit`, that divides every value (0 divides by
    anything): what a kernel may assume of its row strides and row lengths
    (`moekit._experts_kernels._aligned`)."""
    align = limit
    for v in values:
        while v % align:
            align //= 2
    return align
