// fastmerge/sce.h: the arguments and entry point of the SCE CPU kernel (csrc/cpu/sce.cpp), which mirrors
// fastmerge/methods/sce.py in default mode (fp32 math, one rounding on store):
//
//     δ_i  = x_i − b
//     select_topk < 1:  c_i = δ_i − δ_0;  m = (Σ_i c_i) / T;  v = (Σ_i (c_i − m)²) / T      (sums from +0, in order)
//                       k = int(fp32(fp32(nnz(v)) · fp32(select_topk)))   (torch: int64 tensor × float)
//                       keep = v >= the k-th largest v (radix select, csrc/cpu/select.h); k = 0: none
//                       δ_i = δ_i · (keep ? 1 : 0)                        (a product: inf·0 = NaN, as torch)
//     weights:          e_i = (Σ_j fp32(δ_ij²), in double) / n;  tot = Σ_i e_i (double)
//                       w_i = |tot| < 1e-6 ? fp32(1/T) : fp32(e_i / tot)
//     erase:            s = Σ_i δ_i >= 0 ? +1 : −1;  a_i = w_i · (sign(δ_i) == s ? 1 : 0)
//                       out = b + (Σ_i δ_i · a_i) / clamp(Σ_i a_i, 1e-6)
//
// The weights are a double-accumulated mean of squares rounded once (the reference's torch fp32 reductions
// depend on torch's thread count and SIMD width, so no kernel can match them bit for bit); see
// tests/native/test_native_sce.py for the reference patch this assumes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastmerge {

struct SceArgs {
  void* out;
  int out_dtype;
  int64_t n;
  int num_inputs;
  const void* const* inputs;
  const int* input_dtypes;
  const void* base;  // required
  int base_dtype;
  double select_topk;  // in (0, 1]; >= 1: no selection
};

namespace cpu {
// `threads`: 0 = OpenMP default; results do not depend on it. The caller releases the GIL.
void sce(const SceArgs& a, int threads);
// Bytes of the calling thread's grow-only SCE scratch (the variance buffer, rows, partials).
size_t sce_scratch_bytes();
}  // namespace cpu

}  // namespace fastmerge
