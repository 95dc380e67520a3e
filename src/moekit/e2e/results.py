"""Result files of `moekit run`: one JSON record and one Markdown page per run.

They follow PERF.md's "Result files" convention and reuse `moekit.bench.results` for
it: `bench/results/<device-slug>-<yyyymmdd>-e2e-<family>[-fp8].{json,md}`, a "-2", "-3"
suffix instead of overwriting, and device, torch, triton, date and command as
top-level keys (plus transformers' version), so a number can be traced to what
produced it. The kernel table's `ceilings`/`rows` do not apply to a model run.
"""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from moekit.bench.results import result_paths
from moekit.device import device_slug


def device_name(device: torch.device) -> str:
    """Human-readable device name: the GPU's name, or "cpu"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def environment(device: torch.device, command: str | None = None) -> dict[str, Any]:
    """Device, versions, date and command line of this run (top-level keys of the record)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "moekit": _version("moekit"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command or shlex.join(["moekit", *sys.argv[1:]]),
    }


def write_results(record: dict[str, Any], out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write `record` as JSON and its Markdown page under `e2e-<name>` (the family, "-fp8"
    with fp8 experts); never overwrites an earlier run.

    Returns:
        (json path, markdown path).
    """
    day = datetime.date.today().strftime("%Y%m%d")
    json_path, md_path = result_paths(out_dir, device_slug(record["device"]), day,
                                      f"e2e-{name}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    md_path.write_text(markdown(record))
    return json_path, md_path


def markdown(record: dict[str, Any]) -> str:
    """A Markdown page: what ran, where, the timings side by side, and the token checks."""
    env, shape, runs = record, record["shape"], record["runs"]
    lines = [
        f"# End-to-end {record['family']}: {record['experts']['baseline']} vs moekit",
        "",
        f"- model: {record['family']} widths of `{record['checkpoint']}` "
        f"({record['scale']} scale), {shape['layers']} layers, random weights, {shape['dtype']}",
    ]
    if record["scale"] != "real":
        lines.append("- **tiny widths, not the real model: a smoke test, not a benchmark**")
    lines += [
        f"- experts: the baseline's in {shape['dtype']}, moekit's in "
        f"{record['experts'].get('moekit_format', shape['dtype'])}",
        f"- batch {shape['batch']}, prompt {shape['prompt_len']} tokens, "
        f"{shape['new_tokens']} new tokens, median of {record['repeats']} repeats",
        f"- device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}; {env['date'][:10]}",
        f"- command: `{env['command']}`",
        f"- weights {record['weights_gb']:.3g} GB"
        + (f", peak memory {record['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in record
           else ""),
        "",
        "| experts implementation | prefill ms | prefill tok/s | TPOT ms | decode tok/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['prefill_ms']:.2f} | {run['prefill_tok_s']:.0f} | "
            f"{run['tpot_ms']:.3f} | {run['decode_tok_s']:.1f} |"
        )
    speed, match = record["speedup"], record["match"]
    lines += [
        "",
        f"Speedup of moekit: prefill ×{speed['prefill']:.2f}, "
        f"decode (TPOT) ×{speed['decode']:.2f}.",
        "",
        f"Tokens: teacher-forced agreement {match['teacher_forced_agreement']:.1%} "
        f"(the baseline against itself, no cache vs cache: "
        f"{match['baseline_self_agreement']:.1%}); "
        f"free-running token match {match['token_match']:.1%}, "
        f"identical sequences {match['exact_match']:.1%}; "
        f"prefill logits relative L2 {match['prefill_logits_rel_l2']:.2e}.",
        "",
        _check_markdown(record.get("check", {})),
        "",
    ]
    return "\n".join(lines)


def _check_markdown(check: dict[str, Any]) -> str:
    """The float32-oracle check (`moekit.e2e.check`) as one paragraph."""
    if "skipped" in check:
        return f"Check against float32: skipped ({check['skipped']})."
    if "passed" not in check:
        return "Check against float32: not run."
    base, cand = check["baseline"], check["candidate"]
    text = (
        f"Check against the same weights in float32 (teacher-forced logits): "
        f"**{'passed' if check['passed'] else 'FAILED'}**. Median per-position relative L2: "
        f"moekit {cand['median_rel_l2']:.2e}, {check.get('noise', 'baseline')} "
        f"{base['median_rel_l2']:.2e} (bound {check['bound']:.2e}); overall "
        f"{cand['rel_l2']:.2e} vs {base['rel_l2']:.2e}; argmax agreement with float32 "
        f"{cand['agreement']:.1%} vs {base['agreement']:.1%}."
    )
    if "fp8_vs_bf16" in check:
        cost = check["fp8_vs_bf16"]
        text += (f" The fp8 model is judged against itself (moekit's fp8 reference, in bf16 "
                 f"and float32); what fp8 costs against the bf16 model, as moekit's logits "
                 f"against the baseline's: median relative L2 {cost['median_rel_l2']:.2e}, "
                 f"argmax agreement {cost['agreement']:.1%}.")
    return text
