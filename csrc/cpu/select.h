// CPU selection of the k-th largest |x − base| without sorting (used by TIES trimming; reusable by any
// method that keeps "the top density·n magnitudes" of a tensor).
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastmerge {
namespace cpu {

struct KthAbs {
  uint32_t bits;        // fp32 bit pattern of the k-th largest |δ| (a value present in the data)
  int64_t count_above;  // elements whose |δ| bit pattern is larger (NaNs included, see below)
  int64_t count_equal;  // elements whose |δ| has exactly these bits
  int64_t count_nan;    // elements whose |δ| is NaN
};

// The k-th largest of |x_j − base_j| (|x_j| without a base), 1 <= k <= n, computed in fp32 like the
// reference (`(x.float() - base.float()).abs()`), by a two-pass radix select on the bit pattern:
// non-negative floats order exactly like their bits read as uint32. Pass 1 histograms the top 16 bits
// (per-thread histograms, summed per bin: integer sums, so thread-count independent), the bin holding
// the k-th largest is found by a scan from the top; pass 2 histograms the low 16 bits of the elements in
// that bin, which gives the exact bits. Two reads of the inputs, no sort, no copy of the data.
//
// NaN: a NaN |δ| (sign cleared) has bits above +inf, so NaNs rank as the largest values, as in
// torch.kthvalue / torch.sort. If the k-th largest is a NaN, the returned bits are a NaN.
//
// Scratch (per-thread 64 Ki-bin histograms, 256 KiB per OpenMP thread, and the merged histogram) lives
// in a thread_local buffer of the *calling* thread that only grows: steady-state calls allocate nothing,
// and two Python threads calling at once (the GIL is released) use separate buffers.
KthAbs kth_largest_abs_diff(const void* x, int x_dtype, const void* base, int base_dtype, int64_t n, int64_t k,
                            int threads);

// Index of the `rank`-th element (1-based, in index order) whose |x_j − base_j| compares equal (float ==)
// to `th`; n if there are fewer. Used by TIES exact-k mode to break ties at the threshold by index order.
// Per-block counts (parallel) + a serial prefix sum + a scan of one block: thread-count independent.
int64_t nth_equal_abs_diff_index(const void* x, int x_dtype, const void* base, int base_dtype, int64_t n,
                                 float th, int64_t rank, int threads);

// Bytes held by the calling thread's selection scratch (for tests of the grow-only contract).
size_t select_scratch_bytes();

}  // namespace cpu
}  // namespace fastmerge
