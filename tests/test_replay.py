"""Replayed eager calls (`moekit._replay`): a replay launches what the full op would.

What could go wrong silently is a replay that launches other kernels, grids or scalars
than the op would for the new arguments, or a pointer that is not the new argument's.
So a worker subprocess (kernels as JITFunctions, not interpreted; launches recorded, not
run) takes every experts, fp8 and route case of `test_sm90_compile.py`, calls the op three
times with fresh tensors (plainly, recording, replaying) and once more in full on the last
call's tensors, and compares the two launch lists and results with each pointer written as
"argument i + offset" or "buffer j (in order of first use, its size) + offset". The CPU
unit tests below cover the keys and the refusals; the GPU tests compare outputs bitwise.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

import moekit
import moekit._launch as fast_launch
import moekit._replay as replay
import moekit._tile_order
import moekit.layer as layer_module
from helpers import (
    poison_,
    poison_cuda_cache,
    random_experts,
    random_routing,
    worker_report,
)
from moekit.quant import QuantScheme, quantize_weight

_HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------ a fake kernel on the CPU


def _add(x_ptr, out_ptr, n, scale, BLOCK=4):
    pass  # never compiled: the fake `run` below stands in for Triton's


class _Kernels:
    """Two JITFunctions whose Triton `run` returns a fake compiled kernel; every launch,
    by Triton's path or the fast path's `kernel.run`, lands in `launches`."""

    def __init__(self):
        self.launches: list[tuple] = []
        self.first, self.second = JITFunction(_add), JITFunction(_add)
        for fn in (self.first, self.second):
            fn.run = self._run(fn)

    def _run(self, fn):
        def run(*args, grid, warmup, **kwargs):
            name = "first" if fn is self.first else "second"
            kernel = types.SimpleNamespace(function=name, packed_metadata="meta")
            kernel.run = lambda gx, gy, gz, stream, function, packed, a, b, c, *params: \
                self.launches.append((function, (gx, gy, gz), *map(_ptr, params)))
            kernel.run(*grid, *([1] * (3 - len(grid))), 77, name, "meta", None, None, None,
                       *args, *kwargs.values())
            return kernel
        return run


def _ptr(p):
    return p.data_ptr() if isinstance(p, torch.Tensor) else int(p) if type(p) is replay._Pointer \
        else p


@pytest.fixture
def kernels(monkeypatch):
    """The fast path and replays as on a GPU (device 0, stream 77, nothing captured)."""
    monkeypatch.setattr(fast_launch, "unavailable", lambda: None)
    monkeypatch.setattr(fast_launch, "_current_device", lambda: 0)
    monkeypatch.setattr(fast_launch, "_current_stream", lambda device: 77)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(replay, "enabled", True)
    monkeypatch.setattr(fast_launch, "enabled", True)
    return _Kernels()


def _op(kernels, *, extra=None):
    """An op in the library's style: a buffer, two launches, one reading the other's
    output and a view of its input; `extra(x)` runs in the middle if given."""
    calls = []

    @replay.replayed
    def op(x, scale=0.5, out=None):
        calls.append(1)
        n = x.shape[0]
        mid = torch.empty(n, dtype=x.dtype, device=x.device)
        if out is None:
            out = torch.empty_like(x)
        fast_launch.launcher(kernels.first)[(n // 4,)](x[1:], mid, n - 1, scale, BLOCK=4)
        if extra is not None:
            extra(x)
        fast_launch.launcher(kernels.second)[(2,)](mid, out, n, scale, BLOCK=8)
        return out

    return op, calls


def test_a_third_call_replays_the_seconds_launches_on_its_own_tensors(kernels):
    op, calls = _op(kernels)
    x1, x2 = torch.randn(16), torch.randn(16)
    op(x1)  # plainly
    op(x1)  # recorded
    kernels.launches.clear()
    with _Allocations() as allocations:
        out = op(x2)
    assert len(calls) == 2, "the third call ran the op"
    assert isinstance(out, torch.Tensor) and out.shape == x2.shape and out.dtype == x2.dtype
    (f1, g1, xa, mid, n, s, b), (f2, g2, mid2, o, n2, s2, b2) = kernels.launches
    assert (f1, g1, n, s, b, f2, g2, n2, s2, b2) == \
        ("first", (4, 1, 1), 15, 0.5, 4, "second", (2, 1, 1), 16, 0.5, 8)
    assert xa == x2.data_ptr() + 4  # x2[1:]
    assert mid == mid2 and o == out.data_ptr()
    assert sorted(start for start, _ in allocations.spans) == sorted((mid, o))  # new buffers
    for given in (torch.empty(16), torch.empty(16), torch.empty(16)):
        assert op(x2, out=given) is given and kernels.launches[-1][3] == given.data_ptr()
    assert len(calls) == 4  # the new key's first two calls


_NEW_KEYS = [
    ("shape", lambda x: ((torch.randn(32),), {})),
    ("dtype", lambda x: ((x.double(),), {})),
    ("stride", lambda x: ((torch.randn(16, 2)[:, 0],), {})),
    ("alignment", lambda x: ((torch.randn(17)[1:],), {})),
    ("a float's value", lambda x: ((x,), {"scale": 0.25})),
    ("a keyword given", lambda x: ((x,), {"out": torch.empty(16)})),
]


@pytest.mark.parametrize("why, call", _NEW_KEYS, ids=[w for w, _ in _NEW_KEYS])
def test_a_new_call_key_records_again(kernels, why, call):
    op, calls = _op(kernels)
    x = torch.randn(16)
    for _ in range(3):
        op(torch.randn(16))
    assert len(calls) == 2
    args, kwargs = call(x)
    for _ in range(3):
        op(*args, **kwargs)
    assert len(calls) == 4, why  # a plain call and a recording: the old one did not serve
    op(x)
    assert len(calls) == 4, why


def test_the_gluon_switch_is_part_of_the_key(kernels, monkeypatch):
    op, calls = _op(kernels)
    x = torch.randn(16)
    for _ in range(3):
        op(x)
    monkeypatch.setenv("MOEKIT_GLUON", "0")
    for _ in range(3):
        op(x)
    assert len(calls) == 4
    prefetch = moekit._gluon.PREFETCH_TILES
    monkeypatch.setattr(moekit._gluon, "PREFETCH_TILES", not prefetch)
    for _ in range(3):
        op(x)
    assert len(calls) == 6
    order = moekit._tile_order.FORCED
    monkeypatch.setattr(moekit._tile_order, "FORCED", not order)
    for _ in range(3):
        op(x)
    assert len(calls) == 8  # the tile order too: a plain call and a recording
    monkeypatch.setenv("MOEKIT_GLUON_TILE_PROGRAMS", "1")  # read at each launch: the grid
    for _ in range(3):
        op(x)
    assert len(calls) == 10
    monkeypatch.setenv("MOEKIT_GLUON_GEMM1", "0")  # the fp8 GEMM1's kernel
    for _ in range(3):
        op(x)
    assert len(calls) == 12
    monkeypatch.delenv("MOEKIT_GLUON_GEMM1")
    monkeypatch.delenv("MOEKIT_GLUON_TILE_PROGRAMS")
    monkeypatch.delenv("MOEKIT_GLUON")
    monkeypatch.setattr(moekit._gluon, "PREFETCH_TILES", prefetch)
    monkeypatch.setattr(moekit._tile_order, "FORCED", order)
    op(x)  # the first settings' recording again
    assert len(calls) == 12


def _fill(x):
    torch.zeros(4).fill_(1.0)


@pytest.mark.parametrize("why, extra, refuses", [
    ("an aten op besides allocations and views", _fill, True),
    ("views only", lambda x: x[2:].view(2, 7), False),
])
def test_ops_other_than_allocations_and_views_are_never_replayed(kernels, why, extra, refuses):
    op, calls = _op(kernels, extra=extra)
    for _ in range(4):
        op(torch.randn(16))
    assert len(calls) == (4 if refuses else 2), why


def test_a_launch_on_tritons_own_path_is_never_replayed(kernels):
    op, calls = _op(kernels)
    for _ in range(3):  # a tuple argument: in the call key, but not in the fast path's
        op(torch.randn(16), scale=(1, 2))
    assert len(calls) == 3


def test_arguments_sharing_a_storage_are_never_replayed(kernels):
    op, calls = _op(kernels)
    buf = torch.randn(32)
    for _ in range(3):  # out and x on one storage: a view's source is ambiguous
        op(buf[:16], out=buf[16:])
    assert len(calls) == 3


def test_a_returned_view_or_foreign_tensor_is_never_replayed(kernels):
    calls = []

    @replay.replayed
    def op(x):
        calls.append(1)
        out = torch.empty(8, 2)
        fast_launch.launcher(kernels.first)[(1,)](x, out, 16, 0.5, BLOCK=4)
        return out.view(16)

    for _ in range(3):
        op(torch.randn(16))
    assert len(calls) == 3


class _Subclass(torch.Tensor):
    pass


def test_unkeyable_arguments_capture_compile_and_switches_run_in_full(kernels, monkeypatch):
    op, calls = _op(kernels)
    x = torch.randn(16)
    op(x)
    op(x)
    op(x, scale=[1.0])  # unhashable
    assert len(calls) == 3
    sub = torch.randn(16).as_subclass(_Subclass)
    op(sub)
    op(sub)
    op(sub)
    assert len(calls) == 6 and len(op.replays) == 1  # a subclass: neither keyed nor held
    calls[3:] = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    op(x)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(replay, "enabled", False)
    op(x)
    monkeypatch.setattr(replay, "enabled", True)
    monkeypatch.setattr(fast_launch, "enabled", False)
    op(x)
    monkeypatch.setattr(fast_launch, "enabled", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    op(x)
    assert len(calls) == 7
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    op(x)
    assert len(calls) == 7
    replay.clear()
    op(x)
    assert len(calls) == 8


def test_a_replayed_op_inside_a_recording_runs_in_full(kernels):
    inner, inner_calls = _op(kernels)
    outer_calls = []

    @replay.replayed
    def outer(x):
        outer_calls.append(1)
        return inner(x)

    for _ in range(4):
        outer(torch.randn(16))
    assert (len(outer_calls), len(inner_calls)) == (2, 2)
    assert list(inner.replays.values()) == [replay._SEEN], "the inner op recorded inside"


def test_a_hook_installed_after_recording_runs_the_op_in_full(kernels):
    op, calls = _op(kernels)
    op(torch.randn(16))
    op(torch.randn(16))
    kernels.first.pre_run_hooks.append(lambda *a, **k: None)
    try:
        op(torch.randn(16))
    finally:
        kernels.first.pre_run_hooks.clear()
    assert len(calls) == 3
    op(torch.randn(16))
    assert len(calls) == 3


# ------------------------------------ every experts and route case: replay ≡ the full op


def test_replays_launch_what_the_full_op_would_for_every_case():
    report = worker_report(__file__)
    assert not report["mismatches"], "\n".join(report["mismatches"][:3])
    cases = report["cases"]
    assert len(cases) > 50 and sum(case.startswith("route-") for case in cases) >= 7
    assert sum(case.startswith("moe-") for case in cases) == len(_MOE_CASES)
    # Every 16-bit, route and fused_moe(_fp8) case replays; fp8 ones with static input scales (one
    # tensor for both GEMMs here) or the router weight on the input (a multiply) run in full.
    refused = sorted(case for case, state in cases.items() if state != "replayed")
    assert all(case.startswith("fp8-") for case in refused), refused
    assert len(refused) <= 6, refused


class _Allocations(TorchDispatchMode):
    """Every buffer allocated while active: (address, bytes)."""

    def __init__(self):
        super().__init__()
        self.spans: list[tuple[int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in replay._ALLOCATIONS:
            self.spans.append((out.data_ptr(), out.untyped_storage().nbytes()))
        return out


def _normalised(launches: list, pointers: list, inputs: list[torch.Tensor], spans: list,
                result) -> list:
    """Launches, then the op's result, with each address as ("arg", i, offset) or ("buffer",
    j, bytes, offset), buffers numbered in order of first use; `pointers[n][i]` says whether
    parameter i of launch n is a pointer (a tensor where the op ran in full: a replay passes
    an int)."""
    order: dict[int, int] = {}

    def where(ptr: int):
        if ptr == 0:
            return 0  # an empty view: a null pointer either way
        for i, t in enumerate(inputs):
            base, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if size and base <= ptr < base + size:
                return ("arg", i, ptr - t.data_ptr())
        for start, size in spans:
            if start <= ptr < start + max(size, 1):
                return ("buffer", order.setdefault(start, len(order)), size, ptr - start)
        return ("unknown", ptr)

    out = []
    for n, (function, grid, params) in enumerate(launches):
        mask = pointers[n] if n < len(pointers) else []
        items = []
        for i, p in enumerate(params):
            if i < len(mask) and mask[i]:
                items.append(where(_ptr(p)))
            elif hasattr(p, "base") and hasattr(p, "strides"):  # a TMA descriptor
                items.append(("desc", where(p.base.data_ptr()), list(p.shape), list(p.strides),
                              p.padding))
            else:
                items.append(p)
        out.append((function, grid, items))

    def returned(r):
        if isinstance(r, tuple):
            return type(r).__name__, [returned(item) for item in r]
        return None if r is None else (where(r.data_ptr()), tuple(r.shape), r.dtype)

    return out + [("returned", returned(result))]


def _scratch_apart(spans: list, recorded) -> list:
    """A replay's allocations (its returned buffers, then one workspace: the last ones) as
    the buffers the op allocates: the workspace split at the replay's recorded places."""
    if recorded.workspace is None:
        return spans
    n = len(spans) - len(recorded.owned) - 1  # before them: the case's inputs, built
    others, owned, (start, nbytes) = spans[:n], spans[n:-1], spans[-1]
    assert nbytes == recorded.workspace[0], spans
    scratch = [(start + offset, size) for i, offset, size in recorded.places if i < 0]
    ends = sorted((s, s + n) for s, n in scratch)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends)), "scratch buffers overlap"
    assert all(s % 16 == 0 for s, _ in scratch) and ends[-1][1] <= start + nbytes
    return others + owned + scratch


# fused_moe and fused_moe_fp8 (route + experts, replayed as one): the direct path, the
# grouped GEMMs with biases, expert parallelism.
_MOE_CASES = {"direct-M1": dict(M=1, E=32, k=4), "grouped-M64-bias": dict(M=64, E=8, k=2,
              bias=True), "ep-M5": dict(M=5, E=8, k=2, expert_map=True),
              "fp8-block-direct-M1": dict(M=1, E=32, k=4, scheme="fp8_block"),
              "fp8-tensor-ep-M64": dict(M=64, E=8, k=2, expert_map=True, scheme="fp8_tensor")}


def _run_moe(M: int, E: int, k: int, bias: bool = False, expert_map: bool = False,
             scheme: str | None = None):
    H, I, dtype = 256, 128, torch.bfloat16
    table = None
    if expert_map:  # this rank holds the even global experts of 2E
        table = torch.full((2 * E,), -1, dtype=torch.int32)
        table[::2] = torch.arange(E, dtype=torch.int32)
    w13, w2 = torch.randn(E, 2 * I, H, dtype=dtype), torch.randn(E, H, I, dtype=dtype)
    args = (torch.empty(M, H, dtype=dtype), torch.empty(M, E if table is None else 2 * E))
    biases = dict(b13=torch.empty(E, 2 * I, dtype=dtype) if bias else None,
                  b2=torch.empty(E, H, dtype=dtype) if bias else None)
    if scheme is None:
        moekit.fused_moe(*args, w13, w2, k, **biases, expert_map=table, backend="triton")
        return
    spec = QuantScheme.parse(scheme).weight
    moekit.fused_moe_fp8(*args, quantize_weight(w13, spec), quantize_weight(w2, spec), k,
                         scheme=scheme, **biases, expert_map=table, backend="triton")


def _worker() -> None:
    """Each experts, fp8, route and fused_moe case: record, replay on new tensors, run
    those in full; print one JSON line with each case's state and any replay that
    launched differently."""
    import moekit.experts
    import moekit.experts_fp8
    import test_sm90_compile as sm90

    fast_launch.unavailable = lambda: None
    fast_launch._current_device = lambda: 0
    fast_launch._current_stream = lambda device: 77
    torch.cuda.is_current_stream_capturing = lambda: False
    launches: list = []

    def stub_run(self, *args, grid, warmup, **kwargs):
        def run(gx, gy, gz, stream, function, packed, a, b, c, *params):
            launches.append((function, (gx, gy, gz), list(params)))
        return types.SimpleNamespace(run=run, function=self.__name__, packed_metadata="meta")

    ops = {"experts": moekit.fused_experts, "fp8": moekit.fused_experts_fp8,
           "route": moekit.route, "moe": moekit.fused_moe, "moe_fp8": moekit.fused_moe_fp8}
    builds = [(case.id, case.op, functools.partial(sm90._BUILDERS[case.op], case.params))
              for case in sm90.CASES if case.op in ops]
    builds += [(f"moe-{name}", "moe_fp8" if "scheme" in p else "moe",
                functools.partial(_run_moe, **p)) for name, p in _MOE_CASES.items()]
    calls, results = [], []

    def capturing(op):
        def call(*args, **kwargs):
            calls.append((args, kwargs))
            results.append(ops[op](*args, **kwargs))
            return results[-1]
        return call

    cases, mismatches = {}, []
    with sm90._recording_launches([]):
        JITFunction.run = stub_run
        moekit.fused_experts, moekit.fused_experts_fp8 = capturing("experts"), capturing("fp8")
        moekit.route, moekit.fused_moe = capturing("route"), capturing("moe")
        moekit.fused_moe_fp8 = capturing("moe_fp8")
        for case_id, op, build in builds:
            replay.clear()
            build()  # plainly
            build()  # records
            states = list(ops[op].replays.values())
            cases[case_id] = ("refused" if states == [replay._NOT_REPLAYABLE] else
                              "replayed" if len(states) == 1 else f"{len(states)} keys")
            if cases[case_id] == "refused":
                continue  # runs in full every time: nothing to compare
            raw, recorded = [], states[0]
            for replaying in (True, False):  # the second call's tensors, replayed then in full
                launches.clear()
                replay.enabled = replaying
                with _Allocations() as allocations:
                    if replaying:
                        build()
                    else:
                        results.append(ops[op](*calls[-1][0], **calls[-1][1]))
                spans = allocations.spans
                if replaying:
                    spans = _scratch_apart(spans, recorded)
                raw.append((list(launches), spans, results[-1]))
            replay.enabled = True
            inputs = ops[op].call_keys(*calls[-1])[1]
            pointers = [[isinstance(p, torch.Tensor) for p in params] for _, _, params in raw[1][0]]
            runs = [_normalised(ls, pointers, inputs, spans, r) for ls, spans, r in raw]
            if runs[0] != runs[1]:
                pairs = enumerate(zip(*runs, strict=False))
                first = next((i for i, (a, b) in pairs if a != b), min(map(len, runs)))
                mismatches.append(f"{case_id}: launch {first}: replayed "
                                  f"{runs[0][first:first + 1]}, in full {runs[1][first:first + 1]}")
    print(json.dumps({"cases": cases, "mismatches": mismatches}))


# ------------------------------------------------------------ outputs on the GPU, bitwise


_GPU_CALLS = [("bf16", 1), ("bf16", 3), ("bf16", 64), ("bf16", 2048), ("fp8_tensor", 1),
              ("fp8_tensor", 64), ("fp8_block", 512), ("fp8_tensor", 2048), ("bf16-ep", 5)]


@pytest.mark.gpu
@pytest.mark.parametrize("what, M", _GPU_CALLS, ids=[f"{w}-M{m}" for w, m in _GPU_CALLS])
@pytest.mark.parametrize("given_out", [True, False], ids=["out", "no_out"])
def test_replayed_outputs_are_bitwise_the_full_ops_gpu(what, M, given_out, monkeypatch):
    assert fast_launch.unavailable() is None
    E, k, H, I = 64, 8, 1024, 512
    w13, w2, _, _ = random_experts(E, H, I, dtype=torch.bfloat16, device="cuda")
    kwargs = {}
    if what.startswith("fp8"):
        scheme = QuantScheme.parse(what)
        q13, q2 = (quantize_weight(w.float(), scheme.weight) for w in (w13, w2))
        op = lambda h, i, w, **kw: moekit.fused_experts_fp8(h, q13, q2, i, w,  # noqa: E731
                                                             scheme=scheme, **kw)
    else:
        if what.endswith("ep"):  # global ids over 2E experts, this rank holding the odd ones
            kwargs["expert_map"] = torch.full((2 * E,), -1, dtype=torch.int32, device="cuda")
            kwargs["expert_map"][1::2] = torch.arange(E, dtype=torch.int32, device="cuda")
        op = lambda h, i, w, **kw: moekit.fused_experts(h, w13, w2, i, w, **kw)  # noqa: E731
    replay.clear()
    for step in range(4):  # plainly, recorded, then replayed twice, each on new tokens
        hidden = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
        ids, weights = random_routing(M, E, k, device="cuda", seed=100 * M + step)
        if what.endswith("ep"):
            ids = ids * 2 + 1
        outs = []
        for replaying in (True, False):
            monkeypatch.setattr(replay, "enabled", replaying)
            poison_cuda_cache()
            out = poison_(torch.empty_like(hidden)) if given_out else None
            result = op(hidden, ids, weights, out=out, **kwargs)
            assert result is out or not given_out
            torch.cuda.synchronize()
            outs.append(result)
        assert not outs[1].isnan().any()
        assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), step
    cache = (moekit.fused_experts_fp8 if what.startswith("fp8") else moekit.fused_experts).replays
    assert any(isinstance(v, replay._Replay) for v in cache.values()), "nothing replayed"


_ROUTES = [("softmax", {}), ("sigmoid", dict(n_group=8, topk_group=4, routed_scaling_factor=2.5,
                                             bias=True)), ("packed", {})]


@pytest.mark.gpu
@pytest.mark.parametrize("method, extra", _ROUTES, ids=[m for m, _ in _ROUTES])
def test_replayed_routes_are_bitwise_the_full_ops_gpu(method, extra, monkeypatch):
    E, k = 256 if method == "sigmoid" else 128, 8
    extra = dict(extra)
    bias = torch.randn(E, device="cuda") if extra.pop("bias", False) else None
    kwargs = dict(method="softmax" if method == "packed" else method,
                  packed=method == "packed", e_score_correction_bias=bias, **extra)
    replay.clear()
    for step in range(4):  # plainly, recorded, then replayed twice, each on new logits
        logits = torch.randn(3, E, device="cuda", dtype=torch.bfloat16)
        outs = []
        for replaying in (True, False):
            monkeypatch.setattr(replay, "enabled", replaying)
            poison_cuda_cache()
            result = moekit.route(logits, k, **kwargs)
            torch.cuda.synchronize()
            outs.append(result if method == "packed" else torch.cat(
                [result.ids.view(torch.float32), result.weights], 1))
        assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32)), step
    assert any(isinstance(v, replay._Replay) for v in moekit.route.replays.values()), \
        "nothing replayed"


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 64, 1024])
@pytest.mark.parametrize("quant", [None, "fp8_block"])
def test_replayed_layers_are_bitwise_the_full_ones_gpu(M, quant, monkeypatch):
    """`MoE` runs route and experts as one replayed `fused_moe` (`fused_moe_fp8`): its ids
    and weights live in the replay's workspace, never in a tensor the test could compare,
    so the layer's output is the check."""
    torch.manual_seed(M)
    layer = moekit.MoE(64, 8, 1024, 512, quant=quant, device="cuda",
                       dtype=torch.bfloat16).prepare()
    op = moekit.fused_moe if quant is None else moekit.fused_moe_fp8
    replay.clear()
    for step in range(4):  # plainly, recorded, then replayed twice, each on new tokens
        hidden = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
        outs = []
        for replaying in (True, False):
            monkeypatch.setattr(replay, "enabled", replaying)
            poison_cuda_cache()
            with torch.no_grad():
                outs.append(layer(hidden))
            torch.cuda.synchronize()
        assert not outs[1].isnan().any()
        assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16)), step
    replays = (*op.replays.values(), *layer_module._routed_experts.replays.values())
    assert any(isinstance(v, replay._Replay) for v in replays), "nothing replayed"


if __name__ == "__main__":
    sys.path.insert(0, _HERE)
    _worker()
