"""The loops of one kernel's sm_90 SASS, compiled on the CPU: length and instruction mix.

What a kernel change does to a K step (a division gone, a wait serialised, a masked
load) shows in the SASS before any device call; sessions 63–64 read it this way by hand
(bench/NOTES.md). This compiles one launch of a case of tests/test_sm90_compile.py —
the library's own launcher picks the constexprs, tiles and launch options — with ptxas
from Triton's wheel, disassembles the cubin (nvdisasm) and prints every loop (a backward
branch to a label): its instruction count, its MMAs, MMA waits, barriers and global
loads, and ptxas's advisories (C7514: wgmma serialised) and register count.

    PYTHONPATH=src python bench/scripts/sass_loops.py fp8-tensor-bf16-silu-bm1 \\
        _direct_gemm2_fp8_kernel [--params '{"straddle": true}'] [--set gemm2.block_k=64]
        [--sass FILE]

--params adds to (or overrides) the case's parameters (`straddle`: I = 192, 64 past a
multiple of 128 as gpt-oss's 2880); --set replaces fields of the config the fp8 case's
heuristic returns (`direct_fp8_config` / `plan_fp8_config`); --sass writes the whole
listing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # kernels must be JITFunctions to compile
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from triton import knobs  # noqa: E402

import moekit.experts_fp8  # noqa: E402
import test_sm90_compile as sm90  # noqa: E402

# Opcode families counted in each loop (the first token of the opcode).
WATCHED = {
    "MMA": ("HGMMA", "QGMMA", "HMMA", "IMMA"),
    "MMA waits": ("WARPGROUP.DEPBAR",),
    "barriers": ("BAR", "SYNCS"),
    "global loads": ("LDG", "LDGSTS", "UTMALDG"),
    "shared loads": ("LDS", "LDSM"),
    "divisions": ("MUFU.RCP",),
}


def with_config_fields(settings: list[str]):
    """Wrap the fp8 heuristics so their configs take `gemm.field=value` settings."""
    def apply(config):
        for setting in settings:
            path, value = setting.split("=")
            gemm, field = path.split(".")
            tile = dataclasses.replace(getattr(config, gemm), **{field: int(value)})
            config = dataclasses.replace(config, **{gemm: tile})
        return config
    for name in ("direct_fp8_config", "plan_fp8_config"):
        original = getattr(moekit.experts_fp8, name)
        setattr(moekit.experts_fp8, name,
                lambda *a, _original=original, **k: apply(_original(*a, **k)))


def disassemble(cubin: bytes) -> str:
    """nvdisasm's listing of a cubin (from Triton's wheel, beside its ptxas)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        nvdisasm = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "nvdisasm")
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True,
                              check=True).stdout


def ptxas_notes(ptx: str) -> list[str]:
    """ptxas's advisories (coded: C7514, wgmma serialised) and warnings for this PTX on
    sm_90a, and its register count."""
    return [line.strip() for line in sm90.ptxas_report(ptx).splitlines()
            if re.search(r"\(C\d+\)|warning|Used \d+ registers", line)]


def loops(listing: str) -> list[list[str]]:
    """Each loop's instructions: from a label to the last branch back to it."""
    labels, body = {}, []
    for line in listing.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
            continue
        instruction = re.match(r"^\s*/\*[0-9a-f]+\*/\s+(.+?)\s*;", line)
        if instruction:
            body.append(instruction.group(1))
    found = {}
    for end, text in enumerate(body):
        branch = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if branch and branch.group(1) in labels and labels[branch.group(1)] <= end:
            found[branch.group(1)] = body[labels[branch.group(1)]:end + 1]
    return sorted(found.values(), key=len, reverse=True)


def opcode(text: str) -> str:
    """The opcode of an instruction, past its predicate."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def summary(loop: list[str]) -> dict:
    """A loop's length and how many of each watched family it holds."""
    ops = [opcode(text) for text in loop]
    counts = {family: sum(op.startswith(prefixes) for op in ops)
              for family, prefixes in WATCHED.items()}
    return {"instructions": len(loop), **counts,
            "top": collections.Counter(op.split(".")[0] for op in ops).most_common(8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", help="a case id of tests/test_sm90_compile.py")
    parser.add_argument("kernel", help="the kernel's name, e.g. _direct_gemm2_fp8_kernel")
    parser.add_argument("--params", default="{}", help="JSON merged into the case's params")
    parser.add_argument("--set", nargs="*", default=[], metavar="GEMM.FIELD=VALUE")
    parser.add_argument("--sass", help="write the whole SASS listing here")
    args = parser.parse_args()
    if args.case not in sm90._BY_ID:
        sys.exit(f"unknown case {args.case!r}; cases: {', '.join(sorted(sm90._BY_ID))}")
    case = sm90._BY_ID[args.case]
    params = {**case.params, **json.loads(args.params)}
    with_config_fields(args.set)
    launches = []
    with sm90._recording_launches(launches):
        sm90._BUILDERS[case.op](params)
    chosen = [launch for launch in launches if launch[0].__name__ == args.kernel]
    if not chosen:
        sys.exit(f"{args.kernel} was not launched; launched: "
                 f"{sorted({fn.__name__ for fn, _, _ in launches})}")
    kernel, constexprs = sm90.compile_launch(*chosen[0])
    names = chosen[0][0].arg_names
    print(json.dumps({names[path[0]]: str(value) for path, value in constexprs.items()
                      if value is not None}))
    print(f"num_warps {kernel.metadata.num_warps}, num_stages {kernel.metadata.num_stages}, "
          f"shared {kernel.metadata.shared} B")
    for note in ptxas_notes(kernel.asm["ptx"]):
        print(note)
    listing = disassemble(kernel.asm["cubin"])
    if args.sass:
        Path(args.sass).write_text(listing)
    for i, loop in enumerate(loops(listing)):
        print(f"loop {i}: {json.dumps(summary(loop))}")


if __name__ == "__main__":
    main()
