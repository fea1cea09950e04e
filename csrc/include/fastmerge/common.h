// fastmerge/common.h: pieces shared by every kernel, host (csrc/cpu) and device (csrc/cuda) alike.
//
//  * FM_HOST_DEVICE: one definition of each formula, compiled by g++ and by nvcc.
//  * DType: the dtype ints of the Python API (0 = float32, 1 = float16, 2 = bfloat16).
//  * load_f32 / store_f32: exact widening to fp32 and round-to-nearest-even narrowing from fp32,
//    bit-identical to torch's CPU `.to(torch.float16)` / `.to(torch.bfloat16)` (checked against torch 2.13
//    on an AVX-512 host by tests/native: all 65536 fp16 and bf16 patterns, 17M fp32 patterns including
//    inf, overflow, subnormals and rounding ties; NaN stays NaN, see the NaN notes below).
//  * fm_add / fm_sub / fm_mul / fm_div: one IEEE rounding per op on both sides. Host code is compiled with
//    -ffp-contract=off; device code calls the __f*_rn intrinsics, which nvcc never fuses into an FMA
//    (its default is --fmad=true, which would turn `acc + w * v` into one rounding and differ from torch).
//  * FM_CHECK: argument checks that throw std::invalid_argument (pybind11 turns it into ValueError).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FM_HOST_DEVICE inline
#endif

namespace fastmerge {

// FP8 (host kernels, inputs and base only): the pointer is not the data but a cpu::Fp8Src descriptor (the FP8
// bytes and their scales, csrc/cpu/fp8.h), dequantised to fp32 by the load step (load_block, load_f32).
enum DType : int { F32 = 0, F16 = 1, BF16 = 2, FP8 = 3 };

FM_HOST_DEVICE bool valid_dtype(int dt) { return dt == F32 || dt == F16 || dt == BF16; }

FM_HOST_DEVICE int dtype_size(int dt) { return dt == F32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------------------
// Bit casts. memcpy is the portable type pun on the host (compiles to a register move); the device uses the
// intrinsics.
FM_HOST_DEVICE uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FM_HOST_DEVICE float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Arithmetic with exactly one rounding per operation (see the header comment for why).
FM_HOST_DEVICE float fm_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FM_HOST_DEVICE float fm_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FM_HOST_DEVICE float fm_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
// a*b + c with ONE rounding (fused multiply-add). mergekit 0.1.5's linear accumulates with torch's
// `addcmul_`, which is fused on CPU: 9% of fp32 outputs of a 3-model merge differ (up to 347 ulp near
// zero) if the product is rounded first. Host: std::fma (an FMA instruction in the x86-64-v3/v4 clones,
// glibc's exact software fma in the baseline one).
FM_HOST_DEVICE float fm_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
FM_HOST_DEVICE float fm_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// |x| as bits: clearing the sign bit is exact for every input, NaN included. Non-negative floats (and
// NaNs with the sign cleared, which land above +inf = 0x7f800000) order exactly like these uint32 values.
FM_HOST_DEVICE uint32_t abs_bits(float x) { return f32_bits(x) & 0x7fffffffu; }

// ---------------------------------------------------------------------------------------------------------
// bfloat16 <-> float32.
//
// Widening is a 16-bit shift (bf16 is the top half of an fp32), exact for every pattern, NaN payloads kept
// (torch does the same).
FM_HOST_DEVICE float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Narrowing: round to nearest, ties to even, by adding 0x7fff + (lsb of the kept half) and truncating. A
// finite value that rounds past the largest bf16 carries into the exponent and becomes +-inf, as IEEE
// requires. NaN: torch 2.13's CPU conversion (its vectorised path, used even for 1-element tensors) writes
// 0xffff for every NaN whatever its sign or payload, so we do too (torch's CUDA path writes 0x7fff; either
// way it is a NaN, which is all a merge can promise about NaN inputs).
FM_HOST_DEVICE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0xffffu) : uint16_t(rounded);
}

// ---------------------------------------------------------------------------------------------------------
// float16 <-> float32 (IEEE binary16: 1 sign, 5 exponent bits with bias 15, 10 mantissa bits).
//
// Written without branches (selects only) so that g++ -O3 vectorises the load/store loops (this also needs
// -fno-trapping-math, see CMakeLists.txt: ~6 ms instead of ~40 ms per 16M fp16 loads on one core).
//
// Widening is exact. Normal numbers: shift the exponent+mantissa up 13 bits and rebias by 127-15 = 112
// (0x38000000 = 112 << 23). inf/NaN (exponent 31): rebias twice more so the exponent becomes 255; NaNs get
// the quiet bit, as the F16C vcvtph2ps instruction that torch's vectorised path uses (payload kept in
// the high mantissa bits; torch's scalar tail writes 0x7fffffff instead, so NaN payloads are not a
// contract). Subnormals (exponent 0): value = mantissa * 2^-24, computed exactly in fp32 (mantissa < 2^10).
FM_HOST_DEVICE float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;                       // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;      // rebias 15 -> 127
  const uint32_t infnan = ((em << 13) + 0x70000000u)     // exponent 31 -> 255
                          | (em > 0x7c00u ? 0x00400000u : 0u);  // NaN: set the quiet bit
  const float sub = float(int32_t(em)) * 5.9604644775390625e-8f;  // 2^-24, exact (signed convert: em < 2^15)
  const uint32_t mag = em < 0x0400u ? f32_bits(sub) : (em >= 0x7c00u ? infnan : normal);
  return bits_f32(mag | sign);
}

// Narrowing, round to nearest even (what F16C vcvtps2ph with imm=0 and torch's .to(torch.float16) do):
//  * |x| >= 2^-14 (0x38800000, smallest normal half): rebias the exponent by -112 and round the 13 dropped
//    mantissa bits by adding 0xfff + lsb before the shift. A carry out of the mantissa bumps the exponent,
//    which is the correct rounding; 65520 (0x477ff000) and above therefore become exponent 31 = inf.
//  * |x| >= 65536 (0x47800000) or inf: the rebias would overflow the 5-bit exponent, so clamp to inf.
//  * |x| < 2^-14: the result is a subnormal (units of 2^-24). Adding 0.5f puts the value in [0.5, 1),
//    where one fp32 ulp is exactly 2^-24, so the FPU's own round-to-nearest-even does the rounding; the
//    mantissa bits then are the half's subnormal mantissa (0x400 when it rounds up to the smallest normal,
//    which is also the right encoding). 2^-25 exactly ties to 0, as IEEE requires.
//  * NaN: sign | 0x7e00 (quiet) | the top 10 payload bits, as vcvtps2ph writes (torch 2.13 CPU, measured).
FM_HOST_DEVICE uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;  // 0xc8000000 = -(112 << 23)
  const uint32_t sub = f32_bits(fm_add(bits_f32(a), 0.5f)) - 0x3f000000u;
  uint32_t r = a < 0x38800000u ? sub : normal;
  r = a >= 0x47800000u ? 0x7c00u : r;
  r = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;
  return uint16_t(r | sign);
}

// ---------------------------------------------------------------------------------------------------------
// Typed element access by dtype int. The CPU kernels do not use these in their hot loops (they convert
// whole blocks with the dtype switch hoisted out of the loop, see load_block below); the CUDA kernels do,
// since a dtype is uniform across a warp and the branch costs nothing.
#if !defined(__CUDACC__)
namespace cpu {
// The FP8 load step (csrc/cpu/fp8.cpp): len elements from flat index off into fp32, and one element.
void fp8_load_block(float* dst, const void* src, int64_t off, int64_t len);
float fp8_load_one(const void* src, int64_t i);
}  // namespace cpu
#endif

FM_HOST_DEVICE float load_f32(const void* p, int dt, int64_t i) {
#if !defined(__CUDACC__)
  if (dt == FP8) return cpu::fp8_load_one(p, i);
#endif
  if (dt == BF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if (dt == F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

FM_HOST_DEVICE void store_f32(void* p, int dt, int64_t i, float v) {
  if (dt == BF16) {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  } else if (dt == F16) {
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

}  // namespace fastmerge

// ---------------------------------------------------------------------------------------------------------
// Host-only helpers of the CPU kernels (csrc/cpu/*.cpp): block conversion, SIMD clones, thread counts.
#if !defined(__CUDACC__)
#if defined(_OPENMP)
#include <omp.h>
#endif

// The wheel is built for baseline x86-64 (SSE2; no -march=native, it must run on any x86-64 CPU). The hot
// per-block functions are additionally cloned for x86-64-v2 (SSE4.2), v3 (AVX2) and v4 (AVX-512) and the
// best clone is picked at load time (GNU ifunc). The clones compute bit-identical results: every float op
// is still one IEEE operation on one element (-ffp-contract=off also forbids the FMA that v3/v4 offer),
// and the dtype conversions are integer/select code. Off where ifunc is unavailable (non-Linux, clang).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTMERGE_NO_TARGET_CLONES)
#define FM_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "arch=x86-64-v2", "default")))
#define FM_HAS_TARGET_CLONES 1
#else
#define FM_TARGET_CLONES
#define FM_HAS_TARGET_CLONES 0
#endif

// The same clones for code written with GCC vector types of W float lanes (gta_cpu.h's fused block): W must
// be the clone's register width, since GCC 12 lowers a compare or select of a wider vector type lane by
// lane (scalar code, ~20x slower), so one body compiled for every clone does not do. FM_LANE_CLONES(name,
// params, args) defines `void name params` once per ISA level (GCC function multiversioning: the same
// ifunc dispatch as target_clones), each calling the always_inline template `name##_w<W> args` with
// W = 16 (x86-64-v4, AVX-512), 8 (v3, AVX2), 4 (v2 and default, SSE). Without clones, one definition with
// the width of the compile flags.
#if FM_HAS_TARGET_CLONES
#define FM_LANE_CLONES(name, params, args)                                       \
  __attribute__((target("arch=x86-64-v4"))) void name params { name##_w<16> args; } \
  __attribute__((target("arch=x86-64-v3"))) void name params { name##_w<8> args; }  \
  __attribute__((target("arch=x86-64-v2"))) void name params { name##_w<4> args; }  \
  __attribute__((target("default"))) void name params { name##_w<4> args; }
#else
#if !defined(FM_LANES)  // may be set on the command line (tests of each width on one machine)
#if defined(__AVX512F__)
#define FM_LANES 16
#elif defined(__AVX__)
#define FM_LANES 8
#else
#define FM_LANES 4
#endif
#endif
#define FM_LANE_CLONES(name, params, args) \
  void name params { name##_w<FM_LANES> args; }
#endif

#if defined(__GNUC__)
#define FM_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define FM_ALWAYS_INLINE inline
#endif

namespace fastmerge {
namespace cpu {

// Elements per inner block. The kernels convert a block of each operand to fp32 scratch rows and run
// simple loops over them (vectorised); 1024 fp32 = 4 KiB per row, so the 3-5 rows of a block stay in a
// 32 KiB L1d. Blocks are also the unit of OpenMP work: every element's arithmetic is independent of the
// blocking, so results do not depend on the thread count.
constexpr int64_t kBlock = 1024;

FM_ALWAYS_INLINE int64_t num_blocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

FM_ALWAYS_INLINE void load_block(float* dst, const void* src, int dt, int64_t off, int64_t len) {
  if (dt == FP8) {  // one call per block: the table, the scales, the multiply (csrc/cpu/fp8.cpp)
    fp8_load_block(dst, src, off, len);
  } else if (dt == BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t j = 0; j < len; ++j) dst[j] = bf16_to_f32(s[j]);
  } else if (dt == F16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t j = 0; j < len; ++j) dst[j] = f16_to_f32(s[j]);
  } else {
    const float* s = static_cast<const float*>(src) + off;
    for (int64_t j = 0; j < len; ++j) dst[j] = s[j];
  }
}

FM_ALWAYS_INLINE void store_block(void* dst, int dt, int64_t off, const float* src, int64_t len) {
  if (dt == BF16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t j = 0; j < len; ++j) d[j] = f32_to_bf16(src[j]);
  } else if (dt == F16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + off;
    for (int64_t j = 0; j < len; ++j) d[j] = f32_to_f16(src[j]);
  } else {
    float* d = static_cast<float*>(dst) + off;
    for (int64_t j = 0; j < len; ++j) d[j] = src[j];
  }
}

FM_ALWAYS_INLINE int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

FM_ALWAYS_INLINE int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads for a loop over `units` independent pieces of work: `threads` (0 = OpenMP's default), never more
// than there are units (a tiny tensor should not wake a team), at least 1. Without OpenMP always 1.
FM_ALWAYS_INLINE int resolve_threads(int threads, int64_t units) {
#if defined(_OPENMP)
  int64_t nt = threads > 0 ? threads : max_threads();
  if (nt > units) nt = units;
  return nt < 1 ? 1 : int(nt);
#else
  (void)threads;
  (void)units;
  return 1;
#endif
}

// Threads for a pass over n elements: at most one per kMinElemsPerThread elements. Every OpenMP region ends
// in a barrier, and on a busy machine a woken worker can wait a whole scheduler slice for a core: 2-thread
// regions on a 3072-element tensor took 12-20 ms instead of 0.04 ms on one thread (measured, load 6 on 2
// cores). 2^17 elements are ~0.1 ms of work per thread, enough to amortise a wake-up on an idle machine,
// and keep every tensor under 256 Ki elements (norms, biases, small projections) on the calling thread.
constexpr int64_t kMinElemsPerThread = int64_t(1) << 17;

FM_ALWAYS_INLINE int threads_for_elems(int threads, int64_t n) {
  return resolve_threads(threads, (n + kMinElemsPerThread - 1) / kMinElemsPerThread);
}

// fn(off, len) for every block of [0, n), the blocks split statically across OpenMP threads: the driver
// of the elementwise kernels (linear, nearswap), whose bits do not depend on the split.
template <class Fn>
void for_each_block(int64_t n, int threads, const Fn& fn) {
  const int64_t nb = num_blocks(n);
  const int nt = threads_for_elems(threads, n);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t off = blk * kBlock;
    fn(off, n - off < kBlock ? n - off : kBlock);
  }
  (void)nt;
}

}  // namespace cpu
}  // namespace fastmerge
#endif  // !__CUDACC__

// ---------------------------------------------------------------------------------------------------------
// Argument checks (host only). The Python wrappers in fastmerge/_native.py already validate tensors; these
// guard the raw entry points against wrong list lengths and bad dtype ints, with a message naming the
// argument. std::invalid_argument becomes ValueError in Python (pybind11's default translation).
#if !defined(__CUDA_ARCH__)
#include <sstream>
#include <stdexcept>
#include <string>

#define FM_CHECK(cond, msg)                                   \
  do {                                                        \
    if (!(cond)) {                                            \
      std::ostringstream fm_check_os_;                        \
      fm_check_os_ << msg;                                    \
      throw std::invalid_argument(fm_check_os_.str());        \
    }                                                         \
  } while (0)

#define FM_CHECK_DTYPE(dt, name)                                                                    \
  FM_CHECK(::fastmerge::valid_dtype(dt),                                                            \
           name << ": dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " << (dt))

#define FM_CHECK_PTR(p, name) FM_CHECK((p) != 0, name << ": null data pointer")
#endif
