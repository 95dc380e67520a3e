"""The tuner: search tile configurations per shape and keep those that beat the heuristic.

For each (preset, M) cell it times the heuristic's configuration, then searches the
row tile (the heuristic's, half and double), GEMM1's tiles with GEMM2 at the default
for that row tile, then GEMM2's tiles with GEMM1 at its best — a coordinate search of
a few dozen timings instead of the full product. An entry is marked `use` only when
the best beats the heuristic by `margin`, so tables never replace the heuristic on
noise. The table is saved after every cell, and cells already in it are skipped, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable

from moekit.bench.presets import Preset
from moekit.tuning.config import ExpertsConfig
from moekit.tuning.heuristic import default_config, tiles_for_block_m
from moekit.tuning.space import Constraint, candidates, neighbour_block_ms
from moekit.tuning.tables import config_from_dict, config_to_dict, save_table

Measure = Callable[[Preset, int, ExpertsConfig], float]  # → µs (inf when it cannot run)


def search(heuristic: ExpertsConfig, time_us: Callable[[ExpertsConfig], float],
           constraint: Constraint | None = None) -> tuple[ExpertsConfig, float, float]:
    """Coordinate search around the heuristic.

    Returns:
        (best configuration, its µs, the heuristic's µs).
    """
    heuristic_us = time_us(heuristic)
    best, best_us = heuristic, heuristic_us
    for block_m in neighbour_block_ms(heuristic.block_m):
        first = heuristic if block_m == heuristic.block_m else tiles_for_block_m(block_m)
        g1_best, g1_us = first, (heuristic_us if first is heuristic else time_us(first))
        for tile in candidates(block_m, constraint):
            trial = ExpertsConfig(block_m, tile, first.gemm2)
            if trial != first and (t := time_us(trial)) < g1_us:
                g1_best, g1_us = trial, t
        cell_best, cell_us = g1_best, g1_us
        for tile in candidates(block_m, constraint):
            trial = ExpertsConfig(block_m, g1_best.gemm1, tile)
            if trial != g1_best and (t := time_us(trial)) < cell_us:
                cell_best, cell_us = trial, t
        if cell_us < best_us:
            best, best_us = cell_best, cell_us
    return best, best_us, heuristic_us


def new_table(device: str, dtype: str, command: str, versions: dict) -> dict:
    """An empty table document with its provenance."""
    return {"kernel": "fused_experts", "device": device, "dtype": dtype, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **versions, "entries": []}


def tune(table: dict, path, presets: Iterable[Preset], tokens: Iterable[int], measure: Measure,
         *, margin: float = 0.05, constraint: Constraint | None = None,
         progress: Callable[[str], None] = print) -> dict:
    """Fill `table` cell by cell (saving to `path` after each), skipping cells it holds.

    Args:
        table: a table document (`new_table`, or a loaded one to resume).
        measure: times one configuration of one cell, in µs.
        margin: the fraction by which the best must beat the heuristic to be used.
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
            heuristic = default_config(m, preset.num_experts, preset.top_k, preset.hidden,
                                       preset.inter)
            best, best_us, heuristic_us = search(
                heuristic, lambda cfg, p=preset, m=m: measure(p, m, cfg), constraint
            )
            use = math.isfinite(best_us) and best_us < (1 - margin) * heuristic_us
            table["entries"].append({
                "preset": preset.name, "E": key[0], "topk": key[1], "H": key[2], "I": key[3],
                "M": m, "heuristic_us": heuristic_us, "best_us": best_us,
                "config": config_to_dict(best), "use": use,
            })
            save_table(table, path)
            verdict = "table entry used" if use else "heuristic kept"
            progress(f"[{n}/{total}] {preset.name} M={m}: heuristic {heuristic_us:.1f} µs, "
                     f"best {best_us:.1f} µs {config_from_dict(config_to_dict(best))} → {verdict}")
    return table
