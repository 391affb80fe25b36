#!/usr/bin/env bash
# One prepared GPU run (for a session lent a device machine), about 10 minutes on one H100/H200:
# trains the width-16 and width-64 backdoor zoos at the full budget (60k images, 15 epochs),
# runs the backdoor benchmark at width 16 (all eight attacks, 2x/3x/4x, ablations) and the
# compression benchmark on CUDA. Results land in $OUT (the device tool brings them back).
#
#   mkdir -p bench/.cache/fmnist && cp /usr/share/datasets/fashion-mnist/*.gz bench/.cache/fmnist/
#   run: bash bench/gpu_run.sh   with carry: ["bench/.cache/fmnist"]
# The device image's python3 has torch, safetensors, onnx, matplotlib and tqdm; cnc_core needs
# nothing else at run time (tensorly is used only by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=bench/.cache/fmnist
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY bench/zoo.py --width 16 --epochs 15 --device cuda --data-root $DATA --force 2>&1 | tee "$OUT/zoo-w16.log"
$PY bench/zoo.py --width 16 --summary > "$OUT/zoo-w16.md" || true
$PY bench/compress.py --device cuda --tag=-gpu 2>&1 | tail -20 | tee "$OUT/compress.log"
$PY bench/backdoor.py --width 16 --device cuda --ablations --data-root $DATA --tag=-gpu \
    2>&1 | tee "$OUT/backdoor-w16.log"
cp bench/results/*-gpu.* "$OUT/" 2>/dev/null || true
