// Block machinery shared by the CPU kernels of the generalized-task-arithmetic family (ties.cpp, dare.cpp,
// della.cpp, breadcrumbs.cpp): the per-block merge (sparsify every model, then the gta.h tail), the
// per-block L1 norms of the rescale, and the grow-only scratch.
//
// A method supplies a Keep functor, `keep(i, off, len, d, km)`, that writes km[j] = 1 / 0 (keep element
// off + j of model i) for one block, given the block's fp32 deltas d. The block functions below are
// always_inline templates: each method instantiates them inside its own FM_TARGET_CLONES / FM_LANE_CLONES
// function, so they are compiled (and vectorised) once per SIMD clone, with that clone's lane count.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"

namespace fastmerge {
namespace cpu {
namespace gtacpu {

// Per model: how its deltas enter the merge.
struct ModelScale {
  bool whole;     // keep every entry, never rescaled (density >= 1 of dare/della/breadcrumbs)
  bool rescaled;  // multiply kept entries by factor
  float factor;   // ‖δ‖₁ / ‖kept δ‖₁ (fp32)
};

// Scratch rows per thread besides the T weighted-delta rows: base, delta, tot, div, num, keep.
constexpr int kFixedRows = 6;

inline size_t rows_per_thread(int num_inputs) { return size_t(kFixedRows + num_inputs) * size_t(kBlock); }

// The calling thread's grow-only buffers (no allocation per tensor in steady state; one set per calling
// thread, so Python threads merging at once with the GIL released do not share them).
struct Scratch {
  std::vector<float> rows;         // threads × rows_per_thread
  std::vector<double> partials;    // blocks (or rows) × T × 2 norms
  std::vector<ModelScale> scales;  // T
  std::vector<char> need;          // T: model i needs its norms
  std::vector<uint64_t> mask;      // della: T × ceil(n / 64) keep bits
  std::vector<unsigned char> rowbuf;  // della: per-thread row buffers

  size_t bytes() const {
    return rows.capacity() * sizeof(float) + partials.capacity() * sizeof(double) +
           scales.capacity() * sizeof(ModelScale) + need.capacity() + mask.capacity() * sizeof(uint64_t) +
           rowbuf.capacity();
  }
};

Scratch& scratch();  // thread_local, defined in gta_common.cpp

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// The consensus tail over one block: wd holds T rows (stride kBlock) of weighted kept deltas; the result
// (before rounding) is left in num. Loop order and op order as gta.h / methods/gta.py `combine`.
FM_ALWAYS_INLINE void tail_loops(const float* b, const float* wd, int T, const float* weights, const gta::Tail& t,
                                 float* tot, float* div, float* num, int64_t len) {
  for (int64_t j = 0; j < len; ++j) num[j] = 0.0f;
  if (t.consensus == gta::NONE) {
    for (int i = 0; i < T; ++i) {
      const float* wdi = wd + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) num[j] = fm_add(num[j], wdi[j]);
    }
    for (int64_t j = 0; j < len; ++j) num[j] = gta::finish(num[j], 0.0f, b[j], t);
    return;
  }
  for (int64_t j = 0; j < len; ++j) tot[j] = 0.0f;
  if (t.consensus == gta::COUNT) {
    for (int i = 0; i < T; ++i) {
      const float* wdi = wd + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) tot[j] = gta::elect_add(tot[j], wdi[j], gta::COUNT);
    }
  } else {
    for (int i = 0; i < T; ++i) {
      const float* wdi = wd + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) tot[j] = gta::elect_add(tot[j], wdi[j], gta::SUM);
    }
  }
  for (int64_t j = 0; j < len; ++j) {
    tot[j] = gta::majority(tot[j]);
    div[j] = 0.0f;
  }
  for (int i = 0; i < T; ++i) {
    const float* wdi = wd + int64_t(i) * kBlock;
    const float w = weights[i];
    for (int64_t j = 0; j < len; ++j) {
      const bool ag = gta::agrees(wdi[j], tot[j]);
      num[j] = fm_add(num[j], ag ? wdi[j] : 0.0f);
      div[j] = fm_add(div[j], ag ? w : 0.0f);
    }
  }
  for (int64_t j = 0; j < len; ++j) num[j] = gta::finish(num[j], div[j], b[j], t);
}

#if defined(__GNUC__)
// The fused code below runs W lanes at a time with GCC vector types (W = the SIMD clone's lanes: 16 on
// x86-64-v4, 8 on v3, 4 on v2 / default, see common.h's FM_LANE_CLONES). The width must match the clone's
// registers: GCC 12 lowers a compare or select of a vector type wider than the target's (64-byte vectors
// under AVX2 or SSE) lane by lane, with a vucomiss and branches per lane, while it splits +, −, ×, & into
// halves; with 16 lanes in every clone, ties on 3 bf16 4096x4096 models took 1.5 s instead of 85 ms on an
// AVX2 CPU (bench/RESULTS.md, "The fused block on CPUs without AVX-512").
// Per element the operations and their order are the same for every W, so the bits are too.
template <int W>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * W)));
  typedef int32_t I __attribute__((vector_size(4 * W)));
  typedef uint32_t U __attribute__((vector_size(4 * W)));
  typedef uint16_t H __attribute__((vector_size(2 * W)));
  typedef double D __attribute__((vector_size(8 * W)));
};

template <int W>
FM_ALWAYS_INLINE typename Lanes<W>::F vload(const float* p) {
  typename Lanes<W>::F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Lane constants: 0, 1, ..., W − 1 and 1, 2, 4, ..., 2^(W − 1).
alignas(64) constexpr uint32_t kLaneIndex[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
alignas(64) constexpr uint32_t kLaneBit[16] = {1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,
                                               1u << 6,  1u << 7,  1u << 8,  1u << 9,  1u << 10, 1u << 11,
                                               1u << 12, 1u << 13, 1u << 14, 1u << 15};
template <int W>
FM_ALWAYS_INLINE typename Lanes<W>::U lane_const(const uint32_t* table) {
  typename Lanes<W>::U v;
  std::memcpy(&v, table, sizeof v);
  return v;
}

// gta::sign per lane: 1, −1, 0 (either zero), NaN
template <class VF>
FM_ALWAYS_INLINE VF vsign(VF v) {
  const VF zero = {};
  const VF one = zero + 1.0f;
  return v > zero ? one : (v < zero ? -one : (v == zero ? zero : v));
}

// The tail of one W-lane chunk: wd holds T chunks of w·δ' at stride `stride` floats; returns the result
// before rounding. Shared by tail_block (rows of kBlock) and fused_block (T chunks of W on the stack).
// Every w·δ' row is read once or twice instead of the ~3T+4 passes of tail_loops over L1 rows (the merge
// pass of ties was ~3x a weighted delta sum, bench/RESULTS.md). GCC vector types, as abs_sums below:
// auto-vectorising a one-loop version failed (GCC 12: "two or more consecutive inner loops"). Per element
// the operations and their order are tail_loops', so the bits are the same.
template <int W>
FM_ALWAYS_INLINE typename Lanes<W>::F tail_chunk(typename Lanes<W>::F bv, const float* wd, int64_t stride, int T,
                                                 const float* weights, const gta::Tail& t) {
  typedef typename Lanes<W>::F VF;
  typedef typename Lanes<W>::I VI;
  const VF zero = {};
  const VF one = zero + 1.0f;
  VF nm = zero;
  VF dv = zero;
  if (t.consensus == gta::NONE) {
    for (int i = 0; i < T; ++i) nm = nm + vload<W>(wd + int64_t(i) * stride);
  } else {
    VF tt = zero;
    if (t.consensus == gta::COUNT) {
      for (int i = 0; i < T; ++i) tt = tt + vsign(vload<W>(wd + int64_t(i) * stride));
    } else {
      for (int i = 0; i < T; ++i) tt = tt + vload<W>(wd + int64_t(i) * stride);
    }
    const VF maj = tt >= zero ? one : -one;
    for (int i = 0; i < T; ++i) {
      const VF v = vload<W>(wd + int64_t(i) * stride);
      const VI ag = vsign(v) == maj;
      nm = nm + (ag ? v : zero);
      dv = dv + (ag ? zero + weights[i] : zero);
    }
  }
  if (t.normalize) nm = nm / (t.consensus == gta::NONE ? zero + t.divisor : (dv == zero ? one : dv));
  if (t.scale) nm = nm * t.lam;
  return bv + nm;
}

// The tail over one block, W lanes at a time. Whole vectors run past len up to the next multiple of W:
// every row is kBlock (a multiple of 16) long, and the extra lanes are never stored.
template <int W>
FM_ALWAYS_INLINE void tail_block(const float* b, const float* wd, int T, const float* weights, const gta::Tail& tail,
                                 float* tot, float* div, float* num, int64_t len) {
  (void)tot;
  (void)div;
  const gta::Tail t = tail;  // a local: the stores to num cannot alias it
  for (int64_t j = 0; j < len; j += W) {
    const typename Lanes<W>::F r = tail_chunk<W>(vload<W>(b + j), wd + j, kBlock, T, weights, t);
    std::memcpy(num + j, &r, sizeof r);
  }
}

// W elements of a bf16 or fp32 operand as fp32 (bf16: the bits shifted up, as bf16_to_f32).
template <int W>
FM_ALWAYS_INLINE typename Lanes<W>::F vload_dt(const void* p, int dt, int64_t i) {
  if (dt == BF16) {
    typename Lanes<W>::H h;
    std::memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
    const typename Lanes<W>::I w = __builtin_convertvector(h, typename Lanes<W>::I) << 16;
    typename Lanes<W>::F f;
    std::memcpy(&f, &w, sizeof f);
    return f;
  }
  return vload<W>(static_cast<const float*>(p) + i);
}

// MaskKeep (the stored bits of model i) W lanes at a time: off + j is a multiple of W, so the W bits sit in
// one word. Lane l is kept iff bit l is set: (bits & 2^l) != 0, a compare every ISA has (a per-lane shift
// count needs AVX2).
template <int W>
struct MaskVKeep {
  const uint64_t* mask;
  int64_t words;
  int64_t off;  // the block's first element
  FM_ALWAYS_INLINE typename Lanes<W>::I operator()(int i, int64_t j, typename Lanes<W>::F) const {
    typedef typename Lanes<W>::U VU;
    const int64_t e = off + j;
    const uint32_t bits = uint32_t(mask[i * words + (e >> 6)] >> (e & 63));
    return ((VU{} + bits) & lane_const<W>(kLaneBit)) != 0;
  }
};

// How a tie rule "ties kept for indices in [first, last]" covers the block [off, off + len): 1 every index,
// 0 none, −1 some (fused_block takes the first two with one flag per model; the third needs merge_block).
FM_ALWAYS_INLINE int tie_rule(int64_t first, int64_t last, int64_t off, int64_t len) {
  if (first <= off && last >= off + len - 1) return 1;
  if (last < off || first > off + len - 1 || last < first) return 0;
  return -1;
}

// Whether fused_block can take a block: whole 16-lane chunks, bf16 / fp32 / FP8 operands only (f16's widening
// is not a shift; those blocks take merge_block; FP8 ones are dequantised to a row first), at most
// kMaxFusedModels models.
constexpr int kMaxFusedModels = 16;  // fused_block's stack array of w·δ' chunks

inline bool fusable(const GtaArgs& a, int64_t len) {
  if (len % 16 != 0 || a.base_dtype == F16 || a.num_inputs > kMaxFusedModels) return false;
  for (int i = 0; i < a.num_inputs; ++i) {
    if (a.input_dtypes[i] == F16) return false;
  }
  return true;
}

// One block of the merge in a single streaming loop: per W-lane chunk, the base and every model's W
// elements are read straight from their tensors, δ, keep and w·δ' stay in registers (w·δ' of the T models
// in a W × T stack array in L1), then tail_chunk. merge_block instead converts each operand's whole block
// to an fp32 row and makes ~4 passes over each: its loads are one stream at a time, with compute in
// between, and at T=3 its merge pass took 2.8x a weighted delta sum over the same bytes (80 vs 29 ms,
// 32000x1024 bf16, 1 thread). Per element the operations and their order are merge_block's: same bits.
// `vkeep(i, j, d)` returns the keep lanes (each all ones or all zeros) of model i for chunk j (block-relative) given
// its fp32 deltas; it is only called for models that are not ms[i].whole. Callers check fusable().
template <int W, class VKeep>
FM_ALWAYS_INLINE void fused_block(const GtaArgs& a, const ModelScale* ms, const VKeep& vkeep, int64_t off, int64_t len,
                                  float* num) {
  typedef typename Lanes<W>::F VF;
  typedef typename Lanes<W>::I VI;
  const int T = a.num_inputs;
  const gta::Tail t = a.tail;
  const VF zero = {};
  alignas(64) float wd[kMaxFusedModels * W];
  // Operand k (0: base, 1 + i: model i) is read at src[k] + at[k] + j. An FP8 operand is first dequantised
  // into a spare scratch row (the caller's rows hold 6 + T of kBlock; num uses the first): its scales are
  // looked up once per run of 128 columns there, where a lookup per W-lane chunk (two 64-bit divisions and
  // two by the block size) made ties on FP8 inputs 1.6x slower than on their fp32 copies (4096x4096, T=3).
  const void* src[kMaxFusedModels + 1];
  int sdt[kMaxFusedModels + 1];
  int64_t at[kMaxFusedModels + 1];
  for (int k = 0; k <= T; ++k) {
    const void* p = k == 0 ? a.base : a.inputs[k - 1];
    const int dt = k == 0 ? a.base_dtype : a.input_dtypes[k - 1];
    if (dt == FP8) {
      float* row = num + int64_t(1 + k) * kBlock;
      load_block(row, p, dt, off, len);
      src[k] = row;
      sdt[k] = F32;
      at[k] = 0;
    } else {
      src[k] = p;
      sdt[k] = dt;
      at[k] = off;
    }
  }
  for (int64_t j = 0; j < len; j += W) {
    const VF bv = vload_dt<W>(src[0], sdt[0], at[0] + j);
    for (int i = 0; i < T; ++i) {
      const VF d = vload_dt<W>(src[1 + i], sdt[1 + i], at[1 + i] + j) - bv;
      const VF w = zero + a.weights[i];
      VF v;
      if (ms[i].whole) {
        v = w * d;
      } else {
        // the product ANDed with the keep lanes (all ones / all zeros) gives the product or +0.0f, as the
        // select of weighted_kept; GCC 12 lowered `keep != 0 ? w * d : zero` here lane by lane (ties at
        // density 0.5 took 610 ms instead of ~45). The product of a dropped lane is computed and discarded.
        const VF p = ms[i].rescaled ? w * (d * ms[i].factor) : w * d;
        VI pb;
        std::memcpy(&pb, &p, sizeof pb);
        pb &= vkeep(i, j, d);
        std::memcpy(&v, &pb, sizeof v);
      }
      std::memcpy(wd + W * i, &v, sizeof v);
    }
    const VF r = tail_chunk<W>(bv, wd, W, T, a.weights, t);
    std::memcpy(num + j, &r, sizeof r);
  }
  store_block(a.out, a.out_dtype, off, num, len);
}
#define FM_HAS_FUSED_BLOCK 1
#else
template <int W>
FM_ALWAYS_INLINE void tail_block(const float* b, const float* wd, int T, const float* weights, const gta::Tail& t,
                                 float* tot, float* div, float* num, int64_t len) {
  tail_loops(b, wd, T, weights, t, tot, div, num, len);
}
#define FM_HAS_FUSED_BLOCK 0
#endif

// One block of the merge: δ_i = x_i − b, the method's keep mask, w·δ' rows, the tail, one rounding on store.
template <int W, class Keep>
FM_ALWAYS_INLINE void merge_block(const GtaArgs& a, const ModelScale* ms, const Keep& keep, int64_t off, int64_t len,
                                  float* rows) {
  float* b = rows;
  float* d = b + kBlock;
  float* tot = d + kBlock;
  float* div = tot + kBlock;
  float* num = div + kBlock;
  int32_t* km = reinterpret_cast<int32_t*>(num + kBlock);
  float* wd = num + 2 * kBlock;  // T rows
  const int T = a.num_inputs;
  load_block(b, a.base, a.base_dtype, off, len);
  for (int i = 0; i < T; ++i) {
    load_block(d, a.inputs[i], a.input_dtypes[i], off, len);
    float* wdi = wd + int64_t(i) * kBlock;
    const float w = a.weights[i];
    for (int64_t j = 0; j < len; ++j) d[j] = fm_sub(d[j], b[j]);
    if (ms[i].whole) {
      for (int64_t j = 0; j < len; ++j) wdi[j] = fm_mul(w, d[j]);
      continue;
    }
    keep(i, off, len, d, km);
    if (ms[i].rescaled) {
      const float f = ms[i].factor;
      for (int64_t j = 0; j < len; ++j) wdi[j] = gta::weighted_kept(d[j], w, km[j] != 0, true, f);
    } else {
      for (int64_t j = 0; j < len; ++j) wdi[j] = gta::weighted_kept(d[j], w, km[j] != 0, false, 1.0f);
    }
  }
  tail_block<W>(b, wd, T, a.weights, a.tail, tot, div, num, len);
  store_block(a.out, a.out_dtype, off, num, len);
}

// ‖δ‖₁ and ‖keep·δ‖₁ of one block in double, 8 fixed lanes (lane l adds elements l, l + 8, ...; the tail
// continues in lanes 0, 1, ...), lanes combined pairwise: the same order whatever the threading and the SIMD
// clone. Written with GCC vector extensions: GCC does not vectorise an array of 8 double accumulators
// (it kept 16 scalar vaddsd per 8 elements: 40% of a DARE merge's time, measured). The 8 lanes are held in
// vectors of the clone's width, W/2 doubles each (one 8-double vector under AVX2 had no register: GCC
// kept it in memory and rebuilt it through general registers every step, store-forwarding stalls that
// took ~40% of dare_ties' norms pass). Masked entries are selected out, not multiplied by 0 (an inf or NaN
// |δ| that is not kept must not reach the kept norm).
#if defined(__GNUC__)
template <int W>
FM_ALWAYS_INLINE void abs_sums(const float* d, const int32_t* km, int64_t len, double* s_all, double* s_kept) {
  constexpr int CF = W < 8 ? W : 8;  // floats per load: the clone's width, at most the 8 lanes
  constexpr int WD = W / 2;          // doubles per accumulator register
  typedef typename Lanes<CF>::F VF;
  typedef typename Lanes<CF>::I VI;
  typedef typename Lanes<CF>::D VFD;  // a load's floats as doubles
  typedef typename Lanes<WD>::D VD;
  VD acc[8 / WD], kac[8 / WD];
  for (int q = 0; q < 8 / WD; ++q) {
    acc[q] = VD{};
    kac[q] = VD{};
  }
  const VF zero = {};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int c = 0; c < 8 / CF; ++c) {
      VI bits, k;
      std::memcpy(&bits, d + j + c * CF, sizeof bits);
      std::memcpy(&k, km + j + c * CF, sizeof k);
      bits &= 0x7fffffff;
      VF a;
      std::memcpy(&a, &bits, sizeof a);
      const VF ka = k != 0 ? a : zero;
      const VFD ad = __builtin_convertvector(a, VFD);
      const VFD kd = __builtin_convertvector(ka, VFD);
      VD ah[CF / WD], kh[CF / WD];
      std::memcpy(ah, &ad, sizeof ah);
      std::memcpy(kh, &kd, sizeof kh);
      for (int p = 0; p < CF / WD; ++p) {
        acc[c * (CF / WD) + p] += ah[p];
        kac[c * (CF / WD) + p] += kh[p];
      }
    }
  }
  double al[8], kl[8];
  std::memcpy(al, acc, sizeof al);
  std::memcpy(kl, kac, sizeof kl);
#else
template <int W>
FM_ALWAYS_INLINE void abs_sums(const float* d, const int32_t* km, int64_t len, double* s_all, double* s_kept) {
  double al[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  double kl[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int l = 0; l < 8; ++l) {
      const float a = bits_f32(abs_bits(d[j + l]));
      al[l] += double(a);
      kl[l] += double(km[j + l] != 0 ? a : 0.0f);
    }
  }
#endif
  for (int l = 0; j < len; ++j, ++l) {
    const float a = bits_f32(abs_bits(d[j]));
    al[l] += double(a);
    kl[l] += double(km[j] != 0 ? a : 0.0f);
  }
  *s_all = ((al[0] + al[1]) + (al[2] + al[3])) + ((al[4] + al[5]) + (al[6] + al[7]));
  *s_kept = ((kl[0] + kl[1]) + (kl[2] + kl[3])) + ((kl[4] + kl[5]) + (kl[6] + kl[7]));
}

// Keep flags <-> bits (one uint64 per 64 elements, element j of a word in bit j). Blocks start at
// multiples of 1024 elements, so a block's words are its own (no atomics). Packing goes through bytes so
// that both steps vectorise or nearly: 8 bytes (each 0 or 1) -> 8 bits with one multiply (byte k lands in
// bit 56 + k of v·0x0102040810204080; no carries).
FM_ALWAYS_INLINE void pack_bits(const int32_t* km, int64_t len, uint64_t* words) {
  alignas(64) uint8_t kb[kBlock + 64];
  for (int64_t j = 0; j < len; ++j) kb[j] = uint8_t(km[j] != 0);
  const int64_t nw = (len + 63) / 64;
  for (int64_t j = len; j < nw * 64; ++j) kb[j] = 0;
  for (int64_t w = 0; w < nw; ++w) {
    uint64_t x = 0;
    for (int g8 = 0; g8 < 8; ++g8) {
      uint64_t v;
      std::memcpy(&v, kb + w * 64 + 8 * g8, 8);
      x |= ((v * 0x0102040810204080ull) >> 56) << (8 * g8);
    }
    words[w] = x;
  }
}

// Keep = the stored bits of model i (mask + i·words).
struct MaskKeep {
  const uint64_t* mask;
  int64_t words;
  FM_ALWAYS_INLINE void operator()(int i, int64_t off, int64_t len, const float*, int32_t* km) const {
    const uint64_t* w = mask + i * words + (off >> 6);  // off is a multiple of 1024
    for (int64_t j = 0; j < len; ++j) km[j] = int32_t((w[j >> 6] >> (j & 63)) & 1u);
  }
};

// One block of a merge whose keep masks are stored bits (dare with rescale, della): fused_block where it can
// take the block, merge_block elsewhere.
template <int W>
FM_ALWAYS_INLINE void mask_merge_block(const GtaArgs& a, const ModelScale* ms, const MaskKeep& mk, int64_t off,
                                       int64_t len, float* rows) {
#if FM_HAS_FUSED_BLOCK
  if (fusable(a, len)) {
    fused_block<W>(a, ms, MaskVKeep<W>{mk.mask, mk.words, off}, off, len, rows);
    return;
  }
#endif
  merge_block<W>(a, ms, mk, off, len, rows);
}

// One block of the norms pass: partial[2i], partial[2i+1] = the block's two norms of model i (for every
// model that needs them; others get 0).
template <int W, class Keep>
FM_ALWAYS_INLINE void sums_block(const GtaArgs& a, const char* need, const Keep& keep, int64_t off, int64_t len,
                                 float* rows, double* partial) {
  float* b = rows;
  float* d = b + kBlock;
  int32_t* km = reinterpret_cast<int32_t*>(d + kBlock);
  load_block(b, a.base, a.base_dtype, off, len);
  for (int i = 0; i < a.num_inputs; ++i) {
    partial[2 * i] = 0.0;
    partial[2 * i + 1] = 0.0;
    if (!need[i]) continue;
    load_block(d, a.inputs[i], a.input_dtypes[i], off, len);
    for (int64_t j = 0; j < len; ++j) d[j] = fm_sub(d[j], b[j]);
    keep(i, off, len, d, km);
    abs_sums<W>(d, km, len, &partial[2 * i], &partial[2 * i + 1]);
  }
}

// Runs fn(blk, off, len, thread index) over the 1024-element blocks of [0, n), statically split.
template <class Fn>
void for_blocks(int64_t n, int threads, Fn&& fn) {
  const int64_t nb = num_blocks(n);
  const int nt = threads_for_elems(threads, n);  // thread_rows sizes its scratch with the same rule
  if (nt <= 1) {
    // No OpenMP region at all: even a serialised one (`if (false)`) costs a team set-up, which was a tenth
    // of TIES on 64-element tensors (ties_segments: one call per tensor, thousands per batch).
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t off = blk * kBlock;
      fn(blk, off, n - off < kBlock ? n - off : kBlock, 0);
    }
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt)
#endif
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t off = blk * kBlock;
    const int64_t len = n - off < kBlock ? n - off : kBlock;
    fn(blk, off, len, thread_id());
  }
}

// Per-thread scratch rows for a block pass with T models; returns the base pointer (stride rows_per_thread).
float* thread_rows(Scratch& sc, int num_inputs, int64_t n, int threads);

// Adds up `units` partials (units × T × 2, in unit order) and sets the rescale of every model with need[i].
void finish_scales(const double* partials, int64_t units, int num_inputs, const char* need, ModelScale* ms);

// The norms pass: partials of every block (grow-only scratch), then the scales of the models with need[i].
// `block(blk, off, len, rows, partial)` fills one block's partial (T × 2 doubles).
template <class Block>
void norms_pass(const GtaArgs& a, int threads, Scratch& sc, Block&& block) {
  const int T = a.num_inputs;
  const int64_t nb = num_blocks(a.n);
  grow(sc.partials, size_t(nb) * size_t(T) * 2);
  double* partials = sc.partials.data();
  float* rows = thread_rows(sc, T, a.n, threads);
  const size_t rpt = rows_per_thread(T);
  for_blocks(a.n, threads, [&](int64_t blk, int64_t off, int64_t len, int t) {
    block(blk, off, len, rows + size_t(t) * rpt, partials + size_t(blk) * size_t(T) * 2);
  });
  finish_scales(partials, nb, T, sc.need.data(), sc.scales.data());
}

// The merge pass: `block(off, len, rows)` merges one block.
template <class Block>
void merge_pass(const GtaArgs& a, int threads, Scratch& sc, Block&& block) {
  float* rows = thread_rows(sc, a.num_inputs, a.n, threads);
  const size_t rpt = rows_per_thread(a.num_inputs);
  for_blocks(a.n, threads, [&](int64_t, int64_t off, int64_t len, int t) { block(off, len, rows + size_t(t) * rpt); });
}

// Grows the per-model arrays (scales, need) to num_inputs entries; the kernel fills them.
inline void init_models(Scratch& sc, int num_inputs) {
  grow(sc.scales, size_t(num_inputs));
  grow(sc.need, size_t(num_inputs));
}

}  // namespace gtacpu
}  // namespace cpu
}  // namespace fastmerge
