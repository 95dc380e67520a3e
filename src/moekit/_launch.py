"""Launch Triton kernels without Triton re-deriving, on every call, which binary to run.

Eager decode is host-bound (PERF.md: a Triton launch ≈ 15 µs of CPU time against ≈ 1 µs
inside a CUDA graph), and most of a launch's host time is `JITFunction.run` working out
again which compiled kernel the arguments select: the binder specialises every argument,
the cache key is a string of the whole specialisation and options, and a launch-metadata
object is built for hooks that are empty. `launcher(kernel)[grid](*args, **kwargs)` does
what `kernel[grid](*args, **kwargs)` does, and remembers, per device, the `CompiledKernel`
Triton's own `run` launched for each *fast key*; a later call with that key calls the
kernel's launcher directly: 1.05–1.39× less host time per eager call on H200 hosts
(bench/NOTES.md, session 28).

Why a fast key is enough (Triton 3.6, `triton/runtime/jit.py`). Triton launches
`kernel_cache[compute_cache_key(specialization, options)]`, and an entry, once written,
is never replaced. The fast key holds the call's shape (positional count, keyword names
in order), the type of every bound parameter and option, and everything the
specialisation reads of each value:
  - constexpr parameters: the value (with its type, so True, 1 and 1.0 never share a key);
  - tensors: dtype and whether data_ptr() is 16-byte aligned;
  - ints: % 16 == 0, == 1, and the i32 / i64 / u64 range (`do_not_specialize` makes
    Triton ignore some of this; keying on it anyway is finer, never coarser);
  - bool, float, None: the type alone;
  - TMA descriptors (Triton's host-side and Gluon's): the base's dtype, the block shape,
    the padding and (Gluon) the shared layout; shape and strides are launch arguments;
  - options (num_warps, …): by name, order, type and value, plus the knobs the options
    are built from (debug, instrumentation mode, arch override, fp fusion default).
Any other argument type (tuples, numpy scalars, …) is not keyed: such
calls always take Triton's path, as do calls while a pre-run or launch hook is installed.
`tests/test_launch.py` checks "equal fast keys ⇒ equal Triton keys" against Triton's own
binder for every kernel moekit launches, over arguments moved across each edge above.

The fast path needs Triton 3.6's internals and a CUDA device; elsewhere (the CPU
interpreter, another Triton, `MOEKIT_FAST_LAUNCH=0`) `launcher(kernel)` is `kernel`
itself.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import triton
from triton.runtime.jit import JITFunction

try:  # Triton 3.6's internals; without them `unavailable()` says why
    from triton import knobs
    from triton.compiler.compiler import CompiledKernel
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    from triton.runtime.driver import driver
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    knobs = CompiledKernel = driver = None
    GluonDescriptor = TensorDescriptor = type("NoDescriptor", (), {})

_INT32_MIN, _INT32_MAX, _INT64_MAX = -(2**31), 2**31 - 1, 2**63 - 1
_TRITON = (3, 6)  # the version whose internals the fast path reads

# Whether launches may take the fast path; the module's `unavailable()` must also be None.
enabled = os.environ.get("MOEKIT_FAST_LAUNCH", "1") != "0"
_LAUNCHERS: dict[JITFunction, FastLauncher] = {}  # one per kernel, made on its first launch
_local = threading.local()  # .recorder: where this thread's launches are reported, if set


@functools.cache
def unavailable() -> str | None:
    """Why the fast path cannot run in this process, or None (asked once, lazily)."""
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if version != _TRITON:
        return f"written against Triton 3.6's internals; this is {triton.__version__}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "Triton's CPU interpreter"
    if knobs is None:
        return "Triton has no knobs module"
    if not torch.cuda.is_available():
        return "no CUDA device"
    for owner, name in ((CompiledKernel, "run"), (CompiledKernel, "launch_metadata"),
                        (JITFunction, "run"), (JITFunction, "add_pre_run_hook"),
                        (knobs.runtime, "launch_enter_hook"), (knobs.runtime, "override_arch"),
                        (knobs.compilation, "instrumentation_mode"),
                        (knobs.language, "default_fp_fusion")):
        if not hasattr(owner, name):
            return f"{owner.__name__ if isinstance(owner, type) else owner} has no {name}"
    if type(driver.active).__name__ != "CudaDriver":
        return f"Triton's active driver is {type(driver.active).__name__}"
    return None


def launcher(kernel):
    """`kernel`'s fast launcher (indexed by the grid like the kernel), or `kernel` itself
    where the fast path does not apply."""
    if torch.compiler.is_compiling():
        return kernel  # Dynamo traces `kernel[grid](...)` itself, and not this launcher
    if not enabled or not isinstance(kernel, JITFunction) or unavailable() is not None:
        return kernel  # the interpreter's kernels are no JITFunction
    fast = _LAUNCHERS.get(kernel)
    if fast is None:
        fast = _LAUNCHERS[kernel] = FastLauncher(kernel)
    return fast


class _CallShape:
    """One kind of call of a kernel: how many positional arguments, which keywords.

    `bind(args, kwargs)` returns (every parameter in the kernel's order, the option
    values); `key(params, opts)` the fast key, or None when an argument has a type the key
    does not cover. Both are generated source, as Triton generates its binder. A key
    function is generated per tuple of argument types, which it checks first, so a key
    fixes every argument's type; the last one used is tried first.
    """

    def __init__(self, fn: JITFunction, nargs: int, kwnames: tuple[str, ...]):
        names = [p.name for p in fn.params]
        if nargs > len(names):
            raise TypeError(f"{fn}: {nargs} positional arguments for {len(names)} parameters")
        namespace, items = {}, []
        for i, p in enumerate(fn.params):
            if i < nargs:
                items.append(f"a[{i}]")
            elif p.name in kwnames:
                items.append(f"k[{p.name!r}]")
            elif p.has_default:
                namespace[f"d{i}"] = p.default
                items.append(f"d{i}")
            else:
                raise TypeError(f"{fn}: missing argument {p.name}")
        self.options = tuple(n for n in kwnames if n not in names)
        opts = "".join(f"k[{n!r}], " for n in self.options)
        exec(f"def bind(a, k):\n    return ({', '.join(items)},), ({opts})\n", namespace)
        self.bind = namespace["bind"]
        self.names = names
        self._constexpr = [p.is_constexpr for p in fn.params]
        self._keyfns: dict[tuple, object] = {}  # argument types → key function, or None
        self._last = lambda params, opts: None

    def key(self, params: tuple, opts: tuple):
        key = self._last(params, opts)
        if key is None:
            types = (*map(type, params), *map(type, opts))
            if types not in self._keyfns:
                self._keyfns[types] = self._make_keyfn(types, len(self._keyfns))
            keyfn = self._keyfns[types]
            if keyfn is None:
                return None
            self._last = keyfn
            key = keyfn(params, opts)
        return key

    def _make_keyfn(self, types: tuple, tag: int):
        n = len(self._constexpr)
        parts, namespace = [f"{tag}"], {f"t{i}": ty for i, ty in enumerate(types)}
        for i, (ty, constexpr) in enumerate(zip(types[:n], self._constexpr, strict=True)):
            v = f"a{i}"
            if constexpr:
                parts.append(v)
            elif issubclass(ty, torch.Tensor):
                parts.append(f"{v}.dtype, {v}.data_ptr() & 15 == 0")
            elif ty is int:
                parts.append(f"{v} & 15 == 0, {v} == 1, "
                             f"{_INT32_MIN} <= {v} <= {_INT32_MAX} or ({v} > {_INT64_MAX}) * 2")
            elif issubclass(ty, TensorDescriptor):
                parts.append(f"{v}.base.dtype, tuple({v}.block_shape), {v}.padding")
            elif issubclass(ty, GluonDescriptor):
                parts.append(f"{v}.base.dtype, tuple({v}.block_shape), {v}.padding, {v}.layout")
            elif ty not in (bool, float, type(None)):  # those: the type alone decides
                return None
        parts += [f"o{j}" for j in range(len(types) - n)]
        unpack = "".join(f"a{i}, " for i in range(n)) + " = p\n"
        if len(types) > n:
            unpack += "    " + "".join(f"o{j}, " for j in range(len(types) - n)) + " = o\n"
        names = [f"a{i}" for i in range(n)] + [f"o{j}" for j in range(len(types) - n)]
        guard = " and ".join(f"type({x}) is t{i}" for i, x in enumerate(names)) or "True"
        src = (f"def key(p, o):\n    {unpack}    if {guard}:\n"
               f"        return ({', '.join(parts)},)\n    return None\n")
        exec(src, namespace)
        return namespace["key"]


@contextlib.contextmanager
def recording_into(recorder):
    """Report this thread's launches to `recorder` (`moekit._replay`): `recorder.launch(fn,
    entry, grid, params, device)` for each fast-path launch, `recorder.fell_back(why)` for
    each that took Triton's own path."""
    _local.recorder = recorder
    try:
        yield recorder
    finally:
        _local.recorder = None


# (kernel, global's name) → the object last found equal to the value compiled in: a global
# Triton recorded as a `constexpr` of a module's plain int is never the same object, and
# `!=` on constexprs costs ~1 µs per launch (the route kernel's).
_EQUAL_GLOBALS: dict[tuple, object] = {}


def check_globals(fn: JITFunction) -> None:
    """Triton's check that no global the kernel read has changed since it was compiled;
    an unchanged global is usually the very object, or the one found equal last time
    (globals a kernel reads are immutable: ints, floats, constexprs, dtypes)."""
    missing = object()
    for (name, _), (val, globals_dict) in fn.used_global_vals.items():
        now = globals_dict.get(name, missing)
        if now is val or now is _EQUAL_GLOBALS.get((fn, name), missing):
            continue
        if now != val:
            raise RuntimeError(f"Global variable {name} has changed since we compiled "
                               f"this kernel, from {val} to {now}")
        _EQUAL_GLOBALS[(fn, name)] = now


def _knobs_key() -> tuple:
    """The knobs Triton builds a launch's options from, beside the call's keywords."""
    return (knobs.runtime.debug, knobs.compilation.instrumentation_mode,
            knobs.runtime.override_arch, knobs.language.default_fp_fusion)


def _current_device() -> int:
    return driver.active.get_current_device()


def _current_stream(device: int):
    return driver.active.get_current_stream(device)


def _hooks_idle() -> bool:
    """No launch hook would run: Triton's default empty hook chains, or None."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class FastLauncher:
    """`fast[grid](*args, **kwargs)` ≡ `fn[grid](*args, **kwargs)`, minus Triton's re-keying.

    Per device a dict: fast key → (the kernel's launcher, function handle, packed
    metadata, CompiledKernel), filled from what `fn.run` returned for the key's first
    call. Counts `hits`, `misses` (Triton's path, result recorded) and `fallbacks`
    (Triton's path, nothing recorded: an unkeyed argument or an installed hook).
    """

    def __init__(self, fn: JITFunction):
        self.fn = fn
        self._shapes: dict[tuple, _CallShape] = {}
        self._caches: dict[int, dict] = {}
        self.hits = self.misses = self.fallbacks = 0

    def __getitem__(self, grid):
        return functools.partial(self.run, grid)

    def key(self, args: tuple, kwargs: dict):
        """(the call's shape, its bound parameters, its fast key or None)."""
        shape_id = (len(args), *kwargs)
        shape = self._shapes.get(shape_id)
        if shape is None:
            shape = self._shapes[shape_id] = _CallShape(self.fn, len(args), tuple(kwargs))
        params, opts = shape.bind(args, kwargs)
        key = shape.key(params, opts)
        if key is not None:
            key = (shape, key, self.fn.debug, _knobs_key())
        return shape, params, key

    def run(self, grid, *args, **kwargs):
        fn = self.fn
        shape, params, key = self.key(args, kwargs)
        recorder = getattr(_local, "recorder", None)
        if key is None or fn.pre_run_hooks or not _hooks_idle():
            return self._fall_back(recorder, "an unkeyed argument or a hook", grid, args, kwargs)
        device = _current_device()
        cache = self._caches.get(device)
        if cache is None:
            cache = self._caches[device] = {}
        try:
            entry = cache.get(key)
        except TypeError:  # an unhashable constexpr: Triton's own key would fail too
            return self._fall_back(recorder, "an unhashable constexpr", grid, args, kwargs)
        if callable(grid):
            grid = grid(dict(zip(shape.names, params, strict=True)))
        if entry is None:
            self.misses += 1
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if kernel is not None and not hasattr(kernel, "result"):  # not an async compile
                entry = cache[key] = (kernel.run, kernel.function, kernel.packed_metadata,
                                      kernel)
            if recorder is not None:
                if entry is None:
                    recorder.fell_back("an asynchronous compile")
                else:
                    recorder.launch(fn, entry, grid, params, device)
            return kernel
        self.hits += 1
        check_globals(fn)
        n = len(grid)
        launch, function, packed, kernel = entry
        launch(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
               _current_stream(device), function, packed, None, None, None, *params)
        if recorder is not None:
            recorder.launch(fn, entry, grid, params, device)
        return kernel

    def _fall_back(self, recorder, why: str, grid, args, kwargs):
        """Triton's own path, nothing remembered."""
        self.fallbacks += 1
        if recorder is not None:
            recorder.fell_back(why)
        return self.fn.run(*args, grid=grid, warmup=False, **kwargs)

