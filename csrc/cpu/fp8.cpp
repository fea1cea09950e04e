// The FP8 load step of the CPU kernels (see fp8.h): out of line, one call per 1024-element block, cloned per
// SIMD level like the kernels (the decode vectorises: integer shifts, masks and selects).
#include "cpu/fp8.h"

namespace fastmerge {
namespace cpu {

namespace {
template <int F>
FM_ALWAYS_INLINE void load_runs(float* dst, const Fp8Src& s, int64_t off, int64_t len) {
  const uint8_t* d = s.data + off;
  int64_t j = 0;
  while (j < len) {  // runs of one scale: a 128-column block's part of a row, a row, or the whole block
    float sc;
    const int64_t run = fp8_scale_run(s, off + j, &sc);
    const int64_t e = run < len - j ? j + run : len;
    for (; j < e; ++j) dst[j] = fm_mul(fp8_decode<F>(d[j]), sc);
  }
}
}  // namespace

FM_TARGET_CLONES void fp8_load_block(float* dst, const void* src, int64_t off, int64_t len) {
  const Fp8Src& s = *static_cast<const Fp8Src*>(src);
  if (s.format == FP8_E5M2) {
    load_runs<FP8_E5M2>(dst, s, off, len);
  } else {
    load_runs<FP8_E4M3FN>(dst, s, off, len);
  }
}

float fp8_load_one(const void* src, int64_t i) { return fp8_load_one_inl(*static_cast<const Fp8Src*>(src), i); }

}  // namespace cpu
}  // namespace fastmerge
