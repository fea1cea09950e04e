#!/usr/bin/env bash
# `fastmerge bench kernels` on a lent GPU machine, in one short device call: the same library code
# (fastmerge/benchmark/) as the command a user runs, so bench/RESULTS.md and what users see agree.
# From the repository root:
#
#     bash bench/gpu_quick.sh            # build, then --quick (seconds) and the llama-8b table (T = 2, 4)
#     bash bench/gpu_quick.sh quick      # build, then --quick only
#
# build: bench/gpu_session.sh build (fastmerge + its CUDA extension into /tmp/site). Writes under $OUT:
# kernels-gpu-quick.{json,md}, kernels-gpu.{json,md,png} (the roofline chart), env.txt, build.log.
set -u
OUT=${OUT:-/tmp/fm_out}
mkdir -p "$OUT"
REPO=$(pwd)
MODE=${1:-full}
bash "$REPO/bench/gpu_session.sh" build > "$OUT/gpu_session_build.txt" 2>&1 || { tail -40 "$OUT/gpu_session_build.txt"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd /tmp || exit 1
echo "=== quick (${SECONDS}s)"
timeout 120 python3 -m fastmerge bench kernels --device cuda --quick --no-progress \
  --json "$OUT/kernels-gpu-quick.json" > "$OUT/kernels-gpu-quick.md" 2> "$OUT/kernels-gpu-quick.err"
echo "rc=$?"; cat "$OUT/kernels-gpu-quick.md"; tail -5 "$OUT/kernels-gpu-quick.err"
[ "$MODE" = quick ] && exit 0
echo "=== llama-8b, T=2,4 (${SECONDS}s)"
timeout "${KERNELS_CAP:-$((560 - SECONDS))}" python3 -m fastmerge bench kernels --device cuda --shapes llama-8b --models 2,4 \
  --no-progress --json "$OUT/kernels-gpu.json" --plot "$OUT/kernels-gpu.png" > "$OUT/kernels-gpu.md" 2> "$OUT/kernels-gpu.err"
echo "rc=$?"; cat "$OUT/kernels-gpu.md"; tail -5 "$OUT/kernels-gpu.err"
