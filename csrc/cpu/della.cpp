// CPU kernel of DELLA (della, della_linear): per-row magnitude ranks -> keep probabilities -> the
// counter-based mask of fastmerge/rng.h, the L1 rescale and the shared tail of fastmerge/gta.h, mirroring
// fastmerge/methods/della.py (default mode) op for op:
//
//     key       = |δ| rounded to the ranking dtype (the inputs' dtype when model and base are the same
//                 16-bit float, else fp32), as bits (non-negative floats order like their bit patterns)
//     r         = ascending rank of key in its row, equal keys in index order: 16-bit keys by counting
//                 (zero keys apart, see kCountSlack) when the row's keys span a narrow range, else (and for
//                 fp32 keys) by a stable LSD radix sort with 8-bit digits (digits that are the same for
//                 the whole row are skipped)
//     rank_norm = fl(fl(r) / fl(n − 1))          (n = row length; n = 1: 0.5)
//     p         = fl(lo + fl(span · rank_norm))  (lo = fp32(density − ε), span = fp32(2ε))
//     keep      = u(flat index) < p              (u of rng.h)
// Rows: 1-D → one row; 2-D → each row; N-D → the fibres along dim 1 (outer × inner rows, stride inner).
//
// Per tensor: (1) rows in parallel: ranks, probabilities, mask (stored as bits, T × n/8 bytes of grow-only
// scratch, since re-ranking costs far more than storing) and per-row L1 norms; (2) the fused merge pass
// reading the mask bits. Row norms are added in row order: thread-count independent.
#include <algorithm>
#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "fastmerge/rng.h"
#include "gta_cpu.h"

namespace fastmerge {
namespace cpu {
namespace {

struct DellaModel {
  rng::Stream st;
  int key_dtype;  // F32, F16 or BF16
  bool whole;
};

thread_local std::vector<DellaModel> tls_models;
thread_local std::vector<float> tls_ptab;  // T × row_len keep probabilities by rank

// Stable LSD radix sort of packed (key << 32 | index) by the key's low `key_bits` bits; the sorted array
// ends up in *a (the buffers may be swapped).
void radix_by_key(uint64_t** a, uint64_t** tmp, int64_t len, int key_bits) {
  const int passes = key_bits / 8;
  uint32_t cnt[4][256];
  std::memset(cnt, 0, sizeof cnt);
  const uint64_t* src = *a;
  for (int64_t c = 0; c < len; ++c) {
    const uint32_t k = uint32_t(src[c] >> 32);
    for (int p = 0; p < passes; ++p) cnt[p][(k >> (8 * p)) & 255u]++;
  }
  for (int p = 0; p < passes; ++p) {
    uint32_t* h = cnt[p];
    bool uniform = false;
    for (int b = 0; b < 256; ++b) uniform = uniform || h[b] == uint32_t(len);
    if (uniform) continue;  // one digit value in the whole row: the pass would not move anything
    uint32_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    const uint64_t* s = *a;
    uint64_t* d = *tmp;
    const int shift = 32 + 8 * p;
    for (int64_t c = 0; c < len; ++c) {
      const uint64_t v = s[c];
      d[h[(v >> shift) & 255u]++] = v;
    }
    std::swap(*a, *tmp);
  }
}

FM_ALWAYS_INLINE uint32_t rank_key(float d, int key_dtype) {
  const float a = bits_f32(abs_bits(d));
  if (key_dtype == BF16) return f32_to_bf16(a);  // NaN -> 0xffff: still above every number
  if (key_dtype == F16) return f32_to_f16(a);
  return abs_bits(a);
}

struct RowBufs {
  float* b;
  float* d;
  float* u;
  int32_t* km;
  uint32_t* key;
  uint32_t* rank;
  uint32_t* bins;  // counting ranks: kCountSlack + 2 * row_len + 2 counters
  uint8_t* kb;     // keep flags as bytes, row_len + 64
  uint64_t* s0;
  uint64_t* s1;
};

// Counting ranks are used when the row's non-zero 16-bit keys span at most 2·row_len + kCountSlack values.
// |δ| of a fine-tune spans ~1000-1800 bf16 keys per row besides exact zeros (measured on base N(0, 0.02²)
// + N(0, 0.002²) rows of 1024 and 4096: 225-400 distinct keys), and zeros (δ = 0 when x == base in bf16,
// ~70 per 4096) are counted apart: a histogram, a prefix sum over that range and one pass in index order
// give every rank, instead of the two scatter passes of a radix sort plus the inverse permutation.
constexpr int64_t kCountSlack = 2048;

// Ascending ranks of keys[0, L) (equal keys in index order) by counting. Bin 0 holds the zero keys, bin
// k − kmin + 1 the key k. Returns false (nothing written) if the range is too wide.
FM_ALWAYS_INLINE bool counting_ranks(const uint32_t* key, int64_t L, uint32_t* bins, uint32_t* rank) {
  // min of the non-zero keys as min(k − 1) + 1: 0 wraps to the largest value (a plain min vectorises)
  uint32_t kmin1 = 0xffffffffu, kmax = 0;
  for (int64_t c = 0; c < L; ++c) {
    const uint32_t k = key[c];
    const uint32_t k1 = k - 1u;
    kmin1 = k1 < kmin1 ? k1 : kmin1;
    kmax = k > kmax ? k : kmax;
  }
  const uint32_t kmin = kmin1 + 1u;  // 0 if every key is 0
  const int64_t range = kmax != 0 ? int64_t(kmax - kmin) + 1 : 0;  // 0: every key is 0
  if (range > 2 * L + kCountSlack) return false;
  const int64_t nb = range + 1;
  for (int64_t b = 0; b < nb; ++b) bins[b] = 0;
  const uint32_t off = kmin1;  // key k > 0 -> bin k − kmin + 1 (unused when every key is 0)
  for (int64_t c = 0; c < L; ++c) {
    const uint32_t k = key[c];
    bins[k == 0 ? 0 : k - off]++;
  }
  uint32_t sum = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const uint32_t c = bins[b];
    bins[b] = sum;
    sum += c;
  }
  for (int64_t c = 0; c < L; ++c) {
    const uint32_t k = key[c];
    rank[c] = bins[k == 0 ? 0 : k - off]++;
  }
  return true;
}

// Ascending ranks by a stable LSD radix sort of (key << 32 | index), 8-bit digits.
FM_ALWAYS_INLINE void radix_ranks(const uint32_t* key, int64_t L, int key_bits, uint64_t* s0, uint64_t* s1,
                                  uint32_t* rank) {
  for (int64_t c = 0; c < L; ++c) s0[c] = (uint64_t(key[c]) << 32) | uint64_t(c);
  radix_by_key(&s0, &s1, L, key_bits);
  for (int64_t pos = 0; pos < L; ++pos) rank[uint32_t(s0[pos])] = uint32_t(pos);
}

// ORs `word` into mask[w] (another thread may own the other bits of a word at a row boundary).
FM_ALWAYS_INLINE void or_word(uint64_t* mask, int64_t w, uint64_t word) {
  if (word == 0) return;
#if defined(_OPENMP)
#pragma omp atomic
#endif
  mask[w] |= word;
}

// One row of one model: mask bits into `mask`, norms into sums.
template <int W>
FM_ALWAYS_INLINE void della_row_w(const DellaArgs& a, const DellaModel& m, int i, const float* ptab, int64_t row,
                                  const RowBufs& rb, uint64_t* mask, double* sums) {
  const GtaArgs& g = a.g;
  const int64_t L = a.row_len, inner = a.inner;
  const int64_t o = row / inner, qq = row % inner;
  const int64_t start = o * L * inner + qq;  // flat index of element 0; element c at start + c·inner
  float* d = rb.d;
  if (inner == 1) {
    for (int64_t c0 = 0; c0 < L; c0 += kBlock) {
      const int64_t len = L - c0 < kBlock ? L - c0 : kBlock;
      load_block(d + c0, g.inputs[i], g.input_dtypes[i], start + c0, len);
    }
    for (int64_t c = 0; c < L; ++c) d[c] = fm_sub(d[c], rb.b[c]);
  } else {
    for (int64_t c = 0; c < L; ++c) d[c] = fm_sub(load_f32(g.inputs[i], g.input_dtypes[i], start + c * inner), rb.b[c]);
  }
  uint32_t* key = rb.key;
  uint32_t* rank = rb.rank;
  if (m.key_dtype == BF16) {
    for (int64_t c = 0; c < L; ++c) key[c] = f32_to_bf16(bits_f32(abs_bits(d[c])));
  } else if (m.key_dtype == F16) {
    for (int64_t c = 0; c < L; ++c) key[c] = f32_to_f16(bits_f32(abs_bits(d[c])));
  } else {
    for (int64_t c = 0; c < L; ++c) key[c] = abs_bits(d[c]);
  }
  if (m.key_dtype == F32 || !counting_ranks(key, L, rb.bins, rank)) {
    radix_ranks(key, L, m.key_dtype == F32 ? 32 : 16, rb.s0, rb.s1, rank);
  }
  // keep = u < p(rank), u of every element in element order
  float* u = rb.u;
  int32_t* km = rb.km;
  const uint64_t last = uint64_t(start + (L - 1) * inner);
  if (inner == 1 && (uint64_t(start) >> 32) == (last >> 32)) {
    const uint32_t hw = rng::hi_word(m.st, uint64_t(start));
    const uint32_t lo0 = uint32_t(start);
    for (int64_t c = 0; c < L; ++c) u[c] = rng::uniform(rng::hash_lo(m.st, lo0 + uint32_t(c), hw));
  } else {
    for (int64_t c = 0; c < L; ++c) u[c] = rng::uniform(rng::hash(m.st, uint64_t(start + c * inner)));
  }
  for (int64_t c = 0; c < L; ++c) km[c] = u[c] < ptab[rank[c]];
  gtacpu::abs_sums<W>(d, km, L, &sums[0], &sums[1]);
  // mask bits: whole 64-bit words inside the row are this row's alone (plain stores); the partial words at
  // its ends may be shared with the neighbouring rows (atomic OR)
  if (inner == 1) {
    int64_t c = 0;
    uint64_t word = 0;
    for (; c < L && ((start + c) & 63) != 0; ++c) word |= uint64_t(km[c] != 0) << ((start + c) & 63);
    if (c > 0) or_word(mask, start >> 6, word);
    // 64 flags -> one word: the flags as bytes (vectorised), then 8 bytes -> 8 bits with one multiply
    // (byte k of v, 0 or 1, lands in bit 56 + k of v·0x0102040810204080; no carries since each is 0/1)
    uint8_t* kb = rb.kb;
    for (int64_t j = c; j < L; ++j) kb[j] = uint8_t(km[j] != 0);
    for (; c + 64 <= L; c += 64) {
      uint64_t w = 0;
      for (int g8 = 0; g8 < 8; ++g8) {
        uint64_t v;
        std::memcpy(&v, kb + c + 8 * g8, 8);
        w |= ((v * 0x0102040810204080ull) >> 56) << (8 * g8);
      }
      mask[(start + c) >> 6] = w;
    }
    word = 0;
    const int64_t tail = c;
    for (; c < L; ++c) word |= uint64_t(km[c] != 0) << ((start + c) & 63);
    if (tail < L) or_word(mask, (start + tail) >> 6, word);
  } else {
    for (int64_t c = 0; c < L; ++c) {
      const int64_t f = start + c * inner;
      if (km[c] != 0) or_word(mask, f >> 6, uint64_t(1) << (f & 63));
    }
  }
}

FM_LANE_CLONES(della_row,
               (const DellaArgs& a, const DellaModel& m, int i, const float* ptab, int64_t row, const RowBufs& rb,
                uint64_t* mask, double* sums),
               (a, m, i, ptab, row, rb, mask, sums))

template <int W>
FM_ALWAYS_INLINE void della_merge_block_w(const GtaArgs& g, const gtacpu::ModelScale* ms,
                                          const gtacpu::MaskKeep& mk, int64_t off, int64_t len, float* rows) {
  gtacpu::mask_merge_block<W>(g, ms, mk, off, len, rows);
}

FM_LANE_CLONES(della_merge_block,
               (const GtaArgs& g, const gtacpu::ModelScale* ms, const gtacpu::MaskKeep& mk, int64_t off,
                int64_t len, float* rows),
               (g, ms, mk, off, len, rows))

}  // namespace

void della(const DellaArgs& a, int threads) {
  const GtaArgs& g = a.g;
  const int64_t n = g.n;
  const int T = g.num_inputs;
  if (n <= 0) return;
  const int64_t L = a.row_len;
  const int64_t rows = a.outer * a.inner;
  gtacpu::Scratch& sc = gtacpu::scratch();
  gtacpu::init_models(sc, T);
  gtacpu::grow(tls_models, size_t(T));
  gtacpu::grow(tls_ptab, size_t(T) * size_t(L));
  DellaModel* dm = tls_models.data();
  gtacpu::ModelScale* ms = sc.scales.data();
  const int64_t words = (n + 63) / 64;
  bool any = false;
  for (int i = 0; i < T; ++i) {
    const bool whole = a.densities[i] >= 1.0;  // della_keep returns None: kept whole, never rescaled
    const int xdt = g.input_dtypes[i];
    dm[i] = DellaModel{rng::stream_keys(a.seed, a.key, uint32_t(i)),
                       (xdt == g.base_dtype && (xdt == F16 || xdt == BF16)) ? xdt : int(F32), whole};
    ms[i] = gtacpu::ModelScale{whole, false, 1.0f};
    sc.need[i] = g.rescale && !whole;
    any = any || !whole;
    if (whole) continue;
    // probability by rank (the same for every row): della_probs of methods/della.py
    const float lo = float(a.densities[i] - a.epsilons[i]);
    const float span = float(2.0 * a.epsilons[i]);
    float* pt = tls_ptab.data() + size_t(i) * size_t(L);
    const float den = float(L - 1);
    for (int64_t r = 0; r < L; ++r) {
      const float rank_norm = L > 1 ? fm_div(float(r), den) : 0.5f;
      pt[r] = fm_add(lo, fm_mul(span, rank_norm));
    }
  }

  if (any) {
    gtacpu::grow(sc.mask, size_t(T) * size_t(words));
    uint64_t* mask = sc.mask.data();
    for (int i = 0; i < T; ++i) {
      if (!dm[i].whole) std::memset(mask + size_t(i) * words, 0, size_t(words) * sizeof(uint64_t));
    }
    gtacpu::grow(sc.partials, size_t(rows) * size_t(T) * 2);
    double* partials = sc.partials.data();
    const int nt = std::min(resolve_threads(threads, rows), threads_for_elems(threads, n));
    // per thread: b, d, u (floats), km, key, rank (32-bit), bins (32-bit, 2L + slack + 2), two packed-key
    // arrays (uint64), keep bytes
    const size_t bins = size_t(2 * L + kCountSlack + 2);
    const size_t per_thread =
        size_t(L) * (6 * sizeof(float) + 2 * sizeof(uint64_t) + 1) + bins * sizeof(uint32_t) + 64 + 64;
    gtacpu::grow(sc.rowbuf, per_thread * size_t(nt) + 64);
    unsigned char* rowbuf = sc.rowbuf.data();
    const float* ptab = tls_ptab.data();  // (thread_local: read its address here, not in the team)
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
      unsigned char* p = rowbuf + per_thread * size_t(thread_id());
      p = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(p) + 15) & ~uintptr_t(15));
      RowBufs rb;
      rb.s0 = reinterpret_cast<uint64_t*>(p);
      rb.s1 = rb.s0 + L;
      rb.b = reinterpret_cast<float*>(rb.s1 + L);
      rb.d = rb.b + L;
      rb.u = rb.d + L;
      rb.km = reinterpret_cast<int32_t*>(rb.u + L);
      rb.key = reinterpret_cast<uint32_t*>(rb.km + L);
      rb.rank = rb.key + L;
      rb.bins = rb.rank + L;
      rb.kb = reinterpret_cast<uint8_t*>(rb.bins + bins);
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 8)
#endif
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t o = row / a.inner, qq = row % a.inner;
        const int64_t start = o * L * a.inner + qq;
        if (a.inner == 1) {
          for (int64_t c0 = 0; c0 < L; c0 += kBlock) {
            const int64_t len = L - c0 < kBlock ? L - c0 : kBlock;
            load_block(rb.b + c0, g.base, g.base_dtype, start + c0, len);
          }
        } else {
          for (int64_t c = 0; c < L; ++c) rb.b[c] = load_f32(g.base, g.base_dtype, start + c * a.inner);
        }
        for (int i = 0; i < T; ++i) {
          double* sums = partials + (size_t(row) * size_t(T) + size_t(i)) * 2;
          sums[0] = sums[1] = 0.0;
          if (dm[i].whole) continue;
          della_row(a, dm[i], i, ptab + size_t(i) * size_t(L), row, rb, mask + size_t(i) * words, sums);
        }
      }
    }
    (void)nt;
    if (g.rescale) gtacpu::finish_scales(partials, rows, T, sc.need.data(), ms);
  }

  const gtacpu::MaskKeep mk{sc.mask.data(), words};
  gtacpu::merge_pass(g, threads, sc, [&](int64_t off, int64_t len, float* rws) {
    della_merge_block(g, ms, mk, off, len, rws);
  });
}

}  // namespace cpu
}  // namespace fastmerge
