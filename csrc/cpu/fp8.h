// FP8 inputs of the CPU kernels: the load step that turns FP8 e4m3fn / e5m2 bytes and their scales into fp32.
//
// An FP8 input is passed where any input (or the base) is, with the dtype code FP8 (common.h) and, instead of
// the data pointer, the address of an Fp8Src descriptor: the weight's bytes and how its scales apply (one per
// 128x128 block of DeepSeek-V3's `W_scale_inv`, one per row, one per tensor, or none). Every kernel reads its
// inputs through common.h's load_block / load_f32 and gta_cpu.h's vload_dt, which call the loaders below for
// that code, so each fused pass dequantises in registers or in its L1 block rows: no fp32 copy of the model.
//
// The value of byte b at flat index i is fp32(b) · scale(i), one fp32 multiply: exactly the torch reference
// (fastmerge/io/fp8.py `dequantize`: `w.to(float32)` then `mul_` by the scale in fp32), so a merge of FP8
// inputs is bit-identical to the same kernel run on their dequantised fp32 copies. fp32(b) is a table of the
// 256 values of each format, built from the bit layout (exact: every FP8 value is an fp32 value), NaN payloads
// as torch 2.13 writes them (sign | 0x7fc00000 | mantissa shifted to the top).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "fastmerge/common.h"

namespace fastmerge {
namespace cpu {

enum Fp8Format : int32_t { FP8_E4M3FN = 0, FP8_E5M2 = 1 };
enum Fp8Kind : int32_t { FP8_NONE = 0, FP8_TENSOR = 1, FP8_CHANNEL = 2, FP8_BLOCK = 3 };

// The descriptor's first 8 bytes ("FP8SRC1" read as a little-endian integer): the binding refuses a dtype-FP8
// pointer whose descriptor does not start with them.
constexpr uint64_t kFp8Magic = 0x0031435253385046ull;

// The descriptor. Its layout is also written in fastmerge/_native.py (`_Fp8Desc`, ctypes): 56 bytes, no padding.
struct Fp8Src {
  uint64_t magic;
  const uint8_t* data;  // numel bytes
  const float* scale;   // fp32 scales (null for FP8_NONE)
  int64_t cols;         // elements per row: the element at flat index i is in row i / cols
  int64_t scale_cols;   // FP8_BLOCK: scales per row of blocks, ceil(cols / bn)
  int32_t bm, bn;       // FP8_BLOCK: the block's rows and columns (the last block of each dimension partial)
  int32_t kind;         // Fp8Kind
  int32_t format;       // Fp8Format
};
static_assert(sizeof(Fp8Src) == 56, "Fp8Src is mirrored by a ctypes structure in fastmerge/_native.py");

// The fp32 bits of every byte of one format (exact decoding; the tests compare all 256 with torch's cast).
constexpr uint32_t fp8_bits(uint32_t b, int format) {
  const int mbits = format == FP8_E4M3FN ? 3 : 2;
  const int ebits = 7 - mbits;
  const uint32_t bias = format == FP8_E4M3FN ? 7u : 15u;
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t e = (b >> mbits) & ((1u << ebits) - 1u);
  const uint32_t m = b & ((1u << mbits) - 1u);
  const bool nan = format == FP8_E4M3FN ? (e == 15u && m == 7u) : (e == 31u && m != 0u);
  if (nan) return sign | 0x7fc00000u | (m << (23 - mbits));
  if (format == FP8_E5M2 && e == 31u) return sign | 0x7f800000u;  // e4m3fn has no inf
  if (e == 0u) {
    if (m == 0u) return sign;
    // subnormal: m · 2^(1 − bias − mbits); normalise m (at most 3 bits) into an fp32 normal
    int shift = 0;
    uint32_t mm = m;
    while ((mm & (1u << mbits)) == 0u) {
      mm <<= 1;
      ++shift;
    }
    const uint32_t exp32 = uint32_t(int(127) + 1 - int(bias) - shift);
    return sign | (exp32 << 23) | ((mm & ((1u << mbits) - 1u)) << (23 - mbits));
  }
  return sign | ((e - bias + 127u) << 23) | (m << (23 - mbits));
}

struct Fp8Table {
  uint32_t bits[2][256];
  constexpr Fp8Table() : bits() {
    for (int f = 0; f < 2; ++f) {
      for (uint32_t b = 0; b < 256; ++b) bits[f][b] = fp8_bits(b, f);
    }
  }
};
alignas(64) inline constexpr Fp8Table kFp8Table{};

#if defined(__GNUC__)
typedef float fp8_alias_float __attribute__((may_alias));  // the table's uint32 bits read as fp32, legally
#else
typedef float fp8_alias_float;
#endif

FM_ALWAYS_INLINE const fp8_alias_float* fp8_lut(int32_t format) {
  return reinterpret_cast<const fp8_alias_float*>(kFp8Table.bits[format == FP8_E5M2 ? 1 : 0]);
}

// The scale of the element at flat index i, and how many elements from i on share it (to the end of its row
// for per-row scales; to the end of its block's columns within the row for block scales).
FM_ALWAYS_INLINE int64_t fp8_scale_run(const Fp8Src& s, int64_t i, float* sc) {
  if (s.kind == FP8_NONE) {
    *sc = 1.0f;
    return INT64_MAX;
  }
  if (s.kind == FP8_TENSOR) {
    *sc = s.scale[0];
    return INT64_MAX;
  }
  const int64_t r = i / s.cols;
  const int64_t c = i - r * s.cols;
  if (s.kind == FP8_CHANNEL) {
    *sc = s.scale[r];
    return s.cols - c;
  }
  *sc = s.scale[(r / s.bm) * s.scale_cols + c / s.bn];
  const int64_t to_block = s.bn - c % s.bn;
  return to_block < s.cols - c ? to_block : s.cols - c;
}

// One element (della's strided rows, the selection's sample): fp32(b) · scale.
inline float fp8_load_one_inl(const Fp8Src& s, int64_t i) {
  float sc;
  fp8_scale_run(s, i, &sc);
  return fm_mul(fp8_lut(s.format)[s.data[i]], sc);
}

#if defined(__GNUC__)
// W consecutive elements from flat index i, for gta_cpu.h's fused block: the table gathered into a vector and
// one vector multiply where the W elements share a scale (a whole chunk inside one 128-column block: every
// chunk of a DeepSeek-V3 matrix, whose rows are multiples of 16 long); lane by lane otherwise.
template <class VF, int W>
FM_ALWAYS_INLINE VF fp8_vload(const void* src, int64_t i) {
  const Fp8Src& s = *static_cast<const Fp8Src*>(src);
  const fp8_alias_float* lut = fp8_lut(s.format);
  const uint8_t* d = s.data + i;
  float sc;
  const int64_t run = fp8_scale_run(s, i, &sc);
  alignas(64) float f[W];
  if (run >= W) {
    for (int l = 0; l < W; ++l) f[l] = lut[d[l]];
    VF v;
    std::memcpy(&v, f, sizeof v);
    return v * sc;
  }
  for (int l = 0; l < W; ++l) f[l] = fp8_load_one_inl(s, i + l);
  VF v;
  std::memcpy(&v, f, sizeof v);
  return v;
}
#endif

// Why a descriptor cannot be read ("" if it can): the binding's check of a dtype-FP8 argument.
inline std::string fp8_src_problem(const void* p) {
  if (p == nullptr) return "null FP8 descriptor";
  const Fp8Src& s = *static_cast<const Fp8Src*>(p);
  if (s.magic != kFp8Magic) return "not an FP8 source descriptor (fastmerge._native.Fp8Source)";
  if (s.format != FP8_E4M3FN && s.format != FP8_E5M2) return "FP8 format must be 0 (e4m3fn) or 1 (e5m2)";
  if (s.kind < FP8_NONE || s.kind > FP8_BLOCK) return "FP8 scale kind must be 0 (none), 1, 2 or 3 (block)";
  if (s.data == nullptr) return "FP8 source: null data pointer";
  if (s.kind != FP8_NONE && s.scale == nullptr) return "FP8 source: null scale pointer";
  if (s.cols < 1) return "FP8 source: cols must be >= 1";
  if (s.kind == FP8_BLOCK && (s.bm < 1 || s.bn < 1 || s.scale_cols != (s.cols + s.bn - 1) / s.bn))
    return "FP8 source: block scales need bm, bn >= 1 and scale_cols = ceil(cols / bn)";
  return "";
}

}  // namespace cpu
}  // namespace fastmerge

// An input or base argument of a kernel: a dtype code 0-2, or FP8 with a valid descriptor at ptr.
#define FM_CHECK_IN_DTYPE(dt, ptr, name)                                                                   \
  do {                                                                                                      \
    if ((dt) == ::fastmerge::FP8) {                                                                         \
      const std::string fm_fp8_why_ = ::fastmerge::cpu::fp8_src_problem(reinterpret_cast<const void*>(ptr)); \
      FM_CHECK(fm_fp8_why_.empty(), name << ": " << fm_fp8_why_);                                          \
    } else {                                                                                                \
      FM_CHECK(::fastmerge::valid_dtype(dt), name << ": dtype code must be 0 (float32), 1 (float16), "       \
                                                  "2 (bfloat16) or 3 (an FP8 source), got " << (dt));       \
    }                                                                                                       \
  } while (0)
