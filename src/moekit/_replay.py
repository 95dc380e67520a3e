"""Eager calls replayed from a recording of an earlier call with the same arguments' shapes.

After session 28's fast launch path, an eager decode call is still mostly host time:
on an H200 host a qwen3 M = 1 `fused_experts` took 89 µs of CPU for 28 µs of GPU work,
48 of them moekit's own Python (argument checks, configuration, allocations, each
launch's ~30 arguments) and 26 the fast path's per-launch keys (bench/NOTES.md, session
29). None of that depends on the values in the tensors: the same shapes, strides,
dtypes, devices, alignments and non-tensor arguments always lead to the same kernels,
grids and scalar arguments, and to pointers that are an input's or a new buffer's plus a
fixed offset. So `replayed(op)` runs the second call with such a *call key* (the first
runs plainly: one-off shapes are not worth it) while recording:

  - every kernel launch (through `moekit._launch`'s fast path: the compiled kernel, the
    resolved grid, the bound arguments);
  - every aten op (a `TorchDispatchMode`): allocations (`empty`, `empty_like`,
    `empty_strided`, `new_empty`) become buffers to allocate again, views are allowed,
    anything else (a copy, a fill, a conversion, a host read) makes the key
    not replayable and the op always runs in full for it;

and later calls with that key allocate the buffers and launch the recorded kernels with
each pointer argument recomputed from the new tensors. A recording is kept only if every
tensor a kernel reads is an input's view or a buffer the call allocated, each found in one
place only, and the op returned None, an input or one of its buffers, or a tuple (named
or not) of those.

A recording costs 3–6 plain calls of host time and a replay 0.2–0.7 (qwen3 shapes, bf16
and fp8, on this repository's CPU with launches stubbed: `bench/scripts/host_overhead_cpu.py
--replay`); the first recording in a process also imports torch._dynamo (~1.3 s there),
which the dispatch mode needs.

The op runs in full (nothing recorded or replayed) under `torch.compile`, during CUDA
graph capture (capture pays host time once, and graph replay never sees this path), while
another recording is in progress (a replayed op calling another), while a Triton launch
hook is installed, where the fast launch path is off or unavailable, and with
`MOEKIT_REPLAY=0`. The call key holds the switches the ops read at run time
(`MOEKIT_GLUON`, the Gluon prefetch flags, the current device); functions monkeypatched
at run time (experiments, tests) are not seen: set `enabled = False` or call `clear()`
around them.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import _gluon, _launch

enabled = os.environ.get("MOEKIT_REPLAY", "1") != "0"
_SEEN = object()  # a key called once: the next call records
_NOT_REPLAYABLE = object()  # a key whose calls always run in full
# Keys kept per op, oldest dropped first: serving sees a new token count in most prefill
# batches, and each recording is a few KB.
MAX_KEYS = 4096
_ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
                torch.ops.aten.empty_strided.default, torch.ops.aten.new_empty.default,
                torch.ops.aten.new_empty_strided.default}
_RECORDINGS: list[dict] = []  # every replayed op's cache, for `clear()`
_PLAIN_TYPES = (bool, int, float, str, type(None))


def clear() -> None:
    """Forget every recording (e.g. after monkeypatching what the ops read)."""
    for cache in _RECORDINGS:
        cache.clear()


class _Pointer(int):
    """A device address where Triton's launcher wants a tensor (`data_ptr()`) or an int."""

    __slots__ = ()

    def data_ptr(self) -> int:
        return int(self)


class _Descriptor:
    """What Triton's launcher reads of a TMA descriptor (Triton's or Gluon's), its base
    moved to a new address."""

    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, base, shape, strides, padding):
        self.base, self.shape, self.strides, self.padding = base, shape, strides, padding


class _Recording(TorchDispatchMode):
    """The launches and allocations of one call; `broken` says why it cannot be replayed."""

    def __init__(self):
        super().__init__()
        self.launches: list[tuple] = []
        self.buffers: list[torch.Tensor] = []
        self.broken: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.buffers.append(out)
        elif not func.is_view and self.broken is None:
            self.broken = f"runs {func}"
        return out

    def launch(self, fn, entry, grid, params, device) -> None:
        """Called by the fast launch path for each launch it makes while recording."""
        self.launches.append((fn, entry, tuple(grid) + (1,) * (3 - len(grid)), params, device))

    def fell_back(self, why: str) -> None:
        """Called by the fast launch path when a launch took Triton's own path."""
        self.broken = self.broken or why


def recording() -> bool:
    """Whether a recording is in progress on this thread."""
    return getattr(_launch._local, "recorder", None) is not None


def _settings() -> tuple:
    """What the ops read at run time besides their arguments."""
    return (os.environ.get(_gluon.DISABLE_ENV), _gluon.PREFETCH_TILES, _gluon.PREFETCH_TILES_FP8,
            _launch._current_device())


def _call_key(args: tuple, kwargs: dict) -> tuple[tuple, list[torch.Tensor]] | None:
    """(the call key, the call's tensors in key order), or None for an argument the key
    cannot hold (a tensor subclass, an unhashable object)."""
    parts, tensors = [_settings(), tuple(kwargs)], []

    def add(a) -> bool:
        if type(a) is torch.Tensor or type(a) is torch.nn.Parameter:
            parts.append((a.shape, a.stride(), a.dtype, a.get_device(), a.data_ptr() & 15,
                          a.requires_grad))
            tensors.append(a)
        elif type(a) in _PLAIN_TYPES:
            parts.append((type(a), a))
        elif isinstance(a, torch.Tensor):  # a subclass: not keyed (nor held by the cache)
            return False
        elif hasattr(a, "__dataclass_fields__"):  # e.g. QuantizedWeight: its fields
            parts.append(type(a))
            for name in a.__dataclass_fields__:
                if not add(getattr(a, name)):
                    return False
        else:
            try:
                hash(a)
            except TypeError:
                return False
            parts.append((type(a), a))
        return True

    for a in args:
        if not add(a):
            return None
    for a in kwargs.values():
        if not add(a):
            return None
    return tuple(parts), tensors


class _Replay:
    """A recorded call: the buffers to allocate and the launches to repeat."""

    __slots__ = ("buffers", "launches", "result", "device")

    def __init__(self, buffers, launches, result, device):
        self.buffers = buffers  # [(shape, stride, dtype, device)]
        self.launches = launches  # [(fn, run, function, packed, grid, params, moves)]
        self.result = result  # `result_spec`'s (in `_compile`)
        self.device = device  # the CUDA device the launches go to (None: no launches)

    def hooked(self) -> bool:
        """Whether a Triton launch hook is installed now (Triton's path would run it)."""
        return not _launch._hooks_idle() or any(launch[0].pre_run_hooks
                                                 for launch in self.launches)

    def __call__(self, tensors: list[torch.Tensor]):
        buffers = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                   for shape, stride, dtype, device in self.buffers]
        bases = [t.data_ptr() for t in tensors] + [b.data_ptr() for b in buffers]
        if self.launches:
            stream = _launch._current_stream(self.device)
        for fn, run, function, packed, grid, params, moves in self.launches:
            _launch.check_globals(fn)
            params = list(params)
            for i, source, offset, desc in moves:
                ptr = bases[source] + offset
                params[i] = ptr if desc is None else _Descriptor(_Pointer(ptr), *desc)
            run(*grid, stream, function, packed, None, None, None, *params)
        return _rebuild(self.result, tensors, buffers)


def _rebuild(spec, tensors, buffers):
    """The op's result from `_compile`'s `result_spec` and this call's tensors and buffers."""
    if spec is None:
        return None
    kind, what = spec
    if kind == "input":
        return tensors[what]
    if kind == "buffer":
        return buffers[what]
    items = [_rebuild(item, tensors, buffers) for item in what]
    return tuple(items) if kind is tuple else kind(*items)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _compile(recording: _Recording, tensors: list[torch.Tensor], result) -> _Replay | None:
    """The recording as a `_Replay`, or None where it cannot be one (`_Replay`'s rules)."""
    if recording.broken is not None:
        return None
    sources: dict[int, tuple[int, torch.Tensor]] = {}
    for i, t in enumerate(tensors + recording.buffers):
        s = _storage(t)
        if s in sources:
            return None  # two on one storage: which one a view came from is ambiguous
        if s:  # an empty tensor's storage is 0; no launch may read it (`move` fails)
            sources[s] = (i, t)

    def move(t: torch.Tensor):
        found = sources.get(_storage(t))
        if found is None:
            return None
        i, base = found
        return i, t.data_ptr() - base.data_ptr()

    used: dict[int, int] = {}  # recording.buffers index → index among the kept buffers
    kept = []

    def source(i: int) -> int:
        if i < len(tensors):
            return i
        j = i - len(tensors)
        if j not in used:
            used[j] = len(kept)
            kept.append(recording.buffers[j])
        return len(tensors) + used[j]

    launches, devices = [], {device for *_, device in recording.launches}
    if len(devices) > 1:
        return None  # the ops launch on the key's current device only
    for fn, entry, grid, params, _ in recording.launches:
        run, function, packed, _ = entry
        template, moves = list(params), []
        for i, p in enumerate(params):
            if isinstance(p, torch.Tensor):
                template[i] = 0  # an empty view's null pointer, or moved below
                if p.data_ptr() == 0:
                    continue
                where, desc = move(p), None
            elif hasattr(p, "block_shape"):  # a TMA descriptor: its base moves
                template[i] = None
                if not isinstance(getattr(p, "base", None), torch.Tensor):
                    return None
                where = move(p.base)
                desc = (list(p.shape), list(p.strides), p.padding)
            else:
                continue
            if where is None:
                return None  # a tensor neither an argument's nor the call's own
            moves.append((i, source(where[0]), where[1], desc))
        # The template keeps none of the recorded tensors.
        launches.append((fn, run, function, packed, grid, tuple(template), tuple(moves)))

    def result_spec(r):
        """None; ("input", i); ("buffer", j); (tuple or a named tuple's type, [specs]); or
        False where `r` cannot be rebuilt."""
        if r is None:
            return None
        if isinstance(r, tuple):
            items = [result_spec(item) for item in r]
            return False if False in items else (tuple if type(r) is tuple else type(r), items)
        if not isinstance(r, torch.Tensor):
            return False
        index = next((i for i, t in enumerate(tensors) if t is r), None)
        if index is not None:
            return "input", index
        # One of the call's buffers, whole (the mode hands out other objects for them).
        where = move(r)
        if where is None or where[0] < len(tensors) or where[1] != 0:
            return False  # a view, or a tensor from elsewhere
        buffer = recording.buffers[where[0] - len(tensors)]
        if r.shape != buffer.shape or r.stride() != buffer.stride():
            return False
        return "buffer", source(where[0]) - len(tensors)

    out = result_spec(result)
    if out is False:
        return None
    buffers = [(tuple(b.shape), b.stride(), b.dtype, b.device) for b in kept]
    return _Replay(buffers, launches, out, devices.pop() if devices else None)


def replayed(op):
    """`op` with its eager calls replayed per call key (the module's docstring)."""
    cache: dict = {}
    _RECORDINGS.append(cache)

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if (torch.compiler.is_compiling() or not enabled or not _launch.enabled
                or _launch.unavailable() is not None or recording()
                or torch.cuda.is_current_stream_capturing()):
            return op(*args, **kwargs)
        keyed = _call_key(args, kwargs)
        if keyed is None:
            return op(*args, **kwargs)
        key, tensors = keyed
        replay = cache.get(key)
        if replay is None:  # a first call: one-off shapes are not worth a recording
            if len(cache) >= MAX_KEYS:
                del cache[next(iter(cache))]
            cache[key] = _SEEN
            return op(*args, **kwargs)
        if replay is _NOT_REPLAYABLE:
            return op(*args, **kwargs)
        if replay is not _SEEN:
            return op(*args, **kwargs) if replay.hooked() else replay(tensors)
        rec = _Recording()
        with _launch.recording_into(rec), rec:
            result = op(*args, **kwargs)
        try:
            replay = _compile(rec, tensors, result)
        except Exception as error:  # noqa: BLE001 - a bug here must not fail a call that ran
            warnings.warn(f"moekit: {op.__name__} calls are not replayed ({error!r})",
                          stacklevel=2)
            replay = None
        cache[key] = _NOT_REPLAYABLE if replay is None else replay
        return result

    wrapper.replays = cache
    return wrapper
