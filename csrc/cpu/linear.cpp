// CPU kernel of weighted_delta_sum (linear, task_arithmetic): see fastmerge/linear.h for the formula.
//
// Layout of the work: the tensor is cut into blocks of kBlock elements; each block converts the base and
// then each input to fp32 scratch rows on the stack (12 KiB, L1-resident) and runs one vectorisable loop
// per input. Reading every input once and writing the output once is the minimum traffic, so for large
// tensors the kernel runs at memory bandwidth. Blocks are split statically across OpenMP threads; each
// element's arithmetic is the same whatever the split, so any thread count gives the same bits.
#include "fastmerge/common.h"
#include "fastmerge/linear.h"

namespace fastmerge {
namespace cpu {
namespace {

FM_TARGET_CLONES void wds_block(const WdsArgs& a, int64_t off, int64_t len) {
  alignas(64) float b[kBlock];
  alignas(64) float v[kBlock];
  alignas(64) float acc[kBlock];
  const bool has_base = a.base != nullptr;
  if (has_base) {
    load_block(b, a.base, a.base_dtype, off, len);
  } else {
    for (int64_t j = 0; j < len; ++j) b[j] = 0.0f;
  }
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  for (int i = 0; i < a.num_inputs; ++i) {
    load_block(v, a.inputs[i], a.input_dtypes[i], off, len);
    const float w = a.weights[i];
    // Two loops instead of one with a per-element `has_base` test: the branch is loop invariant but GCC
    // only vectorises it after unswitching, which -O3 does not always do for a loop in a loop.
    if (has_base) {
      for (int64_t j = 0; j < len; ++j) acc[j] = linear::accumulate(acc[j], w, v[j], b[j], true);
    } else {
      for (int64_t j = 0; j < len; ++j) acc[j] = linear::accumulate(acc[j], w, v[j], 0.0f, false);
    }
  }
  const linear::Finish f = a.fin;
  for (int64_t j = 0; j < len; ++j) acc[j] = linear::finish(acc[j], b[j], f);
  store_block(a.out, a.out_dtype, off, acc, len);
}

}  // namespace

void weighted_delta_sum(const WdsArgs& a, int threads) {
  for_each_block(a.n, threads, [&a](int64_t off, int64_t len) { wds_block(a, off, len); });
}

}  // namespace cpu
}  // namespace fastmerge
