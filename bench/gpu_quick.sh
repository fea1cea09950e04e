#!/usr/bin/env bash
# `fastmerge bench kernels` on a GPU machine, in one short run: the same library code
# (fastmerge/benchmark/) as the command a user runs, so bench/RESULTS.md and what users see agree.
# From the repository root:
#
#     bash bench/gpu_quick.sh            # build, then --quick (seconds) and the llama-8b table (T = 2, 4)
#     bash bench/gpu_quick.sh quick      # build, then --quick only
#
# build: bench/gpu_session.sh build (fastmerge + its CUDA extension for sm_90 into $SCRATCH/site; it also runs
# bench/gpu_diag_cxx_exceptions.sh: cxx_diag.log says which library resolves __cxa_throw/_Unwind_* for _C
# after `import torch`, and the "exception check" lines say whether the default build or the
# FASTMERGE_PRIVATE_CXX_RUNTIME=ON build survives a C++ exception: if only the private build does, make it
# the default). Then, each with its own cap (the whole call stays under 8 minutes):
#   gate   the GPU test lanes that gate the figures: NaN/inf, bounds, bit-exactness of the merge passes
#          (T constexpr, aligned full tiles) and the selection, compiled, not interpreted; the CUDA C++ ties
#          (thresholds, exact-k cut and rescale decided on the device) vs the reference (tests.log)
#   sync   torch.cuda.set_sync_debug_mode("warn") around a small execute_cuda merge: the number of
#          synchronising calls inside the engine (sync.log; the CPU stand-in count is in test_gpu.py)
#   sync error  each unit under set_sync_debug_mode("error"), per method family, whole and in row chunks:
#          PASS, or the file:line of the first synchronising call (sync_error.log)
#   quick / llama-8b   fastmerge bench kernels (rooflines, the timing matrix in physical-minimum bytes)
#   select bench/gpu_select.py: the radix (base once per 4096-element tile) and the one-read bracket selection
#          vs copy, counting one read; exact-k's per-tile tie counts from the candidates vs the data read they
#          replace (select.md; one JSON line per case in results.jsonl)
#   ncu    three kernels at 4096x14336 (merge T=8, task_arithmetic T=8, the selection's first pass)
# Writes under $OUT: kernels-gpu-quick.{json,md}, kernels-gpu.{json,md,png} (the roofline chart), env.txt,
# build.log, cxx_diag.log, tests.log, sync.log, sync_error.log, select.md, results.jsonl, ncu.txt, offline_sm90.md (the same kernels'
# offline build).
set -u
OUT=${OUT:-$PWD/bench/out/gpu}
mkdir -p "$OUT"
REPO=$(pwd)
export SCRATCH=${SCRATCH:-$REPO/bench/out/scratch}  # gpu_session.sh builds into $SCRATCH/site
mkdir -p "$SCRATCH"
MODE=${1:-full}
bash "$REPO/bench/gpu_session.sh" build > "$OUT/gpu_session_build.txt" 2>&1 || { tail -40 "$OUT/gpu_session_build.txt"; exit 1; }
export PYTHONPATH=$SCRATCH/site PYTHONUNBUFFERED=1
cd "$SCRATCH" || exit 1
grep -E "exception check|== |ok: ValueError" "$OUT/gpu_session_build.txt" "$OUT/cxx_diag.log" 2>/dev/null | head -20
echo "=== gate (${SECONDS}s)"
timeout 150 python3 -m pytest "$REPO/tests/kernels/test_triton_nonfinite.py" "$REPO/tests/kernels/test_triton_bounds.py" \
  "$REPO/tests/kernels/test_triton_ties.py" "$REPO/tests/kernels/test_triton_linear.py" "$REPO/tests/kernels/test_triton_select.py" \
  "$REPO/tests/kernels/test_triton_breadcrumbs.py" "$REPO/tests/kernels/test_triton_gpu.py" \
  "$REPO/tests/native/test_native_ties.py" -q -p no:cacheprovider -x > "$OUT/tests.log" 2>&1
echo "gate rc=$?"; tail -3 "$OUT/tests.log"
echo "=== sync (${SECONDS}s)"
timeout 90 python3 - > "$OUT/sync.log" 2>&1 <<'PY'
import pathlib, tempfile, warnings, torch, fastmerge
from fastmerge.testing import LlamaShape, make_family
from fastmerge.engine import gpu as g
d = tempfile.mkdtemp()
b, fts = make_family(pathlib.Path(d) / "fam", LlamaShape(hidden=256, layers=2, intermediate=512, vocab=1024, heads=4), n_finetunes=3, dtype="bfloat16")
cfg = {"merge_method": "ties", "base_model": str(b), "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.4}} for f in fts]}
real = g._Engine.compute
n = {"units": 0, "syncs": 0}
def compute(self, j, fn):
    def run():
        n["units"] += 1
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                r = fn()
            n["syncs"] += sum("synchroniz" in str(x.message) for x in w)
            return r
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return real(self, j, run)
g._Engine.compute = compute
for backend in ("auto", "triton"):
    n.update(units=0, syncs=0)
    p = fastmerge.plan(cfg, d + "/out-" + backend, progress=False, copy_tokenizer=False, device="cuda", backend=backend)
    g.execute_cuda(p, d + "/out-" + backend)
    print(f"sync debug ({backend}): {n['syncs']} synchronising calls inside {n['units']} units")
PY
echo "sync rc=$?"; tail -3 "$OUT/sync.log"
echo "=== sync error (${SECONDS}s)"
timeout 120 python3 - > "$OUT/sync_error.log" 2>&1 <<'PY'
# the proof: each unit's work under torch.cuda.set_sync_debug_mode("error"), so any synchronising call torch
# sees inside a unit (a blocking host<->device copy, .item(), .cpu(), bool(tensor)) raises; batches and row
# chunks (--max-gpu-memory small), every Triton method family, and ties on the CUDA C++ kernel (its size rule
# lowered so the matrices reach it: its scratch is a torch tensor and its decisions stay on the device; a
# cudaStreamSynchronize inside the extension would escape torch's check, tests/kernels/test_cuda_ptxas.py
# checks the source has none).
import pathlib, tempfile, traceback, torch, fastmerge
from fastmerge.testing import LlamaShape, make_family
from fastmerge.engine import gpu as g
d = tempfile.mkdtemp()
b, fts = make_family(pathlib.Path(d) / "fam", LlamaShape(hidden=256, layers=2, intermediate=512, vocab=1024, heads=4), n_finetunes=3, dtype="bfloat16")
real = g._Engine.compute
def compute(self, j, fn):
    def run():
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return real(self, j, run)
g._Engine.compute = compute
cases = [("task_arithmetic", {"weight": 0.5}, {}), ("dare_ties", {"weight": 0.5, "density": 0.6}, {}),
         ("della", {"weight": 0.5, "density": 0.6, "epsilon": 0.1}, {}), ("linear", {"weight": 0.5}, {}),
         ("breadcrumbs_ties", {"weight": 0.5, "density": 0.6}, {}),
         ("ties", {"weight": 0.5, "density": 0.4}, {"selection": "topk", "rescale": True})]
from fastmerge.backends import cuda as cb
for method, params, extra in cases + [("ties-cuda", {"weight": 0.5, "density": 0.4}, {"selection": "topk", "rescale": True})]:
    backend = "auto" if method.endswith("-cuda") else "triton"
    method = method.removesuffix("-cuda")
    cb.MIN_ELEMS = 1 << 16 if backend == "auto" else 1 << 20
    for budget in (None, 2 << 20):  # whole tensors, then 2 MiB of slots past the reserve: the matrices in row chunks
        cfg = {"merge_method": method, "models": [{"model": str(f), "parameters": dict(params)} for f in fts]}
        if method != "linear":
            cfg["base_model"] = str(b)
        if extra:
            cfg["parameters"] = extra
        out = f"{d}/out-{method}-{budget}"
        try:
            p = fastmerge.plan(cfg, out, progress=False, copy_tokenizer=False, device="cuda", backend=backend)
            rep = g.execute_cuda(p, out, max_gpu_memory=None if budget is None else g.RESERVE_BYTES + budget)
            print(f"sync error mode {method} ({backend}) budget={budget}: PASS ({rep.units} units, {rep.chunked_tensors} "
                  f"chunked, backends {rep.backends})")
        except Exception as e:
            tb = [f for f in traceback.extract_tb(e.__traceback__) if "/fastmerge/" in f.filename or "/kernels/" in f.filename]
            where = f"{tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else "?"
            print(f"sync error mode {method} ({backend}) budget={budget}: FAIL at {where}: {type(e).__name__}: {str(e)[:200]}")
PY
echo "sync error rc=$?"; cat "$OUT/sync_error.log" | grep "sync error mode"
(cd "$REPO" && timeout 120 env -u TRITON_INTERPRET python3 -m fastmerge.kernels.offline > "$OUT/offline_sm90.md" 2>&1) &
echo "=== quick (${SECONDS}s)"
timeout 120 python3 -m fastmerge bench kernels --device cuda --quick --no-progress \
  --json "$OUT/kernels-gpu-quick.json" > "$OUT/kernels-gpu-quick.md" 2> "$OUT/kernels-gpu-quick.err"
echo "rc=$?"; cat "$OUT/kernels-gpu-quick.md"; tail -5 "$OUT/kernels-gpu-quick.err"
echo "=== select (${SECONDS}s)"
timeout 100 python3 "$REPO/bench/gpu_select.py" --out "$OUT" > "$OUT/select.md" 2> "$OUT/select.err"
echo "rc=$?"; cat "$OUT/select.md"; tail -5 "$OUT/select.err"
[ "$MODE" = quick ] && exit 0
echo "=== llama-8b, T=2,4 (${SECONDS}s)"
timeout "${KERNELS_CAP:-$((400 - SECONDS))}" python3 -m fastmerge bench kernels --device cuda --shapes llama-8b --models 2,4 \
  --no-progress --json "$OUT/kernels-gpu.json" --plot "$OUT/kernels-gpu.png" > "$OUT/kernels-gpu.md" 2> "$OUT/kernels-gpu.err"
echo "rc=$?"; cat "$OUT/kernels-gpu.md"; tail -5 "$OUT/kernels-gpu.err"
echo "=== ncu (${SECONDS}s)"
if command -v ncu > /dev/null && [ $((470 - SECONDS)) -gt 20 ]; then
  cat > $SCRATCH/fm_ncu.py <<'PY'
import torch
from fastmerge.kernels._common import Segments
from fastmerge.kernels.ties import TiesKernel
from fastmerge.kernels.linear import task_arithmetic_merge
from fastmerge.methods.ties import TiesParams
from fastmerge.methods.task_arithmetic import TaskArithmeticParams
N, T = 4096 * 14336, 8
base = (torch.randn(N, device="cuda") * 0.02).bfloat16()
x = (base.float()[None] + 0.002 * torch.randn(T, N, device="cuda")).bfloat16()
out = torch.empty(N, dtype=torch.bfloat16, device="cuda")
segs = Segments.packed([N])
TiesKernel([TiesParams((1 / T,) * T, (0.5,) * T)], [N], "cuda").run(x, base, out, segs)
task_arithmetic_merge(x, base, out, segs, [TaskArithmeticParams((1 / T,) * T, False, 1.0)])
torch.cuda.synchronize()
PY
  timeout $((470 - SECONDS)) ncu --clock-control none -k "regex:_gta_kernel|_hist_kernel" --launch-count 3 \
    --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__average_warp_latency_issue_stalled_long_scoreboard,launch__registers_per_thread,gpu__time_duration.sum \
    python3 $SCRATCH/fm_ncu.py > "$OUT/ncu.txt" 2>&1
  echo "ncu rc=$?"; grep -E "_kernel|dram__|warps_active|registers|duration" "$OUT/ncu.txt" | head -30
else
  echo "ncu: not installed or no time left"
fi
wait
cat "$OUT/offline_sm90.md" 2>/dev/null
echo "=== done (${SECONDS}s)"
