#!/usr/bin/env bash
# The GPU checks of this project in one short script, for a lent GPU machine with no network:
#   here:  bash ../shared/offline-wheels.sh .whl && python data/prepare_text.py --out datasets/text
#   there: bash tests/gpu/device_checks.sh [tests] [llada] [dit] [decode]  (.whl and datasets/text carried; results in $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
SECTIONS=${*:-tests llada dit decode}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 \
  | grep -v WARN | tee -a "$OUT/gpu.txt"

if [[ $SECTIONS == *tests* ]]; then
  echo "== GPU tests"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -n 30 | tee "$OUT/gpu_tests.log"
fi

if [[ $SECTIONS == *llada* ]]; then
  echo "== llada 1b preset: throughput and MFU (bf16, ZeRO-2, 1 GPU, micro 8 x seq 2048)"
  timeout 180 python3 launch/train.py recipes/llada/configs/1b.yaml data.dir=datasets/text run_dir=/tmp/r1b \
    train.steps=20 train.global_batch=8 train.micro_batch=8 log.every=1 log.wandb=disabled log.progress=false \
    eval.every=0 eval.at_end=false checkpoint.at_end=false > "$OUT/1b.log" 2>&1
  tail -n 3 "$OUT/1b.log"
  python3 - <<'PY' | tee "$OUT/1b_summary.txt"
import json, statistics
rows = [json.loads(l) for l in open("/tmp/r1b/metrics.jsonl")][5:]
for k in ("step_s", "tokens_per_s", "mfu", "data_wait_pct"):
    print(k, round(statistics.median(r[k] for r in rows), 4))
PY
  echo "== trainer-overhead on the GPU (llada 1b shape)"
  timeout 200 python3 launch/benchmark.py trainer-overhead --preset recipes/llada/configs/1b.yaml --steps 16 \
    --warmup 6 --repeats 1 data.dir=datasets/text train.global_batch=8 train.micro_batch=8 eval.every=0 2>&1 \
    | grep -E "repeat|ratio|failed|Error" | tee "$OUT/overhead.txt"
fi

if [[ $SECTIONS == *dit* ]]; then
  echo "== video DiT training throughput, bf16, SDPA (flash-attn not installable there)"
  for spec in "wan2_1_1_3b 21x60x104" "dit_xl2 9x32x32"; do
    set -- $spec
    timeout 200 python3 launch/benchmark.py dit-throughput --preset recipes/video_dit/configs/$1.yaml --latent $2 \
      --steps 8 --warmup 3 2>&1 | grep -E "dit-throughput|Error|error" | tail -n 3 | tee -a "$OUT/dit.txt"
  done
fi

if [[ $SECTIONS == *decode* ]]; then
  echo "== masked-diffusion decoders vs the AR twin, llada 1b shape, random weights, bf16, gen 256"
  timeout 240 python3 launch/benchmark.py decode --random-shape recipes/llada/configs/1b.yaml --device cuda --bf16 \
    --prompts 32 --batch-size 32 --out "$OUT/decode_1b.json" 2>&1 | grep -v -E "WARN|Warning" | tail -n 8 \
    | tee "$OUT/decode_1b.txt"
fi
