export PYTHONPATH=src MOEKIT_GIT_COMMIT=b1222cd+smrate
timeout 200 python3 bench/scripts/sm_rate_experiment.py --out $OUT > $OUT/smrate.log 2>&1; echo rc=$?
tail -n 4 $OUT/smrate.log
