// The FP8 load step of the CPU kernels (see fp8.h): out of line, one call per 1024-element block, cloned per
// SIMD level like the kernels (the table lookup is a gather where the ISA has one).
#include "cpu/fp8.h"

namespace fastmerge {
namespace cpu {

FM_TARGET_CLONES void fp8_load_block(float* dst, const void* src, int64_t off, int64_t len) {
  const Fp8Src& s = *static_cast<const Fp8Src*>(src);
  const fp8_alias_float* lut = fp8_lut(s.format);
  const uint8_t* d = s.data + off;
  int64_t j = 0;
  while (j < len) {  // runs of one scale: a 128-column block's part of a row, a row, or the whole block
    float sc;
    const int64_t run = fp8_scale_run(s, off + j, &sc);
    const int64_t e = run < len - j ? j + run : len;
    for (; j < e; ++j) dst[j] = fm_mul(lut[d[j]], sc);
  }
}

float fp8_load_one(const void* src, int64_t i) { return fp8_load_one_inl(*static_cast<const Fp8Src*>(src), i); }

}  // namespace cpu
}  // namespace fastmerge
