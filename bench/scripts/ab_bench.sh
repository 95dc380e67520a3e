#!/bin/bash
# A/B of whole source trees through `moekit bench`: every version runs the same bench
# command once per round, each in its own process (PYTHONPATH = that version's src), the
# versions' order rotating by round so that the GPU's drift over the run hits each alike;
# then bench/scripts/compare_tables.py writes $OUT/<TAG>.{json,md}: per cell every
# version's median over its rounds and its ratio to the first version's.
#
#   VERSIONS="main=.baseline/main/src@c0ffee1 cand=src@abc1234" ROUNDS=2 OUT=/tmp/o \
#     bash bench/scripts/ab_bench.sh TAG --dtype fp8_block --presets qwen3-30b-a3b --tokens 1 8
#
# (the arguments after TAG go to `moekit bench`; `--out` and `--what` are set here.) Each
# run's table lands in $OUT/ab/<TAG>-<label>-r<round>/, its log beside it; a version whose
# run fails is left out of that round, and the comparison names the rounds it has.
set -u
tag=$1
shift
out=${OUT:-.out}
rounds=${ROUNDS:-2}
read -r -a versions <<< "${VERSIONS:?VERSIONS=\"label=src[@commit] ...\" needed}"
n=${#versions[@]}
declare -A files
for ((round = 1; round <= rounds; round++)); do
  for ((i = 0; i < n; i++)); do
    spec=${versions[$(( (i + round - 1) % n ))]}  # rotate the order by round
    label=${spec%%=*}
    rest=${spec#*=}
    src=${rest%@*}
    commit=$([[ $rest == *@* ]] && echo "${rest##*@}" || echo "${MOEKIT_GIT_COMMIT:-}")
    dir="$out/ab/$tag-$label-r$round"
    mkdir -p "$dir"
    start=$SECONDS
    PYTHONPATH=$src MOEKIT_GIT_COMMIT=$commit python3 -m moekit.cli bench "$@" --out "$dir" \
      --what "$tag-$label-r$round" > "$dir/bench.log" 2>&1
    rc=$?
    echo "== $tag $label round $round: rc=$rc ($((SECONDS - start)) s)"
    json=$(ls "$dir"/*.json 2>/dev/null | head -1)
    if [ "$rc" = 0 ] && [ -n "$json" ]; then
      files[$label]="${files[$label]:+${files[$label]},}$json"
    else
      grep -v -i warn "$dir/bench.log" | tail -3
    fi
  done
done
args=()
for spec in "${versions[@]}"; do
  label=${spec%%=*}
  [ -n "${files[$label]:-}" ] && args+=("$label=${files[$label]}")
done
# COMPARE_ARGS: more options for compare_tables.py (--eager: a CPU run has no graph rows)
python3 "$(dirname "$0")/compare_tables.py" --out "$out" --stem "$tag" ${COMPARE_ARGS:-} \
  "${args[@]}"
