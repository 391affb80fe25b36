#!/usr/bin/env bash
# One prepared GPU run for a session lent a device machine (about 8 minutes on one H100/H200;
# a session has 15 minutes of device time, start included). It answers the question the CPU
# table cannot afford: how much of C&C's accuracy gap is the synthetic-data budget?
#
#   1. the committed width-16 zoo, BadNet all-to-one, cnc 3x with the preset synthesis
#      (1,024 images x 100 Adam steps): a CUDA smoke test and the same-card baseline;
#   2. all eight attacks, cnc 3x, with 2,048 images x 400 steps (the budget of the H200 probe
#      in method.md), scored on all 10,000 Fashion-MNIST test images;
#   3. the same at 4x, reusing the cached synthetic images, in whatever time is left.
# Every stage rewrites its table after each attack, so a stage cut by the time limit still
# returns the attacks it finished. Results: $OUT/backdoor-w16-gpu-*.{md,json} and $OUT/log.txt.
#
# Here:   mkdir -p bench/.cache/fmnist && cp /usr/share/datasets/fashion-mnist/t10k-* bench/.cache/fmnist/
# Device: run `bash bench/gpu_run.sh` with carry ["bench/.cache/fmnist"], timeout_s 540.
# CPU smoke of this script (tiny settings, two attacks): SMOKE=1 OUT=/tmp/gpu bash bench/gpu_run.sh
# The device image's python3 has torch, safetensors and numpy; cnc_core needs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-bench/.cache/fmnist}
BUDGET=${BUDGET:-480} # seconds for the whole script; leave the device call some margin
LOG=$OUT/log.txt
BIG=(--set num_images=2048 --set synthesis_iterations=400)
EXTRA=()
if [ "${SMOKE:-0}" = 1 ]; then
    BIG=(--set num_images=64 --set synthesis_iterations=2)
    EXTRA=(--set num_images=32 --set synthesis_iterations=2 --set epochs=1 --set inversion_steps=2
        --eval-n 200 --latency-repeats 1)
fi
left() { echo $((BUDGET - SECONDS)); }
B=($PY bench/backdoor.py --width 16 --methods cnc --data-root "$DATA" --results-dir "$OUT")

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } 2>&1 | tee "$LOG"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

echo "== stage 1: preset synthesis, BadNet all-to-one, 3x ($(left) s left)" | tee -a "$LOG"
timeout "$(left)" "${B[@]}" --attacks badnet-all2one --ratios 3 "${EXTRA[@]}" \
    --tag=-gpu-preset 2>&1 | tee -a "$LOG"

echo "== stage 2: 2,048 x 400 synthesis, all attacks, 3x ($(left) s left)" | tee -a "$LOG"
timeout "$(($(left) - 100))" "${B[@]}" "${EXTRA[@]}" "${BIG[@]}" --ratios 3 \
    --tag=-gpu-s2048x400-3x 2>&1 | tee -a "$LOG"

echo "== stage 3: 2,048 x 400 synthesis, all attacks, 4x ($(left) s left)" | tee -a "$LOG"
timeout "$(left)" "${B[@]}" "${EXTRA[@]}" "${BIG[@]}" --ratios 4 \
    --tag=-gpu-s2048x400-4x 2>&1 | tee -a "$LOG"
echo "== done in $SECONDS s" | tee -a "$LOG"
