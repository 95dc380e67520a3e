"""`host_cache`: `functools.lru_cache` for the ops' pure host helpers, bypassed under torch.compile.

Tile heuristics and scheme lookups run on every eager call's host path, so they are
memoised. Under `torch.compile` dynamo cannot use an lru_cache wrapper: it traces the
wrapped function anyway and warns, once per function, that it ignored the cache ("silent
incorrectness is a potential risk") — noise for every user who compiles a model. The
helpers are pure, so tracing the plain function is exact; `host_cache` does that under
compilation and memoises eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def host_cache(maxsize: int | None = 128) -> Callable[[Callable], Callable]:
    """Decorator: memoise a pure function as `functools.lru_cache(maxsize)` does (with its
    `cache_info` / `cache_clear`), calling it plainly while torch.compile traces."""

    def decorate(function: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return function(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_info = cached.cache_info
        call.cache_clear = cached.cache_clear
        return call

    return decorate
