#!/usr/bin/env bash
# Everything the GPU lanes need, in one run on a GPU machine (a few full runs cost less than many small
# ones: each builds first). Run from the repository root:
#
#     bash bench/gpu_session.sh build tests bench e2e
#
# build  pip-installs fastmerge (C++ CPU extension + CUDA extension for sm_90) into $SCRATCH/site (bench/out/scratch by default), with the
#        machine's own torch/triton (no downloads there: --no-build-isolation --no-deps);
# tests  the GPU test lanes: tests/kernels (compiled, not interpreted, when CUDA is present), the
#        CUDA native tests, the M-Loss GPU tests;
# bench  bench/bench_kernels.py per-kernel table (E2E off);  e2e  its end-to-end family (~8.5 GB generated).
#
# Each step has its own time cap so one hang cannot eat the call; logs and tables land in $OUT.
# On an H100 (2026-11-24) build took 40 s, tests 115 s, bench 320 s (before the select8/ties8 cases:
# ~+20 %); generating the 8.5 GB e2e family takes minutes, so `build e2e` runs well on its own.
# .whl (the pinned build tools) is used when present.
set -u
OUT=${OUT:-$PWD/bench/out/gpu}
mkdir -p "$OUT"
REPO=$(pwd)
# scratch (the pip --target sites, build dirs, small scripts): inside the ignored bench/out/ by default
export SCRATCH=${SCRATCH:-$REPO/bench/out/scratch}
mkdir -p "$SCRATCH"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
BD=${FASTMERGE_BENCH_DIR:-$SCRATCH/fm_bench}
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
    # present (the image has its own; these make the build the same as a fresh pip install here).
    BT=""
    if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target $SCRATCH/buildtools "$REPO"/.whl/*.whl && BT=$SCRATCH/buildtools
    fi
    # diagnosis of a crash seen on this image (2026-11-24): a C++ exception out of _C segfaults once torch
    # is imported. Variant A: FASTMERGE_PRIVATE_CXX_RUNTIME=ON (CPU module only, own build dir, in parallel).
    (PYTHONPATH=$BT FASTMERGE_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=6 timeout 300 python3 -m pip install --no-build-isolation \
      --no-deps --no-cache-dir -q --target $SCRATCH/siteA -Cbuild-dir=$SCRATCH/bA \
      -Ccmake.define.FASTMERGE_PRIVATE_CXX_RUNTIME=ON "$REPO" > "$OUT/buildA.log" 2>&1) &
    PYTHONPATH=$BT FASTMERGE_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=10 timeout 300 python3 -m pip install --no-build-isolation --no-deps \
      --no-cache-dir -v --target $SCRATCH/site -Cbuild-dir=$SCRATCH/bM "$REPO" > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
    wait
    cp -r $SCRATCH/site/fastmerge/kernels $SCRATCH/siteA/fastmerge/ 2>/dev/null
    grep -E "pybind11|scikit-build-core|_C_cuda|OpenMP|CXX compiler" "$OUT/build.log" | head -12
    [ -d $SCRATCH/site/fastmerge/kernels ] || { echo "WARNING: the wheel has no fastmerge/kernels (scikit-build-core < 0.10?): copying kernels/"; cp -r "$REPO/kernels" $SCRATCH/site/fastmerge/kernels; }
    ls $SCRATCH/site/fastmerge | tr '\n' ' '; echo
    # a C++ exception through pybind11 must come back as ValueError
    cat > $SCRATCH/exc.py <<'PY'
import os, sys
if os.environ.get("FIRST"):
    import torch
import fastmerge._C as C, array
x = array.array('f', [1.0] * 7); p = x.buffer_info()[0]
libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if any(k in l for k in ('libstdc++', 'libgcc_s', 'unwind'))})
print('libs:', libs)
try:
    C.breadcrumbs(p, 0, 7, [p], [0], p, 0, [1.0], [0.5], [-0.1], 2, False, 1.0, False, False)
except ValueError as e:
    print('ok: ValueError')
PY
    PRE="$(g++ -print-file-name=libstdc++.so.6):$(g++ -print-file-name=libgcc_s.so.1)"
    for v in "$SCRATCH/site|" "$SCRATCH/site|1" "$SCRATCH/siteA|1" "$SCRATCH/site|1|pre"; do
      IFS='|' read site first pre <<< "$v"
      (cd "$SCRATCH" && PYTHONPATH=$site FIRST=$first ${pre:+LD_PRELOAD=$PRE} python3 -X faulthandler $SCRATCH/exc.py > $SCRATCH/exc.log 2>&1
       echo "exception check $site torch=${first:-no} preload=${pre:-no}: rc=$? $(grep -E '^(libs|ok)' $SCRATCH/exc.log | tr '\n' ' ')")
    done
    echo "preload candidates: $PRE"; ldd $SCRATCH/site/fastmerge/_C.*.so | grep -E "stdc|gcc|omp"
    (cd "$SCRATCH" && PYTHONPATH=$SCRATCH/site bash "$REPO/bench/gpu_diag_cxx_exceptions.sh" > "$OUT/cxx_diag.log" 2>&1; head -c 3000 "$OUT/cxx_diag.log")
    (cd "$SCRATCH" && PYTHONPATH=$SCRATCH/site python3 -c "import fastmerge._native as n; print(n.report())")
    ;;
  tests)
    step tests
    (cd "$SCRATCH" && PYTHONPATH=$SCRATCH/site timeout 200 python3 -m pytest "$REPO/tests/kernels" "$REPO/tests/native" \
      "$REPO/tests/mloss/test_mloss_kernels.py" "$REPO/tests/mloss/test_mties.py" -q -p no:cacheprovider -n 4 \
      --timeout 150 -rfEs --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1; echo "tests rc=$?" | tee -a "$OUT/tests.log")
    grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
    ;;
  bench)
    step bench
    (cd "$SCRATCH" && PYTHONPATH=$SCRATCH/site:"$REPO/bench" FASTMERGE_BENCH_DIR="$BD" FASTMERGE_BENCH_E2E=0 timeout "${BENCH_CAP:-$((585 - SECONDS))}" \
      python3 -m pytest "$REPO/bench/bench_kernels.py" -m gpu --benchmark-enable -p no:cacheprovider -s -q \
      > "$OUT/bench.log" 2>&1; echo "bench rc=$?" | tee -a "$OUT/bench.log")
    cp "$BD"/kernels.* "$OUT/" 2>/dev/null; cat "$OUT/kernels.md" 2>/dev/null || tail -30 "$OUT/bench.log"
    ;;
  e2e)
    step e2e
    (cd "$SCRATCH" && PYTHONPATH=$SCRATCH/site:"$REPO/bench" FASTMERGE_BENCH_DIR="$BD" FASTMERGE_BENCH_KERNELS= timeout "${E2E_CAP:-$((585 - SECONDS))}" \
      python3 -m pytest "$REPO/bench/bench_kernels.py" -m gpu -k end_to_end --benchmark-enable -p no:cacheprovider -s -q \
      > "$OUT/e2e.log" 2>&1; echo "e2e rc=$?" | tee -a "$OUT/e2e.log")
    cp "$BD"/kernels.md "$OUT/kernels_e2e.md" 2>/dev/null; cp "$BD"/kernels.json "$OUT/kernels_e2e.json" 2>/dev/null
    grep "end to end" "$OUT/e2e.log"; tail -5 "$OUT/e2e.log"
    ;;
  *) echo "unknown step $what"; exit 2 ;;
  esac
done
step done
