"""`router_logits` (the router GEMM: a GEMV kernel up to 16 tokens, cuBLAS elsewhere) against
the reference, and `MoE`'s choice between it and its router module.

The kernel accumulates in fp32 and rounds once, as the reference does; only the order of
the fp32 sums differs, so outputs match to fp32 rounding before the final cast: exactly
in fp32 up to a few ulps, and in 16 bits to at most one ulp of the output dtype.
"""

import pytest
import torch

import moekit
from helpers import poison_
from moekit import reference
from moekit.layer import MoE
from moekit.routing import router_logits
from moekit.routing.logits import GEMV_ROWS, gemv_serves, gemv_shape, launch_router_logits

_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5),
              torch.float16: dict(rtol=2.0**-10, atol=1e-3),
              torch.bfloat16: dict(rtol=2.0**-7, atol=1e-2)}


def _check(M, E, H, dtype, device, row_stride=None):
    g = torch.Generator(device=device).manual_seed(M * 1000 + E + H)
    wide = torch.randn(M, row_stride or H, generator=g, device=device).to(dtype)
    hidden = wide[:, :H]  # rows at a stride wider than H when row_stride is given
    weight = (torch.randn(E, H, generator=g, device=device) / H**0.5).to(dtype)
    expected = reference.router_logits(hidden, weight)
    if not gemv_serves(M, H):  # cuBLAS's (or the CPU's) linear, as the router module computes
        out = router_logits(hidden, weight, backend="triton")
        assert torch.equal(out, torch.nn.functional.linear(hidden, weight))
    else:
        out = poison_(torch.empty(M, E, dtype=dtype, device=device))
        launch_router_logits(hidden, weight, out)
        assert not out.isnan().any(), "unwritten logits"
        torch.testing.assert_close(router_logits(hidden, weight, backend="triton"), out,
                                   rtol=0, atol=0)
    torch.testing.assert_close(out, expected, **_TOLERANCE[dtype])


# M ≤ 16: the GEMV kernel, 4, 8 or 16 rows — H in one step (64 → 64 columns, 1500 →
# 2048), one expert a program; H past 4096 columns: two experts a program (an odd E: a
# partial last pair), and past 8192 two steps, the second partial. F.linear above 16
# tokens, and at 9–16 tokens past 4096 columns (16 rows × 8192 columns a program).
_SHAPES = [(1, 8, 64), (3, 131, 1500), (4, 6, 2048), (4, 5, 5000), (2, 3, 9000),
           (5, 40, 100), (8, 5, 5000), (16, 7, 3000), (9, 5, 5000), (17, 40, 100),
           (70, 60, 72)]


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M, E, H", _SHAPES)
def test_router_logits_match_the_reference(M, E, H, dtype):
    _check(M, E, H, dtype, "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("M", [2, 11, 17], ids=["gemv4", "gemv16", "linear"])
def test_router_logits_read_strided_rows(M):
    _check(M, 40, 100, torch.float32, "cpu", row_stride=136)


def test_router_logits_check_their_arguments():
    hidden = torch.randint(-4, 5, (3, 16)).float()  # small integers: every sum exact
    with pytest.raises(ValueError, match="weight: expected"):
        router_logits(hidden, torch.randn(4, 8))
    with pytest.raises(TypeError):
        router_logits(hidden, torch.randn(4, 16, dtype=torch.float16))
    assert torch.equal(router_logits(hidden, torch.ones(4, 16)),
                       hidden.sum(1, keepdim=True).expand(3, 4))
    with pytest.raises(ValueError, match="does not serve 17 tokens"):
        launch_router_logits(torch.randn(GEMV_ROWS + 1, 16), torch.randn(4, 16),
                             torch.empty(GEMV_ROWS + 1, 4))
    with pytest.raises(ValueError, match="does not serve 9 tokens of width 5000"):
        launch_router_logits(torch.randn(9, 5000), torch.randn(4, 5000), torch.empty(9, 4))


def test_the_gemv_serves_where_it_measured_faster_than_cublas():
    """The rule of router_gemv_sweep.py on an H200 (sessions 33 and 34): deepseek-v3's
    router (H = 7168) up to 8 tokens only, narrower routers up to 16."""
    assert [gemv_serves(m, 7168) for m in (1, 4, 8, 9, 16)] == [True] * 3 + [False] * 2
    assert all(gemv_serves(m, h) for m in (1, 16) for h in (1536, 2048, 4096))
    assert not gemv_serves(GEMV_ROWS + 1, 64)
    assert gemv_shape(2048, 8) == (1, 2048, 4) and gemv_shape(2048, 16) == (1, 2048, 8)
    assert gemv_shape(7168, 8) == (2, 8192, 8) and gemv_shape(4096, 4) == (1, 4096, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("M, E, H", [(1, 128, 2048), (3, 256, 7168), (4, 8, 4096),
                                     (2, 40, 1536), (1, 7, 9000), (8, 128, 2048),
                                     (8, 256, 7168), (13, 256, 7168), (16, 64, 1024),
                                     (16, 8, 4096), (64, 40, 1536)])
def test_router_logits_match_the_reference_gpu(M, E, H, dtype):
    _check(M, E, H, dtype, "cuda")


# ------------------------------------------------ MoE: the kernel or the router module


def _layer(backend="triton"):
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return MoE(8, 2, 64, 32, backend=backend, device=device)


def _uses_kernel(layer, hidden, monkeypatch) -> bool:
    """Whether `layer(hidden)` routed with `router_topk` (the GEMV and routing kernel)."""
    calls = []
    real = moekit.layer.router_topk
    monkeypatch.setattr(moekit.layer, "router_topk",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(hidden)
    return bool(calls)


@pytest.mark.interpreter
def test_the_layer_takes_the_router_kernel_up_to_gemv_rows(monkeypatch):
    layer = _layer()
    hidden = torch.randn(GEMV_ROWS, 64)
    with torch.no_grad():
        out = layer(hidden)
        assert _uses_kernel(layer, hidden, monkeypatch)
        expected = moekit.fused_moe(hidden, layer.router(hidden), layer.w13, layer.w2, 2,
                                    backend="triton")
        torch.testing.assert_close(out, expected)
        assert not _uses_kernel(layer, torch.randn(GEMV_ROWS + 1, 64), monkeypatch), "cuBLAS"


@pytest.mark.interpreter
@pytest.mark.parametrize("why", ["grad", "hook", "pre-hook", "bias", "reference"])
def test_the_layer_runs_its_router_module_where_it_could_differ(why, monkeypatch):
    layer = _layer("reference" if why == "reference" else "triton")
    hidden = torch.randn(4, 64)
    seen = []
    if why == "hook":
        layer.router.register_forward_hook(lambda m, i, o: seen.append(1))
    if why == "pre-hook":
        layer.router.register_forward_pre_hook(lambda m, i: seen.append(1))
    if why == "bias":
        layer.router = torch.nn.Linear(64, 8, bias=True)
    with torch.set_grad_enabled(why == "grad"):
        assert not _uses_kernel(layer, hidden, monkeypatch), why
    assert seen or why not in ("hook", "pre-hook")


@pytest.mark.gpu
def test_a_layer_warmed_at_decode_captures_cublas_sizes_gpu():
    """Warm-up at M = 1 runs only the GEMV kernel; capturing M = GEMV_ROWS + 4 then runs
    the router module's first cuBLAS call inside the capture, with no warm-up of its own
    (sessions 32 and 33: such a capture failed without `_initialise_cublas`)."""
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(1, 64, device="cuda"))
        torch.cuda.synchronize()
        hidden = torch.randn(GEMV_ROWS + 4, 64, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(hidden)
        hidden.copy_(torch.randn(GEMV_ROWS + 4, 64, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer(hidden))
