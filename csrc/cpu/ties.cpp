// CPU kernel of fused TIES: the trim of fastmerge/ties.h, then the shared tail of fastmerge/gta.h.
//
// Per tensor:
//  (1) the k_i-th largest |δ_i| of every model with density < 1, all models at once in ONE read of base and
//      the inputs (kth_largest_abs_diff_multi, select.h: a sampled bracket, candidates, nth_element);
//  (2) exact-k mode only, when more elements equal a threshold than there is room for: the index of the last
//      tie to keep (one read of that model);
//  (3) rescale only: the two L1 norms per model (one read, gta_cpu.h);
//  (4) one fused pass: trim, weights, sign election, disjoint mean, λ, base, one rounding on store.
// Nothing depends on the thread count: the selection is a function of the multiset of |δ|, cut indices come
// from integer counts, norms are added in block order, and (4) is elementwise.
#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "fastmerge/ties.h"
#include "gta_cpu.h"
#include "select.h"

namespace fastmerge {
namespace cpu {
namespace {

struct ModelSel {
  float th;  // threshold |δ| (ignored when all)
  bool all;  // density >= 1: the reference's all-ones mask
  int64_t cut;  // ties at th are kept for indices <= cut (n − 1 or more: all; −1: none)
};

thread_local std::vector<ModelSel> tls_sel;
thread_local std::vector<KthQuery> tls_queries;

struct TiesKeep {
  const ModelSel* sel;
  FM_ALWAYS_INLINE void operator()(int i, int64_t off, int64_t len, const float* d, int32_t* km) const {
    const ModelSel& s = sel[i];
    if (s.all) {
      for (int64_t j = 0; j < len; ++j) km[j] = 1;
      return;
    }
    const float th = s.th;
    // The exact-k cut as a block-local index: all ties kept (>= len − 1), none (< 0), or up to lc. Three
    // loops so that each vectorises without a per-element index test where none is needed.
    const int64_t lc64 = s.cut - off;
    if (lc64 >= len - 1) {
      for (int64_t j = 0; j < len; ++j) km[j] = ties::kept(d[j], th, true);
    } else if (lc64 < 0) {
      for (int64_t j = 0; j < len; ++j) km[j] = ties::kept(d[j], th, false);
    } else {
      const int lc = int(lc64);
      for (int j = 0; j < int(len); ++j) km[j] = ties::kept(d[j], th, j <= lc);
    }
  }
};

#if FM_HAS_FUSED_BLOCK
// TiesKeep for gtacpu::fused_block, W lanes at a time, for a block where every model's tie rule is uniform:
// mode 2 = all (density >= 1), 1 = |δ| >= th (ties kept: threshold mode, or the exact-k cut past the
// block), 0 = |δ| > th (the cut before the block). `a >= th` is `a > th || a == th` for every float, NaN
// included (all false), as ties::kept.
template <int W>
struct TiesVKeep {
  const ModelSel* sel;
  const signed char* mode;
  FM_ALWAYS_INLINE typename gtacpu::Lanes<W>::I operator()(int i, int64_t, typename gtacpu::Lanes<W>::F d) const {
    typedef typename gtacpu::Lanes<W>::F VF;
    typedef typename gtacpu::Lanes<W>::I VI;
    const VI none = {};
    if (mode[i] == 2) return none - 1;
    VI bits;
    std::memcpy(&bits, &d, sizeof bits);
    bits &= 0x7fffffff;
    VF a;
    std::memcpy(&a, &bits, sizeof a);
    const VF th = VF{} + sel[i].th;
    // bit operations, not a select between two comparisons: GCC 12 lowered that select lane by lane
    // (ties at density 0.5 took 610 ms instead of ~45)
    const VI tie_ok = none - (mode[i] == 1 ? 1 : 0);
    return (a > th) | ((a == th) & tie_ok);
  }
};
#endif

template <int W>
FM_ALWAYS_INLINE void ties_merge_block_w(const GtaArgs& g, const gtacpu::ModelScale* ms, const ModelSel* sel,
                                         int64_t off, int64_t len, float* rows) {
#if FM_HAS_FUSED_BLOCK
  const int T = g.num_inputs;
  if (gtacpu::fusable(g, len)) {
    signed char mode[gtacpu::kMaxFusedModels];
    bool uniform = true;
    for (int i = 0; i < T; ++i) {
      const int rule = gtacpu::tie_rule(0, sel[i].cut, off, len);  // exact-k: ties kept up to the cut
      mode[i] = sel[i].all ? 2 : (rule == 1 ? 1 : 0);
      uniform = uniform && (sel[i].all || rule >= 0);
    }
    if (uniform) {
      gtacpu::fused_block<W>(g, ms, TiesVKeep<W>{sel, mode}, off, len, rows);
      return;
    }
  }
#endif
  gtacpu::merge_block<W>(g, ms, TiesKeep{sel}, off, len, rows);
}

FM_LANE_CLONES(ties_merge_block,
               (const GtaArgs& g, const gtacpu::ModelScale* ms, const ModelSel* sel, int64_t off, int64_t len,
                float* rows),
               (g, ms, sel, off, len, rows))

template <int W>
FM_ALWAYS_INLINE void ties_sums_block_w(const GtaArgs& g, const char* need, const ModelSel* sel, int64_t off,
                                        int64_t len, float* rows, double* partial) {
  gtacpu::sums_block<W>(g, need, TiesKeep{sel}, off, len, rows, partial);
}

FM_LANE_CLONES(ties_sums_block,
               (const GtaArgs& g, const char* need, const ModelSel* sel, int64_t off, int64_t len, float* rows,
                double* partial),
               (g, need, sel, off, len, rows, partial))

}  // namespace

void ties(const TiesArgs& a, int threads) {
  const GtaArgs& g = a.g;
  const int64_t n = g.n;
  const int T = g.num_inputs;
  if (n <= 0) return;
  gtacpu::Scratch& sc = gtacpu::scratch();
  gtacpu::init_models(sc, T);
  gtacpu::grow(tls_sel, size_t(T));
  gtacpu::grow(tls_queries, size_t(T));
  ModelSel* sel = tls_sel.data();
  KthQuery* q = tls_queries.data();

  // (1) thresholds of every trimmed model in one read
  int nq = 0;
  for (int i = 0; i < T; ++i) {
    sel[i].all = a.densities[i] >= 1.0;
    sel[i].th = 0.0f;
    sel[i].cut = n;
    if (!sel[i].all) {
      q[nq] = KthQuery{i, ties::keep_count(a.densities[i], n), KthAbs{}};
      q[nq++].want_cut = a.exact_k;
    }
  }
  kth_largest_abs_diff_multi(g.inputs, g.input_dtypes, g.base, g.base_dtype, n, q, nq, threads);
  for (int j = 0; j < nq; ++j) {
    const int i = q[j].model;
    const KthAbs& r = q[j].result;
    ModelSel& s = sel[i];
    s.th = bits_f32(r.bits);
    const bool th_is_nan = (r.bits & 0x7fffffffu) > 0x7f800000u;
    if (a.exact_k && !th_is_nan) {
      // (2) Elements strictly above th by float comparison: the larger bit patterns minus the NaNs (NaN
      // bits sort above any number but `NaN > th` is false, as in the reference's `mag > threshold`).
      const int64_t above = r.count_above - r.count_nan;
      const int64_t room = q[j].k - above;  // >= 1 since th is the k-th largest
      if (q[j].cut >= 0) {
        s.cut = q[j].cut;  // a small tensor: found by the selection, in the |δ| it held
      } else if (r.count_equal > room) {
        s.cut = nth_equal_abs_diff_index(g.inputs[i], g.input_dtypes[i], g.base, g.base_dtype, n, s.th, room, threads);
      }
    }
  }

  // (3) rescale: every model (density >= 1 included: the reference rescales its all-ones mask by 1)
  gtacpu::ModelScale* ms = sc.scales.data();
  bool any_norms = false;
  for (int i = 0; i < T; ++i) {
    ms[i] = gtacpu::ModelScale{sel[i].all && !g.rescale, false, 1.0f};
    sc.need[i] = g.rescale;
    any_norms = any_norms || g.rescale;
  }
  if (any_norms) {
    gtacpu::norms_pass(g, threads, sc, [&](int64_t, int64_t off, int64_t len, float* rows, double* partial) {
      ties_sums_block(g, sc.need.data(), sel, off, len, rows, partial);
    });
  }

  // (4) fused trim / elect / merge
  gtacpu::merge_pass(g, threads, sc, [&](int64_t off, int64_t len, float* rows) {
    ties_merge_block(g, ms, sel, off, len, rows);
  });
}

}  // namespace cpu
}  // namespace fastmerge
