"""Where an expert GEMM's register spills land: per K loop, on the CPU, for sm_90.

`ptxas -v` (tests/test_sm90_compile.py) gives a kernel's spill bytes in total; what costs
is a spill inside a K loop, and in the warp-specialised Gluon GEMMs which partition's loop
holds it (bench/NOTES.md, session 60: in the fp8 GEMM1 only the first-listed math
warpgroup's loop spilled, whatever the source change). This compiles test_sm90_compile.py's
cases the same way, disassembles each GEMM's cubin with the wheel's `cuobjdump` and prints
every innermost loop that issues warpgroup MMAs: its address range, instructions, MMAs and
local-memory stores and loads per iteration (the K loops are the short spans, one per math
partition; longer ones overlapping them are the tile loops' irregular control flow).

    python bench/scripts/sm90_loop_spills.py \
        fp8-block-bf16-swigluoai-bm128-tma-gluon-gluon1-bias-straddle-bf16

Environment controls (`MOEKIT_GLUON_*`) apply as in the library; the case ids are
test_sm90_compile.py's (`python tests/test_sm90_compile.py` lists them as it runs).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from triton import knobs  # noqa: E402

import test_sm90_compile as sm90  # noqa: E402

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def sass_of(ptx: str) -> str:
    """The sm_90a SASS listing of a PTX module (the wheel's ptxas, then cuobjdump)."""
    tools = Path(knobs.nvidia.ptxas.path).parent
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        Path(src).write_text(ptx)
        subprocess.run([knobs.nvidia.ptxas.path, "-arch=sm_90a", src, "-o", obj], check=True)
        return subprocess.run([str(tools / "cuobjdump"), "-sass", obj], check=True,
                              capture_output=True, text=True).stdout


def mma_loops(sass: str) -> list[dict]:
    """The innermost loops (backward branches) that issue warpgroup MMAs, with their
    instruction, MMA, STL and LDL counts; a loop containing another such loop is left out."""
    code = [(int(a, 16), text) for a, text in _INSTRUCTION.findall(sass)]
    spans = sorted({(int(m.group(1), 16), addr) for addr, text in code
                    if (m := _BRANCH_TARGET.search(text)) and int(m.group(1), 16) < addr})
    loops = []
    for start, end in spans:
        body = [text for addr, text in code if start <= addr <= end]
        if any("GMMA" in text for text in body):
            loops.append({"start": start, "end": end, "instructions": len(body),
                          "mma": sum("GMMA" in t for t in body),
                          "stl": sum(bool(re.search(r"\bSTL\b", t)) for t in body),
                          "ldl": sum(bool(re.search(r"\bLDL\b", t)) for t in body)})
    return [a for a in loops if not any(b is not a and a["start"] <= b["start"]
                                        and b["end"] <= a["end"] for b in loops)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="test_sm90_compile.py case ids")
    args = parser.parse_args()
    captured: list[tuple[str, str]] = []
    compile_sm90, spill_bytes = sm90._compile_sm90, sm90._spill_store_bytes
    current = [""]

    def compile_named(fn, *rest, **kwargs):
        current[0] = fn.__name__
        return compile_sm90(fn, *rest, **kwargs)

    def spill_and_keep(ptx):
        captured.append((current[0], ptx))
        return spill_bytes(ptx)

    sm90._compile_sm90, sm90._spill_store_bytes = compile_named, spill_and_keep
    for case in args.cases:
        captured.clear()
        stdout = os.dup(1)
        sm90._worker([case])  # its JSON line (total spill bytes) goes to stdout first
        sys.stdout.flush()
        os.dup2(stdout, 1)  # the worker points fd 1 at stderr (ptxas listings)
        for name, ptx in captured:
            print(f"{case} {name}")
            for loop in mma_loops(sass_of(ptx)):
                print(f"  loop {loop['start']:#x}–{loop['end']:#x}: {loop['instructions']} "
                      f"instructions, {loop['mma']} MMAs, {loop['stl']} STL, {loop['ldl']} LDL")


if __name__ == "__main__":
    main()
