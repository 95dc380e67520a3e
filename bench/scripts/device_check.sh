#!/bin/bash
# The GPU checks and measurements of one device call, by stage, each under its own time
# limit so one slow stage cannot take the rest down; everything lands under $OUT.
#
#   bench/scripts/device_check.sh tests routing kernels         (≈ 6 min on an H100)
#   bench/scripts/device_check.sh e2e                           (≈ 5 min)
#   bench/scripts/device_check.sh fp8                           (≈ 7 min: compiles dominate)
#
# The device returns at most 8 files from $OUT, and a stage writes several: run as
#   rm -rf /tmp/o; PACK=$OUT/r.tgz DEADLINE=570 OUT=/tmp/o bash bench/scripts/device_check.sh STAGE...
# (a machine may keep an earlier session's /tmp: clear it first). PACK: a tarball of
# everything written so far, rebuilt after every step, so a call the device stops at its
# time limit still returns the steps that finished. DEADLINE: seconds this script may run
# in all; each step's limit is cut to what is left (less 10 s for the packing), and a
# step with under 20 s left is skipped and says so.
# The copied tree's .git there can be stale: prefix MOEKIT_GIT_COMMIT=<this commit> so the
# result files name the commit that ran.
#
# Stages:
#   tests     every GPU test except the slow ones and fp8's (pytest -m "gpu and not slow")
#   slow      the slow GPU tests (> 2^31-element index arithmetic)
#   routing   `moekit bench routing` (routing, plan, permute, unpermute table)
#   kernels   `moekit bench` at every token count, graph replay, both baselines
#   prefill   `moekit bench` at M = 4096 and 16384 only, no baselines (quick v-check)
#   decode    `moekit bench` at M = 1 … 64 only, with the baselines
#   e2e       the transformers integration GPU tests and `moekit run` for the five families
#   e2efp8    fp8 checkpoints through transformers: the fp8 integration's GPU tests and
#             `moekit run --fp8-experts` for qwen3-moe, olmoe and mixtral (≤ 7 min);
#             e2efp8-dsv3 runs deepseek-v3 alone (its quantisation and oracle take longer)
#   fp8       fp8 GPU tests and `moekit bench --dtype fp8_*` at a few token counts
#   fp8tests  only the fp8 GPU tests
#   fp8tables the full fp8 kernel tables, three schemes, every preset and token count, graph
#             replay to M = 16384 (issue 5's table; 80–130 s a scheme on an H200)
#   tune      `moekit tune` on the bf16 cells furthest from their roofline at mid M and on
#             fp8 decode/prefill cells; tables (every trial kept) and their cliff reports
#             under $OUT (never the shipped tables); tune-bf16 and tune-fp8 run one half
#   depth     fp8_decode_depth_experiment.py (deeper weight pipelines, wider or narrower
#             GEMM2 column tiles at fp8 decode; DEPTH_ARGS e.g. "--cells mixtral-8x7b:1
#             --schemes fp8_tensor"): session 63's question again at every 128 products
#   cand      a candidate tree against the checkout's src at decode: copy the candidate's
#             src to .baseline/cand/src (`git archive BRANCH src | tar -x -C .baseline/cand`;
#             carry .baseline), name its commit in CAND_COMMIT; the direct path's 16-bit
#             and the fp8 GPU tests under it (CAND_TESTS=0 skips them, CAND_TESTS=fp8
#             runs only the fp8 ones), then an A/B against the checkout, M = 1–64 on four
#             presets, in CAND_DTYPES (default "fp8_tensor fp8_block"). (Session 65's
#             `steps` stage, which merged the carried direct steps, and `promote`, which
#             chose every 128 products: last at e7a59ae and 32fe004.)
#   promotek  the fp8 decode kernels (fp8_kernel_profile.py) with the swapped dots promoting
#             every 32 products, 64, 128 (shipped since session 65), never, or unswapped;
#             Nsight counters of mixtral M = 1 at 32 and never
#   fp8tiles  bench/scripts/fp8_tile_experiment.py (fp8 tiles at M = 1024, 4096)
#   fp8prefill bench/scripts/fp8_prefill_experiment.py (128- against 64-row fp8 tiles, promotion)
#   host      bench/scripts/host_overhead.py (host µs per eager call, by piece)
#   decodetma bench/scripts/decode_tma_experiment.py (TMA tiles at decode row tiles)
#   padding   bench/scripts/padding_ceiling_experiment.py (prefill: random vs exactly even routing)
#   tail      bench/scripts/tail_tiles_experiment.py (tail tiles against the heuristic, prefill)
#   direct    the direct path's GPU tests and bench/scripts/direct_path_experiment.py (decode)
#   directfp8 bench/scripts/direct_fp8_experiment.py (fp8 direct against plan path, decode;
#             the first presets only, as many as fit the limit; DIRECT_FP8_ARGS to choose)
#   gluon     bench/scripts/gluon_grouped_gemm_experiment.py (GEMM2 at prefill as a Gluon
#             grouped GEMM, plain and warp-specialised, against the library's; bf16, fp8)
#   ncu       bench/scripts/ncu_gemms.py under Nsight Compute (--set full; the report in
#             /tmp/gemms.ncu-rep, its details page in ncu-gemms-details.log); NCU_CELLS=
#             "preset:M:dtype ..." profiles those cells instead of the script's own
#   gluon1    bench/scripts/gluon_gemm1_experiment.py (fp8 GEMM1 at prefill, warp-specialised
#             Gluon over plan-order rows, against the library's GEMM1; per-tensor, block)
#   gemm2bytes Nsight Compute counters (time, clock, DRAM bytes read/written, L2 hit rate and
#             read sectors requested: over-fetch against misses) of
#             the 16-bit GEMM2 at deepseek-v3 M = 4096 and mixtral M = 16384, one call each:
#             the Gluon GEMM2 (MOEKIT_GLUON_GEMM2=1, past the few-row-tiles rule) at GROUP_M
#             1, 2 and 8, at 2 and 3 stages (GROUP_M 8), and Triton's (NOTES sessions 46–47:
#             the Gluon GEMM2 read ~2.1–2.7 GB more than Triton's at deepseek-v3 M = 4096)
#   ridgebytes Nsight Compute counters of both GEMMs (time, SM clock, DRAM bytes, L2 hit
#             rate, SM and memory throughput % of peak) at the bf16 prefill cells under target
#             with 128–256 rows an expert (qwen3 M = 4096, gpt-oss and deepseek-v3 M = 8192),
#             mixtral M = 4096 (90%) beside them: weights read more than once, or a throttled
#             clock? (NOTES, session 48)
#   fp8blockswap  block-scaled fp8 decode, swapped everywhere at the rule's stages and at the
#             same stages as the converted GEMMs, against the shipped choice (qwen3, olmoe,
#             mixtral, M = 1 / 4 / 64; env controls, one bench per setting; NOTES session 46)
#   gemm2rule which GEMM2 where rows an expert are few (session 47: the prefill cells under
#             target are those with 1–2 row tiles an expert): bf16 at M = 2048–16384 on five
#             presets, shipped (since session 47: Triton's GEMM2 at few row tiles of large
#             experts) / the Gluon GEMM2 everywhere (MOEKIT_GLUON_GEMM2=1) / Triton's GEMM2
#             everywhere / both Triton GEMMs, then the fp8
#             GEMM2's order again (row / GROUP_M 8, M = 4096–16384); one bench per setting,
#             compared on this machine with compare_tables.py
#   stagetimes bench/scripts/stage_breakdown.py (plan, GEMM1, GEMM2, combine and the gaps, each
#             graph-replayed alone, and other column tiles) on the cells under target
#             (STAGE_CELLS="preset:M ..." to choose)
#   tileorder bench/scripts/tile_order_experiment.py (the Triton GEMMs' order: GROUP_M 1–16
#             against groups that never split an expert, each GEMM alone and the layer,
#             deepseek-v3 and gpt-oss at M = 4096–16384), then Nsight Compute DRAM bytes of
#             both orders at deepseek-v3 M = 16384, where the expert order lost 6% in the
#             table (NOTES, session 49)
#   gluongroups the Gluon GEMM2s' expert groups (`MOEKIT_GLUON_EXPERT_GROUPS`, staged off,
#             never run on a GPU before): their GPU tests (and the fp8 tail-box test, whose
#             body they now share), Nsight Compute DRAM bytes of the
#             16-bit GEMM2 both ways at deepseek-v3 M = 16384, then `moekit bench` both
#             ways, two rounds alternating, bf16 (deepseek-v3, mixtral M = 4096–16384, the
#             Gluon GEMM2 forced everywhere) and fp8 per-tensor (deepseek-v3, mixtral,
#             gpt-oss, qwen3: a noise band only, as its Gluon GEMM2 runs row tile major,
#             where expert groups are the same order: NOTES, session 50), compared with
#             compare_tables.py (NOTES, session 49)
#   fp8order  the fp8 Gluon GEMM2's tile order, prefill: row tile major (shipped), GROUP_M 8
#             and Triton's GEMM2, per-tensor, one `moekit bench` per setting (the controls
#             are read at every launch), then compare_tables.py (eager and graph rows)
#   groupsab  the expert groups at four row tiles an expert and the few-row-tiles rule, three
#             rounds alternating (NOTES, session 50): shipped; the Gluon GEMM2s' expert groups
#             (`MOEKIT_GLUON_EXPERT_GROUPS=1`); those and the Triton GEMMs' forced on
#             (`MOEKIT_EXPERT_GROUPS=1`, past MAX_ROW_TILES); the Gluon GEMM2 everywhere with
#             expert groups (`MOEKIT_GLUON_GEMM2=1`, past the few-row-tiles rule); bf16,
#             deepseek-v3, gpt-oss and mixtral at M = 2048–16384, compare_tables.py
#   blockgrid gpt-oss fp8_block (the Gluon GEMM1 with block scales, session 58) under the
#             grid and order controls (BLOCKGRID_SETTINGS, default "ship t1 g4"): GEMM1
#             one program per tile (t1), persistent (t0), two consecutive tiles a program
#             (t2), GROUP_M 4 (g4), against the shipped rule; two rounds of `moekit bench`
#             at M = 4096–16384 (~3 min on a warm machine)
#   gridmargin whether the grid rule's L2 term wants a margin (session 59: gpt-oss fp8_block
#             M = 8192, in flight 0.93 of L2, ran 1.03–1.04× with its GEMM1 one program per
#             tile): gpt-oss fp8_block M = 4096 and 8192 with both GEMMs persistent (t00), the
#             GEMM1 one program per tile (t10), both (t11); fp8_tensor M = 8192 t00 and t10
#             (its GEMM1 also 0.93 of L2); two rounds (~4 min with compiles)
#   gptossregs the fp8 GEMM1 of branch s60-gptoss-regs, spill-free in every form (sm_90):
#             its GPU tests and the 16-bit GEMM1's (they share the producer), then two
#             rounds of gpt-oss fp8_block M = 4096–16384 under m (main's: scales by
#             pointer, 232 registers each, 52 bytes of spill), r (by pointer, 248 / 216:
#             no spill) and the branch's rule (staged, 248 / 216), and
#             qwen3 / deepseek-v3 fp8_block M = 4096–8192 by pointer (main's) against the
#             rule (staged; session 60 on the H200: 0.985–1.031) (~6 min)
#   stagedmargin the GEMM1's grid margin (GEMM1_WEIGHT_SHARE_OF_L2: gpt-oss M = 8192 one
#             program per tile) under hidden's per-K scales by pointer (s0) and staged (s1):
#             the grid GPU tests, then two rounds of gpt-oss fp8_block M = 4096–16384 and
#             qwen3 / deepseek-v3 fp8_block M = 4096–8192 each way (~5 min; session 61)
#   wideblock the fp8 GEMM2 with block scales on 256-column tiles (`column_halves`):
#             fp8_block one half (the default, w0) against two
#             (MOEKIT_GLUON_WIDE_BLOCK_GEMM2=1, w1), qwen3 / mixtral / deepseek-v3
#             M = 4096–8192, two rounds, its GPU tests (tests/test_gluon_gemm2.py -k
#             "block or replay") after the first (~5 min; session 61)
#   tilegrid  the Gluon GEMMs launched one program per tile (`MOEKIT_GLUON_TILE_PROGRAMS=1`:
#             the hardware hands tiles out in order) against one per SM, with the GEMM1's
#             and GEMM2's GROUP_M at 1 (fp8's shipped) or 8 (GEMM2 in expert groups): the
#             Gluon GPU tests under both controls, Nsight Compute DRAM bytes of both fp8
#             GEMMs at deepseek-v3 M = 8192 each way, then fp8 per-tensor `moekit bench`
#             each way, two rounds (NOTES, session 50: the persistent fp8 GEMM1 read its
#             expert's weights from DRAM once per row tile)
#   gridrule  the Gluon GEMMs' grid rule (`_gluon.programs_drift_apart`, fp8 only): its GPU
#             tests, then fp8 per-tensor `moekit bench` persistent (MOEKIT_GLUON_TILE_PROGRAMS=0)
#             against the rule, two rounds, on the presets and token counts where the rule
#             launches one program per tile and beside them (NOTES, session 50)
#   chunks-bf16 the 16-bit Gluon GEMMs' grids (`MOEKIT_GLUON_TILE_PROGRAMS`): persistent
#             (0, their default), one program per tile (1), 2 and 4 consecutive tiles a
#             program (`program_tiles`, never run before: the grid GPU tests first); Nsight
#             Compute DRAM bytes and time of both GEMMs at deepseek-v3 and mixtral M = 16384
#             persistent and one per tile, then bf16 `moekit bench` each way, two rounds,
#             deepseek-v3 / mixtral / qwen3 / olmoe at M = 2048–16384 (NOTES, session 50)
#   chunks-fp8 the same grids for the fp8 Gluon GEMMs (per-tensor): the rule (unset), 0, 2
#             and 4, deepseek-v3 / gpt-oss / qwen3 / mixtral at M = 2048–16384
#   chunksplit each fp8 Gluon GEMM's grid apart (`MOEKIT_GLUON_TILE_PROGRAMS=G1,G2`, "r" the
#             rule): after chunks-fp8 (2 tiles a program for both won 1.12-1.14x at
#             deepseek-v3 M >= 8192 but lost 0.77-0.88x at gpt-oss 4096 and mixtral 2048),
#             the grid GPU tests, then fp8 per-tensor the rule against GEMM1 or GEMM2 alone
#             at 2 and 4 tiles a program, and the bf16 half of chunks-bf16 without Nsight
#             Compute (persistent, one per tile, 2 a program), two rounds (NOTES, session 51)
#   gemm2grid the fp8 GEMM2's grid alone (`MOEKIT_GLUON_TILE_PROGRAMS=r,N`), after
#             chunksplit (2 tiles a program won 1.10-1.18x at deepseek-v3 M >= 8192, where the
#             rule keeps it persistent): Nsight Compute DRAM bytes and time of both GEMMs at
#             deepseek-v3 M = 8192 with GEMM2 persistent, one per tile and 2 a program, then
#             fp8 per-tensor the rule against GEMM2 one per tile and 2 a program, three
#             rounds, deepseek-v3 / gpt-oss / qwen3 / mixtral at M = 2048-16384 (session 51)
#   gridrule2 the grid rule with the GEMM2s' tiles-a-program term (MANY_TILES_A_PROGRAM, 2
#             tiles a program): the grid GPU tests, then fp8 per-tensor the rule against GEMM2
#             persistent and one per tile, three rounds, deepseek-v3 / gpt-oss / mixtral at
#             M = 512-16384; and the GEMM1 one per tile where only that term would add it
#             (deepseek-v3 M = 32768, mixtral 16384), two rounds (session 51)
#   gridtests the Gluon grids' GPU tests alone (tests/test_gluon_grid.py)
#   gluontests every Gluon GEMM's GPU tests and the replay's (tests/test_gluon_*.py,
#             tests/test_replay.py; a few minutes): first after a change to those kernels
#   gridlosses the grid rule's small losses (two rounds each in session 51), three rounds:
#             mixtral M = 4096 and 16384 and gpt-oss 32768, fp8 per-tensor, per-channel and
#             block, the rule against its GEMM1 persistent (`MOEKIT_GLUON_TILE_PROGRAMS=0,r`:
#             the tiles term's cells) and its GEMM2 persistent (`r,0`: block mixtral 4096)
#   gridruleblock the fp8 grid rule with block and per-channel scales: persistent against
#             the rule, two rounds, deepseek-v3 / gpt-oss / mixtral at M = 512–16384
#   talltiles bench/scripts/tall_tiles_experiment.py: the 16-bit Gluon GEMM1 alone on 192-row
#             tiles (three math warpgroups) against 128, even routings (~3 min; session 57)
#   blockbias bench/scripts/fp8_block_bias_experiment.py: block-scaled fp8 with biases
#             (gpt-oss, and I = 2816) through the Gluon GEMM1 against Triton's (~4 min), then
#             the Gluon fp8 GEMM1's GPU tests (tests/test_gluon_gemm1.py; session 58)
#   planlaunch bench/scripts/plan_launches_experiment.py: the dispatch plan in one launch
#             against count + scan + place at 8K–32K pairs (~1 min; session 56)
#   combineatomics bench/scripts/combine_atomics_experiment.py: GEMM2's per-pair rows stored
#             and combined against float32 atomics into token rows (then a cast), the
#             epilogue's traffic alone at prefill cells (session 52)
#   slaborder the Gluon GEMM2s in column-slab order (`MOEKIT_GLUON_GEMM2_GROUP_M=65536`:
#             every row tile takes a column tile before the next column tile, so A row
#             tiles are re-read once per column tile) against the shipped order, two rounds,
#             fp8 per-tensor and bf16, qwen3 / olmoe / granite at M = 4096 and 16384: what
#             a GEMM2 folding the combine in behind each slab would pay (session 52)
#   tailtiles the bf16 table's prefill cells (M = 2048, 4096, 8192, every preset) with the
#             heuristic's tail tiles against none (`MOEKIT_TAIL_TILES=0`), two rounds
#   bf16table the H100's shipped bf16 table (mixtral entries, session 53) against none, mixtral
#             M = 1536-4096 (the entries' windows and edges), three alternating rounds
#             (under it tailtiles' mixtral M = 2048-3072 runs without tail tiles both ways;
#             session 53's notail, notailstages and mixtraltable, which placed a table of
#             their own, went once this one shipped: last at 90c0bc0)
#   tailcost  bench/scripts/tail_cost_experiment.py: mixtral bf16 with and without tail tiles
#             on even routings (512, 544, 576, 640 rows an expert) and the bench's random
#             one at M = 2048 and 3072, explicit configs, three interleaved rounds (~2 min)
#   tailsweep tail_cost_experiment.py over the bench's random routings of mixtral, bf16 at
#             M = 256–8192 and fp8 per-tensor at 512–8192: where do tail tiles win (~5 min)
#   tailgrids tail_cost_experiment.py --tile-grids: mixtral bf16 with and without tails, each
#             persistent and one program per tile, even 576 rows and random M = 2048–8192
#             (is the tail plan's loss the persistent programs drifting apart? ~4 min)
#   tailbytes Nsight Compute counters of mixtral bf16's GEMMs at M = 2048, tails and none,
#             persistent, one program per tile, GEMM2 groups within one expert: which setting removes the tail plan's extra DRAM reads? (~3 min)
#   tailncu   Nsight Compute counters (as ridgebytes) of both GEMMs of mixtral bf16 with and
#             without tail tiles: even 576 rows an expert, the bench's M = 2048 and 4096
#             (tail_cost_experiment.py --profile; does the tail plan read more DRAM?)
#   ncustall  warp stall reasons (Nsight Compute WarpStateStats and SourceCounters: the
#             details page, and per-SASS-instruction samples as CSV) of both GEMMs of
#             qwen3 M = 4096 fp8 per-tensor, the fp8 prefill cell under target with the
#             most rows an expert (its GEMM2 at ~53% of the fp8 peak, session 50), or of
#             STALL_GEMMS (e.g. "gemm1") of STALL_CELL (PRESET:M:DTYPE);
#             bench/scripts/ncu_stall_summary.py reads the CSVs
#   fp8ridgebytes Nsight Compute counters of both fp8 per-tensor GEMMs (as ridgebytes) at the
#             fp8 prefill cells under target: deepseek-v3 M = 8192 and 16384, gpt-oss 8192,
#             qwen3 4096 (NOTES, session 50), or of RIDGE_CELLS ("PRESET:M:DTYPE ...")
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
out=${OUT:-.out}
mkdir -p "$out"
# Each GPU test's peak allocation, appended by tests/conftest.py (which test needs how much).
export MOEKIT_GPU_PEAK_LOG="$out/gpu-test-peaks.txt"
# Compiles dominate the GPU tests: 4 pytest-xdist workers (installed on the device), one
# test file each at a time so two memory-hungry files rarely meet; a hung test fails alone.
PARALLEL="-n 4 --dist loadfile --timeout 200"
python3 -c "import xdist, pytest_timeout" 2>/dev/null || PARALLEL=""

started=$SECONDS
pack() {  # PACK, when set: everything under $out so far
  [ -z "${PACK:-}" ] || { tar czf "$PACK.part" -C "$out" . && mv "$PACK.part" "$PACK"; }
}
step() {  # step NAME SECONDS COMMAND...: run, log to $out/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - (SECONDS - started) - 10))
    if [ "$left" -lt 20 ]; then
      echo "== $name: skipped (${left}s left of DEADLINE=${DEADLINE}s)" | tee "$out/$name.log"
      pack
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name: rc=$? (limit ${limit}s)"
  grep -v -i warn "$out/$name.log" | tail -4
  pack
}

# ncu_counters NAME LIMIT CELL [VAR=VALUE...]: the GEMMs of one layer call
# (`ncu_gemms.py --cell CELL`) under Nsight Compute in that environment: time, SM clock,
# DRAM bytes read and written, L2 hit rate, SM and memory throughput (% of peak).
NCU_COUNTERS=gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed
ncu_counters() {
  local name=$1 limit=$2 cell=$3
  shift 3
  step "$name" "$limit" env "$@" ncu --profile-from-start off --clock-control none \
    -k regex:gemm --csv --metrics "$NCU_COUNTERS" python3 bench/scripts/ncu_gemms.py --cell "$cell"
}
# compare_settings STEM WHAT SETTING...: compare_tables.py over each setting's rounds
# ($out/*WHAT-SETTING-r*.json, from `--what WHAT-SETTING-rN`), the first the baseline.
compare_settings() {
  local stem=$1 what=$2 setting
  shift 2
  local versions=()
  for setting in "$@"; do
    versions+=("$setting=$(ls "$out"/*"$what-$setting"-r*.json | paste -sd,)")
  done
  step "compare-$what" 30 python3 bench/scripts/compare_tables.py --out "$out" \
    --stem "$stem" "${versions[@]}"
}

# fp8_swap_tests NAME [VAR=VALUE...]: the fp8 GPU tests (experts and swapped GEMMs) in
# that environment, spread over workers where xdist is there (a cold cache: compiles).
fp8_swap_tests() {
  local name=$1
  shift
  step "$name" 200 env "$@" python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
    ${PARALLEL:+-n 4 --timeout 200} tests/test_experts_fp8.py tests/test_fp8_swap.py
}
# fp8_decode_ab TAG LIMIT DTYPE VERSIONS: ab_bench.sh of VERSIONS ("label=src ...") at
# decode, M = 1–64 on the four presets whose fp8 decode cells session 64 measured.
fp8_decode_ab() {
  step "$1" "$2" env VERSIONS="$4" ROUNDS=2 OUT="$out" bash bench/scripts/ab_bench.sh "$1" \
    --dtype "$3" --no-baselines --rep-ms 30 --graph-max-m 16384 \
    --presets mixtral-8x7b deepseek-v3 gpt-oss-120b qwen3-30b-a3b --tokens 1 4 16 64
}

for stage in "$@"; do
  case $stage in
    tests) step pytest-gpu 480 python3 -m pytest -m "gpu and not slow" -q -p no:cacheprovider -rfE \
             $PARALLEL --ignore=tests/test_experts_fp8.py tests ;;
    slow) step pytest-gpu-slow 120 python3 -m pytest -m "gpu and slow" -q -p no:cacheprovider tests ;;
    decode) step bench-decode 200 python3 -m moekit.cli bench --tokens 1 2 4 8 16 32 64 \
              --what kernels-bf16-decode --out "$out" ;;
    direct)
      step pytest-gpu-direct 150 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_experts.py -k direct
      step direct-experiment 330 python3 bench/scripts/direct_path_experiment.py --out "$out" ;;
    directfp8) step direct-fp8-experiment 400 python3 bench/scripts/direct_fp8_experiment.py \
                 --out "$out" ${DIRECT_FP8_ARGS:-} ;;
    gluon)
      step gluon-experiment 240 python3 bench/scripts/gluon_grouped_gemm_experiment.py --out "$out"
      step gluon-experiment-fp8 180 python3 bench/scripts/gluon_grouped_gemm_experiment.py \
        --dtype fp8 --out "$out" ;;
    gluon1) step gluon-gemm1-experiment 300 env MOEKIT_GLUON=0 python3 \
              bench/scripts/gluon_gemm1_experiment.py --out "$out" ;;  # Triton GEMM1 baseline
    routing) step bench-routing 150 python3 -m moekit.cli bench routing --out "$out" ;;
    kernels) step bench-kernels 300 python3 -m moekit.cli bench --graph-max-m 16384 --out "$out" ;;
    prefill) step bench-prefill 90 python3 -m moekit.cli bench --tokens 4096 16384 --no-baselines \
               --what kernels-bf16-prefill --out "$out" ;;
    e2e)
      step pytest-gpu-integrations 100 python3 -m pytest tests/integrations -m gpu -q -p no:cacheprovider
      for family in gpt-oss deepseek-v3 mixtral olmoe qwen3-moe; do
        step "run-$family" 75 python3 -m moekit.cli run --model "$family" --repeats 3 \
          --new-tokens 8 --out-dir "$out"
      done ;;
    e2efp8)
      step pytest-gpu-fp8-integration 150 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/integrations/test_transformers_fp8_experts.py
      for family in qwen3-moe olmoe mixtral; do
        step "run-fp8-$family" 90 python3 -m moekit.cli run --model "$family" --fp8-experts \
          --repeats 3 --new-tokens 8 --out-dir "$out"
      done ;;
    e2efp8-dsv3) step run-fp8-deepseek-v3 300 python3 -m moekit.cli run --model deepseek-v3 \
                   --fp8-experts --repeats 3 --new-tokens 8 --out-dir "$out" ;;
    fp8|fp8tests)
      step pytest-gpu-fp8 200 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider $PARALLEL \
        tests/test_experts_fp8.py tests/quant
      [ "$stage" = fp8tests ] && continue
      for scheme in fp8_tensor fp8_channel fp8_block; do
        step "bench-$scheme" 85 python3 -m moekit.cli bench --dtype "$scheme" --rep-ms 50 \
          --presets qwen3-30b-a3b mixtral-8x7b deepseek-v3 --tokens 1 64 4096 --out "$out"
      done ;;
    fp8tables)
      for scheme in fp8_tensor fp8_channel fp8_block; do
        step "bench-$scheme-all" 240 python3 -m moekit.cli bench --dtype "$scheme" \
          --no-baselines --graph-max-m 16384 --rep-ms 50 --what "kernels-$scheme" --out "$out"
      done ;;
    tune|tune-bf16|tune-fp8)  # the bf16 cells furthest from their roofline at mid M, and fp8's
           # weakest decode/prefill cells; the tuner saves after every cell and resumes
      [ "$stage" = tune-fp8 ] || {
      step tune-bf16 120 python3 -m moekit.cli tune --fresh --out "$out/tune-bf16.json" \
        --presets granite-3.0-3b-a800m --tokens 256 1024
      step tune-bf16-mid 150 python3 -m moekit.cli tune --out "$out/tune-bf16.json" \
        --presets mixtral-8x7b olmoe-1b-7b --tokens 1024 2048
      step tune-bf16-report 20 python3 -m moekit.cli tune --report "$out/tune-bf16.json"; }
      [ "$stage" = tune-bf16 ] && continue
      step tune-fp8 280 python3 -m moekit.cli tune --fresh --dtype fp8_tensor \
        --out "$out/tune-fp8_tensor.json" --presets qwen3-30b-a3b --tokens 1 4096
      step tune-fp8-report 20 python3 -m moekit.cli tune --report "$out/tune-fp8_tensor.json" ;;
    depth) step fp8-decode-depth 400 python3 bench/scripts/fp8_decode_depth_experiment.py \
             --out "$out" ${DEPTH_ARGS:-} ;;
    fp8tiles) step fp8-tile-experiment 170 python3 bench/scripts/fp8_tile_experiment.py \
                --out "$out" ;;
    fp8prefill) step fp8-prefill-experiment 560 python3 bench/scripts/fp8_prefill_experiment.py \
                  --out "$out" ;;
    host) step host-overhead 60 python3 bench/scripts/host_overhead.py ;;
    decodetma) step decode-tma 150 python3 bench/scripts/decode_tma_experiment.py --out "$out" ;;
    tail) step tail-tiles 300 python3 bench/scripts/tail_tiles_experiment.py --out "$out" ;;
    padding) step padding-ceiling 150 python3 bench/scripts/padding_ceiling_experiment.py \
               --out "$out" ;;
    ncu) step ncu-gemms 300 ncu --profile-from-start off --clock-control none --set full \
           -k regex:gemm -f -o /tmp/gemms python3 bench/scripts/ncu_gemms.py ${NCU_CELLS:+--cell $NCU_CELLS}
         step ncu-gemms-details 60 ncu --import /tmp/gemms.ncu-rep --page details ;;
    gemm2bytes)
      for cell in deepseek-v3:4096:bf16 mixtral-8x7b:16384:bf16; do
        for order in g1 g2 g8 g8s3 g8s2 triton; do
          stages=4
          case $order in
            triton) set -- MOEKIT_GLUON_GEMM2=0 ;;
            g8s*) stages=${order#g8s}; set -- MOEKIT_GLUON_GEMM2=1 MOEKIT_GLUON_GEMM2_GROUP_M=8 ;;
            *) set -- MOEKIT_GLUON_GEMM2=1 MOEKIT_GLUON_GEMM2_GROUP_M=${order#g} ;;
          esac
          step "ncu-gemm2-${cell//:/-}-$order" 120 env "$@" ncu --profile-from-start off \
            --clock-control none -k regex:gemm2 --csv --metrics \
            gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct,lts__t_sectors_op_read.sum \
            python3 bench/scripts/ncu_gemms.py --cell "$cell" --gemm2-stages $stages
        done
      done ;;
    ridgebytes)
      for cell in qwen3-30b-a3b:4096:bf16 gpt-oss-120b:8192:bf16 deepseek-v3:8192:bf16 \
          mixtral-8x7b:4096:bf16; do
        ncu_counters "ncu-ridge-${cell//:/-}" 150 "$cell"
      done ;;
    fp8blockswap)
      all=direct1,direct2,plan1,plan2,block
      for setting in shipped swap-rule swap-same; do
        case $setting in
          shipped) set -- MOEKIT_FP8_SWAP_AB=1 ;;
          swap-rule) set -- MOEKIT_FP8_SWAP_AB=$all MOEKIT_FP8_SWAP_STAGES=rule ;;
          swap-same) set -- MOEKIT_FP8_SWAP_AB=$all MOEKIT_FP8_SWAP_STAGES=same ;;
        esac
        step "bench-fp8blockswap-$setting" 120 env "$@" python3 -m moekit.cli bench \
          --dtype fp8_block --no-baselines --rep-ms 50 --presets qwen3-30b-a3b olmoe-1b-7b \
          mixtral-8x7b --tokens 1 4 64 --what "fp8blockswap-$setting" --out "$out"
      done
      step compare-fp8blockswap 30 python3 bench/scripts/compare_tables.py --out "$out" \
        --stem ab-fp8_block-swap-stages "shipped=$(ls "$out"/*fp8blockswap-shipped.json)" \
        "rule=$(ls "$out"/*fp8blockswap-swap-rule.json)" \
        "same=$(ls "$out"/*fp8blockswap-swap-same.json)" ;;
    gemm2rule)
      for setting in shipped gluon t2 t12; do
        case $setting in
          shipped) set -- ;;
          gluon) set -- MOEKIT_GLUON_GEMM2=1 ;;
          t2) set -- MOEKIT_GLUON_GEMM2=0 ;;
          t12) set -- MOEKIT_GLUON=0 ;;
        esac
        step "bench-gemm2rule-bf16-$setting" 110 env "$@" python3 -m moekit.cli bench \
          --no-baselines --graph-max-m 16384 --rep-ms 40 --presets deepseek-v3 gpt-oss-120b \
          qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b --tokens 2048 4096 8192 16384 \
          --what "gemm2rule-bf16-$setting" --out "$out"
      done
      for order in g1 g8; do
        step "bench-gemm2rule-fp8-$order" 90 env MOEKIT_GLUON_GEMM2_GROUP_M=${order#g} python3 \
          -m moekit.cli bench --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 40 \
          --presets deepseek-v3 gpt-oss-120b qwen3-30b-a3b olmoe-1b-7b mixtral-8x7b \
          --tokens 4096 8192 16384 --what "gemm2rule-fp8-$order" --out "$out"
      done ;;
    stagetimes)
      step "stage-breakdown" 300 python3 bench/scripts/stage_breakdown.py --out "$out" --tiles \
        --cells ${STAGE_CELLS:-granite-3.0-3b-a800m:1 granite-3.0-3b-a800m:8 \
        granite-3.0-3b-a800m:64 gpt-oss-120b:1 qwen3-30b-a3b:1 qwen3-30b-a3b:2 \
        qwen3-30b-a3b:4096 gpt-oss-120b:8192} ;;
    tileorder)
      step tile-order-experiment 300 python3 bench/scripts/tile_order_experiment.py --out "$out"
      for groups in 0 1; do
        ncu_counters "ncu-order-deepseek-v3-16384-e$groups" 90 deepseek-v3:16384:bf16 \
          MOEKIT_EXPERT_GROUPS=$groups
      done ;;
    gluongroups)
      step pytest-gpu-gluon-groups 200 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        -k expert_groups tests/test_gluon_gemm2.py tests/test_gluon_gemm2_16bit.py
      for groups in 0 1; do
        step "ncu-gluon-groups-deepseek-v3-16384-e$groups" 90 env \
          MOEKIT_GLUON_EXPERT_GROUPS=$groups ncu --profile-from-start off --clock-control none \
          -k regex:gemm2 --csv --metrics \
          gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,dram__bytes_read.sum,lts__t_sector_hit_rate.pct \
          python3 bench/scripts/ncu_gemms.py --cell deepseek-v3:16384:bf16
      done
      for round in 1 2; do
        for groups in 0 1; do
          step "bench-gluongroups-bf16-e$groups-r$round" 90 env MOEKIT_GLUON_GEMM2=1 \
            MOEKIT_GLUON_EXPERT_GROUPS=$groups python3 -m moekit.cli bench --no-baselines \
            --graph-max-m 16384 --rep-ms 40 --presets deepseek-v3 mixtral-8x7b \
            --tokens 4096 8192 16384 --what "gluongroups-bf16-e$groups-r$round" --out "$out"
          step "bench-gluongroups-fp8-e$groups-r$round" 90 env \
            MOEKIT_GLUON_EXPERT_GROUPS=$groups python3 -m moekit.cli bench --dtype fp8_tensor \
            --no-baselines --graph-max-m 16384 --rep-ms 40 --presets deepseek-v3 mixtral-8x7b \
            gpt-oss-120b qwen3-30b-a3b --tokens 4096 8192 16384 --what "gluongroups-fp8-e$groups-r$round" --out "$out"
        done
      done
      for dtype in bf16 fp8; do
        step "compare-gluongroups-$dtype" 30 python3 bench/scripts/compare_tables.py \
          --out "$out" --stem "ab-$dtype-gluon-expert-groups" \
          "g8=$(ls "$out"/*gluongroups-$dtype-e0-r1.json),$(ls "$out"/*gluongroups-$dtype-e0-r2.json)" \
          "e8=$(ls "$out"/*gluongroups-$dtype-e1-r1.json),$(ls "$out"/*gluongroups-$dtype-e1-r2.json)"
      done ;;
    fp8order)
      presets="deepseek-v3 mixtral-8x7b qwen3-30b-a3b olmoe-1b-7b"
      for order in g1 g8 triton; do
        if [ $order = triton ]; then set -- MOEKIT_GLUON_GEMM2=0
        else set -- MOEKIT_GLUON_GEMM2_GROUP_M=${order#g}; fi
        step "bench-fp8order-$order" 150 env "$@" python3 -m moekit.cli bench --dtype fp8_tensor \
          --no-baselines --graph-max-m 16384 --rep-ms 50 --presets $presets \
          --tokens 1024 4096 16384 --what "fp8order-$order" --out "$out"
      done
      for mode in "" --eager; do
        step "compare-fp8order${mode}" 30 python3 bench/scripts/compare_tables.py --out "$out" \
          --stem "ab-fp8_tensor-gemm2-order${mode:+-eager}" $mode \
          "row=$(ls "$out"/*fp8order-g1.json)" "g8=$(ls "$out"/*fp8order-g8.json)" \
          "triton=$(ls "$out"/*fp8order-triton.json)"
      done ;;
    groupsab)
      settings="ship gl all glg2"
      for round in 1 2 3; do
        for setting in $settings; do
          case $setting in
            ship) set -- ;;
            gl) set -- MOEKIT_GLUON_EXPERT_GROUPS=1 ;;
            all) set -- MOEKIT_GLUON_EXPERT_GROUPS=1 MOEKIT_EXPERT_GROUPS=1 ;;
            glg2) set -- MOEKIT_GLUON_EXPERT_GROUPS=1 MOEKIT_GLUON_GEMM2=1 ;;
          esac
          step "bench-groupsab-$setting-r$round" 90 env "$@" python3 -m moekit.cli bench \
            --no-baselines --graph-max-m 16384 --rep-ms 40 --presets deepseek-v3 \
            gpt-oss-120b mixtral-8x7b --tokens 2048 4096 8192 16384 \
            --what "groupsab-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-bf16-groups-rule groupsab $settings ;;
    fp8ridgebytes)
      for cell in ${RIDGE_CELLS:-deepseek-v3:8192:fp8_tensor deepseek-v3:16384:fp8_tensor \
          gpt-oss-120b:8192:fp8_tensor qwen3-30b-a3b:4096:fp8_tensor}; do
        ncu_counters "ncu-fp8ridge-${cell//:/-}" 150 "$cell"
      done ;;
    blockgrid)
      settings=${BLOCKGRID_SETTINGS:-ship t1 g4}
      block_setting() {
        case $1 in
          ship) echo ;;
          t1) echo MOEKIT_GLUON_TILE_PROGRAMS=1,r ;;
          t0) echo MOEKIT_GLUON_TILE_PROGRAMS=0,r ;;
          t2) echo MOEKIT_GLUON_TILE_PROGRAMS=2,r ;;
          g4) echo MOEKIT_GLUON_GEMM1_GROUP_M=4 ;;
        esac
      }
      for round in 1 2; do
        for setting in $settings; do
          step "bench-blockgrid-$setting-r$round" 60 env $(block_setting $setting) python3 -m \
            moekit.cli bench --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets gpt-oss-120b --tokens 4096 8192 16384 \
            --what "blockgrid-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_block-gptoss-grid blockgrid $settings ;;
    gridmargin)
      for round in 1 2; do
        for setting in t00 t10 t11; do
          step "bench-gridmargin-block-$setting-r$round" 60 env \
            MOEKIT_GLUON_TILE_PROGRAMS=${setting:1:1},${setting:2:1} python3 -m moekit.cli bench \
            --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets gpt-oss-120b --tokens 4096 8192 --what "gridmargin-block-$setting-r$round" \
            --out "$out"
        done
        for setting in t00 t10; do
          step "bench-gridmargin-tensor-$setting-r$round" 50 env \
            MOEKIT_GLUON_TILE_PROGRAMS=${setting:1:1},${setting:2:1} python3 -m moekit.cli bench \
            --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets gpt-oss-120b --tokens 8192 --what "gridmargin-tensor-$setting-r$round" \
            --out "$out"
        done
      done
      compare_settings ab-fp8_block-gptoss-grid-margin gridmargin-block t00 t10 t11
      compare_settings ab-fp8_tensor-gptoss-grid-margin gridmargin-tensor t00 t10 ;;
    gptossregs)
      step pytest-gpu-gluon-gemm1-regs 240 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        ${PARALLEL:+-n 8 --dist load --timeout 280} tests/test_gluon_gemm1.py \
        tests/test_gluon_gemm1_16bit.py
      regs_setting() {
        case $1 in
          m) echo MOEKIT_GLUON_STAGED_SCALES=0 MOEKIT_GLUON_GEMM1_REGISTERS=232,232 ;;
          r | p) echo MOEKIT_GLUON_STAGED_SCALES=0 ;;
          rule) echo ;;
        esac
      }
      for round in 1 2; do
        for setting in m r rule; do
          step "bench-gptossregs-$setting-r$round" 60 env $(regs_setting $setting) python3 -m \
            moekit.cli bench --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets gpt-oss-120b --tokens 4096 8192 16384 \
            --what "gptossregs-$setting-r$round" --out "$out"
        done
        for setting in p rule; do
          step "bench-blockstaged-$setting-r$round" 60 env $(regs_setting $setting) python3 -m \
            moekit.cli bench --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets qwen3-30b-a3b deepseek-v3 --tokens 4096 8192 \
            --what "blockstaged-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_block-gptoss-regs gptossregs m r rule
      compare_settings ab-fp8_block-staged blockstaged p rule ;;
    stagedmargin)
      step pytest-gpu-grid 150 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_gluon_grid.py
      for round in 1 2; do
        for setting in s0 s1; do
          step "bench-stagedmargin-$setting-r$round" 60 env \
            MOEKIT_GLUON_STAGED_SCALES=${setting:1:1} python3 -m moekit.cli bench \
            --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets gpt-oss-120b --tokens 4096 8192 16384 \
            --what "stagedmargin-$setting-r$round" --out "$out"
          step "bench-stagedblocks-$setting-r$round" 60 env \
            MOEKIT_GLUON_STAGED_SCALES=${setting:1:1} python3 -m moekit.cli bench \
            --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets qwen3-30b-a3b deepseek-v3 --tokens 4096 8192 \
            --what "stagedblocks-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_block-staged-margin stagedmargin s0 s1
      compare_settings ab-fp8_block-staged-blocks stagedblocks s0 s1 ;;
    cand)  # a candidate src (.baseline/cand/src) against the checkout's, at decode
      [ -d .baseline/cand/src ] || { echo "== cand: no .baseline/cand/src"; continue; }
      case ${CAND_TESTS:-1} in  # 0: none; fp8: only the fp8 ones (a plan-path change)
        0) ;;
        fp8) fp8_swap_tests pytest-gpu-fp8-cand PYTHONPATH=.baseline/cand/src ;;
        *) step pytest-gpu-direct-cand 150 env PYTHONPATH=.baseline/cand/src python3 -m pytest \
             -m gpu -q -rfE -p no:cacheprovider tests/test_experts.py -k direct
           fp8_swap_tests pytest-gpu-fp8-cand PYTHONPATH=.baseline/cand/src ;;
      esac
      for dtype in ${CAND_DTYPES:-fp8_tensor fp8_block}; do
        fp8_decode_ab "ab-$dtype-cand" 200 "$dtype" \
          "main=src cand=.baseline/cand/src${CAND_COMMIT:+@$CAND_COMMIT}"
      done ;;
    promotek)  # the swapped fp8 dots' promotion interval at decode, kernel by kernel (s63)
      cells=${PROMOTE_CELLS:-mixtral-8x7b:1:fp8_tensor mixtral-8x7b:4:fp8_tensor \
        gpt-oss-120b:1:fp8_tensor deepseek-v3:1:fp8_tensor deepseek-v3:2:fp8_tensor \
        qwen3-30b-a3b:64:fp8_tensor}
      for setting in promote-32 promote-0 promote-128 promote-64 swap-off; do
        case $setting in
          swap-off) set -- MOEKIT_FP8_SWAP_AB=0 ;;
          *) set -- MOEKIT_FP8_SWAP_PROMOTE_K=${setting#promote-} ;;
        esac
        step "profile-$setting" 90 env "$@" python3 bench/scripts/fp8_kernel_profile.py \
          --tag "$setting" --cells $cells --out "$out"
      done
      step compare-promote 20 python3 bench/scripts/fp8_kernel_profile.py --compare \
        "$out"/promote-{32,64,128,0}.json "$out"/swap-off.json
      for setting in 32 0; do
        ncu_counters "ncu-mixtral-1-fp8_tensor-promote-$setting" 90 mixtral-8x7b:1:fp8_tensor \
          MOEKIT_FP8_SWAP_PROMOTE_K=$setting
      done ;;
    wideblock)
      for round in 1 2; do
        for setting in w0 w1; do
          step "bench-wideblock-$setting-r$round" 80 env \
            MOEKIT_GLUON_WIDE_BLOCK_GEMM2=${setting:1:1} python3 -m moekit.cli bench \
            --dtype fp8_block --no-baselines --graph-max-m 16384 --rep-ms 40 \
            --presets qwen3-30b-a3b mixtral-8x7b deepseek-v3 --tokens 4096 8192 \
            --what "wideblock-$setting-r$round" --out "$out"
        done
        [ $round = 1 ] && step pytest-gpu-gemm2 150 python3 -m pytest -m gpu -q -rfE \
          -p no:cacheprovider -k "block or replay" tests/test_gluon_gemm2.py
      done
      compare_settings ab-fp8_block-wide-gemm2 wideblock w0 w1 ;;
    tilegrid)
      step pytest-gpu-tilegrid 150 env MOEKIT_GLUON_TILE_PROGRAMS=1 MOEKIT_GLUON_GEMM1_GROUP_M=8 \
        MOEKIT_GLUON_GEMM2_GROUP_M=8 MOEKIT_GLUON_EXPERT_GROUPS=1 python3 -m pytest -m gpu -q \
        -rfE -p no:cacheprovider -x tests/test_gluon_gemm1.py tests/test_gluon_gemm1_16bit.py \
        tests/test_gluon_gemm2.py tests/test_gluon_gemm2_16bit.py
      settings="ship g8 tiles tiles8"
      tile_setting() {
        case $1 in
          ship) echo ;;
          g8) echo MOEKIT_GLUON_GEMM1_GROUP_M=8 MOEKIT_GLUON_GEMM2_GROUP_M=8 MOEKIT_GLUON_EXPERT_GROUPS=1 ;;
          tiles) echo MOEKIT_GLUON_TILE_PROGRAMS=1 ;;
          tiles8) echo MOEKIT_GLUON_TILE_PROGRAMS=1 MOEKIT_GLUON_GEMM1_GROUP_M=8 \
                    MOEKIT_GLUON_GEMM2_GROUP_M=8 MOEKIT_GLUON_EXPERT_GROUPS=1 ;;
        esac
      }
      for setting in $settings; do
        ncu_counters "ncu-tilegrid-$setting" 60 deepseek-v3:8192:fp8_tensor $(tile_setting $setting)
      done
      for round in 1 2; do
        for setting in $settings; do
          step "bench-tilegrid-$setting-r$round" 60 env $(tile_setting $setting) python3 -m moekit.cli \
            bench --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 40 --presets \
            deepseek-v3 gpt-oss-120b qwen3-30b-a3b mixtral-8x7b --tokens 4096 8192 16384 \
            --what "tilegrid-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_tensor-tile-grid tilegrid $settings ;;
    gridrule)
      step pytest-gpu-gridrule 90 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_gluon_grid.py
      for round in 1 2; do
        for setting in ship rule; do
          if [ $setting = ship ]; then set -- MOEKIT_GLUON_TILE_PROGRAMS=0; else set --; fi
          step "bench-gridrule-$setting-r$round" 60 env "$@" python3 -m moekit.cli bench \
            --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 30 --presets \
            deepseek-v3 gpt-oss-120b qwen3-30b-a3b mixtral-8x7b olmoe-1b-7b \
            --tokens 512 1024 2048 4096 8192 16384 --what "gridrule-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_tensor-grid-rule gridrule ship rule ;;
    chunks-bf16|chunks-fp8)
      step pytest-gpu-chunks 120 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_gluon_grid.py
      if [ $stage = chunks-bf16 ]; then
        for cell in deepseek-v3:16384:bf16 mixtral-8x7b:16384:bf16; do
          for setting in 0 1; do
            ncu_counters "ncu-chunks-${cell//:/-}-t$setting" 90 "$cell" \
              MOEKIT_GLUON_TILE_PROGRAMS=$setting
          done
        done
        settings="t0 t1 t2 t4" dtype=bf16 presets="deepseek-v3 mixtral-8x7b qwen3-30b-a3b olmoe-1b-7b"
      else
        settings="rule t0 t2 t4" dtype=fp8_tensor
        presets="deepseek-v3 gpt-oss-120b qwen3-30b-a3b mixtral-8x7b"
      fi
      for round in 1 2; do
        for setting in $settings; do
          if [ $setting = rule ]; then set --; else set -- MOEKIT_GLUON_TILE_PROGRAMS=${setting#t}; fi
          step "bench-$stage-$setting-r$round" 60 env "$@" python3 -m moekit.cli bench \
            --dtype $dtype --no-baselines --graph-max-m 16384 --rep-ms 30 --presets $presets \
            --tokens 2048 4096 8192 16384 --what "$stage-$setting-r$round" --out "$out"
        done
      done
      compare_settings "ab-$dtype-chunks" "$stage" $settings ;;
    gridruleblock)
      for dtype in fp8_block fp8_channel; do
        for round in 1 2; do
          for setting in ship rule; do
            if [ $setting = ship ]; then set -- MOEKIT_GLUON_TILE_PROGRAMS=0; else set --; fi
            step "bench-gridrule-$dtype-$setting-r$round" 90 env "$@" python3 -m moekit.cli \
              bench --dtype $dtype --no-baselines --graph-max-m 16384 --rep-ms 30 --presets \
              deepseek-v3 gpt-oss-120b mixtral-8x7b --tokens 512 1024 2048 4096 8192 16384 \
              --what "gridrule-$dtype-$setting-r$round" --out "$out"
          done
        done
        compare_settings "ab-$dtype-grid-rule" "gridrule-$dtype" ship rule
      done ;;
    chunksplit)
      step pytest-gpu-chunks 120 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_gluon_grid.py
      for round in 1 2; do
        for setting in rule a2 a4 b2 b4; do
          case $setting in
            rule) set -- ;;
            a*) set -- MOEKIT_GLUON_TILE_PROGRAMS=${setting#a},r ;;
            b*) set -- MOEKIT_GLUON_TILE_PROGRAMS=r,${setting#b} ;;
          esac
          step "bench-split-$setting-r$round" 60 env "$@" python3 -m moekit.cli bench \
            --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 30 --presets \
            deepseek-v3 gpt-oss-120b qwen3-30b-a3b mixtral-8x7b --tokens 2048 4096 8192 16384 \
            --what "split-$setting-r$round" --out "$out"
        done
        for setting in t0 t1 t2; do
          step "bench-chunks16-$setting-r$round" 60 env MOEKIT_GLUON_TILE_PROGRAMS=${setting#t} \
            python3 -m moekit.cli bench --no-baselines --graph-max-m 16384 --rep-ms 30 \
            --presets deepseek-v3 mixtral-8x7b qwen3-30b-a3b olmoe-1b-7b \
            --tokens 2048 4096 8192 16384 --what "chunks16-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_tensor-chunk-split split rule a2 a4 b2 b4
      compare_settings ab-bf16-chunks chunks16 t0 t1 t2 ;;
    gemm2grid)
      for setting in 0 1 2; do
        ncu_counters "ncu-gemm2grid-deepseek-v3-8192-g2-$setting" 90 \
          deepseek-v3:8192:fp8_tensor MOEKIT_GLUON_TILE_PROGRAMS=r,$setting
      done
      for round in 1 2 3; do
        for setting in rule b1 b2; do
          if [ $setting = rule ]; then set --; else set -- MOEKIT_GLUON_TILE_PROGRAMS=r,${setting#b}; fi
          step "bench-gemm2grid-$setting-r$round" 60 env "$@" python3 -m moekit.cli bench \
            --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 30 --presets \
            deepseek-v3 gpt-oss-120b qwen3-30b-a3b mixtral-8x7b --tokens 2048 4096 8192 16384 \
            --what "gemm2grid-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-fp8_tensor-gemm2-grid gemm2grid rule b1 b2 ;;
    gridrule2)
      step pytest-gpu-grid 120 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_gluon_grid.py
      for round in 1 2 3; do
        for setting in rule b0 b1; do
          if [ $setting = rule ]; then set --; else set -- MOEKIT_GLUON_TILE_PROGRAMS=r,${setting#b}; fi
          step "bench-gridrule2-$setting-r$round" 60 env "$@" python3 -m moekit.cli bench \
            --dtype fp8_tensor --no-baselines --graph-max-m 16384 --rep-ms 30 --presets \
            deepseek-v3 gpt-oss-120b mixtral-8x7b --tokens 512 1024 2048 4096 8192 16384 \
            --what "gridrule2-$setting-r$round" --out "$out"
        done
        [ $round = 3 ] && continue
        for setting in rule a1; do
          if [ $setting = rule ]; then set --; else set -- MOEKIT_GLUON_TILE_PROGRAMS=1,r; fi
          for cell in deepseek-v3:32768 mixtral-8x7b:16384; do
            step "bench-gemm1many-${cell%:*}-$setting-r$round" 60 env "$@" python3 -m moekit.cli \
              bench --dtype fp8_tensor --no-baselines --graph-max-m 32768 --rep-ms 30 \
              --presets ${cell%:*} --tokens ${cell#*:} \
              --what "gemm1many-${cell%:*}-$setting-r$round" --out "$out"
          done
        done
      done
      compare_settings ab-fp8_tensor-grid-rule2 gridrule2 rule b0 b1
      for preset in deepseek-v3 mixtral-8x7b; do
        compare_settings "ab-fp8_tensor-gemm1-many-$preset" "gemm1many-$preset" rule a1
      done ;;
    gridtests) step pytest-gpu-grid 120 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        tests/test_gluon_grid.py ;;
    gluontests) step pytest-gpu-gluon 300 python3 -m pytest -m "gpu and not slow" -q -rfE \
        -p no:cacheprovider $PARALLEL tests/test_gluon_*.py tests/test_replay.py ;;
    gridlosses)
      for round in 1 2 3; do
        for dtype in fp8_tensor fp8_channel fp8_block; do
          for setting in rule g1p g2p; do
            case $setting in
              rule) set -- ;;
              g1p) set -- MOEKIT_GLUON_TILE_PROGRAMS=0,r ;;
              g2p) set -- MOEKIT_GLUON_TILE_PROGRAMS=r,0 ;;
            esac
            step "bench-gridlosses-$dtype-$setting-r$round" 60 env "$@" python3 -m moekit.cli \
              bench --dtype $dtype --no-baselines --graph-max-m 32768 --rep-ms 30 \
              --presets mixtral-8x7b --tokens 4096 16384 \
              --what "gridlosses-$dtype-$setting-r$round" --out "$out"
            [ $dtype = fp8_tensor ] || continue
            step "bench-gridlosses-gptoss-$setting-r$round" 60 env "$@" python3 -m moekit.cli \
              bench --dtype $dtype --no-baselines --graph-max-m 32768 --rep-ms 30 \
              --presets gpt-oss-120b --tokens 32768 \
              --what "gridlosses-gptoss-$setting-r$round" --out "$out"
          done
        done
      done
      for what in gridlosses-fp8_tensor gridlosses-fp8_channel gridlosses-fp8_block \
          gridlosses-gptoss; do
        compare_settings "ab-$what" "$what" rule g1p g2p
      done ;;
    combineatomics) step combine-atomics 240 python3 bench/scripts/combine_atomics_experiment.py \
                      --out "$out" ;;
    blockbias)
      step fp8-block-bias 300 python3 bench/scripts/fp8_block_bias_experiment.py --out "$out"
      step pytest-gpu-gluon-gemm1 200 python3 -m pytest -m gpu -q -rfE -p no:cacheprovider \
        $PARALLEL tests/test_gluon_gemm1.py ;;
    talltiles) step tall-tiles 360 python3 bench/scripts/tall_tiles_experiment.py --rounds 2 \
                 --out "$out" ;;
    planlaunch) step plan-launches 150 python3 bench/scripts/plan_launches_experiment.py \
                  --out "$out" ;;
    slaborder)
      for round in 1 2; do
        for dtype in fp8_tensor bf16; do
          for setting in ship slab; do
            if [ $setting = ship ]; then set --; else set -- MOEKIT_GLUON_GEMM2_GROUP_M=65536; fi
            step "bench-slaborder-$dtype-$setting-r$round" 60 env "$@" python3 -m moekit.cli \
              bench --dtype $dtype --no-baselines --graph-max-m 16384 --rep-ms 30 \
              --presets qwen3-30b-a3b olmoe-1b-7b granite-3.0-3b-a800m --tokens 4096 16384 \
              --what "slaborder-$dtype-$setting-r$round" --out "$out"
          done
        done
      done
      for dtype in fp8_tensor bf16; do
        compare_settings "ab-slaborder-$dtype" "slaborder-$dtype" ship slab
      done ;;
    tailtiles)
      for round in 1 2; do
        for setting in ship notail; do
          if [ $setting = ship ]; then set --; else set -- MOEKIT_TAIL_TILES=0; fi
          step "bench-tailtiles-$setting-r$round" 110 env "$@" python3 -m moekit.cli bench \
            --no-baselines --graph-max-m 16384 --rep-ms 20 --tokens 2048 4096 8192 \
            --what "tailtiles-$setting-r$round" --out "$out"
        done
      done
      compare_settings ab-bf16-tailtiles tailtiles ship notail ;;
    bf16table)
      table=src/moekit/tuning/tables/h100-sxm-fused_experts-bf16.json
      cp $table /tmp/bf16table.json
      for round in 1 2 3; do
        for setting in table none; do
          if [ $setting = none ]; then rm -f $table; else cp /tmp/bf16table.json $table; fi
          step "bench-bf16table-$setting-r$round" 60 python3 -m moekit.cli bench \
            --no-baselines --graph-max-m 16384 --rep-ms 30 --presets mixtral-8x7b \
            --tokens 1536 2048 2560 3072 3584 4096 --what "bf16table-$setting-r$round" \
            --out "$out"
        done
      done
      cp /tmp/bf16table.json $table
      compare_settings ab-bf16-table-mixtral bf16table none table ;;
    tailcost) step tail-cost 240 python3 bench/scripts/tail_cost_experiment.py --out "$out" ;;
    tailsweep)
      step tail-sweep-bf16 300 python3 bench/scripts/tail_cost_experiment.py --out "$out" \
        --even --tokens 256 512 1024 1536 2048 3072 4096 6144 8192
      step tail-sweep-fp8 240 python3 bench/scripts/tail_cost_experiment.py --out "$out" \
        --dtype fp8_tensor --even --tokens 512 1024 2048 3072 4096 8192 ;;
    tailgrids) step tail-grids 400 python3 bench/scripts/tail_cost_experiment.py --out "$out" \
                 --stem tail-grids-experiment --tile-grids --even 576 --tokens 2048 3072 4096 8192 ;;
    tailbytes)
      for setting in persistent MOEKIT_GLUON_TILE_PROGRAMS=1 MOEKIT_GLUON_EXPERT_GROUPS=1; do
        # (persistent: no variable set; the unquoted empty word vanishes)
        step "ncu-tailbytes-${setting%%=*}" 150 env ${setting/persistent/} \
          ncu --profile-from-start off --clock-control none -k regex:gemm --csv \
          --metrics "$NCU_COUNTERS" python3 bench/scripts/tail_cost_experiment.py --profile \
          --profile-tokens 2048
      done ;;
    tailncu) step ncu-tail-cost 240 ncu --profile-from-start off --clock-control none \
               -k regex:gemm --csv --metrics "$NCU_COUNTERS" \
               python3 bench/scripts/tail_cost_experiment.py --profile ;;
    ncustall)
      for gemm in ${STALL_GEMMS:-gemm1 gemm2}; do
        step "ncu-stall-$gemm" 150 ncu --profile-from-start off --clock-control none \
          --section WarpStateStats --section SourceCounters --section SpeedOfLight \
          -k regex:$gemm -f -o /tmp/stall-$gemm python3 bench/scripts/ncu_gemms.py \
          --cell "${STALL_CELL:-qwen3-30b-a3b:4096:fp8_tensor}"
        step "ncu-stall-$gemm-details" 60 ncu --import /tmp/stall-$gemm.ncu-rep --page details
        step "ncu-stall-$gemm-sass" 60 ncu --import /tmp/stall-$gemm.ncu-rep --page source \
          --csv --print-source sass
      done ;;
    *) echo "unknown stage: $stage" >&2; exit 2 ;;
  esac
done
