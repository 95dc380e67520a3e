"""Experiment: host time per Triton launch, `kernel[grid](...)` against a cached fast path.

Eager MoE decode is host-bound, and much of a launch's host time is Triton's
`JITFunction.run` re-deriving, on every call, which binary to launch. What it does in
Triton 3.6 (file:line in triton/runtime/jit.py unless named):

    run (695-746)
      kwargs["debug"], kwargs["instrumentation_mode"] from the knobs           696-697
      device, stream = driver.active.get_current_device() / _stream(device)   700-701
      pre-run hooks                                                            704-705
      kernel_cache, kernel_key_cache, target, backend, binder = device_caches[device]  707
      binder(*args, **kwargs) → params dict, specialization, options          710
          the exec-generated `dynamic_func` of create_function_from_signature (391-448):
          per parameter ("constexpr", value) or native_specialize_impl(backend, arg,
          is_const, specialize, align) (C++, python/src/specialize.cc)
      compute_cache_key(kernel_key_cache, specialization, options)            712 (563-584)
          a dict lookup keyed on (tuple(specialization), str(options))
      kernel_cache.get(key); compile on a miss (_pack_args, _do_compile)      713-722
      used-globals check                                                      725-729
      grid → (g0, g1, g2); kernel.result() for async compiles                 733-741
      kernel.launch_metadata(grid, stream, *params)   compiler.py:479-488     743
          the launch hooks are always `HookChain`s in 3.6 (knobs.py:468-469), never None,
          so this builds a LazyDict on every launch
      kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata,
                 launch_metadata, enter_hook, exit_hook, *params)             744-745
          `CompiledKernel.run` (compiler.py:474-477) is the launcher built in
          `_init_handles` (452): `CudaLauncher` (backends/nvidia/driver.py:674-714), whose
          __call__ allocates scratch if the kernel has any, then calls the generated C
          `launch` (format driver.py:123 + one code per parameter; constexprs included,
          parsed as "O" and dropped, driver.py:192, 260; hooks called unless None,
          driver.py:519, 555).

`FastLauncher` (below) keeps, per JITFunction and device, the `CompiledKernel` that
Triton's own `run` returned for the first call of each *fast key*, and on later calls
with that key calls the kernel's launcher directly: no binder, no cache-key string, no
launch metadata (None, with None hooks, while both HookChains are empty). Any key it has
not seen (and any argument it cannot key) goes through Triton's `run`, whose result it
records. `FastLauncher(raw=True)` ("fast+raw" below) goes one step further and calls the
C `launch` itself, skipping `CudaLauncher.__call__`, when the kernel needs no scratch.

Why the fast key is sufficient. Triton launches kernel_cache[K] with K a function of
(device, specialization, str(options)) only (712-713), and an entry of kernel_cache is
written once, on a miss (jit.py:843/850), never replaced. The fast key holds the call's
shape (how many positional arguments, which keywords in which order), type(v) of every
bound parameter and option value, and:
  - constexpr parameters: the value (jit.py:403-404 puts ("constexpr", value) in the
    specialization); with its type, so True / 1 / 1.0 never share a key;
  - tensors: dtype and data_ptr() % 16 == 0 — all specialize.cc's handle_tensor reads
    (dtype → canonical pointer type, with is_const fixed per parameter; "D" when aligned);
  - ints: v % 16 == 0, v == 1 and the i32 / i64 / u64 range — all handle_long_type
    reads (== 1 becomes ("constexpr", 1), else "D" when % 16 == 0; type by range);
    do_not_specialize(_on_alignment) only makes Triton ignore some of this, so keying on
    it anyway is finer, never coarser;
  - bool, float, None: the type alone (handle_bool_type "u1", handle_float_type "fp32",
    None → ("constexpr", None)); annotated parameters (jit.py:410-419) read a subset;
  - options: every keyword that is not a parameter, by name, order, type and value, plus
    fn.debug, knobs.runtime.debug and knobs.compilation.instrumentation_mode (696-697),
    which is everything `options` (and so str(options)) is built from.
Any other argument type (tuples, tensor descriptors, constexpr objects, JITFunctions,
unhashable constexprs) is not keyed: such calls always take Triton's path. So equal fast
keys imply equal (specialization, str(options)) on the same device, hence the same K and
the same CompiledKernel Triton would launch. The fast path also keeps Triton's per-call
checks: the used-globals check is repeated (`is` tried before `!=`), and it steps aside
(normal path) while a pre-run hook or a launch hook is installed. The CPU mode checks the
implication on a few hundred argument variants against Triton's own binder and
compute_cache_key, and a new specialisation end to end (miss, compile, hit).

CPU mode (default) measures host µs per launch with the driver stubbed: the kernels are
really compiled for sm_90 (ptxas ships with the wheel; tests/test_sm90_compile.py) and
Triton's `run`, `CompiledKernel`, `CudaLauncher.__init__/__call__` all run; only the
generated C `launch` (and loading the cubin) is a no-op. The arguments are the ones
`moekit.experts_direct` passes at qwen3-30b-a3b shapes, M = 1, recorded from a real
`moekit.fused_experts` call. GPU mode (`--gpu`) runs both paths on an H100/H200: outputs
must be bitwise equal, and it times launches (host time of N launches without a sync)
and whole eager `fused_experts` calls; JSON + Markdown under --out.

    python bench/scripts/launch_path_experiment.py              # CPU, ~5 s (+1 s compiling)
    PYTHONPATH=src python3 bench/scripts/launch_path_experiment.py --gpu --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

import torch
import triton
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:  # 3.6 internals: without them the fast path is unavailable, the normal numbers stand
    from triton import knobs
    from triton.runtime.jit import compute_cache_key
except ImportError:
    knobs = compute_cache_key = None

E, K, H, I = 128, 8, 2048, 768  # qwen3-30b-a3b
PRESET = "qwen3-30b-a3b"
DIRECT_KERNELS = ("_direct_gemm1_kernel", "_direct_gemm2_kernel")
LAUNCHES, RUNS = 300, 3  # per timing: best of RUNS runs of LAUNCHES launches
CPU_LAUNCHES, CPU_RUNS = 1000, 7  # no GPU queue to fill: more and longer runs, less noise

_INT32_MIN, _INT32_MAX, _INT64_MAX = -(2**31), 2**31 - 1, 2**63 - 1


# --------------------------------------------------------------------------- fast path


def fast_path_unavailable() -> str | None:
    """Why `FastLauncher` cannot run on this Triton, or None: it reads internals of 3.6."""
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) != (3, 6):
        return f"written against Triton 3.6's internals; this is {triton.__version__}"
    from triton.compiler.compiler import CompiledKernel
    needed = [(JITFunction, "run"), (CompiledKernel, "run"), (CompiledKernel, "launch_metadata"),
              (knobs.runtime, "launch_enter_hook"), (knobs.runtime, "launch_exit_hook"),
              (knobs.runtime, "debug"), (knobs.compilation, "instrumentation_mode")]
    for owner, name in needed:
        if not hasattr(owner, name):
            return f"{owner} has no {name}"
    if not hasattr(knobs.runtime.launch_enter_hook, "calls"):
        return "knobs.runtime.launch_enter_hook is not a HookChain"
    return None


def _hooks_idle() -> bool:
    """No launch hook would run: Triton's default empty HookChains, or None."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class _CallShape:
    """One kind of call (how many positional arguments, which keywords in which order).

    `bind(args, kwargs)` returns (parameters in the kernel's order, option values), and
    `key(params, opts)` the fast key, or None when an argument is of a type the key does
    not cover; both are generated as Triton generates its binder (jit.py:391-448). Each
    key function is generated for one tuple of argument types, which it checks first
    (`type(x) is T`), so a key also fixes every argument's type; the most recent one is
    tried first, as calls of one launcher site repeat their types.
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
        self.constexpr = [p.is_constexpr for p in fn.params]
        self.names = names
        self._keyfns: dict[tuple, object] = {}  # argument types → key function (or None)
        self._last = lambda p, o: None

    def key(self, params: tuple, opts: tuple):
        key = self._last(params, opts)
        if key is None:
            tys = (*map(type, params), *map(type, opts))
            if tys not in self._keyfns:
                self._keyfns[tys] = self._make_keyfn(tys, len(self._keyfns))
            keyfn = self._keyfns[tys]
            if keyfn is None:
                return None
            self._last = keyfn
            key = keyfn(params, opts)
        return key

    def _make_keyfn(self, tys: tuple, tag: int):
        n = len(self.constexpr)
        parts, namespace = [f"{tag}"], {f"t{i}": ty for i, ty in enumerate(tys)}
        for i, (ty, constexpr) in enumerate(zip(tys[:n], self.constexpr, strict=True)):
            v = f"a{i}"
            if constexpr:
                parts.append(v)
            elif issubclass(ty, torch.Tensor):
                parts.append(f"{v}.dtype, {v}.data_ptr() & 15 == 0")
            elif ty is int:
                parts.append(f"{v} & 15 == 0, {v} == 1, "
                             f"{_INT32_MIN} <= {v} <= {_INT32_MAX} or ({v} > {_INT64_MAX}) * 2")
            elif ty in (bool, float, type(None)):
                pass  # the type alone decides
            else:
                return None
        parts += [f"o{j}" for j in range(len(tys) - n)]
        unpack = "".join(f"a{i}, " for i in range(n)) + " = p\n"
        if len(tys) > n:
            unpack += "    " + "".join(f"o{j}, " for j in range(len(tys) - n)) + " = o\n"
        names = [f"a{i}" for i in range(n)] + [f"o{j}" for j in range(len(tys) - n)]
        guard = " and ".join(f"type({x}) is t{i}" for i, x in enumerate(names)) or "True"
        src = (f"def key(p, o):\n    {unpack}    if {guard}:\n"
               f"        return ({', '.join(parts)},)\n    return None\n")
        exec(src, namespace)
        return namespace["key"]


class FastLauncher:
    """`run(grid, *args, **kwargs)` ≡ `fn[grid](*args, **kwargs)`, minus Triton's re-keying.

    Per device, a dict: fast key → (CudaLauncher, function handle, packed metadata,
    CompiledKernel, raw C launch or None), filled from what `JITFunction.run` returned
    (see the module docstring for why the key is sufficient). `raw`: call the generated
    C `launch` directly for kernels without global/profile scratch. `verify`: check
    every hit against Triton's own choice (slow; for tests).
    """

    def __init__(self, fn: JITFunction, raw: bool = False, verify: bool = False):
        self.fn, self.raw, self.verify = fn, raw, verify
        self._shapes: dict[tuple, _CallShape] = {}
        self._caches: dict[int, dict] = {}
        self.hits = self.misses = self.fallbacks = 0

    def key(self, args: tuple, kwargs: dict):
        """(the call's shape, its bound parameters, its fast key or None)."""
        shape = self._shapes.get((len(args), *kwargs))
        if shape is None:
            shape = self._shapes[(len(args), *kwargs)] = _CallShape(self.fn, len(args),
                                                                   tuple(kwargs))
        params, opts = shape.bind(args, kwargs)
        key = shape.key(params, opts)
        if key is not None:
            key = (shape, key, self.fn.debug, knobs.runtime.debug,
                   knobs.compilation.instrumentation_mode)
        return shape, params, key

    def run(self, grid, *args, **kwargs):
        fn = self.fn
        shape, params, key = self.key(args, kwargs)
        if key is None or fn.pre_run_hooks or not _hooks_idle():
            self.fallbacks += 1
            return fn.run(*args, grid=grid, warmup=False, **kwargs)
        drv = driver.active
        device = drv.get_current_device()
        cache = self._caches.get(device)
        if cache is None:
            cache = self._caches[device] = {}
        try:
            entry = cache.get(key)
        except TypeError:  # an unhashable constexpr: Triton's own key would fail too
            self.fallbacks += 1
            return fn.run(*args, grid=grid, warmup=False, **kwargs)
        if entry is None:
            self.misses += 1
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if kernel is not None and not hasattr(kernel, "result"):
                cache[key] = self._entry(kernel)
            return kernel
        self.hits += 1
        # Triton's used-globals check (jit.py:725-729); an unchanged global is usually the
        # very object, and comparing tl.constexprs with != costs ~0.3 µs each.
        missing = object()
        for (name, _), (val, globals_dict) in fn.used_global_vals.items():
            if (now := globals_dict.get(name, missing)) is not val and now != val:
                raise RuntimeError(
                    f"Global variable {name} has changed since we compiled this kernel, "
                    f"from {val} to {now}")
        if callable(grid):
            grid = grid(dict(zip(shape.names, params, strict=True)))
        n = len(grid)
        g0, g1, g2 = grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1
        stream = drv.get_current_stream(device)
        launcher, function, packed, kernel, raw = entry
        if self.verify:
            self._check(kernel, device, args, kwargs)
        if raw is not None:
            launch, cooperative, pdl = raw
            launch(g0, g1, g2, stream, function, cooperative, pdl, None, None, packed, None,
                   None, None, *params)
        else:
            launcher(g0, g1, g2, stream, function, packed, None, None, None, *params)
        return kernel

    def _entry(self, kernel) -> tuple:
        launcher = kernel.run  # the property loads the binary once (compiler.py:474-477)
        raw = None
        if (self.raw and hasattr(launcher, "launch")
                and getattr(launcher, "global_scratch_size", 1) == 0
                and getattr(launcher, "profile_scratch_size", 1) == 0):
            raw = (launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl)
        return launcher, kernel.function, kernel.packed_metadata, kernel, raw

    def entries(self, device: int) -> list[tuple]:
        """The recorded (launcher, function, packed metadata, CompiledKernel, raw) tuples."""
        return list(self._caches.get(device, {}).values())

    def _check(self, kernel, device, args, kwargs) -> None:
        chosen = triton_choice(self.fn, device, args, kwargs)
        if chosen is not kernel:
            raise AssertionError(f"{self.fn}: fast path chose {kernel}, Triton {chosen}")


def triton_key(fn: JITFunction, device: int, args, kwargs) -> str:
    """Triton's own cache key for this call (jit.py:696-712), without launching."""
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    _, kernel_key_cache, _, _, binder = fn.device_caches[device]
    _, specialization, options = binder(*args, **kwargs)
    return compute_cache_key(kernel_key_cache, specialization, options)


def triton_choice(fn: JITFunction, device: int, args, kwargs):
    """The CompiledKernel `fn[grid](*args, **kwargs)` would launch (None: it would compile)."""
    return fn.device_caches[device][0].get(triton_key(fn, device, args, kwargs))


# ------------------------------------------------------------------ moekit's launches


class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`."""

    def __init__(self, fn, args, kwargs, grid):
        self.fn, self.args, self.kwargs, self.grid = fn, args, kwargs, grid

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def normal(self):
        return self.fn[self.grid](*self.args, **self.kwargs)

    def via(self, fast: FastLauncher):
        return fast.run(self.grid, *self.args, **self.kwargs)


def record_launches(call) -> list[Launch]:
    """The Triton launches `call()` makes, recorded and not run."""
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), grid))

    saved = JITFunction.run
    JITFunction.run = record
    try:
        call()
    finally:
        JITFunction.run = saved
    return launches


def direct_launches(hidden, w13, w2, ids, weights):
    """(moekit's two direct-path launches for this call, a fused_experts call making them,
    which config that takes): the default one if it takes the direct path, else the
    heuristic's direct tiles."""
    import moekit
    from moekit.tuning.heuristic import direct_tiles

    call = lambda: moekit.fused_experts(hidden, w13, w2, ids, weights, backend="triton")
    launches, how = record_launches(call), "default config"
    if [x.name for x in launches] != list(DIRECT_KERNELS):
        config = direct_tiles(hidden.shape[0], ids.shape[1], hidden.shape[1])
        how = f"direct_tiles (the default launched {[x.name for x in launches]})"
        call = lambda: moekit.fused_experts(hidden, w13, w2, ids, weights, config=config,
                                            backend="triton")
        launches = record_launches(call)
    assert [x.name for x in launches] == list(DIRECT_KERNELS), [x.name for x in launches]
    return launches, call, how


class FastKernel:
    """Stands in for a JITFunction in `moekit.experts_direct`: `kernel[grid](...)` through
    a FastLauncher, so a whole `fused_experts` call can be timed with the fast path."""

    def __init__(self, fast: FastLauncher):
        self._run = fast.run

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._run(grid, *args, **kwargs)


def layer_call(call, fasts: dict[str, FastLauncher] | None):
    """`call` (a fused_experts call) with moekit.experts_direct's two kernels launched
    through `fasts` (None: Triton's path); the kernels are swapped in on every call, so
    the variants can be timed interleaved."""
    import moekit._direct_kernels as kernels
    import moekit.experts_direct as direct

    swap = [(name, getattr(kernels, name) if fasts is None else FastKernel(fasts[name]))
            for name in DIRECT_KERNELS]

    def layer():
        for name, kernel in swap:
            setattr(direct, name, kernel)
        call()
    return layer


def restore_direct_kernels() -> None:
    import moekit._direct_kernels as kernels
    import moekit.experts_direct as direct
    for name in DIRECT_KERNELS:
        setattr(direct, name, getattr(kernels, name))


# ------------------------------------------------------------------------------ timing


def host_us(calls: dict, n: int = LAUNCHES, runs: int = RUNS, sync=None) -> dict:
    """name → (host µs per call, wall µs per call) of each of `calls`: best of `runs` runs
    of n calls, the calls' runs interleaved so that a noisy stretch of the host hits them
    all; host time stops before `sync()`, wall time after it."""
    for fn in calls.values():
        for _ in range(max(10, n // 5)):
            fn()
    if sync:
        sync()
    best = {name: (float("inf"), float("inf")) for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            start = time.perf_counter()
            for _ in range(n):
                fn()
            mid = time.perf_counter()
            if sync:
                sync()
            end = time.perf_counter()
            host, wall = best[name]
            best[name] = (min(host, (mid - start) / n * 1e6), min(wall, (end - start) / n * 1e6))
    return best


def launch_calls(launch: Launch, fasts, raws) -> dict:
    """The ways to make `launch`, as argument-free calls of the same shape."""
    fn, grid, args, kwargs = launch.fn, launch.grid, launch.args, launch.kwargs
    calls = {"normal": lambda: fn[grid](*args, **kwargs)}
    if fasts:
        fast, raw = fasts[launch.name].run, raws[launch.name].run
        calls["fast"] = lambda: fast(grid, *args, **kwargs)
        calls["fast_raw"] = lambda: raw(grid, *args, **kwargs)
    return calls


def time_paths(launches: list[Launch], fasts, raws, n: int = LAUNCHES, runs: int = RUNS,
               sync=None) -> list[dict]:
    """Per kernel: normal, fast and fast+raw host (and with `sync`, wall) µs per launch."""
    rows = []
    for launch in launches:
        row = {"kernel": launch.name}
        for path, (host, wall) in host_us(launch_calls(launch, fasts, raws), n, runs,
                                          sync).items():
            row[path] = host
            if sync:
                row[path + "_wall"] = wall
        rows.append(row)
    return rows


def print_table(rows: list[dict], unit: str = "host µs/launch") -> None:
    print(f"\n{'kernel':24s} {'normal':>9s} {'fast':>9s} {'fast+raw':>9s} {'saved':>9s}"
          f"   ({unit})")
    for r in rows:
        fast, raw = r.get("fast"), r.get("fast_raw")
        cell = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9s}"
        saved = r["normal"] - fast if fast is not None else None
        print(f"{r['kernel']:24s} {cell(r['normal'])} {cell(fast)} {cell(raw)} {cell(saved)}")


# ---------------------------------------------------------------------------- CPU mode


def stub_cuda_driver() -> None:
    """An sm_90 GPU for Triton on a machine without one: compile for real, launch nothing.

    Everything of Triton's launch path runs (the binder, the cache key, CompiledKernel,
    CudaLauncher.__init__ and __call__); the generated C `launch` is a no-op and loading
    the cubin returns a dummy handle, since neither exists without libcuda.
    """
    import triton.backends.nvidia.driver as nv
    from triton.backends.compiler import GPUTarget

    def compile_module(src, name, **_):
        assert name == "__triton_launcher", name  # only the launcher is stubbed
        return types.SimpleNamespace(launch=lambda *args: None)

    nv.compile_module_from_src = compile_module
    nv.library_dirs = lambda: []

    class Utils:
        @staticmethod
        def load_binary(name, kernel, shared, device):
            return 1, 1, 0, 0, 1024  # module, function, n_regs, n_spills, max threads

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448, "multiprocessor_count": 132, "warpSize": 32}

    class Sm90Driver:
        launcher_cls = nv.CudaLauncher
        utils = Utils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(Sm90Driver())


def cpu_inputs():
    """qwen3-30b-a3b decode inputs on the CPU: weights never touched, so never paged in."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, H, generator=g, dtype=torch.bfloat16)
    w13 = torch.empty(E, 2 * I, H, dtype=torch.bfloat16)
    w2 = torch.empty(E, H, I, dtype=torch.bfloat16)
    ids = torch.randperm(E, generator=g)[:K].view(1, K).to(torch.int32)
    weights = torch.softmax(torch.randn(1, K, generator=g), dim=-1)
    return hidden, w13, w2, ids, weights


def key_variants(launch: Launch):
    """Calls of `launch`'s kernel whose arguments move across every specialisation edge:
    misaligned pointers, another dtype, ints 0/1/16/17/2^31/2^40/2^63, bool and float
    where an int was, other constexprs and options."""
    args, kwargs = list(launch.args), dict(launch.kwargs)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    ints = [i for i, a in enumerate(args) if type(a) is int]
    yield args, kwargs
    for i in tensors:
        a = args[i]
        flat = a.reshape(-1)
        retyped = torch.empty(1, dtype=torch.float16 if a.is_floating_point() else torch.int64)
        for other in (flat[1:], flat[8:], retyped):
            yield args[:i] + [other] + args[i + 1:], kwargs
    for i in ints:
        for v in (0, 1, 2, 16, 17, 32, 2**31 - 16, 2**31, 2**40, 2**40 + 1, 2**63, -16,
                  -(2**31) - 16, True, 16.0):
            yield args[:i] + [v] + args[i + 1:], kwargs
    for name, v in kwargs.items():
        for other in _other_values(v):
            yield args, {**kwargs, name: other}
    yield args, {**kwargs, "debug": True}


def _other_values(v) -> list:
    """Values of another type or value for a constexpr or option valued `v`."""
    if type(v) is bool:
        return [not v, int(v)]
    if type(v) is int:
        return [v * 2, float(v)]
    return {str: ["relu2"], type(None): ["ieee"]}.get(type(v), [])


def check_new_specialisation(launch: Launch, fast: FastLauncher) -> str:
    """End to end: a misaligned output pointer is a key the fast path has not seen; it
    goes through Triton (which compiles a new variant) and the next call is a hit that
    launches that variant, not the aligned one."""
    i = next(i for i, p in enumerate(launch.fn.params) if p.name == "out_ptr")
    out = launch.args[i]
    shifted = torch.empty(out.numel() + 1, dtype=out.dtype)[1:].view_as(out)  # 2-byte offset
    args = launch.args[:i] + (shifted,) + launch.args[i + 1:]
    aligned = launch.via(fast)
    misses = fast.misses
    variant = fast.run(launch.grid, *args, **launch.kwargs)
    assert fast.misses == misses + 1 and variant is not aligned
    assert fast.run(launch.grid, *args, **launch.kwargs) is variant  # verified by `fast`
    assert launch.via(fast) is aligned
    return "misaligned out_ptr: a miss, a new binary, then hits on it (verified)"


def check_key(fast: FastLauncher, launch: Launch) -> dict:
    """Equal fast keys ⇒ equal Triton keys, over `key_variants` (Triton's binder and
    compute_cache_key, no compile)."""
    seen: dict = {}
    variants = unkeyed = 0
    for args, kwargs in key_variants(launch):
        variants += 1
        try:
            ours = fast.key(tuple(args), kwargs)[2]
        except TypeError:
            ours = None
        if ours is None:
            unkeyed += 1
            continue
        theirs = triton_key(fast.fn, 0, args, kwargs)
        if seen.setdefault(ours, theirs) != theirs:
            raise AssertionError(f"{launch.name}: one fast key, two Triton keys:\n"
                                 f"{seen[ours]}\n{theirs}")
    return {"variants": variants, "fast_keys": len(seen), "unkeyed": unkeyed,
            "triton_keys": len(set(seen.values()))}


def cpu_main(args) -> None:
    import moekit
    import moekit.backend

    stub_cuda_driver()
    moekit.backend.interpreter_enabled = lambda: True  # the Triton path on CPU tensors
    hidden, w13, w2, ids, weights = cpu_inputs()
    launches, call, how = direct_launches(hidden, w13, w2, ids, weights)
    print(f"moekit's direct path at {PRESET} M=1 ({how}); Triton {triton.__version__}, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    reason = fast_path_unavailable()
    start = time.perf_counter()
    for launch in launches:
        launch.normal()  # compiles for sm_90 (ptxas) unless Triton's cache has it
    print(f"first launches (compile or cache load): {time.perf_counter() - start:.1f} s")
    if reason:
        print(f"fast path unavailable: {reason}")
        print_table(time_paths(launches, None, None, CPU_LAUNCHES, CPU_RUNS))
        return
    fasts = {x.name: FastLauncher(x.fn, verify=True) for x in launches}
    raws = {x.name: FastLauncher(x.fn, raw=True, verify=True) for x in launches}
    for launch in launches:
        for fast in (fasts[launch.name], raws[launch.name]):
            first = launch.via(fast)  # a miss: Triton's path, its kernel recorded
            assert first is triton_choice(launch.fn, 0, launch.args, launch.kwargs)
            assert launch.via(fast) is first  # a hit, checked against Triton's choice
            assert (fast.misses, fast.hits) == (1, 1), (fast.misses, fast.hits)
        raw = [e[4] is not None for e in raws[launch.name].entries(0)]
        print(f"{launch.name}: key check {check_key(fasts[launch.name], launch)}; "
              f"raw C launch {raw}")
    gemm2 = launches[1]
    print(f"{gemm2.name}: {check_new_specialisation(gemm2, fasts[gemm2.name])}")
    for fast in (*fasts.values(), *raws.values()):
        fast.verify = False
    print_table(time_paths(launches, fasts, raws, CPU_LAUNCHES, CPU_RUNS))

    us = host_us({"normal": layer_call(call, None), "fast": layer_call(call, fasts),
                  "fast_raw": layer_call(call, raws)}, CPU_LAUNCHES // 2, CPU_RUNS)
    restore_direct_kernels()
    normal, fast, raw = (us[x][0] for x in ("normal", "fast", "fast_raw"))
    print(f"\nwhole fused_experts call (2 launches), host µs: normal {normal:.1f}, "
          f"fast {fast:.1f}, fast+raw {raw:.1f}, saved {normal - fast:.1f} / {normal - raw:.1f}")
    stats = {name: (f.hits, f.misses, f.fallbacks) for name, f in fasts.items()}
    print(f"fast path (hits, misses, fallbacks): {stats}")


# ---------------------------------------------------------------------------- GPU mode


def snapshot(launches: list[Launch], limit_bytes: int = 64 << 20) -> dict[int, tuple]:
    """id → (tensor, its copy) of every tensor argument under `limit_bytes` (the larger
    ones, the weights, are read-only)."""
    out = {}
    for launch in launches:
        for a in itertools.chain(launch.args, launch.kwargs.values()):
            if isinstance(a, torch.Tensor) and a.numel() * a.element_size() < limit_bytes:
                out.setdefault(id(a), (a, a.clone()))
    return out


def run_from(state, launches: list[Launch], how) -> list[torch.Tensor]:
    """Restore the small tensors, run the launches `how`, return copies of them after."""
    for a, saved in state.values():
        a.copy_(saved)
    torch.cuda.synchronize()
    for launch in launches:
        how(launch)
    torch.cuda.synchronize()
    return [a.clone() for a, _ in state.values()]


def bitwise_equal(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    as_bytes = lambda t: t.contiguous().view(-1).view(torch.uint8)
    return all(torch.equal(as_bytes(x), as_bytes(y)) for x, y in zip(xs, ys, strict=True))


def check_fast_path(launches: list[Launch], fasts, raws) -> dict:
    """Both fast paths against Triton's: the same CompiledKernel, bitwise the same outputs.

    Every small tensor argument is restored before each run, so the runs (GEMM1 then
    GEMM2, as moekit launches them) start from the same state; the direct path is
    deterministic, which normal-vs-normal confirms.
    """
    state = snapshot(launches)
    normal = run_from(state, launches, Launch.normal)
    normal_again = run_from(state, launches, Launch.normal)
    for fl in (fasts, raws):  # the first call of each key goes through Triton and records
        run_from(state, launches, lambda x, fl=fl: x.via(fl[x.name]))
    hits = sum(f.hits for f in fasts.values())
    fast = run_from(state, launches, lambda x: x.via(fasts[x.name]))
    raw = run_from(state, launches, lambda x: x.via(raws[x.name]))
    assert sum(f.hits for f in fasts.values()) == hits + len(launches), "not all hits"
    index = torch.cuda.current_device()
    for launch in launches:
        for fl in (fasts, raws):
            (entry,) = fl[launch.name].entries(index)
            assert entry[3] is triton_choice(launch.fn, index, launch.args, launch.kwargs)
    return {
        "normal_vs_normal": bitwise_equal(normal, normal_again),
        "fast_vs_normal": bitwise_equal(normal, fast),
        "fast_raw_vs_normal": bitwise_equal(normal, raw),
        "tensors_compared": len(state),
        "raw_c_launch": {n: f.entries(index)[0][4] is not None for n, f in raws.items()},
    }


def gpu_main(args) -> None:
    from moekit.bench.inputs import make_tokens, make_weights
    from moekit.bench.presets import PRESETS

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    preset = PRESETS[PRESET]
    w = make_weights(preset, torch.bfloat16, device)
    hidden, topk = make_tokens(preset, 1, torch.bfloat16, device)
    ids, weights = topk.ids, topk.weights
    result = {
        "preset": PRESET, "M": 1, "dtype": "bf16", "launches_per_run": LAUNCHES, "runs": RUNS,
        "gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
        "torch": torch.__version__, "python": platform.python_version(),
    }
    launches, call, result["config"] = direct_launches(hidden, w.w13, w.w2, ids, weights)
    call()  # compiles
    torch.cuda.synchronize()

    reason = fast_path_unavailable()
    fasts = raws = None
    if reason is None:
        try:
            fasts = {x.name: FastLauncher(x.fn) for x in launches}
            raws = {x.name: FastLauncher(x.fn, raw=True) for x in launches}
            result["check"] = check_fast_path(launches, fasts, raws)
            if not (result["check"]["fast_vs_normal"] and result["check"]["fast_raw_vs_normal"]):
                reason = "the fast path's outputs differ from the normal path's"
        except Exception as e:  # noqa: BLE001 - report the normal numbers regardless
            reason = f"fast path failed: {type(e).__name__}: {e}"
    if reason:
        print(f"fast path unavailable: {reason}")
        result["fast_path_unavailable"] = reason
        fasts = raws = None

    sync = torch.cuda.synchronize
    result["launches"] = time_paths(launches, fasts, raws, sync=sync)
    layers = {"normal": layer_call(call, None)}
    if fasts:
        layers.update(fast=layer_call(call, fasts), fast_raw=layer_call(call, raws))
    try:
        for name, (host, wall) in host_us(layers, sync=sync).items():
            result[f"fused_experts_{name}"] = {"host_us": host, "wall_us": wall}
    finally:
        restore_direct_kernels()
    if fasts:
        result["fast_stats"] = {n: {"hits": f.hits, "misses": f.misses,
                                    "fallbacks": f.fallbacks} for n, f in fasts.items()}
    print_table(result["launches"])
    for name in layers:
        r = result[f"fused_experts_{name}"]
        print(f"fused_experts {name}: host {r['host_us']:.1f} µs/call, wall {r['wall_us']:.1f}")
    write_reports(result, out_dir)


def write_reports(result: dict, out_dir: Path) -> None:
    (out_dir / "launch_path_experiment.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Launch path: normal `kernel[grid]` vs fast path ({result['gpu']})",
        "",
        f"{PRESET}, M = 1, bf16, direct path ({result['config']}); Triton {result['triton']}, "
        f"torch {result['torch']}, Python {result['python']}. Host µs per launch: best of "
        f"{RUNS} runs of {LAUNCHES} launches without a sync (wall: including the final sync).",
        "",
    ]
    if "fast_path_unavailable" in result:
        lines += [f"Fast path unavailable: {result['fast_path_unavailable']}", ""]
    else:
        lines += [f"Check (bitwise equality, raw C launch used): {result['check']}", ""]
    lines += ["| kernel | normal | fast | fast+raw | normal wall | fast wall |",
              "|---|---|---|---|---|---|"]
    cell = lambda v: f"{v:.2f}" if v is not None else "-"
    for r in result["launches"]:
        lines.append(f"| {r['kernel']} | {cell(r['normal'])} | {cell(r.get('fast'))} | "
                     f"{cell(r.get('fast_raw'))} | {cell(r.get('normal_wall'))} | "
                     f"{cell(r.get('fast_wall'))} |")
    lines += ["", "| fused_experts | host µs/call | wall µs/call |", "|---|---|---|"]
    for name in ("normal", "fast", "fast_raw"):
        if f"fused_experts_{name}" in result:
            r = result[f"fused_experts_{name}"]
            lines.append(f"| {name} | {r['host_us']:.1f} | {r['wall_us']:.1f} |")
    (out_dir / "launch_path_experiment.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/launch_path_experiment.json and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (H100/H200)")
    parser.add_argument("--out", default="launch-path-out", help="GPU mode's output folder")
    args = parser.parse_args()
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        gpu_main(args)
    else:
        os.environ.pop("TRITON_INTERPRET", None)
        cpu_main(args)


if __name__ == "__main__":
    main()
