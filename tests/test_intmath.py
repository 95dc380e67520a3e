"""The host-side integer helpers agree with Triton's constexpr functions they replace."""

import triton

from moekit._intmath import cdiv, next_power_of_2, row_align


def test_cdiv_and_next_power_of_2_match_triton():
    for n in [*range(0, 2100), 2**20 - 1, 2**20, 2**20 + 1, 2**31 + 5]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128, 1024):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_row_align_is_the_largest_power_of_two_dividing_all():
    assert row_align(2048, 768, 4096) == 16, "capped at 16"
    assert row_align(2880, 360) == 8, "gpt-oss's 8-way tensor-parallel shard"
    assert row_align(1000, 264, 2048) == 8
    assert row_align(1000, 6) == 2
    assert row_align(7) == 1
    assert row_align(0, 24) == 8, "0 divides by anything"
    assert row_align(360, limit=4) == 4
    for values in [(360, 2880), (1000, 264), (12, 20, 28)]:
        a = row_align(*values)
        assert all(v % a == 0 for v in values) and any(v % (2 * a) for v in values)
