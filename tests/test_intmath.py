"""The host-side integer helpers agree with Triton's constexpr functions they replace."""

import triton

from moekit._intmath import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_match_triton():
    for n in [*range(0, 2100), 2**20 - 1, 2**20, 2**20 + 1, 2**31 + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128, 1024):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
