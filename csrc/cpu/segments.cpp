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

int64_t itemsize(int dtype) { return dtype == 0 ? 4 : 2; }

}  // namespace

void ties_segments(const TiesArgs& a, const int64_t* offsets, int64_t num_segments, int threads) {
  const int T = a.g.num_inputs;
  const int nt = threads_for_elems(threads, offsets[num_segments]);
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t off = offsets[s];
    std::vector<const void*> ins(static_cast<size_t>(T));
    for (int i = 0; i < T; ++i) {
      ins[size_t(i)] = static_cast<const char*>(a.g.inputs[i]) + off * itemsize(a.g.input_dtypes[i]);
    }
    TiesArgs seg = a;
    seg.g.out = static_cast<char*>(a.g.out) + off * itemsize(a.g.out_dtype);
    seg.g.base = static_cast<const char*>(a.g.base) + off * itemsize(a.g.base_dtype);
    seg.g.inputs = ins.data();
    seg.g.n = offsets[s + 1] - off;
    ties(seg, 1);
  }
  (void)nt;
}

}  // namespace cpu
}  // namespace fastmerge
