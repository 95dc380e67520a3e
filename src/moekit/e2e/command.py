"""`moekit run`: a real-width MoE model, transformers' experts vs moekit, end to end.

    moekit run --model mixtral [--layers N] [--batch B] [--prompt-len P] [--new-tokens T]

builds the family's model with its published widths, a few layers and random weights
(`moekit.e2e.families`, `moekit.e2e.model`), then on one prompt runs prefill + greedy
decode (`moekit.e2e.decode`) with transformers' own experts implementation (its default
unless `--baseline` names one) and with moekit, alternating the two for each repeat so
that clock drift hits both alike. It reports prefill tokens/s, time per output token and
moekit's speedup, checks that moekit computes the same model (`moekit.e2e.check`: both
implementations' teacher-forced logits against a float32 run of the same weights, so
that the bound is the bf16 noise measured in this run), and writes JSON + Markdown
(`moekit.e2e.results`). Token agreement with the baseline is reported, not gated on:
with random weights, correct bf16 implementations flip near-tied tokens.

On a machine without CUDA it runs the same pipeline at tiny widths (`--scale tiny`, the
default there) and says so: that checks the wiring, not the speed.

With `--fp8-experts` moekit runs the experts as a fine-grained fp8 checkpoint holds them
(`moekit.e2e.fp8`: transformers' `FP8Experts`, 128×128 block scales) while the timing
baseline keeps transformers' bf16 experts. The check then judges moekit against the same
fp8 model run by moekit's fp8 reference (in bf16 for the noise, float32 for the oracle),
and what fp8 costs against the bf16 model is reported beside it.

The exit status is 1 when that check fails or the logits are not finite, so the command
doubles as a test. Where the device has no room for the float32 run the check is
reported as skipped (DeepSeek-V3 defaults to one layer so that it has room).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import asdict
from typing import Any

import torch

from moekit.e2e.families import FAMILIES, get_family

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Default shapes per scale: (batch, prompt length, new tokens).
DEFAULT_SHAPE = {"real": (4, 512, 64), "tiny": (2, 32, 16)}
TINY_LAYERS = 2


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of `moekit run` to `parser`."""
    parser.add_argument("--model", required=True, choices=sorted(FAMILIES),
                        help="model family (widths of its published checkpoint)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers to build (default: per family at real scale, "
                             f"{TINY_LAYERS} at tiny scale)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch")
    parser.add_argument("--prompt-len", type=int, default=None, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--scale", choices=("real", "tiny"), default=None,
                        help="real widths (default on CUDA) or tiny ones (default on CPU)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--baseline", default=None,
                        help="transformers experts implementation to compare with "
                             "(default: transformers' default for the model)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and prompt")
    parser.add_argument("--fp8-experts", action="store_true",
                        help="moekit runs the experts quantised as a fine-grained fp8 "
                             "checkpoint (128x128 block scales; transformers' FP8Experts); "
                             "the baseline keeps bf16")
    parser.add_argument("--out-dir", default="bench/results",
                        help="where to write the JSON and Markdown results ('' to skip)")


def _log(message: str) -> None:
    print(f"[moekit run] {message}", file=sys.stderr, flush=True)


def _progress(label: str):
    """A decode progress callback that redraws one line on a terminal, silent otherwise."""
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r[moekit run]   {label}: token {done}/{total}", end=end, file=sys.stderr,
              flush=True)

    return report


def run_command(args: argparse.Namespace) -> int:
    """Run `moekit run` with parsed `args`; returns the exit status."""
    try:
        from moekit.integrations import transformers as moekit_transformers

        moekit_transformers.register()
    except ImportError as exc:
        print(f"moekit run: {exc}", file=sys.stderr)
        return 2
    from moekit.e2e.decode import compare_runs, greedy_decode
    from moekit.e2e.model import build_model
    from moekit.e2e.results import environment, write_results

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale = args.scale or ("real" if device.type == "cuda" else "tiny")
    if scale == "real" and device.type != "cuda":
        print("moekit run: real widths need a CUDA device; use --scale tiny on the CPU",
              file=sys.stderr)
        return 2
    family = get_family(args.model)
    layers = args.layers or (family.default_layers if scale == "real" else TINY_LAYERS)
    default_batch, default_prompt, default_new = DEFAULT_SHAPE[scale]
    batch = args.batch or default_batch
    prompt_len = args.prompt_len or default_prompt
    new_tokens = args.new_tokens or default_new
    dtype = DTYPES[args.dtype]
    if scale == "tiny":
        _log("TINY widths (no CUDA or --scale tiny): this checks the wiring, it does not "
             "measure the real model")

    config = family.build_config(scale, layers)
    _log(f"building {family.name} ({family.checkpoint} widths, {scale}), {layers} layers, "
         f"{args.dtype}, random weights, on {device}")
    model = build_model(config, dtype=dtype, device=device, seed=args.seed)
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    _log(f"model built: {weight_gb * 1e3:.1f} MB of weights" if weight_gb < 1
         else f"model built: {weight_gb:.1f} GB of weights")
    baseline = args.baseline or model.config._experts_implementation
    if baseline == moekit_transformers.NAME:
        print("moekit run: --baseline must be a transformers implementation", file=sys.stderr)
        return 2
    swap = None
    if args.fp8_experts:
        try:
            swap = _fp8_swap(model, config)
        except (ValueError, RuntimeError, ImportError) as exc:
            print(f"moekit run: {exc}", file=sys.stderr)
            return 2

    def activate(impl: str) -> None:
        """Select `impl` for the experts (and, with --fp8-experts, its modules)."""
        model.set_experts_implementation(impl)
        if swap is not None:
            swap.use(fp8=impl == moekit_transformers.NAME)

    activate(moekit_transformers.NAME)
    plans = moekit_transformers.prepare_model(model)
    served = [name for name, plan in plans.items() if plan.supported]
    converted = [name for name, plan in plans.items()
                 if plan.supported and getattr(plan, "converts", False)]
    _log(f"moekit serves {len(served)}/{len(plans)} experts modules "
         f"({len(converted)} converted to moekit's layout once)")
    for name, plan in plans.items():
        if not plan.supported:
            _log(f"  falls back to transformers: {name}: {plan.reason}")

    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=gen)
    prompt = prompt.to(device)  # [B, P]
    implementations = (baseline, moekit_transformers.NAME)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The warm-up decodes as many tokens as a timed run: session 33 found transformers'
    # grouped_mm decode 5–9× slower in the first run past a 3-token warm-up, so a
    # one-repeat run's speedup was mostly that warm-up.
    for impl in implementations:
        _log(f"warmup {impl} (first calls compile kernels)")
        activate(impl)
        greedy_decode(model, prompt, new_tokens)

    runs: dict[str, list] = {impl: [] for impl in implementations}
    for repeat in range(args.repeats):
        for impl in implementations:
            activate(impl)
            label = f"repeat {repeat + 1}/{args.repeats} {impl}"
            run = greedy_decode(model, prompt, new_tokens, progress=_progress(label))
            runs[impl].append(run)
            _log(f"{label}: prefill {run.prefill_s * 1e3:.2f} ms, "
                 f"TPOT {run.tpot_s() * 1e3:.3f} ms")

    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    base_run, moe_run = runs[baseline][0], runs[moekit_transformers.NAME][0]
    match = compare_runs(base_run, moe_run)
    finite = all(torch.isfinite(r.prefill_logits).all().item() for rs in runs.values() for r in rs)
    check = _check(model, prompt, base_run.tokens, baseline, device, activate, swap)
    match["teacher_forced_agreement"] = check.pop("agreement_with_baseline")
    match["baseline_self_agreement"] = check.pop("baseline_self_agreement")

    summary = {impl: _summarise(rs, batch, prompt_len) for impl, rs in runs.items()}
    base, moe = summary[baseline], summary[moekit_transformers.NAME]
    record: dict[str, Any] = {
        **environment(device, getattr(args, "command_line", None)),
        "family": family.name,
        "checkpoint": family.checkpoint,
        "scale": scale,
        "shape": {"layers": layers, "batch": batch, "prompt_len": prompt_len,
                  "new_tokens": new_tokens, "dtype": args.dtype},
        "config": {k: v for k, v in family.config_kwargs(scale, layers).items()
                   if isinstance(v, (int, float, str, bool)) or v is None},
        "experts": {"baseline": baseline, "modules": len(plans), "served": len(served),
                    "converted": len(converted),
                    "moekit_format": (f"fp8 e4m3, {swap.block}x{swap.block} block scales"
                                      if swap is not None else args.dtype),
                    "fallback": {n: p.reason for n, p in plans.items() if not p.supported}},
        "weights_gb": weight_gb,
        "repeats": args.repeats,
        "runs": summary,
        "speedup": {"prefill": base["prefill_ms"] / moe["prefill_ms"],
                    "decode": base["tpot_ms"] / moe["tpot_ms"]},
        "match": match,
        "check": check,
        "finite": finite,
    }
    if peak_gb is not None:
        record["peak_memory_gb"] = peak_gb

    _print_summary(record)
    if args.out_dir:
        stem = family.name + ("-fp8" if swap is not None else "")
        json_path, md_path = write_results(record, args.out_dir, stem)
        _log(f"wrote {json_path} and {md_path}")
    if not finite or check.get("passed") is False:
        _log(f"FAILED: {_check_line(check)}; finite logits: {finite}")
        return 1
    return 0


def _fp8_swap(model, config):
    """`--fp8-experts`: every experts module's fp8 twin (`moekit.e2e.fp8`)."""
    from moekit.e2e.fp8 import Fp8ExpertsSwap
    from moekit.integrations.fp8_quantize import fp8_block

    inter = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    block = fp8_block(config.hidden_size, inter)  # one for every layer: the run's label
    _log(f"quantising the experts to fp8 ({block}x{block} blocks, transformers' quantiser)")
    swap = Fp8ExpertsSwap(model, block)
    _log(f"{len(swap)} experts modules in fp8: {swap.fp8_bytes() / 1e9:.2f} GB")
    return swap


def _check(model, prompt, tokens, baseline: str, device: torch.device, activate,
           fp8_swap=None) -> dict[str, Any]:
    """Teacher-forced logits of both implementations and the float32 oracle's verdict
    (`activate(impl)` selects an implementation). With `fp8_swap` (--fp8-experts) the
    noise and the oracle are the fp8 model's by moekit's fp8 reference
    (`moekit.e2e.fp8.REFERENCE`), and the distance to the bf16 model is reported."""
    from moekit.e2e import check as oracle_check
    from moekit.integrations import transformers as moekit_transformers

    _log("check: teacher-forced logits of both implementations on the baseline's tokens")
    logits = {}
    for impl in (baseline, moekit_transformers.NAME):
        activate(impl)
        logits[impl] = oracle_check.teacher_forced_logits(model, prompt, tokens)  # [B, T, V]
    result: dict[str, Any] = {
        # moekit fed the baseline's tokens predicts them; and the baseline itself (one
        # forward vs. its cached decode): what numerics alone allow at this dtype.
        "agreement_with_baseline":
            (logits[moekit_transformers.NAME].argmax(-1) == tokens).float().mean().item(),
        "baseline_self_agreement": (logits[baseline].argmax(-1) == tokens).float().mean().item(),
    }
    noise, oracle_experts = logits[baseline], oracle_check.ORACLE_EXPERTS
    if fp8_swap is not None:
        from moekit.e2e.fp8 import REFERENCE, register_reference

        # What fp8 costs: moekit's fp8 logits against transformers' bf16 model.
        result["fp8_vs_bf16"] = asdict(oracle_check.distance(
            logits[moekit_transformers.NAME], logits[baseline]))
        _log("check: teacher-forced logits of the fp8 model by moekit's fp8 reference")
        register_reference()
        model.set_experts_implementation(REFERENCE)
        fp8_swap.use(fp8=True)
        noise, oracle_experts = oracle_check.teacher_forced_logits(model, prompt, tokens), REFERENCE
        result["noise"] = f"{REFERENCE} (bf16)"
    # The converted copies (gpt-oss) are made again on next use; free them for the oracle.
    moekit_transformers.release_converted(model)
    if not oracle_check.oracle_fits(model, device):
        need = oracle_check.fp32_bytes(model) / 1e9
        result["skipped"] = f"no room for the float32 oracle (+{need:.1f} GB); not checked"
        _log(f"check SKIPPED: {result['skipped']}")
        return result
    _log("check: the same weights in float32 (the oracle)")
    oracle = oracle_check.fp32_oracle_logits(model, prompt, tokens, experts=oracle_experts)
    verdict = oracle_check.judge(noise, logits[moekit_transformers.NAME], oracle)
    activate(moekit_transformers.NAME)
    result.update(verdict.as_dict())
    _log(f"check: {_check_line(result)}")
    return result


def _check_line(check: dict[str, Any]) -> str:
    if "skipped" in check:
        return f"SKIPPED ({check['skipped']})"
    base, cand = check["baseline"], check["candidate"]
    verdict = "passed" if check["passed"] else "FAILED"
    fp8 = ""
    if "fp8_vs_bf16" in check:
        fp8 = (f"; fp8 against the bf16 model: median logits rel L2 "
               f"{check['fp8_vs_bf16']['median_rel_l2']:.2e}")
    return (f"{verdict}: median logits rel L2 to float32 "
            f"moekit {cand['median_rel_l2']:.2e} vs {check.get('noise', 'baseline')} "
            f"{base['median_rel_l2']:.2e} "
            f"(bound {check['bound']:.2e}); overall rel L2 {cand['rel_l2']:.2e} vs "
            f"{base['rel_l2']:.2e}; argmax agreement with float32 {cand['agreement']:.1%} vs "
            f"{base['agreement']:.1%}{fp8}")


def _summarise(runs: list, batch: int, prompt_len: int) -> dict[str, float]:
    """Median timings over repeats, in the units the report uses."""
    prefill_s = statistics.median(r.prefill_s for r in runs)
    tpot_s = statistics.median(r.tpot_s() for r in runs)
    return {
        "prefill_ms": prefill_s * 1e3,
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "tpot_ms": tpot_s * 1e3,
        "decode_tok_s": batch / tpot_s if tpot_s > 0 and not math.isnan(tpot_s) else 0.0,
        "prefill_ms_all": [r.prefill_s * 1e3 for r in runs],
        "tpot_ms_all": [r.tpot_s() * 1e3 for r in runs],
    }


def _print_summary(record: dict[str, Any]) -> None:
    shape = record["shape"]
    scale_note = "" if record["scale"] == "real" else "  [TINY widths: not a benchmark]"
    print(f"{record['family']} ({record['checkpoint']} widths, {shape['layers']} layers, "
          f"{shape['dtype']}), batch {shape['batch']}, prompt {shape['prompt_len']}, "
          f"{shape['new_tokens']} new tokens{scale_note}")
    print(f"{'experts':<12} {'prefill ms':>11} {'prefill tok/s':>14} {'TPOT ms':>9}")
    for name, run in record["runs"].items():
        print(f"{name:<12} {run['prefill_ms']:>11.2f} {run['prefill_tok_s']:>14.0f} "
              f"{run['tpot_ms']:>9.3f}")
    speed, match = record["speedup"], record["match"]
    print(f"moekit speedup: prefill x{speed['prefill']:.2f}, decode x{speed['decode']:.2f}")
    print(f"tokens: teacher-forced agreement {match['teacher_forced_agreement']:.1%} "
          f"(baseline vs itself {match['baseline_self_agreement']:.1%}), free-running match "
          f"{match['token_match']:.1%}, identical sequences {match['exact_match']:.1%}, "
          f"prefill logits rel L2 {match['prefill_logits_rel_l2']:.2e}")
    print(f"check against float32: {_check_line(record['check'])}")
