// CPU kernel of fused TIES: see fastmerge/ties.h for the per-element formula.
//
// Per tensor: (1) for each model with density < 1, the threshold th_i = k_i-th largest |δ_i| by radix
// select (select.cpp; two reads of x_i and base), plus in exact-k mode, when more elements equal the
// threshold than there is room for, the index of the last tie to keep (one more read); (2) one fused
// pass over all inputs that trims, elects and merges, block by block, with the T trimmed deltas of a
// block in per-thread scratch. Nothing depends on the thread count: thresholds and cut indices are
// computed with integer counts, and pass (2) is elementwise.
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/ties.h"
#include "select.h"

namespace fastmerge {
namespace cpu {
namespace {

struct ModelSel {
  float th;       // threshold |δ| (ignored when keep_all)
  bool keep_all;  // density >= 1
  int64_t cut;    // ties at th are kept for indices <= cut (n − 1 or more: all; −1: none)
};

// Per-block scratch of every OpenMP thread of the calling thread, grow-only (no allocation per tensor in
// steady state; one buffer per calling thread, so concurrent Python threads do not share it).
thread_local std::vector<float> tls_block_scratch;
thread_local std::vector<ModelSel> tls_sel;

// Scratch rows per thread besides the T trimmed-delta rows: base, input, election total, num, div.
constexpr int kFixedRows = 5;

FM_TARGET_CLONES void ties_block(const TiesArgs& a, const ModelSel* sel, int64_t off, int64_t len, float* scratch) {
  float* b = scratch;
  float* v = b + kBlock;
  float* tot = v + kBlock;
  float* num = tot + kBlock;
  float* div = num + kBlock;
  float* wd = div + kBlock;  // T rows
  const int T = a.num_inputs;

  load_block(b, a.base, a.base_dtype, off, len);

  // Trim: wd_i = m_i ? w_i * (x_i - b) : 0
  for (int i = 0; i < T; ++i) {
    load_block(v, a.inputs[i], a.input_dtypes[i], off, len);
    float* wdi = wd + int64_t(i) * kBlock;
    const float w = a.weights[i];
    const float th = sel[i].th;
    // The exact-k cut as a block-local index: all ties kept (>= len-1), none (< 0), or up to lc.
    const int64_t lc64 = sel[i].cut - off;
    if (sel[i].keep_all) {
      for (int64_t j = 0; j < len; ++j) wdi[j] = ties::trimmed(fm_sub(v[j], b[j]), w, th, true, true);
    } else if (lc64 >= len - 1) {
      for (int64_t j = 0; j < len; ++j) wdi[j] = ties::trimmed(fm_sub(v[j], b[j]), w, th, false, true);
    } else if (lc64 < 0) {
      for (int64_t j = 0; j < len; ++j) wdi[j] = ties::trimmed(fm_sub(v[j], b[j]), w, th, false, false);
    } else {
      const int lc = int(lc64);
      for (int j = 0; j < int(len); ++j) wdi[j] = ties::trimmed(fm_sub(v[j], b[j]), w, th, false, j <= lc);
    }
  }

  // Elect: tot = Σ wd_i (or Σ sign(wd_i)) from +0, then the majority sign (stored over tot).
  for (int64_t j = 0; j < len; ++j) tot[j] = 0.0f;
  if (a.election == ties::COUNT) {
    for (int i = 0; i < T; ++i) {
      const float* wdi = wd + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) tot[j] = ties::elect_add(tot[j], wdi[j], ties::COUNT);
    }
  } else {
    for (int i = 0; i < T; ++i) {
      const float* wdi = wd + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) tot[j] = ties::elect_add(tot[j], wdi[j], ties::SUM);
    }
  }
  for (int64_t j = 0; j < len; ++j) tot[j] = ties::majority(tot[j]);

  // Disjoint merge: num = Σ agree ? wd_i : 0, div = Σ agree ? w_i : 0 (in model order, from +0).
  for (int64_t j = 0; j < len; ++j) {
    num[j] = 0.0f;
    div[j] = 0.0f;
  }
  for (int i = 0; i < T; ++i) {
    const float* wdi = wd + int64_t(i) * kBlock;
    const float w = a.weights[i];
    for (int64_t j = 0; j < len; ++j) {
      const bool ag = ties::agrees(wdi[j], tot[j]);
      num[j] = fm_add(num[j], ag ? wdi[j] : 0.0f);
      div[j] = fm_add(div[j], ag ? w : 0.0f);
    }
  }

  const ties::Finish f = a.fin;
  for (int64_t j = 0; j < len; ++j) num[j] = ties::finish(num[j], div[j], b[j], f);
  store_block(a.out, a.out_dtype, off, num, len);
}

}  // namespace

void ties(const TiesArgs& a, int threads) {
  const int64_t n = a.n;
  const int T = a.num_inputs;
  if (n <= 0) return;

  // (1) thresholds, one model at a time (each selection is itself parallel).
  std::vector<ModelSel>& sel = tls_sel;
  if (sel.size() < size_t(T)) sel.resize(size_t(T));
  for (int i = 0; i < T; ++i) {
    const double d = a.densities[i];
    ModelSel& s = sel[i];
    s.keep_all = d >= 1.0;
    s.th = 0.0f;
    s.cut = n;
    if (s.keep_all) continue;
    // k = max(1, int(density * n)), with Python's double product and truncation (methods/ties.py).
    int64_t k = int64_t(d * double(n));
    if (k < 1) k = 1;
    if (k > n) k = n;
    const KthAbs r = kth_largest_abs_diff(a.inputs[i], a.input_dtypes[i], a.base, a.base_dtype, n, k, threads);
    s.th = bits_f32(r.bits);
    const bool th_is_nan = (r.bits & 0x7fffffffu) > 0x7f800000u;
    if (a.exact_k && !th_is_nan) {
      // Elements strictly above th by float comparison: the larger bit patterns minus the NaNs (NaN bits
      // sort above any number but `NaN > th` is false, as in the reference's `mag > threshold`).
      const int64_t above = r.count_above - r.count_nan;
      const int64_t room = k - above;  // >= 1 since th is the k-th largest
      if (r.count_equal > room) {
        s.cut = nth_equal_abs_diff_index(a.inputs[i], a.input_dtypes[i], a.base, a.base_dtype, n, s.th, room,
                                         threads);
      }
    }
  }

  // (2) fused trim / elect / merge.
  const int64_t nb = num_blocks(n);
  const int nt = resolve_threads(threads, nb);
  const size_t per_thread = size_t(kFixedRows + T) * kBlock;
  std::vector<float>& scratch = tls_block_scratch;
  if (scratch.size() < per_thread * size_t(nt)) scratch.resize(per_thread * size_t(nt));
  float* scratch_base = scratch.data();
  const ModelSel* selp = sel.data();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t off = blk * kBlock;
    const int64_t len = n - off < kBlock ? n - off : kBlock;
    ties_block(a, selp, off, len, scratch_base + size_t(thread_id()) * per_thread);
  }
}

size_t ties_scratch_bytes() {
  return tls_block_scratch.capacity() * sizeof(float) + tls_sel.capacity() * sizeof(ModelSel) +
         select_scratch_bytes();
}

}  // namespace cpu
}  // namespace fastmerge
