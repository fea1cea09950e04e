#!/usr/bin/env bash
# Everything the GPU lanes need, in one call on a lent GPU machine (device tool: few, full calls cost less
# device time than many small ones). Run from the repository root:
#
#     bash bench/gpu_session.sh build tests bench e2e
#
# build  pip-installs fastmerge (C++ CPU extension + CUDA extension for sm_90) into /tmp/site, with the
#        machine's own torch/triton (no downloads there: --no-build-isolation --no-deps);
# tests  the GPU test lanes: tests/kernels (compiled, not interpreted, when CUDA is present), the
#        CUDA native tests, the M-Loss GPU tests;
# bench  bench/bench_kernels.py per-kernel table (E2E off);  e2e  its end-to-end family (~8.5 GB generated).
#
# Each step has its own time cap so one hang cannot eat the call; logs and tables land in $OUT.
set -u
OUT=${OUT:-/tmp/fm_out}
mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BD=${FASTMERGE_BENCH_DIR:-/tmp/fm_bench}
mkdir -p "$BD"

step() { echo "=== $1 ($(date -u +%H:%M:%S), ${SECONDS}s)"; }

for what in "$@"; do
  case "$what" in
  build)
    step build
    { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
      python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
      nvcc --version | tail -1; nproc; } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    python3 -m pip list 2>/dev/null | grep -iE "^(pybind11|scikit.build.core|cmake|ninja) " | tee -a "$OUT/env.txt"
    # The build tools the package pins (pyproject build-system.requires), carried as wheels in .whl/ when
    # present: the image's own pybind11 built a _C whose C++ exceptions crashed the interpreter (2026-11-24).
    BT=""
    if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/buildtools "$REPO"/.whl/*.whl && BT=/tmp/buildtools
    fi
    PYTHONPATH=$BT FASTMERGE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 300 python3 -m pip install --no-build-isolation --no-deps \
      --no-cache-dir -v --target /tmp/site "$REPO" > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
    grep -E "pybind11|scikit-build-core|_C_cuda|OpenMP|CXX compiler" "$OUT/build.log" | head -12
    [ -d /tmp/site/fastmerge/kernels ] || { echo "WARNING: the wheel has no fastmerge/kernels (scikit-build-core < 0.10?): copying kernels/"; cp -r "$REPO/kernels" /tmp/site/fastmerge/kernels; }
    ls /tmp/site/fastmerge | tr '\n' ' '; echo
    # a C++ exception through pybind11 must come back as ValueError (a crash here = the toolchain problem above)
    (cd /tmp && PYTHONPATH=/tmp/site python3 -X faulthandler -c "
import torch, fastmerge._native as n
x = torch.randn(7)
try:
    n._C.breadcrumbs(x.data_ptr(), 0, 7, [x.data_ptr()], [0], x.data_ptr(), 0, [1.0], [0.5], [-0.1], 2, False, 1.0, False, False)
except ValueError as e:
    print('C++ exception -> ValueError: ok;', n.report())
") 2>&1 | tail -5
    ;;
  tests)
    step tests
    (cd /tmp && PYTHONPATH=/tmp/site timeout 330 python3 -m pytest "$REPO/tests/kernels" "$REPO/tests/native" \
      "$REPO/tests/mloss/test_mloss_kernels.py" "$REPO/tests/mloss/test_mties.py" -q -p no:cacheprovider \
      --timeout 150 -rfEs --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1; echo "tests rc=$?" | tee -a "$OUT/tests.log")
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
    ;;
  bench)
    step bench
    (cd /tmp && PYTHONPATH=/tmp/site:"$REPO/bench" FASTMERGE_BENCH_DIR="$BD" FASTMERGE_BENCH_E2E=0 timeout "${BENCH_CAP:-$((585 - SECONDS))}" \
      python3 -m pytest "$REPO/bench/bench_kernels.py" -m gpu --benchmark-enable -p no:cacheprovider -s -q \
      > "$OUT/bench.log" 2>&1; echo "bench rc=$?" | tee -a "$OUT/bench.log")
    cp "$BD"/kernels.* "$OUT/" 2>/dev/null; cat "$OUT/kernels.md" 2>/dev/null || tail -30 "$OUT/bench.log"
    ;;
  e2e)
    step e2e
    (cd /tmp && PYTHONPATH=/tmp/site:"$REPO/bench" FASTMERGE_BENCH_DIR="$BD" FASTMERGE_BENCH_KERNELS= timeout "${E2E_CAP:-$((585 - SECONDS))}" \
      python3 -m pytest "$REPO/bench/bench_kernels.py" -m gpu -k end_to_end --benchmark-enable -p no:cacheprovider -s -q \
      > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?" | tee -a "$OUT/e2e.log")
    cp "$BD"/kernels.md "$OUT/kernels_e2e.md" 2>/dev/null; cp "$BD"/kernels.json "$OUT/kernels_e2e.json" 2>/dev/null
    grep "end to end" "$OUT/e2e.log"; tail -5 "$OUT/e2e.log"
    ;;
  *) echo "unknown step $what"; exit 2 ;;
  esac
done
step done
