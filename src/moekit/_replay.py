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

and later calls with that key allocate the buffers (those the op returns, and one
workspace for the rest) and launch the recorded kernels with each pointer argument
recomputed from the new tensors. A recording is kept only if every
tensor a kernel reads is an input's view or a buffer the call allocated, each found in one
place only, and the op returned None, an input or one of its buffers, or a tuple (named
or not) of those.

A recording costs 3–6 plain calls of host time and a replay 0.1–0.4 (qwen3 shapes, bf16
and fp8, on this repository's CPU with launches stubbed: `bench/scripts/host_overhead_cpu.py
--replay`); the first recording in a process also imports torch._dynamo (~1.3 s there),
which the dispatch mode needs. On an H200's host a replayed qwen3 M = 1 `fused_experts`
takes about its GPU time (28 µs; bench/NOTES.md, session 30), mostly Triton's launches.

The op runs in full (nothing recorded or replayed) under `torch.compile`, during CUDA
graph capture (capture pays host time once, and graph replay never sees this path), while
another recording is in progress (a replayed op calling another), while a Triton launch
hook is installed, where the fast launch path is off or unavailable, and with
`MOEKIT_REPLAY=0`. The call key holds the switches the ops read at run time
(`MOEKIT_GLUON` and the Gluon GEMMs' grid and order controls, the Gluon prefetch flags,
the tile order, the current device); functions
monkeypatched at run time (experiments, tests) are not seen: set `enabled = False` or call
`clear()` around them.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import _gluon, _gluon_gemm1, _gluon_gemm2, _launch, _tile_order

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


def _environment_reader(name: str):
    """A function returning `os.environ.get(name)` in some form that changes with it.

    `os.environ.get` encodes the name and decodes the value on every call (~0.7 µs, most
    of the settings' cost); CPython's `os.environ` keeps the encoded mapping in `_data`.
    """
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        key = encode(name)
        return lambda: data.get(key)
    return lambda: os.environ.get(name)


_gluon_switch = _environment_reader(_gluon.DISABLE_ENV)
# The Gluon GEMMs' controls read at each launch: the grid, each GEMM's kernel and both
# orders (called one by one below: a generator would cost an eager call more than the reads).
_tile_programs = _environment_reader(_gluon.TILE_PROGRAMS_ENV)
_gemm1_switch = _environment_reader(_gluon.GEMM1_ENV)
_gemm2_switch = _environment_reader(_gluon.GEMM2_ENV)
_gemm2_group_m = _environment_reader(_gluon.GEMM2_GROUP_M_ENV)
_gemm1_group_m = _environment_reader(_gluon.GEMM1_GROUP_M_ENV)


def _settings() -> tuple:
    """What the ops read at run time besides their arguments."""
    return (_gluon_switch(), _tile_programs(), _gemm1_switch(), _gemm2_switch(),
            _gemm2_group_m(), _gemm1_group_m(),
            _gluon.PREFETCH_TILES, _gluon.PREFETCH_TILES_FP8, _gluon.EXPERT_GROUPS,
            _gluon_gemm1.STAGED_SCALES_ENV, _gluon_gemm2.WIDE_PER_K_WEIGHTS,
            _tile_order.FORCED, _launch._current_device())


_MISMATCH = object()  # a key function given arguments of another signature
_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exactly these types are keyed as tensors


def _signature(value):
    """What a call key's function is generated for: the value's type, with a dataclass's
    fields' signatures; None for an argument no key can hold (a tensor subclass)."""
    kind = type(value)
    if kind in _TENSORS or kind in _PLAIN_TYPES:
        return kind
    if isinstance(value, torch.Tensor):
        return None
    if hasattr(value, "__dataclass_fields__"):  # e.g. QuantizedWeight: its fields
        fields = tuple(_signature(getattr(value, name)) for name in value.__dataclass_fields__)
        return None if None in fields else (kind, fields)
    return kind  # hashed by value (an unhashable one fails the cache lookup)


class _CallKeys:
    """Per op, `keys(args, kwargs)` → (the call key, the call's tensors in key order), or
    None for a call no key can hold.

    The key holds, per tensor, (shape, strides, dtype, device, address % 16,
    requires_grad); every other argument by value, a dataclass's fields one by one; the
    keyword names; `_settings()`; and which generated function made it. Each function is
    generated for one argument signature (`_signature`) and checks it first, as
    `moekit._launch` keys launches: a dozen argument types and attribute reads, not a
    walk over the arguments (~9 → ~4 µs per call on this repository's CPU).
    """

    def __init__(self):
        self._functions: dict[tuple, object] = {}  # signature → function, or None
        self._last = lambda args, kwargs: _MISMATCH

    def __call__(self, args: tuple, kwargs: dict):
        keyed = self._last(args, kwargs)
        if keyed is _MISMATCH:
            signature = (tuple(map(_signature, args)), tuple(kwargs),
                         tuple(map(_signature, kwargs.values())))
            function = self._functions.get(signature, _MISMATCH)
            if function is _MISMATCH:
                function = self._functions[signature] = _key_function(signature,
                                                                      len(self._functions))
            if function is None:
                return None
            self._last = function
            keyed = function(args, kwargs)
        return keyed


def _key_function(signature: tuple, tag: int):
    """The source of `_CallKeys`' function for one signature, compiled; None if the
    signature holds an argument no key can."""
    arg_sigs, names, kw_sigs = signature
    if None in arg_sigs or None in kw_sigs:
        return None
    namespace = {"settings": _settings, "MISMATCH": _MISMATCH, "names": names}
    lines, checks, parts, tensors = [], [], [f"{tag}", "settings()", "names"], []

    def visit(expr: str, sig) -> None:
        kind, fields = (sig, ()) if isinstance(sig, type) else sig
        t = f"t{len(namespace)}"
        namespace[t] = kind
        checks.append(f"type({expr}) is {t}")
        if kind in _TENSORS:
            parts.append(f"{expr}.shape, {expr}.stride(), {expr}.dtype, {expr}.get_device(), "
                         f"{expr}.data_ptr() & 15, {expr}.requires_grad")
            tensors.append(expr)
        elif fields:
            for name, field in zip(kind.__dataclass_fields__, fields, strict=True):
                visit(f"{expr}.{name}", field)
        else:
            parts.append(expr)

    for i, sig in enumerate(arg_sigs):
        visit(f"a{i}", sig)
    for i, sig in enumerate(kw_sigs):
        visit(f"k{i}", sig)
    unpack = "".join(f"a{i}, " for i in range(len(arg_sigs)))
    lines.append("def key(args, kwargs):")
    lines.append(f"    if len(args) != {len(arg_sigs)} or tuple(kwargs) != names:")
    lines.append("        return MISMATCH")
    if arg_sigs:
        lines.append(f"    {unpack}= args")
    if names:
        lines.append(f"    {''.join(f'k{i}, ' for i in range(len(names)))}= kwargs.values()")
    # A dataclass's fields are read only once its type checked out; `and` stops there.
    lines.append(f"    if not ({' and '.join(checks)}):")
    lines.append("        return MISMATCH")
    lines.append(f"    return ({', '.join(parts)},), [{', '.join(tensors)}]")
    exec("\n".join(lines) + "\n", namespace)
    return namespace["key"]


class _Replay:
    """A recorded call: the buffers to allocate and the launches to repeat.

    Buffers the op returns are allocated as recorded; the others (scratch) share one
    workspace allocation, each at a `_ALIGN`-aligned offset: a torch allocation costs a
    few µs of host time. The workspace is freed when the call returns, as the op's own
    scratch would be (the caching allocator orders reuse on the stream).
    """

    __slots__ = ("owned", "workspace", "places", "launches", "result", "device")

    def __init__(self, owned, workspace, places, launches, result, device):
        self.owned = owned  # [(shape, stride, dtype, device)]: the buffers returned
        self.workspace = workspace  # (bytes, device) of the scratch buffers', or None
        self.places = places  # per buffer: (index in owned, 0, bytes), (-1, offset, bytes)
        self.launches = launches  # [(fn, checks, call, head, grid, params, moves)]
        self.result = result  # `result_spec`'s (in `_compile`)
        self.device = device  # the CUDA device the launches go to (None: no launches)

    def hooked(self) -> bool:
        """Whether a Triton launch hook is installed now (Triton's path would run it)."""
        return not _launch._hooks_idle() or any(launch[0].pre_run_hooks
                                                 for launch in self.launches)

    def __call__(self, tensors: list[torch.Tensor]):
        owned = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                 for shape, stride, dtype, device in self.owned]
        bases = [t.data_ptr() for t in tensors]
        if self.workspace is not None:
            nbytes, device = self.workspace
            space = torch.empty(nbytes, dtype=torch.uint8, device=device)
            start = space.data_ptr()
            bases += [start + offset if i < 0 else owned[i].data_ptr()
                      for i, offset, _ in self.places]
        else:
            bases += [owned[i].data_ptr() for i, _, _ in self.places]
        if self.launches:
            stream = _launch._current_stream(self.device)
        for fn, checks, call, head, grid, params, moves in self.launches:
            for names, name, value in checks:
                if names.get(name) is not value:
                    _launch.check_globals(fn)  # raises if it changed
                    break
            params = list(params)
            for i, source, offset, desc in moves:
                ptr = bases[source] + offset
                params[i] = ptr if desc is None else _Descriptor(_Pointer(ptr), *desc)
            call(*grid, stream, *head, *params)
        return _rebuild(self.result, tensors, owned)


# Scratch buffers' alignment in a replay's workspace: every buffer the ops allocate is at
# least 16-byte aligned (TMA, Triton's pointer specialisation); the allocator gives 512.
_ALIGN = 256


def _workspace_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of buffers of these sizes (bytes) in one workspace, and its size."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // _ALIGN) * _ALIGN
    return offsets, end


def _launch_call(run, function, packed) -> tuple:
    """(call, head): a replay launches with `call(*grid, stream, *head, *params)`.

    Triton 3.6's `CudaLauncher.__call__` allocates the kernel's global and profile
    scratch, if any, then calls its compiled `launch`; for a kernel with neither, the
    replay calls `launch` itself.
    """
    launch = getattr(run, "launch", None)
    if (type(run).__name__ == "CudaLauncher" and launch is not None
            and getattr(run, "global_scratch_size", 1) == 0
            and getattr(run, "profile_scratch_size", 1) == 0
            and hasattr(run, "launch_cooperative_grid") and hasattr(run, "launch_pdl")):
        return launch, (function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                        packed, None, None, None)
    return run, (function, packed, None, None, None)


def _global_checks(fn) -> tuple:
    """(globals dict, name, the object there now) for each global `fn` read when compiled,
    after Triton's check that each still equals the value compiled in: a replay then only
    asks whether each is still the very object."""
    _launch.check_globals(fn)
    return tuple((names, name, names.get(name))
                 for (name, _), (_, names) in fn.used_global_vals.items())


def _rebuild(spec, tensors, buffers):
    """The op's result from `_compile`'s `result_spec` and this call's tensors and buffers."""
    if spec is None:
        return None
    kind, what = spec
    if kind == "input":
        return tensors[what]
    if kind == "buffer":
        return buffers[what]  # the replay's returned buffers
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
        launches.append((fn, _global_checks(fn), *_launch_call(run, function, packed), grid,
                         tuple(template), tuple(moves)))

    def result_spec(r):
        """None; ("input", i); ("buffer", j: kept's index); (tuple or a named tuple's
        type, [specs]); or False where `r` cannot be rebuilt."""
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
    returned: dict[int, int] = {}  # kept index → index among the owned buffers

    def own(spec):
        """`spec` with each buffer numbered among the returned ones."""
        if spec is None or spec[0] == "input":
            return spec
        if spec[0] == "buffer":
            return "buffer", returned.setdefault(spec[1], len(returned))
        return spec[0], [own(item) for item in spec[1]]

    out = own(out)
    owned = [None] * len(returned)
    for j, k in returned.items():
        b = kept[j]
        owned[k] = (tuple(b.shape), b.stride(), b.dtype, b.device)
    scratch = [j for j in range(len(kept)) if j not in returned]
    if len({kept[j].device for j in scratch}) > 1:
        return None  # scratch on two devices: not one workspace
    sizes = [b.untyped_storage().nbytes() for b in kept]
    offsets, nbytes = _workspace_layout([sizes[j] for j in scratch])
    places = [(returned.get(j, -1), 0, sizes[j]) for j in range(len(kept))]
    for j, offset in zip(scratch, offsets, strict=True):
        places[j] = (-1, offset, sizes[j])
    workspace = (nbytes, kept[scratch[0]].device) if scratch else None
    return _Replay(owned, workspace, places, launches, out,
                   devices.pop() if devices else None)


def replayed(op):
    """`op` with its eager calls replayed per call key (the module's docstring)."""
    cache: dict = {}
    _RECORDINGS.append(cache)
    keys = _CallKeys()

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        if (torch.compiler.is_compiling() or not enabled or not _launch.enabled
                or _launch.unavailable() is not None or recording()
                or torch.cuda.is_current_stream_capturing()):
            return op(*args, **kwargs)
        keyed = keys(args, kwargs)
        if keyed is None:
            return op(*args, **kwargs)
        key, tensors = keyed
        try:
            replay = cache.get(key)
        except TypeError:  # an unhashable argument
            return op(*args, **kwargs)
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
    wrapper.call_keys = keys
    return wrapper
