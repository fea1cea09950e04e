#!/bin/bash
# Why does a C++ exception out of fastmerge._C crash the interpreter after `import torch` on some images
# (H100 image, 2026-11-24; see CMakeLists.txt, FASTMERGE_PRIVATE_CXX_RUNTIME)? Prints which library
# provides the throw path's symbols to _C, the loaded libraries that export their own, LD_* / preload, and
# a backtrace where gdb exists. PY=python to use; PYTHONPATH must reach the fastmerge build to examine.
PY=${PY:-python3}
SCRATCH=${SCRATCH:-$(mktemp -d)}
cat > $SCRATCH/fm_t.py <<'P'
import torch
import fastmerge._C as C, array
x = array.array('f', [1.0] * 7); p = x.buffer_info()[0]
try:
    C.breadcrumbs(p, 0, 7, [p], [0], p, 0, [1.0], [0.5], [-0.1], 2, False, 1.0, False, False)
except ValueError as e:
    print('ok: ValueError')
P
echo "== 1. who provides the throw path symbols to fastmerge/_C"
rm -f $SCRATCH/fm_ldb.*; LD_DEBUG=bindings LD_DEBUG_OUTPUT=$SCRATCH/fm_ldb $PY $SCRATCH/fm_t.py >/dev/null 2>&1
grep -h 'fastmerge/_C' $SCRATCH/fm_ldb.* | grep -E "\`(__cxa_throw|__cxa_allocate_exception|__cxa_begin_catch|__gxx_personality_v0|_Unwind_RaiseException|_Unwind_Resume)'" | sed 's/^ *[0-9]*: *//' | sort -u
echo "== 2. loaded libraries that export a C++ ABI / unwinder (possible interposers)"
$PY - <<'P'
import torch, subprocess
libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if '.so' in l})
keys = ('__cxa_throw', '__cxa_allocate_exception', '__gxx_personality_v0', '_Unwind_RaiseException', '_Unwind_Find_FDE', '__register_frame')
for lib in libs:
    out = subprocess.run(['nm', '-D', '--defined-only', lib], capture_output=True, text=True).stdout
    hits = sorted({l.split()[-1] for l in out.splitlines() if l.split() and l.split()[-1].split('@')[0] in keys})
    if hits: print(lib, hits)
P
echo "== 3. environment"; env | grep -E '^LD_|PRELOAD'; cat /etc/ld.so.preload 2>/dev/null
echo "== 4. backtrace"; command -v gdb >/dev/null && gdb -q -batch -ex run -ex bt -ex 'info sharedlibrary' --args $PY $SCRATCH/fm_t.py 2>&1 | tail -60
