#!/usr/bin/env bash
# The GPU checks of this project in one short script, for a lent GPU machine with no network:
#   here:  bash ../shared/offline-wheels.sh .whl && python data/prepare_text.py --out datasets/text
#   there: bash tests/gpu/device_checks.sh   (with .whl and datasets/text carried; results land in $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 \
  | grep -v WARN | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"

echo "== 1b preset: throughput and MFU (bf16, ZeRO-2, 1 GPU, micro 8 x seq 2048)"
timeout 180 python3 launch/train.py recipes/llada/configs/1b.yaml data.dir=datasets/text run_dir=/tmp/r1b \
  train.steps=20 train.global_batch=8 train.micro_batch=8 log.every=1 log.wandb=disabled log.progress=false \
  eval.at_end=false checkpoint.at_end=false > "$OUT/1b.log" 2>&1
tail -n 5 "$OUT/1b.log"
cp /tmp/r1b/metrics.jsonl "$OUT/1b_metrics.jsonl" 2>/dev/null
python3 - <<'PY' | tee "$OUT/1b_summary.txt"
import json, statistics
rows = [json.loads(l) for l in open("/tmp/r1b/metrics.jsonl")][5:]
for k in ("step_s", "tokens_per_s", "mfu", "data_wait_pct"):
    print(k, round(statistics.median(r[k] for r in rows), 4))
PY

echo "== trainer-overhead on the GPU (1b shape)"
timeout 200 python3 launch/benchmark.py trainer-overhead --preset recipes/llada/configs/1b.yaml --steps 16 \
  --warmup 6 --repeats 1 data.dir=datasets/text train.global_batch=8 train.micro_batch=8 2>&1 \
  | grep -E "repeat|ratio|failed|Error" | tee "$OUT/overhead.txt"
