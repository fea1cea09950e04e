// Radix select of the k-th largest |x − base| on fp32 bit patterns: see select.h for the contract.
#include "select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/rng.h"

namespace fastmerge {
namespace cpu {
namespace {

constexpr int kBins = 1 << 16;  // 16 bits per pass: two passes cover the 32-bit pattern
// Per-thread counts are uint32: one histogram pass handles at most this many elements, and longer
// tensors are processed in slices of this size (summed into the uint64 merged histogram).
constexpr int64_t kSlice = int64_t(1) << 31;
// A histogram pass costs each thread 256 KiB of zeroing plus a 64 Ki-bin merge (~50 us); below this many
// elements per thread an extra thread does not pay for itself.
constexpr int64_t kElemsPerThread = int64_t(1) << 18;

// Sampled selection (kth_largest_abs_diff_multi): one bracket of candidate bit patterns per query.
struct Bracket {
  int model;
  uint32_t lo, hi;  // inclusive bit-pattern range
  double frac;      // fraction of the sample inside
  bool single;      // lo == hi: count the equal elements, store nothing
  bool usable;      // false: its queries go to the radix select
  int64_t above;    // elements with bits > hi (all threads)
  int64_t inside;   // elements inside (all threads)
  bool overflow;    // a thread's candidate buffer filled up
  int64_t start;    // first candidate of thread 0 in Scratch::cand
};

struct ThreadCounts {
  int64_t above;
  int64_t inside;
  int64_t cap;  // candidate slots of this (bracket, thread)
  int64_t off;  // first slot in Scratch::cand
  bool overflow;
};

struct Scratch {
  std::vector<uint32_t> local;   // threads x kBins
  std::vector<uint64_t> merged;  // kBins
  std::vector<int32_t> counts;   // per block (nth_equal_abs_diff_index)
  // kth_largest_abs_diff_multi
  std::vector<uint32_t> cand;    // candidate bit patterns, [bracket][thread] regions
  std::vector<uint32_t> sample;  // sampled |δ| bits of one model (or every |δ| of a small tensor)
  std::vector<float> sample_base;
  std::vector<int64_t> sample_pos;
  std::vector<Bracket> brackets;
  std::vector<ThreadCounts> tcounts;  // brackets x threads
  std::vector<int> query_bracket;     // per query: its bracket
  std::vector<char> query_ok;         // per query: answered from its bracket (else radix select)
  std::vector<int> models;            // distinct queried models with a usable bracket
  std::vector<int64_t> nans;          // models x threads

  size_t bytes() const {
    return local.capacity() * sizeof(uint32_t) + merged.capacity() * sizeof(uint64_t) +
           counts.capacity() * sizeof(int32_t) + cand.capacity() * sizeof(uint32_t) +
           sample.capacity() * sizeof(uint32_t) + sample_base.capacity() * sizeof(float) +
           sample_pos.capacity() * sizeof(int64_t) + brackets.capacity() * sizeof(Bracket) +
           tcounts.capacity() * sizeof(ThreadCounts) + query_bracket.capacity() * sizeof(int) + query_ok.capacity() +
           models.capacity() * sizeof(int) + nans.capacity() * sizeof(int64_t);
  }
};

// One per calling thread, grow-only (see select.h).
thread_local Scratch tls_scratch;

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// A block of base, or zeros without one (x − 0 is x exactly, so |x − 0| is |x|): lets the selection run
// on plain tensors (PEFT's magnitude pruning, peft_ties.cpp).
FM_ALWAYS_INLINE void load_block_or_zero(float* dst, const void* base, int bdt, int64_t off, int64_t len) {
  if (base != nullptr) {
    load_block(dst, base, bdt, off, len);
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j] = 0.0f;
  }
}

// |x − base| bit patterns of one block (|x| without a base).
FM_TARGET_CLONES void absdiff_bits_block(uint32_t* out, const void* x, int xdt, const void* base, int bdt,
                                         int64_t off, int64_t len) {
  alignas(64) float xv[kBlock];
  alignas(64) float bv[kBlock];
  load_block(xv, x, xdt, off, len);
  if (base != nullptr) {
    load_block(bv, base, bdt, off, len);
    for (int64_t j = 0; j < len; ++j) out[j] = abs_bits(fm_sub(xv[j], bv[j]));
  } else {
    for (int64_t j = 0; j < len; ++j) out[j] = abs_bits(xv[j]);
  }
}

struct Src {
  const void* x;
  int xdt;
  const void* base;
  int bdt;
};

// Adds to `merged` the histogram of elements [lo, hi) (hi − lo <= kSlice):
//   filter == false: bin = bits >> 16 over every element, and counts NaNs;
//   filter == true:  bin = bits & 0xffff over the elements whose bits >> 16 == top.
int64_t histogram_slice(const Src& s, int64_t lo, int64_t hi, int nt, bool filter, uint32_t top, Scratch& sc) {
  grow(sc.local, size_t(nt) * kBins);
  uint32_t* local = sc.local.data();
  uint64_t* merged = sc.merged.data();
  const int64_t nb = (hi - lo + kBlock - 1) / kBlock;
  int64_t nans = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1) reduction(+ : nans)
#endif
  {
    uint32_t* h = local + size_t(thread_id()) * kBins;
    std::memset(h, 0, kBins * sizeof(uint32_t));
    alignas(64) uint32_t bits[kBlock];
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t off = lo + blk * kBlock;
      const int64_t len = hi - off < kBlock ? hi - off : kBlock;
      absdiff_bits_block(bits, s.x, s.xdt, s.base, s.bdt, off, len);
      if (!filter) {
        int64_t nn = 0;
        for (int64_t j = 0; j < len; ++j) {
          h[bits[j] >> 16]++;
          nn += bits[j] > 0x7f800000u;
        }
        nans += nn;
      } else {
        for (int64_t j = 0; j < len; ++j) {
          if ((bits[j] >> 16) == top) h[bits[j] & 0xffffu]++;
        }
      }
    }
    // (implicit barrier of the omp for: every local histogram is complete)
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
    for (int b = 0; b < kBins; ++b) {
      uint64_t c = 0;
      for (int t = 0; t < nt; ++t) c += local[size_t(t) * kBins + b];
      merged[b] += c;
    }
  }
  return nans;
}

int64_t histogram(const Src& s, int64_t n, int threads, bool filter, uint32_t top, Scratch& sc) {
  grow(sc.merged, kBins);
  std::memset(sc.merged.data(), 0, kBins * sizeof(uint64_t));
  int64_t nans = 0;
  for (int64_t lo = 0; lo < n; lo += kSlice) {
    const int64_t hi = n - lo < kSlice ? n : lo + kSlice;
    const int nt = resolve_threads(threads, (hi - lo + kElemsPerThread - 1) / kElemsPerThread);
    nans += histogram_slice(s, lo, hi, nt, filter, top, sc);
  }
  return nans;
}

// Scans `merged` from the top bin down for the bin holding the k-th largest; returns the bin and the
// number of elements in higher bins.
void find_bin(const uint64_t* merged, int64_t k, uint32_t* bin, int64_t* above) {
  int64_t cum = 0;
  for (int b = kBins - 1; b >= 0; --b) {
    const int64_t c = int64_t(merged[b]);
    if (cum + c >= k) {
      *bin = uint32_t(b);
      *above = cum;
      return;
    }
    cum += c;
  }
  // Unreachable for 1 <= k <= n (the bins sum to n); the caller checked k.
  *bin = 0;
  *above = cum;
}

}  // namespace

KthAbs kth_largest_abs_diff(const void* x, int x_dtype, const void* base, int base_dtype, int64_t n, int64_t k,
                            int threads) {
  Scratch& sc = tls_scratch;
  const Src s{x, x_dtype, base, base_dtype};
  KthAbs r{};
  r.count_nan = histogram(s, n, threads, /*filter=*/false, 0, sc);
  uint32_t top = 0;
  int64_t above_top = 0;
  find_bin(sc.merged.data(), k, &top, &above_top);

  histogram(s, n, threads, /*filter=*/true, top, sc);
  uint32_t low = 0;
  int64_t above_low = 0;
  find_bin(sc.merged.data(), k - above_top, &low, &above_low);

  r.bits = (top << 16) | low;
  r.count_above = above_top + above_low;
  r.count_equal = int64_t(sc.merged[low]);
  return r;
}

int64_t nth_equal_abs_diff_index(const void* x, int x_dtype, const void* base, int base_dtype, int64_t n,
                                 float th, int64_t rank, int threads) {
  Scratch& sc = tls_scratch;
  const int64_t nb = num_blocks(n);
  grow(sc.counts, size_t(nb));
  int32_t* counts = sc.counts.data();
  const int nt = threads_for_elems(threads, n);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
  for (int64_t blk = 0; blk < nb; ++blk) {
    alignas(64) uint32_t bits[kBlock];
    const int64_t off = blk * kBlock;
    const int64_t len = n - off < kBlock ? n - off : kBlock;
    absdiff_bits_block(bits, x, x_dtype, base, base_dtype, off, len);
    int32_t c = 0;
    for (int64_t j = 0; j < len; ++j) c += bits_f32(bits[j]) == th;
    counts[blk] = c;
  }
  (void)nt;
  // Serial prefix sum over blocks (n / 1024 integers), then a scan of the one block holding the answer.
  int64_t cum = 0;
  for (int64_t blk = 0; blk < nb; ++blk) {
    if (cum + counts[blk] >= rank) {
      alignas(64) uint32_t bits[kBlock];
      const int64_t off = blk * kBlock;
      const int64_t len = n - off < kBlock ? n - off : kBlock;
      absdiff_bits_block(bits, x, x_dtype, base, base_dtype, off, len);
      for (int64_t j = 0; j < len; ++j) {
        cum += bits_f32(bits[j]) == th;
        if (cum == rank) return off + j;
      }
      return n;  // unreachable: the block's count said the rank-th tie is in it
    }
    cum += counts[blk];
  }
  return n;
}

// ---------------------------------------------------------------------------------------------------------
// kth_largest_abs_diff_multi

namespace {

// Sample size: the bracket half-width is ~4.5 binomial sd = 4.5·sqrt(q(1−q)/m) of the elements, 1.2% at
// q = 1/2 for m = 32768 (2.4% of the tensor are candidates). A larger sample narrows it as 1/sqrt(m) but
// costs m scattered reads per model (a cache line each): 32768 keeps the sample to ~1-2 ms per tensor.
constexpr int64_t kSample = 32768;
// At most this many elements: no sample, nth_element over every |δ| (a 256 KiB scratch).
constexpr int64_t kDirectMax = int64_t(1) << 16;
// A bracket expected to hold more than this fraction (heavily tied data) is not collected: radix select.
constexpr double kMaxCandFrac = 0.125;

thread_local int64_t tls_fallbacks = 0;

// rth_largest: a counting select. std::nth_element over the candidates was a quarter of a selection's
// time on the benchmark family (2816x1024, T=3: rth_largest 24% of samples, and the second OpenMP thread
// spinning meanwhile), whose bf16 deltas take few distinct values (21397 of 2.9M; 53320 equal to the
// threshold), a bad case for a partitioning select. Counting: histogram the values relative to the
// minimum in 2^11 bins, keep the bin that holds the r-th largest, repeat on its elements; each round
// divides the value range by 2^11 (three at most for 32 bits), and a round whose range fits the bins
// answers exactly. Runs of equal values go to four interleaved sub-histograms so that consecutive
// increments of one counter do not wait on each other's stores.
constexpr int kCountBits = 11;
constexpr int kCountBins = 1 << kCountBits;
// At most this many values: rth_largest_small (cheaper than zeroing 32 KiB of counters).
constexpr int64_t kNthMax = 2048;
// At most this many values: std::nth_element (a few hundred ns).
constexpr int64_t kSortMax = 64;
thread_local std::vector<uint32_t> tls_bin;  // the kept bin's values (grow-only, per OpenMP thread)

// rth_largest for kSortMax < m <= kNthMax: the same counting select with 2^8 bins in two interleaved
// sub-histograms (2 KiB to zero per round, four rounds at most for 32 bits). Why: a MoE expert matrix
// of 2,048 elements selects twice per TIES merge; std::nth_element took 28.6 us per selection of its
// |bf16 deltas| and this 8.2 us (standalone, best of 30 on the 2-core machine). v is left unchanged.
constexpr int kSmallBits = 8;
uint32_t rth_largest_small(const uint32_t* v, int64_t m, int64_t r) {
  grow(tls_bin, size_t(m) + 1);  // +1: the branchless compaction stores before deciding (as below)
  uint32_t* dst = tls_bin.data();
  const uint32_t* src = v;
  for (;;) {
    uint32_t lo = 0xffffffffu, hi = 0;
    for (int64_t j = 0; j < m; ++j) {
      lo = src[j] < lo ? src[j] : lo;
      hi = src[j] > hi ? src[j] : hi;
    }
    if (lo == hi) return lo;
    const int width = 32 - __builtin_clz(hi - lo);
    const int shift = width > kSmallBits ? width - kSmallBits : 0;
    alignas(64) uint32_t h[2][1 << kSmallBits];
    std::memset(h, 0, sizeof h);
    int64_t j = 0;
    for (; j + 2 <= m; j += 2) {
      ++h[0][(src[j] - lo) >> shift];
      ++h[1][(src[j + 1] - lo) >> shift];
    }
    for (; j < m; ++j) ++h[0][(src[j] - lo) >> shift];
    int64_t above = 0;
    uint32_t bin = (hi - lo) >> shift;
    for (;; --bin) {
      const int64_t c = int64_t(h[0][bin]) + h[1][bin];
      if (above + c >= r) break;
      above += c;
    }
    if (shift == 0) return lo + bin;
    // later rounds compact tls_bin in place (c <= j: a value is read before its slot is overwritten)
    int64_t c = 0;
    for (j = 0; j < m; ++j) {
      const uint32_t x = src[j];
      dst[c] = x;
      c += ((x - lo) >> shift) == bin;
    }
    src = dst;
    m = c;
    r -= above;
  }
}

// The r-th largest (1-based) of v[0, m); may reorder v, never changes its multiset.
uint32_t rth_largest(uint32_t* v, int64_t m, int64_t r) {
  if (m <= kSortMax || m > int64_t(0xffffffffu)) {
    std::nth_element(v, v + (m - r), v + m);
    return v[m - r];
  }
  if (m <= kNthMax) return rth_largest_small(v, m, r);
  const uint32_t* src = v;
  for (;;) {
    uint32_t lo = 0xffffffffu, hi = 0;
    for (int64_t j = 0; j < m; ++j) {
      lo = src[j] < lo ? src[j] : lo;
      hi = src[j] > hi ? src[j] : hi;
    }
    if (lo == hi) return lo;
    const int width = 32 - __builtin_clz(hi - lo);
    const int shift = width > kCountBits ? width - kCountBits : 0;
    alignas(64) uint32_t h[4][kCountBins];
    std::memset(h, 0, sizeof h);
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      ++h[0][(src[j] - lo) >> shift];
      ++h[1][(src[j + 1] - lo) >> shift];
      ++h[2][(src[j + 2] - lo) >> shift];
      ++h[3][(src[j + 3] - lo) >> shift];
    }
    for (; j < m; ++j) ++h[0][(src[j] - lo) >> shift];
    int64_t above = 0;
    uint32_t bin = (hi - lo) >> shift;
    for (;; --bin) {
      const int64_t c = int64_t(h[0][bin]) + h[1][bin] + h[2][bin] + h[3][bin];
      if (above + c >= r) break;
      above += c;
    }
    if (shift == 0) return lo + bin;
    const int64_t cnt = int64_t(h[0][bin]) + h[1][bin] + h[2][bin] + h[3][bin];
    // +1: the branchless compaction stores every value at dst[c] before deciding to keep it. Later rounds
    // compact tls_bin in place (c <= j: a value is read before its slot is overwritten).
    if (src == v) grow(tls_bin, size_t(cnt) + 1);
    uint32_t* dst = tls_bin.data();
    int64_t c = 0;
    for (j = 0; j < m; ++j) {
      const uint32_t x = src[j];
      dst[c] = x;
      c += ((x - lo) >> shift) == bin;
    }
    src = dst;
    m = cnt;
    r -= above;
    if (m <= kNthMax) {
      std::nth_element(dst, dst + (m - r), dst + m);
      return dst[m - r];
    }
  }
}

KthAbs result_from(const uint32_t* v, int64_t m, uint32_t th, int64_t above_base, int64_t nans) {
  int64_t greater = 0, equal = 0;
  for (int64_t j = 0; j < m; ++j) {
    greater += v[j] > th;
    equal += v[j] == th;
  }
  KthAbs r{};
  r.bits = th;
  r.count_above = above_base + greater;
  r.count_equal = equal;
  r.count_nan = nans;
  return r;
}

// |x − b| bits of one block fused with the counts of one bracket: NaNs, elements above hi, and the
// in-bracket flags (unsigned wrap-around turns lo <= bits <= hi into one compare). One loop per input
// dtype so that the conversion, the subtraction and the three tests vectorise together.
template <int DT, bool FLAGS>
FM_ALWAYS_INLINE void fused_bits(uint32_t* bits, uint8_t* flag, const float* bv, const void* x, int64_t off, int len,
                                 uint32_t lo, uint32_t hi, int32_t* nans, int32_t* above) {
  const uint32_t range = hi - lo;
  int32_t nn = 0, ab = 0;
  for (int j = 0; j < len; ++j) {
    float xv;
    if (DT == BF16) {
      xv = bf16_to_f32(static_cast<const uint16_t*>(x)[off + j]);
    } else if (DT == F16) {
      xv = f16_to_f32(static_cast<const uint16_t*>(x)[off + j]);
    } else {
      xv = static_cast<const float*>(x)[off + j];
    }
    const uint32_t b = abs_bits(fm_sub(xv, bv[j]));
    bits[j] = b;
    nn += b > 0x7f800000u;
    ab += b > hi;
    if (FLAGS) flag[j] = uint8_t((b - lo) <= range);
  }
  *nans = nn;
  *above = ab;
}

// Copies the flagged bit patterns to dst[c..], at most up to cap (then sets *overflow); returns the new c.
// The flags are visited 8 at a time as one 64-bit word: with ~3% of elements inside, 4 words in 5 are zero
// and cost one test, the others one step per set byte. (A branchless "store every element, advance by the
// flag" compaction carries a store-address dependency from element to element: ~2.5 cycles per element,
// measured, 60 ms of a 4096x4096, T=3 selection on one core.)
FM_ALWAYS_INLINE int64_t copy_flagged(uint32_t* dst, int64_t c, int64_t cap, const uint32_t* bits, uint8_t* flag,
                                      int len, bool* overflow) {
  for (int j = len; j < ((len + 7) & ~7); ++j) flag[j] = 0;
  for (int j = 0; j < len; j += 8) {
    uint64_t w;
    std::memcpy(&w, flag + j, 8);
    while (w != 0) {
      const int byte = __builtin_ctzll(w) >> 3;
      if (c < cap) {
        dst[c] = bits[j + byte];
      } else {
        *overflow = true;
      }
      ++c;
      w &= w - 1;
    }
  }
  return c < cap ? c : cap;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FM_HAS_AVX512_COPY 1
// AVX-512 copy of the in-bracket bit patterns: a compare into a 16-bit mask and a compress per 16 elements,
// no branch per candidate. The compress goes to a register and is stored whole (VPCOMPRESSD with a memory
// operand is microcoded on AMD Zen 4, ~100x slower), so dst needs 16 free slots past the last candidate:
// the caller checks cap − c >= len + 16.
__attribute__((target("avx512f"))) int64_t copy_inside_avx512(uint32_t* dst, int64_t c, const uint32_t* bits, int len,
                                                              uint32_t lo, uint32_t range) {
  const __m512i vlo = _mm512_set1_epi32(int(lo));
  const __m512i vr = _mm512_set1_epi32(int(range));
  int j = 0;
  for (; j + 16 <= len; j += 16) {
    const __m512i b = _mm512_loadu_si512(bits + j);
    const __mmask16 k = _mm512_cmple_epu32_mask(_mm512_sub_epi32(b, vlo), vr);
    _mm512_storeu_si512(dst + c, _mm512_maskz_compress_epi32(k, b));
    c += __builtin_popcount(unsigned(k));
  }
  for (; j < len; ++j) {
    dst[c] = bits[j];
    c += (bits[j] - lo) <= range;
  }
  return c;
}

bool cpu_has_avx512f() {
  static const bool has = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512f"));
  }();
  return has;
}
#else
#define FM_HAS_AVX512_COPY 0
#endif

// Pass over the blocks [b0, b1) of one thread: counts and candidates of every usable bracket. Base is
// converted once per block for all models; per-block counts are int32 (1024 elements), which keeps the
// counting loops 16 lanes wide.
FM_TARGET_CLONES void multi_pass_range(const void* const* xs, const int* x_dtypes, const void* base, int bdt,
                                       int64_t n, int64_t b0, int64_t b1, Scratch& sc, int t, int nt) {
  alignas(64) float bv[kBlock];
  alignas(64) float xv[kBlock];  // an FP8 model's block, dequantised (fused_bits then reads it as fp32)
  alignas(64) uint32_t bits[kBlock];
  alignas(64) uint8_t flag[kBlock + 8];
  const int nbr = int(sc.brackets.size());
  const int nm = int(sc.models.size());
  uint32_t* cand = sc.cand.data();
#if FM_HAS_AVX512_COPY
  const bool avx512 = cpu_has_avx512f();
#else
  const bool avx512 = false;
#endif
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t off = blk * kBlock;
    const int len = int(n - off < kBlock ? n - off : kBlock);
    load_block_or_zero(bv, base, bdt, off, len);
    for (int mi = 0; mi < nm; ++mi) {
      const int m = sc.models[mi];
      // The model's first usable bracket is fused into the conversion loop; further ones (breadcrumbs'
      // second rank) re-read the bits from L1.
      bool first = true;
      for (int bi = 0; bi < nbr; ++bi) {
        const Bracket& br = sc.brackets[bi];
        if (br.model != m || !br.usable) continue;
        ThreadCounts& tc = sc.tcounts[size_t(bi) * nt + t];
        const uint32_t hi = br.hi;
        const uint32_t lo = br.lo;
        // the AVX-512 copy needs no flags (it compares again in registers)
        const bool fast = avx512 && !br.single && tc.cap - tc.inside >= len + 16;
        int32_t ab = 0;
        if (first) {
          int32_t nn = 0;
          int dt = x_dtypes[m];
          const void* x = xs[m];
          int64_t xoff = off;
          if (dt == FP8) {
            load_block(xv, x, dt, off, len);
            dt = F32;
            x = xv;
            xoff = 0;
          }
          if (fast) {
            if (dt == BF16) {
              fused_bits<BF16, false>(bits, flag, bv, x, xoff, len, lo, hi, &nn, &ab);
            } else if (dt == F16) {
              fused_bits<F16, false>(bits, flag, bv, x, xoff, len, lo, hi, &nn, &ab);
            } else {
              fused_bits<F32, false>(bits, flag, bv, x, xoff, len, lo, hi, &nn, &ab);
            }
          } else {
            if (dt == BF16) {
              fused_bits<BF16, true>(bits, flag, bv, x, xoff, len, lo, hi, &nn, &ab);
            } else if (dt == F16) {
              fused_bits<F16, true>(bits, flag, bv, x, xoff, len, lo, hi, &nn, &ab);
            } else {
              fused_bits<F32, true>(bits, flag, bv, x, xoff, len, lo, hi, &nn, &ab);
            }
          }
          sc.nans[size_t(mi) * nt + t] += nn;
          first = false;
        } else {
          const uint32_t range = hi - lo;
          for (int j = 0; j < len; ++j) {
            ab += bits[j] > hi;
            flag[j] = uint8_t((bits[j] - lo) <= range);
          }
        }
        tc.above += ab;
        if (br.single) {  // lo == hi: the flags mark the equal elements
          int32_t eq = 0;
          for (int j = 0; j < len; ++j) eq += flag[j];
          tc.inside += eq;
        } else if (fast) {
#if FM_HAS_AVX512_COPY
          tc.inside = copy_inside_avx512(cand + tc.off, tc.inside, bits, len, lo, hi - lo);
#endif
        } else {
          tc.inside = copy_flagged(cand + tc.off, tc.inside, tc.cap, bits, flag, len, &tc.overflow);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Small tensors (n <= kDirectMax): every |δ| of a model in scratch, then per query a radix round on the float
// bit pattern and a counting select among the elements of one bin.
//
// Why: a MoE checkpoint merges tens of thousands of ~2k-element tensors one by one (ties_segments). The
// previous path (a NaN pass, then rth_largest_small's min/max-relative linear bins, which put most |δ| of
// a spread of exponents into the lowest bin, up to four rounds with a full compaction each, then a count
// pass) cost ~7 ns per element for 2 models against ~1 ns for the sampled selection of a large tensor.

// Bin of the first round: bits >> 20 is the exponent and the top 3 mantissa bits of a non-negative float
// (bit patterns order like the values), at most 2048 bins (NaN/inf in the top 8); the elements of one bin
// span at most 2^20 consecutive patterns, which the linear counting select of rth_largest splits well.
constexpr int kTopShift = 20;
constexpr int kTopBins = 1 << (32 - 1 - kTopShift);
// At most this many elements: no first round, tiny_select (n² compares cost less than the bins would).
constexpr int64_t kTopMin = 64;
// At least this many elements: the first round's bin is guessed from a quarter of them (checked exactly).
constexpr int64_t kGuessMin = 512;
// At most max(kTopMin, n / kBinsPer) bins in the first round (the shift grows until they fit): zeroing and
// scanning ~980 bins for 300 |bf16 δ| cost more than the histogram; 300-element segments took ~10% less time.
constexpr int64_t kBinsPer = 4;

// |x − base| bits of every element into v (base already in fp32), with their minimum, maximum and the
// number of NaNs, in one vectorised loop per block.
FM_TARGET_CLONES void small_abs_bits(uint32_t* v, const float* bf, const void* x, int xdt, int64_t n, uint32_t* lo,
                                     uint32_t* hi, int64_t* nans) {
  alignas(64) float xv[kBlock];
  uint32_t mn = 0xffffffffu, mx = 0;
  int64_t nn = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int len = int(n - off < kBlock ? n - off : kBlock);
    load_block(xv, x, xdt, off, len);
    uint32_t* o = v + off;
    const float* b = bf + off;
    int32_t c = 0;
    for (int j = 0; j < len; ++j) {
      const uint32_t u = abs_bits(fm_sub(xv[j], b[j]));
      o[j] = u;
      mn = u < mn ? u : mn;
      mx = u > mx ? u : mx;
      c += u > 0x7f800000u;
    }
    nn += c;
  }
  *lo = mn;
  *hi = mx;
  *nans = nn;
}

// Of the elements of v[0, n): how many lie in bins above `bin`, how many in it, and their extremes there.
FM_TARGET_CLONES void bin_stats(const uint32_t* v, int64_t n, int shift, uint32_t bin, int64_t* above,
                                int64_t* count, uint32_t* lo, uint32_t* hi) {
  uint32_t mn = 0xffffffffu, mx = 0;
  int64_t ab = 0, in = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int len = int(n - off < kBlock ? n - off : kBlock);
    const uint32_t* s = v + off;
    int32_t ac = 0, ic = 0;
    for (int j = 0; j < len; ++j) {
      // masks rather than selects: GCC 12 turned the selects into branches (not vectorised, 4x slower)
      const uint32_t u = s[j];
      const uint32_t key = u >> shift;
      const uint32_t m = 0u - uint32_t(key == bin);
      ac += key > bin;
      ic += key == bin;
      const uint32_t a = u | ~m;
      const uint32_t b = u & m;
      mn = a < mn ? a : mn;
      mx = b > mx ? b : mx;
    }
    ab += ac;
    in += ic;
  }
  *above = ab;
  *count = in;
  *lo = mn;
  *hi = mx;
}

// The first-round bin (relative to b0, nb bins) of the kk-th largest of v[0], v[step], v[2·step], ... < n.
// Counts in uint16: four interleaved histograms, each counting at most n / 4 <= 16384 elements. Why four:
// tied data sends runs of elements to one counter, and each increment waits on the previous one's store
// (with two, the histogram of 2,048 bf16 |δ| took ~3 cycles per element).
int top_bin(const uint32_t* v, int64_t n, int64_t step, int64_t kk, int shift, uint32_t b0, int nb) {
  alignas(64) uint16_t h[4][kTopBins];
  for (int t = 0; t < 4; ++t) std::memset(h[t], 0, size_t(nb) * sizeof(uint16_t));
  int64_t j = 0;
  for (; j + 3 * step < n; j += 4 * step) {
    ++h[0][(v[j] >> shift) - b0];
    ++h[1][(v[j + step] >> shift) - b0];
    ++h[2][(v[j + 2 * step] >> shift) - b0];
    ++h[3][(v[j + 3 * step] >> shift) - b0];
  }
  for (; j < n; j += step) ++h[0][(v[j] >> shift) - b0];
  const int64_t m = (n + step - 1) / step;
  // scanned from the nearer end
  int bin;
  if (kk <= m / 2) {
    int64_t above = 0;
    for (bin = nb - 1; bin > 0; --bin) {
      const int64_t c = int64_t(h[0][bin]) + h[1][bin] + h[2][bin] + h[3][bin];
      if (above + c >= kk) break;
      above += c;
    }
  } else {
    int64_t below = 0;
    const int64_t want = m - kk + 1;  // the kk-th largest is the want-th smallest
    for (bin = 0; bin < nb - 1; ++bin) {
      const int64_t c = int64_t(h[0][bin]) + h[1][bin] + h[2][bin] + h[3][bin];
      if (below + c >= want) break;
      below += c;
    }
  }
  return bin;
}

// Elements of v[0, n) equal to a and to b.
FM_TARGET_CLONES void count_two(const uint32_t* v, int64_t n, uint32_t a, uint32_t b, int64_t* ca, int64_t* cb) {
  int64_t x = 0, y = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int len = int(n - off < kBlock ? n - off : kBlock);
    int32_t xc = 0, yc = 0;
    for (int j = 0; j < len; ++j) {
      xc += v[off + j] == a;
      yc += v[off + j] == b;
    }
    x += xc;
    y += yc;
  }
  *ca = x;
  *cb = y;
}

// The elements of v[0, n) with lo < bits < hi, in index order, to dst (n + 8 slots); returns their number.
// Flags are computed vectorised and visited 8 at a time (a word of zeros costs one test).
FM_TARGET_CLONES int64_t copy_between(uint32_t* dst, const uint32_t* v, int64_t n, uint32_t lo, uint32_t hi) {
  alignas(64) uint8_t flag[kBlock + 8];
  const uint32_t base = lo + 1, range = hi - lo - 2;  // lo < u < hi  <=>  u − (lo + 1) <= hi − lo − 2
  int64_t c = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int len = int(n - off < kBlock ? n - off : kBlock);
    const uint32_t* s = v + off;
    for (int j = 0; j < len; ++j) flag[j] = uint8_t(s[j] - base <= range);
    for (int j = len; j < ((len + 7) & ~7); ++j) flag[j] = 0;
    for (int j = 0; j < len; j += 8) {
      uint64_t w;
      std::memcpy(&w, flag + j, 8);
      while (w != 0) {
        dst[c++] = s[j + (__builtin_ctzll(w) >> 3)];
        w &= w - 1;
      }
    }
  }
  return c;
}

// Elements of v[0, m) above th and equal to th.
FM_TARGET_CLONES void count_vs(const uint32_t* v, int64_t m, uint32_t th, int64_t* greater, int64_t* equal) {
  int64_t g = 0, e = 0;
  for (int64_t off = 0; off < m; off += kBlock) {
    const int len = int(m - off < kBlock ? m - off : kBlock);
    int32_t gc = 0, ec = 0;
    for (int j = 0; j < len; ++j) {
      gc += v[off + j] > th;
      ec += v[off + j] == th;
    }
    g += gc;
    e += ec;
  }
  *greater = g;
  *equal = e;
}

// The k-th largest of v[0, n) (n <= kTopMin) with its counts, by counting for each value how many are
// larger and how many are not smaller: n² compares in vector lanes and no branch per element. Why: on 64
// |bf16 δ| (heavily tied) std::nth_element was half of a TIES merge of the tensor.
FM_TARGET_CLONES void tiny_select(const uint32_t* v, int64_t n, int64_t k, uint32_t* th, int64_t* greater,
                                  int64_t* equal) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t x = v[i];
    int32_t gt = 0, ge = 0;
    for (int64_t j = 0; j < n; ++j) {
      gt += v[j] > x;
      ge += v[j] >= x;
    }
    if (gt < k && k <= ge) {
      *th = x;
      *greater = gt;
      *equal = ge - gt;
      return;
    }
  }
  *th = 0;  // unreachable for 1 <= k <= n: some value holds rank k
  *greater = 0;
  *equal = 0;
}

// Index of the rank-th element (1-based, index order) of v[0, n) equal to th; n if there are fewer.
FM_TARGET_CLONES int64_t nth_equal_bits(const uint32_t* v, int64_t n, uint32_t th, int64_t rank) {
  constexpr int kStep = 256;
  int64_t j = 0, cum = 0;
  for (; j + kStep <= n; j += kStep) {
    int32_t c = 0;
    for (int i = 0; i < kStep; ++i) c += v[j + i] == th;
    if (cum + c >= rank) break;
    cum += c;
  }
  for (; j < n; ++j) {
    cum += v[j] == th;
    if (cum == rank) return j;
  }
  return n;
}

// One query on the bits v[0, n) of its model (lo, hi: their extremes). v is left unchanged (index order:
// the exact-k cut scans it).
KthAbs small_query(const uint32_t* v, int64_t n, int64_t k, uint32_t lo, uint32_t hi, int64_t nans, Scratch& sc) {
  KthAbs r{};
  r.count_nan = nans;
  if (lo == hi) {
    r.bits = lo;
    r.count_equal = n;
    return r;
  }
  if (n <= kTopMin) {
    tiny_select(v, n, k, &r.bits, &r.count_above, &r.count_equal);
    return r;
  }
  grow(sc.cand, size_t(n) + 8);
  uint32_t* cand = sc.cand.data();
  int64_t m = n, above = 0;
  // Coarser bins where the range would hold more bins than a quarter of the elements (zeroing and scanning
  // them would cost more than the increments: 300 |bf16 δ| with zeros among them span ~980 bins at 20).
  int shift = kTopShift;
  while (int64_t((hi >> shift) - (lo >> shift)) + 1 > std::max<int64_t>(kTopMin, n / kBinsPer)) ++shift;
  const uint32_t b0 = lo >> shift, b1 = hi >> shift;
  if (b0 != b1) {
    // The bin of the k-th largest: first guessed from every 4th element (a quarter of the histogram's
    // increments, ~2 cycles each) and checked by the exact counts of one vectorised pass; the full histogram
    // where the guess misses (the k-th largest close to a bin edge).
    const int nb = int(b1 - b0) + 1;
    int64_t c = 0;
    uint32_t mn = 0, mx = 0;
    bool found = false;
    if (n >= kGuessMin) {
      const int64_t ms = (n + 3) / 4;
      const int64_t ks = std::max<int64_t>(1, std::min<int64_t>(ms, (k * ms + n / 2) / n));
      bin_stats(v, n, shift, b0 + uint32_t(top_bin(v, n, 4, ks, shift, b0, nb)), &above, &c, &mn, &mx);
      found = above < k && k <= above + c;
    }
    if (!found) bin_stats(v, n, shift, b0 + uint32_t(top_bin(v, n, 1, k, shift, b0, nb)), &above, &c, &mn, &mx);
    // Within the bin: its extremes, and how many equal each. Heavily tied data (bf16 deltas: the 2,048
    // |δ| of a MoE expert take ~120 values, 461 equal the median) mostly ends here; else the k-th largest
    // is strictly between them, and only those elements are copied.
    const int64_t rr = k - above;  // rank inside the bin, from the top
    if (mn == mx) {
      r.bits = mn;
      r.count_above = above;
      r.count_equal = c;
      return r;
    }
    int64_t eq_mx, eq_mn;
    count_two(v, n, mx, mn, &eq_mx, &eq_mn);
    if (rr <= eq_mx) {
      r.bits = mx;
      r.count_above = above;
      r.count_equal = eq_mx;
      return r;
    }
    if (rr > c - eq_mn) {
      r.bits = mn;
      r.count_above = above + c - eq_mn;
      r.count_equal = eq_mn;
      return r;
    }
    above += eq_mx;
    m = copy_between(cand, v, n, mn, mx);
  } else {
    std::memcpy(cand, v, size_t(n) * sizeof(uint32_t));
  }
  int64_t greater = 0;
  if (m <= kTopMin) {
    tiny_select(cand, m, k - above, &r.bits, &greater, &r.count_equal);
  } else {
    r.bits = rth_largest(cand, m, k - above);
    count_vs(cand, m, r.bits, &greater, &r.count_equal);
  }
  r.count_above = above + greater;
  return r;
}

void small_select(const void* const* xs, const int* x_dtypes, const void* base, int base_dtype, int64_t n,
                  KthQuery* queries, int num_queries, Scratch& sc) {
  grow(sc.sample, size_t(n));
  grow(sc.sample_base, size_t(n));
  uint32_t* v = sc.sample.data();
  float* bf = sc.sample_base.data();
  for (int64_t off = 0; off < n; off += kBlock) load_block_or_zero(bf + off, base, base_dtype, off, std::min(kBlock, n - off));
  int cur = -1;
  uint32_t lo = 0, hi = 0;
  int64_t nans = 0;
  for (int q = 0; q < num_queries; ++q) {
    KthQuery& qq = queries[q];
    if (qq.model != cur) {
      small_abs_bits(v, bf, xs[qq.model], x_dtypes[qq.model], n, &lo, &hi, &nans);
      cur = qq.model;
    }
    qq.result = small_query(v, n, qq.k, lo, hi, nans, sc);
    qq.cut = -1;
    if (qq.want_cut) {
      const KthAbs& r = qq.result;
      const int64_t room = qq.k - (r.count_above - r.count_nan);
      if ((r.bits & 0x7fffffffu) <= 0x7f800000u && r.count_equal > room) qq.cut = nth_equal_bits(v, n, r.bits, room);
    }
  }
}

}  // namespace

void kth_largest_abs_diff_multi(const void* const* xs, const int* x_dtypes, const void* base, int base_dtype,
                                int64_t n, KthQuery* queries, int num_queries, int threads) {
  Scratch& sc = tls_scratch;
  tls_fallbacks = 0;
  if (num_queries <= 0 || n <= 0) return;

  if (n <= kDirectMax) {
    small_select(xs, x_dtypes, base, base_dtype, n, queries, num_queries, sc);
    return;
  }

  // 1. Sample: stratified positions (one per stride, at a hashed offset inside it), the same every call.
  // Below 2^23 elements half the sample: its scattered reads touch a cache line every 2-64 elements there
  // (about as much as a pass), and a 1024x1024 selection of 3 models took 10% less time (measured).
  const int64_t m = n >= (int64_t(1) << 23) ? kSample : kSample / 2;
  const int64_t stride = n / m;  // >= 4 since n > kDirectMax = 4 · (kSample / 2)
  grow(sc.sample_pos, size_t(m));
  grow(sc.sample_base, size_t(m));
  grow(sc.sample, size_t(m));
  for (int64_t j = 0; j < m; ++j) {
    const uint32_t h = rng::mix32(uint32_t(j) * 0x9E3779B9u + 0x6A09E667u);
    const int64_t p = j * stride + int64_t(h % uint64_t(stride));
    sc.sample_pos[j] = p;
    sc.sample_base[j] = base != nullptr ? load_f32(base, base_dtype, p) : 0.0f;
  }
  sc.brackets.clear();
  sc.query_bracket.assign(size_t(num_queries), -1);
  int sampled_model = -1;
  for (int q = 0; q < num_queries; ++q) {
    const int mdl = queries[q].model;
    if (mdl != sampled_model) {  // queries of one model are adjacent in the callers (else: sampled again)
      for (int64_t j = 0; j < m; ++j) {
        sc.sample[j] = abs_bits(fm_sub(load_f32(xs[mdl], x_dtypes[mdl], sc.sample_pos[j]), sc.sample_base[j]));
      }
      sampled_model = mdl;
    }
    const double qf = double(queries[q].k) / double(n);
    const double r = qf * double(m);
    const double margin = 4.5 * std::sqrt(double(m) * qf * (1.0 - qf)) + 4.0;
    const int64_t rh = int64_t(std::floor(r - margin));
    const int64_t rl = int64_t(std::ceil(r + margin));
    uint32_t* sv = sc.sample.data();
    const uint32_t hi = rh < 1 ? 0xffffffffu : rth_largest(sv, m, rh);
    const uint32_t lo = rl > m ? 0u : rth_largest(sv, m, rl);
    int64_t in = 0;
    for (int64_t j = 0; j < m; ++j) in += sv[j] >= lo && sv[j] <= hi;
    Bracket br{};
    br.model = mdl;
    br.lo = lo;
    br.hi = hi;
    br.frac = double(in) / double(m);
    // Merge with an overlapping bracket of the same model (breadcrumbs' two ranks on a small tensor).
    int merged_into = -1;
    for (int bi = 0; bi < int(sc.brackets.size()); ++bi) {
      Bracket& o = sc.brackets[bi];
      if (o.model == mdl && o.lo <= hi && lo <= o.hi) {
        o.lo = std::min(o.lo, lo);
        o.hi = std::max(o.hi, hi);
        int64_t in2 = 0;  // the sample (this model's, reordered but the same multiset) inside the union
        for (int64_t j = 0; j < m; ++j) in2 += sv[j] >= o.lo && sv[j] <= o.hi;
        o.frac = double(in2) / double(m);
        merged_into = bi;
        break;
      }
    }
    if (merged_into < 0) {
      sc.brackets.push_back(br);
      merged_into = int(sc.brackets.size()) - 1;
    }
    sc.query_bracket[q] = merged_into;
  }
  for (Bracket& br : sc.brackets) {
    br.single = br.lo == br.hi;
    br.usable = br.single || br.frac <= kMaxCandFrac;
  }

  // 2. One pass over base and the queried inputs.
  const int64_t nb = num_blocks(n);
  const int nt = resolve_threads(threads, (n + kElemsPerThread - 1) / kElemsPerThread);
  const int nbr = int(sc.brackets.size());
  sc.models.clear();
  for (const Bracket& br : sc.brackets) {
    if (br.usable && std::find(sc.models.begin(), sc.models.end(), br.model) == sc.models.end()) {
      sc.models.push_back(br.model);
    }
  }
  sc.tcounts.assign(size_t(nbr) * nt, ThreadCounts{});
  int64_t total = 0;
  for (int bi = 0; bi < nbr; ++bi) {
    Bracket& br = sc.brackets[bi];
    br.start = total;
    for (int t = 0; t < nt; ++t) {
      ThreadCounts& tc = sc.tcounts[size_t(bi) * nt + t];
      const int64_t elems = std::min(n, (nb * (t + 1) / nt) * kBlock) - (nb * t / nt) * kBlock;
      // 1.5x the sampled fraction plus 4 blocks of slack (the compaction needs a block's worth free)
      tc.cap = (br.usable && !br.single)
                   ? std::min(elems + kBlock, int64_t(std::ceil(br.frac * 1.5 * double(elems))) + 4 * kBlock)
                   : 0;
      tc.off = total;
      total += tc.cap;
    }
  }
  grow(sc.cand, size_t(total));
  sc.nans.assign(sc.models.size() * size_t(nt), 0);
  if (!sc.models.empty()) {
#if defined(_OPENMP)
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
    {
      const int t = thread_id();
      multi_pass_range(xs, x_dtypes, base, base_dtype, n, nb * t / nt, nb * (t + 1) / nt, sc, t, nt);
    }
  }

  // 3. Per bracket: totals, then the queries' exact answers (brackets in parallel: disjoint buffers).
  for (int bi = 0; bi < nbr; ++bi) {
    Bracket& br = sc.brackets[bi];
    br.above = 0;
    br.inside = 0;
    br.overflow = false;
    int64_t pos = br.start;
    for (int t = 0; t < nt; ++t) {
      const ThreadCounts& tc = sc.tcounts[size_t(bi) * nt + t];
      br.above += tc.above;
      br.overflow = br.overflow || tc.overflow;
      if (!br.single && br.usable && tc.inside > 0 && tc.off != pos) {
        std::memmove(sc.cand.data() + pos, sc.cand.data() + tc.off, size_t(tc.inside) * sizeof(uint32_t));
      }
      pos += tc.inside;
      br.inside += tc.inside;
    }
  }
  auto nan_count = [&](int mdl) {
    int64_t c = 0;
    for (size_t mi = 0; mi < sc.models.size(); ++mi) {
      if (sc.models[mi] != mdl) continue;
      for (int t = 0; t < nt; ++t) c += sc.nans[mi * nt + t];
    }
    return c;
  };
  sc.query_ok.assign(size_t(num_queries), 0);
  int64_t total_inside = 0;
  for (const Bracket& br : sc.brackets) total_inside += br.single ? 0 : br.inside;
  const int ntq = std::min(resolve_threads(threads, nbr), threads_for_elems(threads, total_inside));
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) num_threads(ntq) if (ntq > 1)
#endif
  for (int bi = 0; bi < nbr; ++bi) {
    const Bracket& br = sc.brackets[bi];
    for (int q = 0; q < num_queries; ++q) {
      if (sc.query_bracket[q] != bi) continue;
      const int64_t k = queries[q].k;
      const bool ok = br.usable && !br.overflow && br.above < k && k <= br.above + br.inside;
      sc.query_ok[q] = ok;
      if (!ok) continue;
      if (br.single) {
        KthAbs r{};
        r.bits = br.hi;
        r.count_above = br.above;
        r.count_equal = br.inside;
        r.count_nan = nan_count(br.model);
        queries[q].result = r;
      } else {
        uint32_t* c = sc.cand.data() + br.start;
        const uint32_t th = rth_largest(c, br.inside, k - br.above);
        queries[q].result = result_from(c, br.inside, th, br.above, nan_count(br.model));
      }
    }
  }
  (void)ntq;
  // 4. Fallbacks: the two-pass radix select (exact), one query at a time.
  for (int q = 0; q < num_queries; ++q) {
    if (sc.query_ok[q]) continue;
    ++tls_fallbacks;
    const int mdl = queries[q].model;
    queries[q].result = kth_largest_abs_diff(xs[mdl], x_dtypes[mdl], base, base_dtype, n, queries[q].k, threads);
  }
}

int64_t select_fallbacks() { return tls_fallbacks; }

size_t select_scratch_bytes() { return tls_scratch.bytes(); }

}  // namespace cpu
}  // namespace fastmerge
