#!/usr/bin/env bash
# One GPU-machine run: GPU tests, then the decode benchmark and the HF baseline; logs under $OUT.
# Usage (device machine, repo root): bash benchmarks/gpu_suite.sh [seconds-for-tests]
set -u
OUT=${OUT:-/tmp/distllm-out}; mkdir -p "$OUT"
if [ -f .gpuwheels/install.sh ]; then bash .gpuwheels/install.sh > "$OUT/install.log" 2>&1; fi
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L | tee "$OUT/cards.txt"
timeout "${1:-200}" python -m pytest tests/gpu -q -x -p no:cacheprovider --durations=10 > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$OUT/gpu_tests.log"; tail -25 "$OUT/gpu_tests.log"
timeout 150 python benchmarks/bench_tp_decode.py --tp "${TP_LIST:-1}" --tokens 128 > "$OUT/decode.log" 2>&1
echo "decode rc=$?"; grep -v INFO "$OUT/decode.log" | tail -8
timeout 90 python benchmarks/bench_fused_ops.py > "$OUT/fused_ops.log" 2>&1
echo "fused ops rc=$?"; tail -16 "$OUT/fused_ops.log"
folder=$(python -c "import sys; sys.path.insert(0,'benchmarks'); import bench_tp_decode as b; print(b.make_model_dir('llama3-8b')[0])")
timeout 180 python benchmarks/throughput.py --model "$folder" --dummy --dtype bfloat16 --max-model-len 2048 \
  --num-prompts 1 --input-len 128 --output-len 128 > "$OUT/throughput_b1.log" 2>&1
echo "throughput rc=$?"; grep -v -E "INFO|it/s" "$OUT/throughput_b1.log" | tail -6
