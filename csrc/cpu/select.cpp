// Radix select of the k-th largest |x − base| on fp32 bit patterns: see select.h for the contract.
#include "select.h"

#include <cstring>
#include <vector>

#include "fastmerge/common.h"

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

struct Scratch {
  std::vector<uint32_t> local;   // threads x kBins
  std::vector<uint64_t> merged;  // kBins
  std::vector<int32_t> counts;   // per block (nth_equal_abs_diff_index)

  size_t bytes() const {
    return local.capacity() * sizeof(uint32_t) + merged.capacity() * sizeof(uint64_t) +
           counts.capacity() * sizeof(int32_t);
  }
};

// One per calling thread, grow-only (see select.h).
thread_local Scratch tls_scratch;

template <class T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
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
  const int nt = resolve_threads(threads, nb);
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

size_t select_scratch_bytes() { return tls_scratch.bytes(); }

}  // namespace cpu
}  // namespace fastmerge
