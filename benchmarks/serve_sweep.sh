#!/usr/bin/env bash
# GPU machine: `distllm serve` on the Llama-3.1-8B shape (dummy weights), then `distllm bench serve`
# at increasing Poisson request rates; prints one line per rate (p99 TPOT, failures). Logs in $OUT.
set -u
OUT=${OUT:-/tmp/distllm-out}; mkdir -p "$OUT"
[ -f .gpuwheels/install.sh ] && bash .gpuwheels/install.sh > "$OUT/install.log" 2>&1
[ -d .servewheels ] && pip install -q --no-index --find-links .servewheels --target /tmp/site-serve fastapi uvicorn prometheus-client httpx >> "$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site:/tmp/site-serve:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
folder=$(python -c "import sys; sys.path.insert(0,'benchmarks'); import bench_tp_decode as b; print(b.make_model_dir('llama3-8b')[0])")
python -m distllm serve "$folder" --load-format dummy --dtype bfloat16 --max-model-len 4096 --port 8000 \
  --uvicorn-log-level warning > "$OUT/server.log" 2>&1 &
srv=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8000/health >/dev/null && break; sleep 1; done
for r in ${RATES:-4 8 16 32}; do
  python -m distllm bench serve --request-rate "$r" --num-prompts "${N:-120}" --input-len 512 --output-len 128 \
    --result-json "$OUT/rate_$r.json" > "$OUT/bench_rate_$r.log" 2>&1
  echo "rate $r rc=$?"; grep -i -E "throughput|tpot|fail|ttft" "$OUT/bench_rate_$r.log" | head -8
done
kill $srv; wait $srv 2>/dev/null
