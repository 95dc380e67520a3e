export PYTHONPATH=src MOEKIT_GIT_COMMIT=f65637d
timeout 150 python3 bench/scripts/sm_rate_experiment.py --out $OUT > $OUT/smrate.log 2>&1; echo smrate rc=$?
CELLS="qwen3-30b-a3b:3:fp8_tensor qwen3-30b-a3b:4:fp8_tensor qwen3-30b-a3b:8:fp8_tensor granite-3.0-3b-a800m:4:fp8_tensor granite-3.0-3b-a800m:8:fp8_tensor olmoe-1b-7b:8:fp8_tensor gpt-oss-120b:4:fp8_tensor qwen3-30b-a3b:1:fp8_tensor"
for v in main cand main cand; do s=src; [ $v = main ] && s=.baseline/main/src; PYTHONPATH=$s timeout 100 python3 bench/scripts/fp8_kernel_profile.py --tag $v-$RANDOM --blocks 2 --out $OUT/prof --cells $CELLS > $OUT/prof-$v.log 2>&1; echo prof $v rc=$?; done
python3 - > $OUT/spills.txt 2>&1 <<'PY'
import torch, moekit
from moekit.bench.inputs import make_tokens, make_weights
from moekit.bench.presets import PRESETS
from moekit.bench.fp8 import quantize_experts
from moekit._plan_quantize_kernels import _plan_quantize_kernel
for name, m in (("qwen3-30b-a3b", 8), ("gpt-oss-120b", 5), ("granite-3.0-3b-a800m", 8)):
    p = PRESETS[name]; w = quantize_experts(make_weights(p, torch.bfloat16, torch.device("cuda")), "fp8_tensor")
    h, t = make_tokens(p, m, torch.bfloat16, torch.device("cuda"))
    moekit.fused_experts_fp8(h, w.w13, w.w2, t.ids, t.weights, scheme="fp8_tensor", activation=p.activation, b13=w.b13, b2=w.b2)
for cache in _plan_quantize_kernel.device_caches.values():
    for key, k in cache[0].items():
        print(k.n_regs, k.n_spills, k.metadata.shared, k.metadata.num_warps)
PY
echo spills rc=$?; cat $OUT/spills.txt | tail -8
VERSIONS="main=.baseline/main/src@b1222cd cand=src@f65637d" ROUNDS=2 OUT=$OUT/ab timeout 330 bash bench/scripts/ab_bench.sh ab-fp8_tensor-whole-amax-s72 --dtype fp8_tensor --no-baselines --rep-ms 25 --presets qwen3-30b-a3b granite-3.0-3b-a800m olmoe-1b-7b gpt-oss-120b --tokens 1 2 4 8 > $OUT/ab.log 2>&1; echo ab rc=$?; tail -n 30 $OUT/ab.log
rm -rf $OUT/ab/ab
timeout 120 python3 -m pytest tests/test_plan_quantize.py tests/test_experts_fp8.py tests/test_fused_moe_fp8.py -m gpu -n 4 -rf -q -p no:cacheprovider > $OUT/pytest-gpu-f65637d.txt 2>&1; echo pytest rc=$?; tail -n 3 $OUT/pytest-gpu-f65637d.txt
