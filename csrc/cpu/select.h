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

// One selection request of kth_largest_abs_diff_multi: the k-th largest |x_model − base|, 1 <= k <= n.
struct KthQuery {
  int model;
  int64_t k;
  KthAbs result;  // filled in
  // TIES exact-k: when set, a tensor of at most 2^16 elements also gets the cut from the |δ| it holds
  // anyway: with room = k − (count_above − count_nan), the index of the room-th element equal to the result
  // (nth_equal_abs_diff_index) if the result is a number and count_equal > room. -1: not computed (no cut
  // needed, or a larger tensor: the caller asks nth_equal_abs_diff_index).
  bool want_cut = false;
  int64_t cut = -1;
};

// Every query at once, exact (the same KthAbs as kth_largest_abs_diff), in ONE read of base and of each
// queried input (TIES: one query per model; breadcrumbs: two; base may be null: |x|, PEFT's pruning):
//  1. a stratified sample of m positions (m = 32768; 16384 below 2^23 elements) gives each query a bracket
//     [lo, hi] of bit patterns that holds the k-th largest with overwhelming probability (the sample's ranks
//     r ± (4.5σ + 4) around r = k/n·m, σ = binomial sd: ~2-5% of the elements fall inside);
//  2. one pass over the blocks (base loaded once per block for all models) counts the elements above each
//     bracket and copies the bit patterns inside it into a per-thread candidate buffer;
//  3. the k-th largest is the (k − above)-th largest candidate: std::nth_element on ~3% of n.
// A bracket that misses (the sample was unlucky; or too many candidates, e.g. heavily tied data) falls back
// to the two-pass radix select for that query only, so the result is always exact and does not depend on
// the thread count (it is a function of the multiset of |δ|). Tensors of at most 65536 elements skip the
// sample: every |δ| of a model goes to scratch (with its extremes and NaN count, one vectorised loop), a
// histogram of the top 11 bits of the pattern (exponent and 3 mantissa bits) finds the bin of the k-th
// largest, and a counting select among that bin's elements finishes; one thread.
void kth_largest_abs_diff_multi(const void* const* xs, const int* x_dtypes, const void* base, int base_dtype,
                                int64_t n, KthQuery* queries, int num_queries, int threads);

// How many queries of the last kth_largest_abs_diff_multi call on this thread fell back to the radix select
// (tests and benchmarks).
int64_t select_fallbacks();

// Bytes held by the calling thread's selection scratch (for tests of the grow-only contract).
size_t select_scratch_bytes();

}  // namespace cpu
}  // namespace fastmerge
