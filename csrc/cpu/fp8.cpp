// The FP8 load step of the CPU kernels (see fp8.h): out of line, one call per 1024-element block.
//
// Two decoders, bit-identical (tests/native/test_fp8_decode.py: every code of both formats times every kind
// of scale, against the torch reference):
//  * F16C (CPUs with AVX2 and F16C, i.e. every x86-64-v3 or v4 one): the byte becomes an fp16 bit pattern
//    with a few 16-bit integer ops and vcvtph2ps widens 8 of them per instruction, about what a bf16 widening
//    costs (`bench_fp8.py --methods load`, one 4096x4096 input read once: 12.5 ms as e4m3fn with block
//    scales, 11.8 ms as bf16, 18.7 ms with the select decoder; one core of the AVX2 EPYC, bench/RESULTS.md).
//  * fp8_decode's selects (CPUs without F16C; the F16C path's tails under 8 elements and the runs whose
//    scale it cannot fold, see f16c_scale).
#include "cpu/fp8.h"

#if FM_HAS_TARGET_CLONES || (defined(__F16C__) && defined(__AVX2__))
#include <immintrin.h>
#define FM_FP8_F16C 1
#else
#define FM_FP8_F16C 0
#endif

#if FM_HAS_TARGET_CLONES  // a baseline build: the F16C decoder compiled for AVX2 + F16C, used where the CPU has them
#define FM_F16C_TARGET __attribute__((target("avx2,f16c")))
#else  // built for a CPU with them (-march), or without the F16C decoder
#define FM_F16C_TARGET
#endif

#include <cstdlib>

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

#if FM_FP8_F16C
// 16-bit lanes holding the bytes b in their high half (b << 8) -> the fp16 bit patterns of format F's values:
//  * e5m2 is the high byte of an fp16 (same exponent bias 15, 2 of fp16's 10 mantissa bits), inf and NaN
//    included: vcvtph2ps sets the quiet bit and keeps the payload at the top of the mantissa, which gives
//    fp8_decode's sign | 0x7fc00000 | m << 21 for the three NaN mantissas.
//  * e4m3fn: sign to bit 15, exponent and mantissa to bits 13..7 (an arithmetic shift copies the sign into
//    bit 14, the mask clears it): an fp16 of exponent field e and mantissa m << 7, whose value is the e4m3fn
//    value / 256 exactly (bias 15 vs 7; subnormals m · 2^-9 become m · 2^-17, fp16 subnormals). The NaN codes
//    (magnitude 0x7f, 0x3f80 here, the only one that carries into bit 14 when 0x80 is added) get bit 14:
//    0x7f80, an fp16 NaN that vcvtph2ps widens to sign | 0x7ff00000 = fp8_decode's sign | 0x7fc00000 | 7 << 20.
template <int F>
FM_F16C_TARGET FM_ALWAYS_INLINE __m128i fp16_bits(__m128i w) {
  if (F == FP8_E5M2) return w;
  w = _mm_and_si128(_mm_srai_epi16(w, 1), _mm_set1_epi16(int16_t(0xbf80)));
  return _mm_or_si128(w, _mm_and_si128(_mm_add_epi16(w, _mm_set1_epi16(0x0080)), _mm_set1_epi16(0x4000)));
}

template <int F>
FM_F16C_TARGET FM_ALWAYS_INLINE __m256i fp16_bits(__m256i w) {
  if (F == FP8_E5M2) return w;
  w = _mm256_and_si256(_mm256_srai_epi16(w, 1), _mm256_set1_epi16(int16_t(0xbf80)));
  return _mm256_or_si256(w, _mm256_and_si256(_mm256_add_epi16(w, _mm256_set1_epi16(0x0080)), _mm256_set1_epi16(0x4000)));
}

// The run multiplier. e4m3fn's fp16 is value / 256, so its run multiplies by 256 · sc: exact whenever it is
// finite (a power-of-two product, subnormal sc included), and then (v / 256) · (256 sc) is the same real
// number as v · sc, rounded once: the same fp32 (overflow, underflow and signed zeros included). Runs whose
// sc is NaN, inf or |sc| >= 2^120 (256 sc overflows) take fp8_decode instead (so does e5m2 with a NaN or
// inf scale: which NaN a NaN · NaN product keeps depends on the operand order the compiler picks).
template <int F>
FM_ALWAYS_INLINE bool f16c_scale(float sc, float* m) {
  *m = F == FP8_E4M3FN ? fm_mul(sc, 256.0f) : sc;
  return abs_bits(sc) < (F == FP8_E4M3FN ? 0x7b800000u : 0x7f800000u);
}

template <int F>
FM_F16C_TARGET void load_f16c(float* dst, const Fp8Src& s, int64_t off, int64_t len) {
  const uint8_t* d = s.data + off;
  int64_t j = 0;
  while (j < len) {
    float sc, mul;
    const int64_t run = fp8_scale_run(s, off + j, &sc);
    const int64_t e = run < len - j ? j + run : len;
    if (f16c_scale<F>(sc, &mul)) {
      const __m256 m = _mm256_set1_ps(mul);
      for (; j + 16 <= e; j += 16) {
        const __m256i w = fp16_bits<F>(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(d + j))), 8));
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(w)), m));
        _mm256_storeu_ps(dst + j + 8, _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(w, 1)), m));
      }
      if (j + 8 <= e) {  // a run of 8-15 left (rows or blocks not a multiple of 16 wide)
        const __m128i w = fp16_bits<F>(_mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(d + j))));
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtph_ps(w), m));
        j += 8;
      }
    }
    for (; j < e; ++j) dst[j] = fm_mul(fp8_decode<F>(d[j]), sc);
  }
}

FM_F16C_TARGET void fp8_load_f16c(float* dst, const Fp8Src& s, int64_t off, int64_t len) {
  if (s.format == FP8_E5M2) {
    load_f16c<FP8_E5M2>(dst, s, off, len);
  } else {
    load_f16c<FP8_E4M3FN>(dst, s, off, len);
  }
}

// Whether the F16C decoder runs: the CPU has AVX2 and F16C, and FASTMERGE_FP8_DECODER=select is not set (the
// select decoder on an F16C machine, so that tests/native/test_fp8_decode.py checks both on one).
bool use_f16c() {
  static const bool yes = [] {
    const char* env = std::getenv("FASTMERGE_FP8_DECODER");
    if (env != nullptr && std::strcmp(env, "select") == 0) return false;
#if FM_HAS_TARGET_CLONES
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#else
    return true;
#endif
  }();
  return yes;
}
#endif  // FM_FP8_F16C

FM_ALWAYS_INLINE void fp8_load_select(float* dst, const Fp8Src& s, int64_t off, int64_t len) {
  if (s.format == FP8_E5M2) {
    load_runs<FP8_E5M2>(dst, s, off, len);
  } else {
    load_runs<FP8_E4M3FN>(dst, s, off, len);
  }
}
}  // namespace

// F16C where the CPU has it (every x86-64-v3 or v4 CPU), checked per call (a load and a test; GCC function
// multiversioning would not do: GCC 12 resolves a call from another file to its default version); the select
// decoder cloned per SIMD level otherwise (it vectorises: integer shifts, masks and selects).
FM_TARGET_CLONES void fp8_load_block(float* dst, const void* src, int64_t off, int64_t len) {
  const Fp8Src& s = *static_cast<const Fp8Src*>(src);
#if FM_FP8_F16C
  if (use_f16c()) return fp8_load_f16c(dst, s, off, len);
#endif
  fp8_load_select(dst, s, off, len);
}

float fp8_load_one(const void* src, int64_t i) { return fp8_load_one_inl(*static_cast<const Fp8Src*>(src), i); }

}  // namespace cpu
}  // namespace fastmerge
