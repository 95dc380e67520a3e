"""Experiment: the dispatch plan in one launch past 4096 pairs, against count + scan + place.

Up to `moekit.dispatch._FUSED_PAIRS` (4096) pairs the plan is one launch, each place
program histogramming every pair itself; past it, a count launch and a scan launch come
first. Session 56's stage breakdown of granite on an H100 read the plan at 9.4 µs for 4,096
pairs (M = 512) and 12.1 / 12.8 µs for 8,192 / 16,384 (M = 1024 / 2048), each with the
replay's ~5 µs floor: ~2–3 µs more for the two launches. This times the plan as the layer
builds it (the heuristic's row tile, tail tiles where it takes them) as shipped and with the
one-launch limit raised to the cell's pairs (8K–32K), rounds interleaved; the plans must be
identical. Compiled for sm_90 on the CPU (session 56, `ptxas -v`), the one-launch place
kernel spills nothing at 8K pairs (40 or 128 experts) and 16K on 40 experts, but 19.7 KB
at 16K on 128 experts and 17.6–47.3 KB at 32K: its [ALL_PAIRS] ids block outgrows the
registers there, so any limit raised would stop at 8K–16K.

Usage (on the device): PYTHONPATH=src python3 bench/scripts/plan_launches_experiment.py --out $OUT
(`device_check.sh planlaunch`).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from unittest import mock

import torch

import moekit.dispatch
from moekit._tma import heuristic_sms
from moekit.bench.experiment_files import experiment_meta, rows_table, write_experiment
from moekit.bench.inputs import make_tokens
from moekit.bench.presets import PRESETS
from moekit.bench.timing import graph_replay_us
from moekit.dispatch import dispatch_plan
from moekit.tuning.heuristic import default_config

CELLS = [("granite-3.0-3b-a800m", m) for m in (512, 1024, 2048, 4096)] + [
    ("qwen3-30b-a3b", 1024), ("qwen3-30b-a3b", 2048), ("olmoe-1b-7b", 2048),
    ("deepseek-v2-lite", 2048), ("mixtral-8x7b", 8192)]
SHIPPED = moekit.dispatch._FUSED_PAIRS  # the most pairs planned in one launch
PLAN_FIELDS = ("sorted_pairs", "block_experts", "expert_offsets", "pair_slots", "tiles")


def layer_plan(ids: torch.Tensor, num_experts: int, block_m: int, tail_m: int,
               fused_pairs: int, backend: str = "auto"):
    """The plan `fused_experts` builds for these ids, with at most `fused_pairs` pairs
    planned in one launch."""
    with mock.patch.object(moekit.dispatch, "_FUSED_PAIRS", fused_pairs):
        return dispatch_plan(ids, num_experts, tail_m or block_m,
                             tile_m=block_m if tail_m else None, backend=backend)


def same_plans(a, b) -> bool:
    """Whether two plans hold the same slots, blocks, offsets and work lists."""
    return all((getattr(a, f) is None and getattr(b, f) is None)
               or torch.equal(getattr(a, f), getattr(b, f)) for f in PLAN_FIELDS)


def launches(num_pairs: int, fused_pairs: int) -> int:
    """The plan's launches: place alone up to `fused_pairs` pairs, else count, scan, place."""
    return 1 if num_pairs <= fused_pairs else 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for name, m in CELLS:
        preset = PRESETS[name]
        _, topk = make_tokens(preset, m, torch.bfloat16, device)
        cfg = default_config(m, preset.num_experts, preset.top_k, preset.hidden, preset.inter,
                             2, heuristic_sms(device))
        pairs = topk.ids.numel()
        # The one-launch kernel is the same whatever the limit past the pairs: one setting.
        settings = [SHIPPED] + ([pairs] if pairs > SHIPPED else [])
        shipped = layer_plan(topk.ids, preset.num_experts, cfg.block_m, cfg.tail_block_m,
                             SHIPPED)
        plans = {limit: functools.partial(layer_plan, topk.ids, preset.num_experts,
                                          cfg.block_m, cfg.tail_block_m, limit)
                 for limit in settings}
        times: dict[int, list[float]] = {limit: [] for limit in settings}
        identical, errors = {}, {}
        for round_ in range(args.rounds):
            for limit, plan in plans.items():
                if limit in errors:
                    continue
                try:  # a one-launch histogram of 32K pairs may not compile: record, go on
                    if round_ == 0:
                        identical[limit] = same_plans(plan(), shipped)
                    times[limit].append(graph_replay_us(plan))  # captures its launches
                except Exception as exc:  # noqa: BLE001 - any compile or launch failure
                    errors[limit] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for limit in settings:
            row = dict(preset=name, M=m, pairs=pairs, block_m=cfg.block_m,
                       tail_m=cfg.tail_block_m, one_launch_up_to=limit,
                       launches=launches(pairs, limit), identical=identical.get(limit),
                       us=round(statistics.median(times[limit]), 2) if times[limit] else None,
                       rounds=[round(t, 2) for t in times[limit]],
                       error=errors.get(limit, ""))
            rows.append(row)
            print(row, flush=True)
    meta = experiment_meta()
    notes = [f"- the plan as `fused_experts` builds it, CUDA-graph replay with L2 emptied by a "
             f"read before each replay (~5 µs of the figure is the replay's floor), "
             f"{args.rounds} rounds interleaved, median; shipped limit {SHIPPED} pairs",
             "- identical: the plan's tensors equal the shipped limit's bitwise"]
    keys = ["preset", "M", "pairs", "one_launch_up_to", "launches", "us", "rounds", "identical",
            "error"]
    write_experiment(args.out, "plan-launches-experiment", meta, rows,
                     "The dispatch plan in one launch past 4096 pairs", notes,
                     rows_table(rows, keys))


if __name__ == "__main__":
    main()
