"""Tuned tables: measured tile choices that beat the heuristic, one file per kernel family.

    src/moekit/tuning/tables/<device-slug>-fused_experts-<dtype>.json

Each entry records a shape (E, k, H, I, M), the heuristic's time, the best time found
and its configuration, and `use`: true only when the best beat the heuristic by the
tuner's margin. A lookup takes the entry of the same (E, k, H, I) whose M is nearest
on a log scale, within a factor √2, and returns its configuration only when `use` is
set, so a table never overrides the heuristic where it did not measurably win.
`moekit tune` writes them.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

from moekit.tuning.config import ExpertsConfig, GemmConfig

TABLE_DIR = Path(__file__).parent / "tables"
KERNEL = "fused_experts"
#: An entry stands for token counts within a factor √2 of its own: a table tuned at every
#: power of two covers every M, one tuned at a few never stretches to distant ones.
NEAREST_LOG2 = 0.5


def table_path(slug: str, dtype: str, directory: Path = TABLE_DIR) -> Path:
    """Where the table of this device slug and weight dtype lives."""
    return Path(directory) / f"{slug}-{KERNEL}-{dtype}.json"


def config_to_dict(config: ExpertsConfig) -> dict:
    """A JSON-ready form of a configuration."""
    g = lambda c: [c.block_n, c.block_k, c.group_m, c.num_warps, c.num_stages]
    data = {"block_m": config.block_m, "gemm1": g(config.gemm1), "gemm2": g(config.gemm2)}
    if config.tail_block_m:
        data["tail_block_m"] = config.tail_block_m
    return data


def config_from_dict(data: dict) -> ExpertsConfig:
    """Inverse of `config_to_dict`. An entry naming the gathered path (`"gathered": true`,
    written by tuners before session 76) is refused: that path is removed, and reading
    the entry without it would run other kernels than the ones it timed."""
    if data.get("gathered"):
        raise ValueError(
            "tuned table entry: \"gathered\": true names the gathered path, removed in "
            "session 76 (measured slower than the plan path in every decode cell, "
            "h100-sxm-20261208-gathered-decode-s75.md); retune the table or drop the entry"
        )
    return ExpertsConfig(data["block_m"], GemmConfig(*data["gemm1"]), GemmConfig(*data["gemm2"]),
                         data.get("tail_block_m", 0))


def load_table(path: Path) -> dict | None:
    """The table at `path`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def save_table(table: dict, path: Path) -> None:
    """Write atomically, so an interrupted tuner never leaves a half-written table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    tmp.replace(path)


def lookup(table: dict | None, num_experts: int, top_k: int, hidden: int, inter: int,
           num_tokens: int) -> ExpertsConfig | None:
    """The tuned configuration for this shape, or None to use the heuristic."""
    if not table:
        return None
    same = [e for e in table.get("entries", ())
            if (e["E"], e["topk"], e["H"], e["I"]) == (num_experts, top_k, hidden, inter)]
    if not same:
        return None
    target = math.log2(max(num_tokens, 1))
    nearest = min(same, key=lambda e: (abs(math.log2(e["M"]) - target), e["M"]))
    if abs(math.log2(nearest["M"]) - target) > NEAREST_LOG2:
        return None  # a table tuned at other token counts says nothing about this one
    return config_from_dict(nearest["config"]) if nearest.get("use") else None


@functools.cache
def _device_table(device_index: int, dtype: str) -> dict | None:
    from moekit.device import device_slug

    return load_table(table_path(device_slug(torch.cuda.get_device_name(device_index)), dtype))


@functools.lru_cache(maxsize=4096)
def tuned_config(device_index: int, dtype: str, num_experts: int, top_k: int, hidden: int,
                 inter: int, num_tokens: int) -> ExpertsConfig | None:
    """Cached `lookup` in the shipped table of this CUDA device (None if it has none)."""
    return lookup(_device_table(device_index, dtype), num_experts, top_k, hidden, inter,
                  num_tokens)


def tuned_for(hidden: torch.Tensor, table_dtype: str | None, num_experts: int, top_k: int,
              inter: int) -> ExpertsConfig | None:
    """The tuned entry for a call on `hidden` [M, H], or None: no table dtype, not CUDA, or
    under torch.compile (where only the heuristic, pure arithmetic, is traced)."""
    if table_dtype is None or not hidden.is_cuda or torch.compiler.is_compiling():
        return None
    num_tokens, hidden_size = hidden.shape
    index = hidden.device.index if hidden.device.index is not None else 0
    return tuned_config(index, table_dtype, num_experts, top_k, hidden_size, inter, num_tokens)
