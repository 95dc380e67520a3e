"""`host_cache`: memoised eagerly, traced plainly (and silently) under torch.compile."""

import warnings

import torch

from moekit._host_cache import host_cache


def test_memoises_eager_calls():
    calls = []

    @host_cache(maxsize=8)
    def square(x):
        calls.append(x)
        return x * x

    assert [square(3), square(3), square(4)] == [9, 9, 16]
    assert calls == [3, 4]
    assert square.cache_info().hits == 1 and square.__name__ == "square"
    square.cache_clear()
    assert square(3) == 9 and calls == [3, 4, 3]


def test_traced_plainly_without_dynamo_warnings():
    @host_cache(maxsize=8)
    def scale(n):
        return float(n) / 4

    def f(x):
        return x * scale(x.shape[0])

    x = torch.ones(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(f, backend="eager", fullgraph=True)(x)
    assert torch.equal(out, x * 0.75)
    assert not [w for w in caught if "lru_cache" in str(w.message)], caught
