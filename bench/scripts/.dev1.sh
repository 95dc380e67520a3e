export PYTHONPATH=src MOEKIT_GIT_COMMIT=b1222cd
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv > $OUT/smi.txt
(timeout 200 python3 -m pytest tests/test_plan_quantize.py tests/test_experts_fp8.py tests/test_fused_moe_fp8.py -m gpu -n 4 -rf -q -p no:cacheprovider > $OUT/pytest.txt 2>&1; echo rc=$? >> $OUT/pytest.txt)
tail -5 $OUT/pytest.txt
timeout 200 ncu --profile-from-start off --clock-control none --set full -k regex:gemm -f -o /tmp/g python3 bench/scripts/ncu_gemms.py --cell qwen3-30b-a3b:8:fp8_tensor qwen3-30b-a3b:32:fp8_tensor granite-3.0-3b-a800m:8:fp8_tensor qwen3-30b-a3b:8:bf16 > $OUT/ncu.log 2>&1
echo ncu rc=$?; tail -3 $OUT/ncu.log
ncu --import /tmp/g.ncu-rep --page details > $OUT/ncu-details.txt 2>&1
ncu --import /tmp/g.ncu-rep --page raw --csv > $OUT/ncu-raw.csv 2>&1
for k in gemm1 gemm2; do
timeout 120 ncu --profile-from-start off --clock-control none --section WarpStateStats --section SourceCounters -k regex:$k -f -o /tmp/s$k python3 bench/scripts/ncu_gemms.py --cell qwen3-30b-a3b:8:fp8_tensor > $OUT/stall-$k.log 2>&1
ncu --import /tmp/s$k.ncu-rep --page source --csv --print-source sass > $OUT/stall-$k.csv 2>&1
done
ls -la $OUT
