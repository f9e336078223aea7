#!/usr/bin/env bash
# The GPU runs behind bench/results/ (one H200; FlashInfer carried as ../shared/gpu/README.md says).
#
#   bash bench/gpu.sh STAGE [STAGE ...]      (from the repository root, $OUT = where results go)
#
# Setup (on the development machine, before the call): `bash ../shared/gpu/pack-flashinfer.sh`
# fills .gpu-carry/; `pip wheel --no-deps --no-build-isolation -w .whl . tests/plugin_pkg` builds
# sparsekit and the test plug-in as wheels; the call carries .gpu-carry and .whl.
#
# Stages:
#   tests     pytest -m gpu over tests/test_gpu.py, test_hip.py, test_vertical_slash.py -> $OUT/gpu_tests.txt
#   alltests  the same plus test_block_threshold.py and test_meancorr.py
#   bench     sparsekit bench --backends all --inputs structured,random at 32K and 128K (every corrector)
#   bench1m   the same at 1M, structured inputs, with the steps of each run (--pieces)
#   quick     streaming / hip / vertical_slash / plug-in + Δ at 128K only, structured, with --pieces
#   bttests   pytest -m gpu of block_threshold's scorer and meancorr's kernel
#   btprobe   block_threshold variants at 4K-1M (probe 1 of bench/results/h200/block_threshold/probes)
#   probe2    block_threshold forced sparse at 16K-64K, meancorr's cost at 128K (probe 2)
#   probe13   streaming + Δ piece by piece at 128K and 1M (bench/probe_streaming.py), fa3_rows / Δ GPU tests
#   s13       issue 13's table: streaming(2048, 1024) alone and + Δ(γ=64) at 32K-1M, fa3 in the same run ($RUN names it)
#   bt12      issue 12's table: block_threshold alone / + Δ / + meancorr at 4K-128K and alone / + Δ at 1M
set -u
OUT=${OUT:?set OUT}
source .gpu-carry/setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/sk .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/sk:$PYTHONPATH
export PYTHONSAFEPATH=1  # never import the source tree's sparsekit/ (its plug-in folders live beside it)
SK="python3 -m sparsekit.cli"
COMMON="--heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16 --no-isolate"
OPTS=(--backend-options "strided:block_q=128,block_k=64,local=4,stride=10")
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_gpu.py tests/test_hip.py tests/test_vertical_slash.py \
        > "$OUT/gpu_tests.txt" 2>&1; tail -25 "$OUT/gpu_tests.txt" ;;
    alltests)  # every GPU test: the tests stage's files plus block_threshold's and meancorr's
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs --durations=12 tests/test_gpu.py tests/test_hip.py \
        tests/test_vertical_slash.py tests/test_block_threshold.py tests/test_meancorr.py > "$OUT/gpu_tests.txt" 2>&1
      tail -40 "$OUT/gpu_tests.txt" ;;
    bench)
      $SK bench --n 32K,128K --backends all --inputs structured,random $COMMON "${OPTS[@]}" \
        --baseline-max-n 128K --reps 5 --out "$OUT/bench" > "$OUT/bench_stdout.md" 2> "$OUT/bench_log.txt"
      tail -3 "$OUT/bench_log.txt" ;;
    bench1m)
      $SK bench --n 1M --backends all --inputs structured $COMMON "${OPTS[@]}" --pieces \
        --baseline-max-n 128K --large-n 512K --large-reps 1 --out "$OUT/bench1m" > "$OUT/bench1m_stdout.md" \
        2> "$OUT/bench1m_log.txt"
      tail -3 "$OUT/bench1m_log.txt" ;;
    quick)
      $SK bench --n 128K --backends streaming,hip,vertical_slash,strided --inputs structured $COMMON "${OPTS[@]}" \
        --correctors "none,delta(gamma=64)" --impls auto,triton --pieces --baselines fa3 --reps 5 \
        --out "$OUT/quick" > "$OUT/quick_stdout.md" 2> "$OUT/quick_log.txt"
      tail -3 "$OUT/quick_log.txt"; grep -E "^\| (FlashInfer|streaming|hip|vertical|strided)" "$OUT/quick/bench.md" | cut -c1-260 ;;
    bttests)
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs $(ls tests/test_block_threshold.py tests/test_meancorr.py 2>/dev/null) \
        > "$OUT/gpu_bt_tests.txt" 2>&1; tail -8 "$OUT/gpu_bt_tests.txt" ;;
    btprobe)  # block_threshold variants at 4K..1M, structured inputs, with the steps of plan and run
      BT=(block_threshold "block_threshold(min_len=0)" "block_threshold(rule=relative(alpha=0.3))" "block_threshold(budget=2048)")
      $SK bench --n 4K,16K,128K --specs "${BT[@]}" --inputs structured $COMMON --correctors "none,delta(gamma=64)" \
        --baselines fa3 --pieces --reps 5 --out "$OUT/btprobe" > /dev/null 2> "$OUT/btprobe_log.txt"
      $SK bench --n 1M --specs block_threshold "block_threshold(budget=2048)" --inputs structured $COMMON \
        --correctors "none,delta(gamma=64)" --baselines fa3 --pieces --large-n 512K --large-reps 2 \
        --out "$OUT/btprobe1m" > /dev/null 2> "$OUT/btprobe1m_log.txt"
      for f in "$OUT/btprobe/bench.md" "$OUT/btprobe1m/bench.md"; do grep -E "^\| (FlashInfer|block)" "$f" | cut -c1-420; done ;;
    probe2)  # where block_threshold starts to pay (min_len) and what meancorr costs
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_block_threshold.py tests/test_gpu.py -k "meancorr or scorer" \
        > "$OUT/gpu_probe2_tests.txt" 2>&1; tail -6 "$OUT/gpu_probe2_tests.txt"
      $SK bench --n 16K,32K,64K --specs "block_threshold(min_len=0)" --inputs structured $COMMON \
        --correctors "none,delta(gamma=64)" --baselines fa3 --pieces --reps 5 --out "$OUT/probe2" > /dev/null 2> "$OUT/probe2_log.txt"
      $SK bench --n 128K --specs block_threshold "streaming(window=2048,sink=1024)" --inputs structured $COMMON \
        --correctors "meancorr(gamma=64),tailonly(gamma=64)" --baselines fa3 --pieces --reps 5 --out "$OUT/probe2mc" > /dev/null 2> "$OUT/probe2mc_log.txt"
      for f in "$OUT/probe2/bench.md" "$OUT/probe2mc/bench.md"; do grep -E "^\| (FlashInfer|block|stream)" "$f" | cut -c1-400; done ;;
    bt12)  # issue 12's speed table: block_threshold (defaults) alone, + Δ, + meancorr, one run, fa3 in the same run
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_gpu.py tests/test_block_threshold.py -k "meancorr or scorer" \
        > "$OUT/gpu_bt12_tests.txt" 2>&1; tail -3 "$OUT/gpu_bt12_tests.txt"
      $SK bench --n 4K,16K,32K,128K --specs dense block_threshold --inputs structured $COMMON \
        --correctors "none,delta(gamma=64),meancorr(gamma=64)" --baselines fa3 --pieces --reps 7 \
        --out "$OUT/bt12" > /dev/null 2> "$OUT/bt12_log.txt"
      $SK bench --n 1M --specs block_threshold --inputs structured $COMMON --correctors "none,delta(gamma=64)" \
        --baselines fa3 --pieces --large-n 512K --large-reps 3 --out "$OUT/bt12_1m" > /dev/null 2> "$OUT/bt12_1m_log.txt"
      for f in "$OUT/bt12/bench.md" "$OUT/bt12_1m/bench.md"; do grep -E "^\| (FlashInfer|block|dense)" "$f" | cut -c1-300; done ;;
    probe13)
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfEs tests/test_gpu.py ${GPU_K:+-k "$GPU_K"} > "$OUT/gpu_probe13_tests.txt" 2>&1
      tail -4 "$OUT/gpu_probe13_tests.txt"
      python3 bench/probe_streaming.py --n "${PROBE_N:-128K,1M}" --out "$OUT/probe13" 2>&1 | tee "$OUT/probe13_log.txt" | cut -c1-300 ;;
    s13)
      R=${RUN:-1}
      $SK bench --n 32K,128K,512K,1M --specs "streaming(window=2048,sink=1024)" --inputs structured $COMMON \
        --correctors "none,delta(gamma=64)" --baselines fa3 --pieces --reps 7 --large-n 512K --large-reps 3 \
        --out "$OUT/s13_run$R" > /dev/null 2> "$OUT/s13_run${R}_log.txt"
      grep -E "^\| (FlashInfer|stream)" "$OUT/s13_run$R/bench.md" | cut -c1-330 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
