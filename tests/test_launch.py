"""The fast launch path (`moekit._launch`): its keys against Triton's, and its hits,
misses and fallbacks.

The keys are what could go wrong silently (one fast key for two Triton binaries would
launch the wrong one), so they are checked against Triton's own binder and cache key for
every kernel the library launches: a worker subprocess (kernels as JITFunctions, not
interpreted) runs each case of `test_sm90_compile.py` with the launches recorded, and
moves each launch's arguments across every edge the specialisation reads (alignment,
dtype, ints 0/1/16/2^31/2^63, bool and float for an int, other constexprs and options).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

import moekit
import moekit._launch as fast_launch
import moekit._replay as replay
from helpers import (
    poison_,
    poison_cuda_cache,
    random_experts,
    random_routing,
    worker_report,
)
from moekit.quant import QuantScheme, quantize_weight

_HERE = os.path.dirname(os.path.abspath(__file__))


def _square(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr = 4):
    pass  # never compiled: the tests below stand in for Triton's `run`


@pytest.fixture
def fake_device(monkeypatch):
    """Device 0, stream 77: what the fast path asks Triton's driver on a hit."""
    monkeypatch.setattr(fast_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(fast_launch, "_current_stream", lambda device: 77)


def _recording_kernel() -> tuple[JITFunction, list, list]:
    """(kernel, the calls that reached Triton's `run`, the launches made on hits)."""
    fn = JITFunction(_square)
    runs, launches = [], []

    def run(*args, grid, warmup, **kwargs):
        runs.append((args, kwargs, grid))
        return types.SimpleNamespace(run=lambda *a: launches.append(a),
                                     function=f"binary{len(runs)}", packed_metadata="meta")

    fn.run = run
    return fn, runs, launches


def test_a_repeated_call_hits_and_launches_the_recorded_binary(fake_device):
    fn, runs, launches = _recording_kernel()
    fast = fast_launch.FastLauncher(fn)
    x, out = torch.empty(8), torch.empty(8)
    first = fast[(3,)](x, out, 8, 0.5, BLOCK=4, num_warps=2)
    assert (len(runs), fast.misses, fast.hits) == (1, 1, 0)
    again = fast[(3,)](x, out, 8, 0.5, BLOCK=4, num_warps=2)
    assert again is first and (len(runs), fast.hits) == (1, 1)
    assert launches == [(3, 1, 1, 77, "binary1", "meta", None, None, None, x, out, 8, 0.5, 4)]


# Each differs from the first call in one thing Triton's specialisation reads.
_NEW_KEYS = [
    ("misaligned pointer", lambda x, out: ((x[1:], out, 8, 0.5), {"BLOCK": 4})),
    ("other dtype", lambda x, out: ((x.half(), out, 8, 0.5), {"BLOCK": 4})),
    ("int not a multiple of 16", lambda x, out: ((x, out, 9, 0.5), {"BLOCK": 4})),
    ("int equal to 1", lambda x, out: ((x, out, 1, 0.5), {"BLOCK": 4})),
    ("int past int32", lambda x, out: ((x, out, 2**32, 0.5), {"BLOCK": 4})),
    ("int past int64", lambda x, out: ((x, out, 2**63 + 16, 0.5), {"BLOCK": 4})),
    ("bool for an int", lambda x, out: ((x, out, True, 0.5), {"BLOCK": 4})),
    ("other constexpr", lambda x, out: ((x, out, 8, 0.5), {"BLOCK": 8})),
    ("constexpr of another type", lambda x, out: ((x, out, 8, 0.5), {"BLOCK": 4.0})),
    ("an option", lambda x, out: ((x, out, 8, 0.5), {"BLOCK": 4, "num_warps": 8})),
]


@pytest.mark.parametrize("why, call", _NEW_KEYS, ids=[w for w, _ in _NEW_KEYS])
def test_a_new_specialisation_goes_through_triton(fake_device, why, call):
    fn, runs, _ = _recording_kernel()
    fast = fast_launch.FastLauncher(fn)
    x, out = torch.empty(16), torch.empty(16)
    fast[(1,)](x, out, 16, 0.5, BLOCK=4)
    args, kwargs = call(x, out)
    fast[(1,)](*args, **kwargs)
    assert fast.misses == 2, why
    fast[(1,)](*args, **kwargs)
    assert (fast.misses, fast.hits, len(runs)) == (2, 1, 2), why


def test_values_that_specialise_alike_share_a_key(fake_device):
    fn, runs, _ = _recording_kernel()
    fast = fast_launch.FastLauncher(fn)
    x, out = torch.empty(64), torch.empty(64)
    fast[(1,)](x, out, 16, 0.5, BLOCK=4)
    fast[(2,)](x[16:], torch.empty(64), 4096, -3.0, BLOCK=4)  # aligned, % 16, fp32
    assert (fast.misses, fast.hits, len(runs)) == (1, 1, 1)


def test_unkeyed_arguments_and_hooks_fall_back_to_triton(fake_device):
    fn, runs, _ = _recording_kernel()
    fast = fast_launch.FastLauncher(fn)
    x, out = torch.empty(8), torch.empty(8)
    for _ in range(2):
        fast[(1,)](x, out, (8,), 0.5, BLOCK=4)  # a tuple: not keyed
    assert (fast.fallbacks, fast.hits, len(runs)) == (2, 0, 2)
    fast[(1,)](x, out, 8, 0.5, BLOCK=4)
    fast[(1,)](x, out, 8, 0.5, BLOCK=4)
    assert fast.hits == 1
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        fast[(1,)](x, out, 8, 0.5, BLOCK=4)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert (fast.fallbacks, fast.hits) == (3, 1)
    fn.pre_run_hooks.append(hook)
    fast[(1,)](x, out, 8, 0.5, BLOCK=4)
    assert (fast.fallbacks, fast.hits) == (4, 1)


def test_a_callable_grid_sees_the_bound_parameters(fake_device):
    fn, _, launches = _recording_kernel()
    fast = fast_launch.FastLauncher(fn)
    x, out = torch.empty(8), torch.empty(8)
    grid = lambda meta: (meta["n"] // meta["BLOCK"], 2)  # noqa: E731
    fast[grid](x, out, 32, 0.5, BLOCK=4)
    fast[grid](x, out, 32, 0.5, BLOCK=4)
    assert launches[-1][:3] == (8, 2, 1)


def test_a_changed_global_is_an_error_as_in_triton(fake_device):
    fn, _, _ = _recording_kernel()
    fast = fast_launch.FastLauncher(fn)
    x, out = torch.empty(8), torch.empty(8)
    fast[(1,)](x, out, 8, 0.5)
    scope = {"LIMIT": 3}
    fn.used_global_vals = {("LIMIT", id(scope)): (3, scope)}
    fast[(1,)](x, out, 8, 0.5)
    scope["LIMIT"] = 4
    with pytest.raises(RuntimeError, match="LIMIT has changed"):
        fast[(1,)](x, out, 8, 0.5)
    # Recorded as a constexpr of the module's int: equal, never the same object.
    scope["LIMIT"] = 3
    fn.used_global_vals = {("LIMIT", id(scope)): (tl.constexpr(3), scope)}
    fast[(1,)](x, out, 8, 0.5)
    fast[(1,)](x, out, 8, 0.5)  # the object found equal is remembered
    scope["LIMIT"] = 5
    with pytest.raises(RuntimeError, match="LIMIT has changed"):
        fast[(1,)](x, out, 8, 0.5)


def test_launcher_is_the_kernel_itself_where_the_fast_path_does_not_apply(monkeypatch):
    fn = JITFunction(_square)
    monkeypatch.setattr(fast_launch, "unavailable", lambda: None)
    assert isinstance(fast_launch.launcher(fn), fast_launch.FastLauncher)
    assert fast_launch.launcher(fn) is fast_launch.launcher(fn)
    interpreted = types.SimpleNamespace()  # the interpreter's kernels are no JITFunction
    assert fast_launch.launcher(interpreted) is interpreted
    monkeypatch.setattr(fast_launch, "enabled", False)
    assert fast_launch.launcher(fn) is fn
    monkeypatch.setattr(fast_launch, "enabled", True)
    monkeypatch.setattr(fast_launch, "unavailable", lambda: "no CUDA device")
    assert fast_launch.launcher(fn) is fn
    monkeypatch.setattr(fast_launch, "unavailable", lambda: None)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fast_launch.launcher(fn) is fn  # torch.compile traces the kernel launch itself


def test_available_on_a_cuda_device_with_this_triton(monkeypatch):
    # What `unavailable` reads of Triton's internals exists here; only the device is faked.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = types.SimpleNamespace(active=type("CudaDriver", (), {})())
    monkeypatch.setattr(fast_launch, "driver", cuda)
    assert fast_launch.unavailable.__wrapped__() is None
    monkeypatch.setattr(fast_launch, "driver", types.SimpleNamespace(active=object()))
    assert "driver" in fast_launch.unavailable.__wrapped__()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "interpreter" in fast_launch.unavailable.__wrapped__()


def test_unavailable_without_a_gpu_or_under_the_interpreter():
    if torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET"):
        assert fast_launch.unavailable() is None
    else:
        assert fast_launch.unavailable() is not None


# Decode (direct path), mid M (plan path, pointer tiles), prefill (TMA Triton GEMMs:
# unkeyed, so Triton's path), fp8 per-tensor decode and prefill, expert parallelism.
_GPU_CALLS = [("bf16", 1), ("bf16", 3), ("bf16", 64), ("bf16", 2048), ("fp8_tensor", 1),
              ("fp8_tensor", 64), ("fp8_block", 512), ("bf16-ep", 5)]


@pytest.mark.gpu
@pytest.mark.parametrize("what, M", _GPU_CALLS, ids=[f"{w}-M{m}" for w, m in _GPU_CALLS])
def test_fast_path_outputs_are_bitwise_tritons_gpu(what, M, monkeypatch):
    assert fast_launch.unavailable() is None
    monkeypatch.setattr(replay, "enabled", False)  # launches, not replays (test_replay.py)
    E, k, H, I = 64, 8, 1024, 512
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    ids, weights = random_routing(M, E, k, device="cuda", seed=M)
    kwargs = {}
    if what.startswith("fp8"):
        scheme = QuantScheme.parse(what)
        q13, q2 = (quantize_weight(w.float(), scheme.weight) for w in (w13, w2))
        call = lambda out: moekit.fused_experts_fp8(hidden, q13, q2, ids, weights,  # noqa: E731
                                                    scheme=scheme, out=out)
    else:
        if what.endswith("ep"):  # global ids over 2E experts, this rank holding the odd ones
            kwargs["expert_map"] = torch.full((2 * E,), -1, dtype=torch.int32, device="cuda")
            kwargs["expert_map"][1::2] = torch.arange(E, dtype=torch.int32, device="cuda")
            ids = ids * 2 + 1
        call = lambda out: moekit.fused_experts(hidden, w13, w2, ids, weights,  # noqa: E731
                                                out=out, **kwargs)
    outs = []
    for fast in (False, True, True):  # Triton's path; the fast path's misses; its hits
        monkeypatch.setattr(fast_launch, "enabled", fast)
        poison_cuda_cache()
        out = poison_(torch.empty_like(hidden))
        call(out)
        torch.cuda.synchronize()
        outs.append(out)
    assert not outs[0].isnan().any()
    for out in outs[1:]:
        assert torch.equal(out.view(torch.int16), outs[0].view(torch.int16))
    assert sum(f.hits for f in fast_launch._LAUNCHERS.values()) > 0


# ------------------------------------------------ the keys against Triton's, every kernel


def test_fast_keys_imply_tritons_keys_for_every_kernel():
    report = worker_report(__file__)
    assert not report["violations"], "\n".join(report["violations"][:5])
    kernels = report["kernels"]
    # Every kernel the library launches from a public op was keyed, Gluon's too.
    expected = {"_gemm1_ws_kernel", "_gemm2_ws_kernel", "_gemm1_ws16_kernel", "_gemm2_ws16_kernel",
                "_direct_gemm1_kernel", "_direct_gemm2_kernel", "_gemm1_kernel",
                "_gemm2_kernel", "_combine_kernel", "_place_pairs_kernel",
                "_count_pairs_kernel", "_scan_counts_kernel", "_local_ids_kernel",
                "_route_kernel", "_permute_kernel", "_unpermute_kernel",
                "_quantize_rows_kernel", "_amax_partials_kernel", "_gemm1_fp8_kernel",
                "_gemm2_fp8_kernel", "_direct_gemm1_fp8_kernel", "_direct_gemm2_fp8_kernel"}
    keyed = {name for name, k in kernels.items() if k["fast_keys"]}
    assert expected <= keyed, sorted(expected - keyed)
    # The variants did move the Triton key: several binaries per kernel, told apart.
    assert all(k["triton_keys"] >= 4 for name, k in kernels.items() if name in expected)


def _key_variants(args: list, kwargs: dict):
    """The launch, and copies moved across each specialisation edge one argument at a time."""
    yield args, kwargs
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            flat = a.reshape(-1)
            other = torch.empty(1, dtype=torch.float16 if a.is_floating_point() else torch.int64)
            for moved in ((flat[1:], flat[8:], other) if flat.numel() > 8 else (other,)):
                yield args[:i] + [moved] + args[i + 1:], kwargs
        elif type(a) is int:
            for v in (0, 1, 2, 16, 17, 2**31 - 16, 2**31, 2**40 + 1, 2**63, -16, True, 16.0):
                yield args[:i] + [v] + args[i + 1:], kwargs
        elif hasattr(a, "block_shape"):  # a TMA descriptor (Triton's or Gluon's)
            for moved in _other_descriptors(a):
                yield args[:i] + [moved] + args[i + 1:], kwargs
    for name, v in kwargs.items():
        for other in _other_values(v):
            yield args, {**kwargs, name: other}
    yield args, {**kwargs, "debug": True}


def _other_descriptors(d) -> list:
    """`d` with another base dtype, block shape, layout, padding; and with another shape
    and strides (which Triton does not specialise on: both keys must stay)."""
    from triton.experimental.gluon import language as gl

    other = torch.empty(64, 64, dtype=torch.float16 if d.base.dtype != torch.float16
                        else torch.bfloat16)
    block = [2 * d.block_shape[0], *d.block_shape[1:]]
    out = [dataclasses.replace(d, base=other), dataclasses.replace(d, block_shape=block),
           dataclasses.replace(d, shape=[s + 16 for s in d.shape],
                               strides=[s * 2 for s in d.strides[:-1]] + [1]),
           dataclasses.replace(d, padding="nan" if d.padding == "zero" else "zero")]
    if hasattr(d, "layout"):
        layout = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=16, rank=2)
        out += [dataclasses.replace(d, layout=layout),
                dataclasses.replace(d, base=other, layout=d.layout)]
    return out


def _other_values(v) -> list:
    """Another value, and a value of another type, for a constexpr or option valued `v`."""
    if type(v) is bool:
        return [not v, int(v)]
    if type(v) is int:
        return [v * 2, float(v)]
    return {str: ["relu2"], type(None): ["ieee"]}.get(type(v), [])


def _worker() -> None:
    """Record every case's launches (test_sm90_compile's table), key each launch's variants
    both ways, and print one JSON line: per kernel counts, and any fast key that maps to
    two Triton keys."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    import test_sm90_compile as sm90

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders, fasts, seen = {}, {}, {}
    kernels, violations = {}, []

    def triton_key(fn, args, kwargs):
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        _, specialization, options = binders[fn](*args, **kwargs)
        return compute_cache_key({}, specialization, options)

    for case in sm90.CASES:
        launches = []
        with sm90._recording_launches(launches):
            sm90._BUILDERS[case.op](case.params)
        for fn, args, kwargs in launches:
            fast = fasts.setdefault(fn, fast_launch.FastLauncher(fn))
            counts = kernels.setdefault(fn.__name__, {"variants": 0, "fast_keys": 0,
                                                      "triton_keys": 0, "unkeyed": 0})
            mine = seen.setdefault(fn, {})
            for v_args, v_kwargs in _key_variants(list(args), dict(kwargs)):
                counts["variants"] += 1
                try:
                    key = fast.key(tuple(v_args), v_kwargs)[2]
                    hash(key)
                except TypeError:
                    key = None
                if key is None:
                    counts["unkeyed"] += 1
                    continue
                try:
                    theirs = triton_key(fn, v_args, v_kwargs)
                except Exception:  # noqa: BLE001 - Triton rejects it: so would the launch
                    continue
                if key not in mine:
                    mine[key] = theirs
                    counts["fast_keys"] += 1
                elif mine[key] != theirs:
                    violations.append(f"{fn.__name__} ({case.id}): one fast key, two Triton "
                                      f"keys:\n{mine[key]}\n{theirs}")
            counts["triton_keys"] = len(set(mine.values()))
    print(json.dumps({"kernels": kernels, "violations": violations}))


if __name__ == "__main__":
    sys.path.insert(0, _HERE)
    _worker()
