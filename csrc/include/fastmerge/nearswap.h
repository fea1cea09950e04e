// NearSwap in default mode (fastmerge/methods/nearswap.py): for t >= 1e-6,
//     out = min(max(b − t, x), b + t)      in fp32: x itself where |x − b| <= t, b ± t beyond,
// with torch.maximum / torch.minimum's NaN propagation (a NaN operand gives NaN). b − t and b + t are one
// fp32 rounding each (torch adds the Python float t to an fp32 tensor in fp32). t < 1e-6 (the weighted
// form w·x + (1 − w)·b of the reference) has no kernel: the torch backend runs it.
#pragma once

#include <cstdint>

#include "fastmerge/common.h"

namespace fastmerge {
namespace nearswap {

//: smallest t of the clamp form (methods/nearswap.py DIFF_FLOOR)
constexpr double kMinT = 1e-6;

FM_HOST_DEVICE float maximum(float a, float b) { return a != a ? a : (b != b ? b : (a > b ? a : b)); }
FM_HOST_DEVICE float minimum(float a, float b) { return a != a ? a : (b != b ? b : (a < b ? a : b)); }

FM_HOST_DEVICE float clamp_to_base(float x, float b, float t) {
  return minimum(maximum(fm_sub(b, t), x), fm_add(b, t));
}

}  // namespace nearswap

struct NearswapArgs {
  void* out;
  int out_dtype;
  int64_t n;
  const void* x;
  int x_dtype;
  const void* base;
  int base_dtype;
  float t;  // >= kMinT, rounded to fp32
};

namespace cpu {
void nearswap(const NearswapArgs& a, int threads);
}  // namespace cpu

}  // namespace fastmerge
