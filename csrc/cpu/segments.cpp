// Many small tensors in one call: TIES over consecutive segments of packed buffers, each segment merged
// exactly as its own tensor (its own k, thresholds and tail), without returning to Python in between.
//
// Why: a MoE checkpoint holds tens of thousands of tensors of a few KB (DeepSeek-V3: 45k per model). One
// Python call per tensor cost ~190 us in the engine against ~30 us of kernel work for a 2k-element tensor
// (bench/RESULTS.md, "MoE"); the engine now packs consecutive small tensors of one shard span into one
// buffer per input and merges them here. Segments run one per thread (each is below the 2^17 elements at
// which a kernel would use a second thread), dynamically scheduled over the threads the total size earns.
#include "cpu/segments.h"

#include <cstdint>
#include <vector>

#include "fastmerge/common.h"

namespace fastmerge {
namespace cpu {

namespace {

int64_t itemsize(int dtype) { return dtype == F32 ? 4 : 2; }

// Inputs held on the stack up to this many models (no allocation per segment), else in a vector.
constexpr int kStackInputs = 16;

}  // namespace

void ties_segments(const TiesArgs& a, const int64_t* offsets, int64_t num_segments, int threads) {
  const int T = a.g.num_inputs;
  // An FP8 operand is a source descriptor, not an array this function could offset into.
  for (int i = 0; i < T; ++i) FM_CHECK(a.g.input_dtypes[i] != FP8, "inputs[" << i << "]: ties_segments takes no FP8 input");
  FM_CHECK(a.g.base_dtype != FP8, "base: ties_segments takes no FP8 base");
  const int nt = threads_for_elems(threads, offsets[num_segments]);
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t off = offsets[s];
    const void* stack_ins[kStackInputs];
    std::vector<const void*> heap_ins;
    const void** ins = stack_ins;
    if (T > kStackInputs) {
      heap_ins.resize(size_t(T));
      ins = heap_ins.data();
    }
    for (int i = 0; i < T; ++i) {
      ins[i] = static_cast<const char*>(a.g.inputs[i]) + off * itemsize(a.g.input_dtypes[i]);
    }
    TiesArgs seg = a;
    seg.g.out = static_cast<char*>(a.g.out) + off * itemsize(a.g.out_dtype);
    seg.g.base = static_cast<const char*>(a.g.base) + off * itemsize(a.g.base_dtype);
    seg.g.inputs = ins;
    seg.g.n = offsets[s + 1] - off;
    ties(seg, 1);
  }
  (void)nt;
}

}  // namespace cpu
}  // namespace fastmerge
