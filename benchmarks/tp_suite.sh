#!/usr/bin/env bash
# Issue 4's GPU checks in one device call on a 2- or 4-GPU machine: the TP and custom all-reduce
# GPU tests, batch-1 decode at TP=1/2/4 (Llama-3.1-8B shape, dummy weights) and the all-reduce
# latency table. Each step has a time limit and the run stops starting steps past BUDGET seconds,
# so the logs of what ran always come back. Logs under $OUT.
# Usage (device machine, repo root, after installing the carried wheels):
#   BUDGET=540 bash benchmarks/tp_suite.sh
set -u
OUT=${OUT:-/tmp/distllm-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-/tmp/site:$PWD} NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BUDGET=${BUDGET:-540}
gpus=$(nvidia-smi -L | tee "$OUT/cards.txt" | wc -l)
tps=1,2; [ "$gpus" -ge 4 ] && tps=1,2,4
step() { # name limit command...
  local name=$1 limit=$2; shift 2
  if [ $((SECONDS + limit)) -gt "$BUDGET" ]; then echo "$name: skipped (${SECONDS}s of ${BUDGET}s used)"; return; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? at ${SECONDS}s"
}
step decode 150 python benchmarks/bench_tp_decode.py --tp "$tps" --tokens 128
grep -E '^tp=' "$OUT/decode.log"
step allreduce 90 python benchmarks/bench_allreduce.py --world-size 2
tail -12 "$OUT/allreduce.log"
step custom_ar_tests 150 python -m pytest -q -p no:cacheprovider tests/gpu/test_custom_all_reduce_gpu.py
tail -2 "$OUT/custom_ar_tests.log"
step tp_tests 240 python -m pytest -q -p no:cacheprovider tests/gpu/test_tp_gpu.py
tail -2 "$OUT/tp_tests.log"
