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
#   bench     sparsekit bench --backends all --inputs structured,random at 32K and 128K (every corrector)
#   bench1m   the same at 1M, structured inputs, with the steps of each run (--pieces)
#   quick     streaming / hip / vertical_slash / plug-in + Δ at 128K only, structured, with --pieces
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
    *) echo "unknown stage $stage" ;;
  esac
done
