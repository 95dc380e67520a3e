"""The tuner: search tile configurations per shape and keep those that beat the heuristic.

For each (preset, M) cell it times the heuristic's configuration, then searches the
row tile (the heuristic's, half and double), GEMM1's tiles with GEMM2 at the default
for that row tile, then GEMM2's tiles with GEMM1 at its best — a coordinate search of
a few dozen timings instead of the full product, and last the best with tail tiles
toggled (`ExpertsConfig.tail_block_m`). For a fixed row tile the two GEMMs are
separate launches whose times add, so GEMM1's best tile does not depend on GEMM2's:
the coordinate search then finds the best of the whole product of candidates (up to
timing noise and L2 effects between the launches), which is what the "heuristic within
10% of an exhaustive sweep" check needs (`cliffs`). An entry is marked `use` only when
the best beats the heuristic by `margin`, so tables never replace the heuristic on
noise. Every configuration timed is kept with the entry (`trials`: the evidence a
heuristic rule is drawn from). The table is saved after every cell, and cells already
in it are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Callable, Iterable

import torch

from moekit._tma import heuristic_sms
from moekit.bench.presets import Preset
from moekit.tuning.config import ExpertsConfig
from moekit.tuning.heuristic import default_config, tiles_for_block_m
from moekit.tuning.space import Constraint, candidates, gemm2_candidates, neighbour_block_ms
from moekit.tuning.tables import config_from_dict, config_to_dict, save_table

Measure = Callable[[Preset, int, ExpertsConfig], float]  # → µs (inf when it cannot run)


def search(heuristic: ExpertsConfig, time_us: Callable[[ExpertsConfig], float],
           constraint: Constraint | None = None,
           tiles_for: Callable[[int], ExpertsConfig] = tiles_for_block_m,
           direct: bool = True) -> tuple[ExpertsConfig, float, float]:
    """Coordinate search around the heuristic.

    Args:
        tiles_for: the starting tiles at another row tile (the bf16 heuristic's by default).
        direct: whether the kernel family has the direct path (block_m 1) to try.
    Returns:
        (best configuration, its µs, the heuristic's µs).
    """
    heuristic_us = time_us(heuristic)
    best, best_us = heuristic, heuristic_us
    for block_m in neighbour_block_ms(heuristic.block_m, direct):
        first = heuristic if block_m == heuristic.block_m else tiles_for(block_m)
        g1_best, g1_us = first, (heuristic_us if first is heuristic else time_us(first))
        for tile in candidates(block_m, constraint):
            trial = dataclasses.replace(first, gemm1=tile)
            if trial != first and (t := time_us(trial)) < g1_us:
                g1_best, g1_us = trial, t
        cell_best, cell_us = g1_best, g1_us
        for tile in gemm2_candidates(block_m, constraint):
            trial = dataclasses.replace(g1_best, gemm2=tile)
            if trial != g1_best and (t := time_us(trial)) < cell_us:
                cell_best, cell_us = trial, t
        if cell_us < best_us:
            best, best_us = cell_best, cell_us
    if best.block_m >= 32:  # last, the best with tail tiles toggled (ExpertsConfig)
        toggled = 0 if best.tail_block_m else best.block_m // 2
        trial = dataclasses.replace(best, tail_block_m=toggled)
        if (t := time_us(trial)) < best_us:
            best, best_us = trial, t
    return best, best_us, heuristic_us


def new_table(device: str, dtype: str, command: str, versions: dict) -> dict:
    """An empty table document with its provenance."""
    return {"kernel": "fused_experts", "device": device, "dtype": dtype, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **versions, "entries": []}


def this_gpu_sms() -> int:
    """SMs of the current CUDA device (the heuristics' default without one)."""
    return heuristic_sms(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def bf16_heuristic(preset: Preset, num_tokens: int) -> ExpertsConfig:
    """`fused_experts`' default configuration for a preset's shape on this machine's GPU."""
    return default_config(num_tokens, preset.num_experts, preset.top_k, preset.hidden,
                          preset.inter, num_sms=this_gpu_sms())


def bf16_tiles_at(heuristic: ExpertsConfig, block_m: int) -> ExpertsConfig:
    """The bf16 heuristic's tiles for another row tile."""
    return tiles_for_block_m(block_m)


def same_tiles_at(heuristic: ExpertsConfig, block_m: int) -> ExpertsConfig:
    """The heuristic's own GEMM tiles at another row tile (kernels without a per-row-tile
    rule, e.g. fp8's)."""
    return ExpertsConfig(block_m, heuristic.gemm1, heuristic.gemm2)


def tune(table: dict, path, presets: Iterable[Preset], tokens: Iterable[int], measure: Measure,
         *, margin: float = 0.05, constraint: Constraint | None = None,
         heuristic_for: Callable[[Preset, int], ExpertsConfig] = bf16_heuristic,
         start_at: Callable[[ExpertsConfig, int], ExpertsConfig] = bf16_tiles_at,
         direct: bool = True, progress: Callable[[str], None] = print) -> dict:
    """Fill `table` cell by cell (saving to `path` after each), skipping cells it holds.

    Args:
        table: a table document (`new_table`, or a loaded one to resume).
        measure: times one configuration of one cell, in µs.
        margin: the fraction by which the best must beat the heuristic to be used.
        heuristic_for: the kernel family's default configuration for (preset, M).
        start_at: (the cell's heuristic, another row tile) → where the search starts at
            that row tile.
    Returns:
        The table.
    """
    presets, tokens = list(presets), list(tokens)
    done = {(e["E"], e["topk"], e["H"], e["I"], e["M"]) for e in table["entries"]}
    total, n = len(presets) * len(tokens), 0
    for preset in presets:
        for m in tokens:
            n += 1
            key = (preset.num_experts, preset.top_k, preset.hidden, preset.inter, m)
            if key in done:
                progress(f"[{n}/{total}] {preset.name} M={m}: in the table already, skipped")
                continue
            heuristic = heuristic_for(preset, m)
            trials: list[dict] = []

            def timed(cfg, p=preset, m=m, trials=trials):
                us = measure(p, m, cfg)
                trials.append({"config": config_to_dict(cfg),
                               "us": us if math.isfinite(us) else None})  # None: cannot run
                return us
            best, best_us, heuristic_us = search(
                heuristic, timed, constraint, lambda block_m, h=heuristic: start_at(h, block_m),
                direct)
            use = math.isfinite(best_us) and best_us < (1 - margin) * heuristic_us
            table["entries"].append({
                "preset": preset.name, "E": key[0], "topk": key[1], "H": key[2], "I": key[3],
                "M": m, "heuristic_us": heuristic_us, "best_us": best_us,
                "config": config_to_dict(best), "use": use, "trials": trials,
            })
            save_table(table, path)
            verdict = "table entry used" if use else "heuristic kept"
            progress(f"[{n}/{total}] {preset.name} M={m}: heuristic {heuristic_us:.1f} µs, "
                     f"best {best_us:.1f} µs {config_from_dict(config_to_dict(best))} → {verdict}")
    return table


CLIFF = 0.10  # the performance issue's bound: heuristic within 10% of the best found


def cliffs(table: dict, bound: float = CLIFF) -> list[dict]:
    """Entries where the heuristic is more than `bound` slower than the best found."""
    return [e for e in table.get("entries", ())
            if math.isfinite(e["best_us"]) and e["heuristic_us"] > (1 + bound) * e["best_us"]]


def report(table: dict, bound: float = CLIFF) -> list[str]:
    """Lines summarising a table: cells, entries used, and the heuristic's cliffs."""
    entries = table.get("entries", ())
    ratios = [e["heuristic_us"] / e["best_us"] for e in entries
              if math.isfinite(e["best_us"]) and e["best_us"] > 0]
    lines = [f"{table.get('device', '?')} {table.get('dtype', '?')}: {len(entries)} cells, "
             f"{sum(bool(e.get('use')) for e in entries)} table entries used"]
    if ratios:
        lines.append(f"heuristic ÷ best: median {sorted(ratios)[len(ratios) // 2]:.3f}, "
                     f"worst {max(ratios):.3f}")
    bad = cliffs(table, bound)
    lines.append(f"cells where the heuristic is over {bound:.0%} slower than the best: "
                 f"{len(bad)}" + (":" if bad else ""))
    lines += [f"  {e['preset']} M={e['M']}: heuristic {e['heuristic_us']:.1f} µs, best "
              f"{e['best_us']:.1f} µs ({e['heuristic_us'] / e['best_us']:.2f}×) "
              f"{config_from_dict(e['config'])}" for e in bad]
    return lines
