#!/usr/bin/env bash
# One prepared GPU run for a session lent a device machine (about 8 minutes on one H100/H200;
# a session has 15 minutes of device time, start included). It measures the current `cnc`
# preset with the synthesis budget a GPU affords (2,048 images x 400 Adam steps, the budget
# of the H200 probe in method.md), scored on all 10,000 Fashion-MNIST test images:
#
#   1. all eight attacks at 3x and 4x, seed 0, one process per attack side by side (the w16
#      model leaves the card launch-bound, so eight processes share it well; 4x reuses the
#      synthetic images cached by 3x);
#   2. in whatever time is left, seed 1 of the same at 3x: the run-to-run spread on the card.
# Every process rewrites its own table after each attack, so a stage cut by the time limit
# still returns what finished; the parts are merged at the end (and can be merged again here
# with `bench/backdoor.py --merge`). Results go to $RES (bench/results/gpu); on the device, where
# $OUT is set, they are packed into one $OUT/gpu-results.tgz (the device returns a bounded number
# of files: session 7 lost half of a 36-file $OUT).
#
# Here:   mkdir -p bench/.cache/fmnist && cp /usr/share/datasets/fashion-mnist/t10k-* bench/.cache/fmnist/
# Device: run `bash bench/gpu_run.sh` with carry ["bench/.cache/fmnist"], timeout_s 560.
# CPU smoke of this script (tiny settings, two attacks): SMOKE=1 RES=/tmp/gpu bash bench/gpu_run.sh
# The device image's python3 has torch, safetensors and numpy; cnc_core needs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${RES:-bench/results/gpu}
mkdir -p "$RES"
PY=${PY:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DATA=${DATA:-bench/.cache/fmnist}
BUDGET=${BUDGET:-500} # seconds for the whole script; leave the device call some margin
TAG=${TAG:-gpu-s7}
LOG=$RES/log.txt
ATTACKS=(badnet-all2one blended-all2one wanet-all2one inputaware-all2one
    badnet-all2all blended-all2all wanet-all2all inputaware-all2all)
SETS=(--set num_images=2048 --set synthesis_iterations=400)
EXTRA=(--threads 2)
if [ "${SMOKE:-0}" = 1 ]; then
    ATTACKS=(badnet-all2one blended-all2one)
    SETS=(--set num_images=32 --set synthesis_iterations=2 --set epochs=1 --set inversion_steps=2)
    EXTRA=(--threads 1 --eval-n 200 --latency-repeats 1)
fi
left() { echo $((BUDGET - SECONDS)); }

# run_stage NAME SEED RATIOS...: one process per attack, all side by side, cut at the budget.
run_stage() {
    local name=$1 seed=$2
    shift 2
    echo "== $name: seed $seed, ratios $*, $(left) s left" | tee -a "$LOG"
    local parts=()
    for attack in "${ATTACKS[@]}"; do
        timeout "$(left)" $PY bench/backdoor.py --width 16 --methods cnc --data-root "$DATA" \
            --results-dir "$RES" --attacks "$attack" --ratios "$@" --seed "$seed" \
            "${SETS[@]}" "${EXTRA[@]}" --tag="-$TAG-$name-$attack" \
            >"$RES/log-$name-$attack.txt" 2>&1 &
        parts+=("$RES/backdoor-w16-$TAG-$name-$attack.json")
    done
    wait
    grep -h "\] cnc\|Traceback\|Error" "$RES"/log-"$name"-*.txt | tee -a "$LOG"
    local have=()
    for p in "${parts[@]}"; do [ -f "$p" ] && have+=("$p"); done
    [ ${#have[@]} -gt 0 ] && $PY bench/backdoor.py --width 16 --results-dir "$RES" \
        --merge "${have[@]}" --tag="-$TAG-$name" 2>&1 | tail -2 | tee -a "$LOG"
    echo "== $name done at $SECONDS s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } 2>&1 | tee "$LOG"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
run_stage seed0 0 3 4
if [ "$(left)" -gt 120 ]; then run_stage seed1 1 3; fi
echo "== done in $SECONDS s" | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu-results.tgz" -C "$RES" .; fi
