// fastmerge/ties.h: TIES's trim, per element (host and device), mirroring fastmerge/methods/ties.py.
// The rest of the merge (weights, sign election, disjoint mean, λ, base) is the shared tail in gta.h.
//
// With th_i the k_i-th largest |δ_i| of the whole tensor (k_i = max(1, int(density_i · n)), found by a
// selection beforehand: csrc/cpu/select.h, csrc/cuda/ties.cu):
//
//     keep_i(j) = |δ_i(j)| > th_i  or  (|δ_i(j)| == th_i and tie_ok_i(j))
//
// tie_ok is "true" in threshold mode (every |δ| equal to the k-th largest is kept) and "j <= cut_i" in
// exact-k mode (selection: topk), cut_i = the index of the (k_i − #{|δ_i| > th_i})-th element equal to th_i.
// Float comparisons, as the reference's `mag >= threshold`: a NaN |δ| is never kept by a threshold, and a
// NaN threshold (more NaNs than k) keeps nothing.
#pragma once

#include <cstdint>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"

namespace fastmerge {
namespace ties {

// Kept for the Python API's election codes.
enum Election : int { SUM = gta::SUM, COUNT = gta::COUNT };

FM_HOST_DEVICE bool kept(float d, float th, bool tie_ok) {
  const float a = bits_f32(abs_bits(d));
  return a > th || (a == th && tie_ok);
}

// k of methods/ties.py keep_count: Python's double product, truncated, at least 1 (and at most n).
FM_HOST_DEVICE int64_t keep_count(double density, int64_t n) {
  int64_t k = int64_t(density * double(n));
  if (k < 1) k = 1;
  if (k > n) k = n;
  return k;
}

}  // namespace ties
}  // namespace fastmerge
