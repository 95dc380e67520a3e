export PYTHONPATH=src MOEKIT_GIT_COMMIT=b1222cd+waves
timeout 400 python3 bench/scripts/gemm1_waves_experiment.py --out $OUT > $OUT/waves.log 2>&1; echo rc=$?
timeout 150 python3 bench/scripts/gemm1_waves_experiment.py --preset granite-3.0-3b-a800m --hidden 1536 768 --experts 8 12 16 20 24 28 32 33 36 40 --out $OUT/granite > $OUT/waves-granite.log 2>&1; echo rc=$?
tail -n 3 $OUT/waves.log; tail -n 3 $OUT/waves-granite.log
