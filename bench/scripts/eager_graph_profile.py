"""One preset's `fused_experts` eager and in CUDA-graph replay, kernel by kernel.

For a cell whose graph time and eager time differ in the kernel table (session 32:
mixtral M = 512, graph 1,071 against eager 915 µs): both timed by the table's
`CudaTimer` (L2 flushed), then five back-to-back calls of each under torch.profiler,
which lists the kernels each ran and their GPU time.

    PYTHONPATH=src python3 bench/scripts/eager_graph_profile.py --preset mixtral-8x7b \
        --tokens 512 1024 > profile.log
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import moekit
from moekit.bench.presets import PRESETS
from moekit.bench.timing import CudaTimer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mixtral-8x7b", choices=sorted(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024])
    args = parser.parse_args()
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    E, k, H, I = p.num_experts, p.top_k, p.hidden, p.inter
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) / H**0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) / I**0.5
    print(f"{args.preset}; {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for m in args.tokens:
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        topk = moekit.route(torch.randn(m, E, device="cuda"), k)

        def call(x=x, topk=topk):
            return moekit.fused_experts(x, w13, w2, topk.ids, topk.weights)

        for _ in range(5):  # compiles, records the replay
            call()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        timer = CudaTimer(rep_ms=100)
        for label, fn in (("eager", call), ("graph", graph.replay)):
            print(m, label, "timer (L2 flushed):", timer.eager(fn))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8,
                                            max_name_column_width=60))


if __name__ == "__main__":
    main()
