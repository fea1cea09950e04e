// FP8 inputs of the CPU kernels: the load step that turns FP8 e4m3fn / e5m2 bytes and their scales into fp32.
//
// An FP8 input is passed where any input (or the base) is, with the dtype code FP8 (common.h) and, instead of
// the data pointer, the address of an Fp8Src descriptor: the weight's bytes and how its scales apply (one per
// 128x128 block of DeepSeek-V3's `W_scale_inv`, one per row, one per tensor, or none). Every kernel reads its
// inputs through common.h's load_block / load_f32 (gta_cpu.h's fused block dequantises an FP8 operand's block
// with load_block into a scratch row first), which call the loaders of fp8.cpp for that code, so each pass
// dequantises a 1024-element block at a time into its L1 rows: no fp32 copy of the model.
//
// The value of byte b at flat index i is fp32(b) · scale(i), one fp32 multiply: exactly the torch reference
// (fastmerge/io/fp8.py `dequantize`: `w.to(float32)` then `mul_` by the scale in fp32), so a merge of FP8
// inputs is bit-identical to the same kernel run on their dequantised fp32 copies (fp8_decode below).
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

// The fp32 value of FP8 byte b (format F), decoded from its bit layout without branches (selects and integer
// operations, which GCC vectorises; a 256-entry table needs a gather, and AVX2's took ties on FP8 inputs to
// 1.5x its time on fp32 copies). Exact: every FP8 value is an fp32 value; subnormals m · 2^(1 − bias −
// mantissa bits) are an exact product; NaN payloads as torch 2.13 writes them (sign | 0x7fc00000 | mantissa at
// the top); e5m2's exponent 31 with mantissa 0 is ±inf. The definition of the decode: fp8.cpp's F16C decoder
// (where the CPU has F16C) writes the same bits, and falls back on this one where it cannot.
template <int F>
FM_ALWAYS_INLINE float fp8_decode(uint32_t b) {
  constexpr uint32_t MB = F == FP8_E4M3FN ? 3u : 2u;
  constexpr uint32_t EMAX = F == FP8_E4M3FN ? 15u : 31u;
  constexpr uint32_t BIAS = F == FP8_E4M3FN ? 7u : 15u;
  constexpr float SUB = F == FP8_E4M3FN ? 0x1p-9f : 0x1p-16f;
  const uint32_t sign = (b & 0x80u) << 24;
  const uint32_t e = (b >> MB) & EMAX;
  const uint32_t m = b & ((1u << MB) - 1u);
  const uint32_t normal = sign | ((e + (127u - BIAS)) << 23) | (m << (23 - MB));
  const uint32_t sub = f32_bits(float(int32_t(m)) * SUB) | sign;
  const uint32_t nan = sign | 0x7fc00000u | (m << (23 - MB));
  uint32_t r = e == 0u ? sub : normal;
  if (F == FP8_E4M3FN) {
    r = (e == EMAX && m == 7u) ? nan : r;
  } else {
    r = e == EMAX ? (m == 0u ? (sign | 0x7f800000u) : nan) : r;
  }
  return bits_f32(r);
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
  const uint32_t b = s.data[i];
  return fm_mul(s.format == FP8_E5M2 ? fp8_decode<FP8_E5M2>(b) : fp8_decode<FP8_E4M3FN>(b), sc);
}

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
