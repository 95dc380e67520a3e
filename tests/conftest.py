"""Test setup: without CUDA, Triton kernels run through the CPU interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` is evaluated, so it is set here,
before moekit is imported by any test module. With CUDA the kernels compile for the GPU
instead, so the tests that run them on CPU tensors through the interpreter (marked
`interpreter`) are skipped there, and the `gpu` tests run in their place; without CUDA
the `gpu` tests are skipped.

Eager calls of the experts ops and `route` replay a recording of an earlier call with the
same argument shapes (`moekit._replay`), which cannot see functions a test monkeypatches
between two calls; so ops run in full in tests, except in test_replay.py (the replays' own
tests) and in tests/integrations (models calling the ops as a user's would, patching
nothing inside).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Every `torch.empty` on the CPU starts as NaN (integers: their maximum), so an element
    # a kernel reads before anything wrote it — a scratch row, a scale past the last group
    # — reaches the output as NaN instead of as whatever the allocator left. Deterministic
    # algorithms are what turn the fill on; warn_only keeps ops without a deterministic
    # form running.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True

_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_interpreter = pytest.mark.skip(
        reason="runs Triton kernels on CPU tensors through the interpreter, which this "
               "process does not use (TRITON_INTERPRET is set only without CUDA)")
    for item in items:
        if "gpu" in item.keywords and not _CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not _INTERPRETING:
            item.add_marker(skip_interpreter)


@pytest.fixture(autouse=True)
def _ops_in_full(request, monkeypatch):
    path = str(request.node.path)
    if not path.endswith("test_replay.py") and f"{os.sep}integrations{os.sep}" not in path:
        import moekit._replay

        monkeypatch.setattr(moekit._replay, "enabled", False)


@pytest.fixture(autouse=True)
def _gpu_memory_returned(request):
    """After each GPU test, the caching allocator's free blocks go back to the device.

    The GPU stage runs several workers on one GPU (`-n 6`); session 33 saw one worker hold
    80 GB while another's test ran out of memory (bench/NOTES.md). Tests of full-size
    presets (deepseek-v3's bf16 experts alone are 22.5 GB) would otherwise keep their
    blocks reserved for the rest of the worker's run. With MOEKIT_GPU_PEAK_LOG set to a
    path, each GPU test appends its peak allocated GB and node id there (which test needs
    how much, to size the stage's workers).
    """
    gpu = _CUDA and "gpu" in request.keywords
    log = os.environ.get("MOEKIT_GPU_PEAK_LOG")
    if gpu and log:
        torch.cuda.reset_peak_memory_stats()
    yield
    if gpu:
        if log:
            with open(log, "a") as f:
                f.write(f"{torch.cuda.max_memory_allocated() / 2**30:.2f} "
                        f"{request.node.nodeid}\n")
        torch.cuda.empty_cache()
