"""Shared test helpers: one tolerance table and an assert_close that says where it fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from moekit.routing import Routing

# Relative L2 error bounds by output dtype (DESIGN.md, "Accuracy").
REL_L2_TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5, torch.float64: 1e-12}

# DeepSeek-V3's routing in small: sigmoid over 4 groups of E / 4, 2 kept, scaled by 2.5
DEEPSEEK_LIKE = Routing("sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5)
POISON = float("nan")
BENCH_SCRIPTS = Path(__file__).parents[1] / "bench" / "scripts"


def bench_script(name: str):
    """bench/scripts/<name>.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH_SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so elements a kernel fails to write are caught."""
    if t.is_floating_point():
        return t.fill_(POISON)
    return t.fill_(-7777)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ in float64 (0 when both are zero)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None,
                 name: str = "output") -> None:
    """Fail unless the relative L2 error is within `tol` (default: by dtype); report where."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if tol is None:
        tol = REL_L2_TOL[actual.dtype]
    a, e = actual.double().cpu(), expected.double().cpu()
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values (first at {bad}); unwritten output?")
    err = rel_l2(a, e)
    if err > tol:
        diff = (a - e).abs()
        where = divmod(int(diff.argmax()), a.shape[-1]) if a.dim() >= 2 else int(diff.argmax())
        scale = e.abs().max().item() or 1.0
        raise AssertionError(
            f"{name}: relative L2 {err:.3e} > {tol:.1e}; max abs diff {diff.max().item():.3e} "
            f"(max relative to peak {diff.max().item() / scale:.3e}) at {where}"
        )


def capture_cuda_graph(call):
    """Run `call` once on a side stream (lazy initialisation, compiles), then capture it;
    returns (graph, what the captured call returned), the output replays overwrite."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    return graph, out


def poison_cuda_cache(nbytes: int = 1 << 28) -> None:
    """Leave NaN in the CUDA caching allocator's free blocks, so buffers a kernel pipeline
    allocates start poisoned and unwritten elements that are read show up as NaN.

    Every byte 0xFF: NaN read as float32, fp16, bf16 or e4m3 alike (fp16 NaN halves read
    as a float32 scale made a finite 4.2e37, which a masked-to-zero product hid)."""
    if torch.cuda.is_available():
        torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(0xFF)
        torch.cuda.synchronize()


def random_experts(num_experts, hidden, inter, *, gated=True, bias=False, dtype=torch.float32,
                   device="cpu", seed=0):
    """Weights (w13, w2, b13, b2) scaled like a trained layer, so outputs stay O(1).

    Drawn in `dtype` and scaled in place: deepseek-v3's bf16 experts drawn in fp32 and
    divided into a new tensor peaked at 63 GB (session 34), against 22.5 once held."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows = 2 * inter if gated else inter
    draw = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)
    w13 = draw(num_experts, rows, hidden).div_(hidden**0.5)
    w2 = draw(num_experts, hidden, inter).div_(inter**0.5)
    b13 = draw(num_experts, rows).mul_(0.1) if bias else None
    b2 = draw(num_experts, hidden).mul_(0.1) if bias else None
    return w13, w2, b13, b2


def seeded_randn_like(tensor, seed):
    """Standard normal values shaped like `tensor`, from a generator of its own: a test's
    inputs must not depend on what the tests its xdist worker ran before it drew."""
    g = torch.Generator(device=tensor.device).manual_seed(seed)
    return torch.randn(tensor.shape, generator=g, device=tensor.device).to(tensor.dtype)


def random_routing(num_tokens, num_experts, top_k, *, skew=0.0, device="cpu", seed=0):
    """Softmax-top-k routing of random logits; `skew` > 0 sends most tokens to few experts."""
    from moekit import reference

    g = torch.Generator(device=device).manual_seed(seed + 1)
    logits = torch.randn(num_tokens, num_experts, generator=g, device=device)
    if skew:
        logits = logits + skew * torch.linspace(1, 0, num_experts, device=device) ** 4
    return reference.route(logits, top_k, renormalize=True)


def cuda_layer_case(M, E, k, H, I, dtype, bias, skew, seed=0):
    """A random bf16/fp16 layer on the GPU: (hidden, w13, w2, b13, b2, ids, weights), every
    7th token's last pair dropped (id −1)."""
    w13, w2, b13, b2 = random_experts(E, H, I, bias=bias, dtype=dtype, device="cuda", seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 3)
    hidden = torch.randn(M, H, generator=g, device="cuda").to(dtype)
    ids, weights = random_routing(M, E, k, skew=skew, device="cuda", seed=seed)
    ids[::7, -1] = -1  # dropped pairs
    return hidden, w13, w2, b13, b2, ids, weights


def float32_reference(hidden, w13, w2, b13, b2, ids, weights, activation, on_input):
    """`reference.fused_experts` of a 16-bit layer case computed in float32."""
    from moekit import reference

    return reference.fused_experts(
        hidden.float(), w13.float(), w2.float(), ids, weights, activation=activation,
        b13=None if b13 is None else b13.float(), b2=None if b2 is None else b2.float(),
        apply_router_weight_on_input=on_input)


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace `owner.name` by a spy that records each call (a list, one entry per call:
    its positional arguments) and calls through, so a test knows which kernel ran and
    with what."""
    calls = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, spy)
    return calls


def outputs_both_ways(monkeypatch, owner, flag: str, call) -> dict:
    """`call()` (a fresh, poisoned output each time) with `owner.<flag>` False, then True:
    {False: out, True: out} — for switches that must not move a value."""
    outs = {}
    for value in (False, True):
        monkeypatch.setattr(owner, flag, value)
        poison_cuda_cache()
        outs[value] = call()
    return outs


def check_graph_replay_with_new_routing(M, E, k, H, I, config) -> None:
    """A bf16 `fused_experts` captured once in a CUDA graph, replayed after new routing is
    copied into its inputs, matches the float32 reference each time."""
    import moekit
    from moekit import reference

    hidden, w13, w2, _, _, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                          False, 0.0)
    out = torch.empty_like(hidden)
    graph, _ = capture_cuda_graph(
        lambda: moekit.fused_experts(hidden, w13, w2, ids, weights, config=config, out=out))
    for seed in (5, 6):
        new_ids, new_weights = random_routing(M, E, k, skew=2.0, device="cuda", seed=seed)
        ids.copy_(new_ids)
        weights.copy_(new_weights)
        out.fill_(float("nan"))
        graph.replay()
        expected = reference.fused_experts(hidden.float(), w13.float(), w2.float(), ids,
                                           weights)
        assert_close(out, expected, name=f"replay seed {seed}")


def check_reruns_bitwise(M, E, k, H, I, config) -> None:
    """Three reruns of a bf16 `fused_experts` on skewed routing equal the first bitwise."""
    import moekit

    hidden, w13, w2, _, _, ids, weights = cuda_layer_case(M, E, k, H, I, torch.bfloat16,
                                                          False, 0.5)
    first = moekit.fused_experts(hidden, w13, w2, ids, weights, config=config)
    for _ in range(3):
        again = moekit.fused_experts(hidden, w13, w2, ids, weights, config=config)
        assert torch.equal(again, first), "a rerun moved a value"


def exact_counts(counts):
    """ids_transform for k = 1: expert e receives exactly counts[e] tokens, shuffled."""
    def transform(ids):
        chosen = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        assert chosen.numel() == ids.numel(), "M must be the sum of counts"
        perm = torch.randperm(chosen.numel(), generator=torch.Generator().manual_seed(5))
        return chosen[perm].to(ids.dtype).reshape(ids.shape).to(ids.device)
    return transform


def worker_report(path: str) -> dict:
    """Run test file `path` as a script, kernels compiled rather than interpreted (its
    `__main__` worker records launches, runs none), and return its last line's JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
