// CPU kernel of Model Breadcrumbs (breadcrumbs, breadcrumbs_ties): keep the band of ascending |δ| ranks
// [n_bot, n_bot + target) of each model, then the shared tail of fastmerge/gta.h, mirroring
// fastmerge/methods/breadcrumbs.py (band_mask, threshold and topk selections).
//
// The band's two boundary magnitudes are two k-th largest selections per model, all of them found in ONE
// read of base and the inputs (kth_largest_abs_diff_multi, select.h):
//     hi = the (n_bot + target)-th smallest = the (n − n_bot − target + 1)-th largest
//     lo = the (n_bot + 1)-th smallest      = the (n − n_bot)-th largest          (n_bot > 0)
// Per element, with a = |δ| and float comparisons (so NaN is never kept, as in the reference):
//     keep = (a > lo && a < hi) || (a == lo && lo_tie_ok(j)) || (a == hi && hi_tie_ok(j))
// threshold mode: every tie kept, and lo = −1 when n_bot = 0 (no lower bound): keep = lo <= a <= hi (and
// nothing when hi is NaN: lo is then set to NaN too).
// topk mode: the ties at v ∈ {lo, hi} whose position #{a < v} + (tie rank by index) falls in the band are
// kept; that is a contiguous range of tie ranks, i.e. an index range found by nth_equal_abs_diff_index
// (one more read, only when the band cuts through the ties). n_bot = 0: lo = min |δ| (NaN if any |δ| is
// NaN: the reference's `mag.min()`).
#include <cmath>
#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "gta_cpu.h"
#include "select.h"

namespace fastmerge {
namespace cpu {
namespace {

struct Band {
  float lo, hi;
  int64_t lo_first, lo_last;  // ties at lo kept for lo_first <= j <= lo_last
  int64_t hi_first, hi_last;
};

thread_local std::vector<Band> tls_bands;
thread_local std::vector<KthQuery> tls_queries;
thread_local std::vector<int> tls_qidx;  // per model: its hi query, its lo query (−1: none)

// Block-local clamp of an index range: [f, l] ∩ [−1, len].
FM_ALWAYS_INLINE void local_range(int64_t first, int64_t last, int64_t off, int64_t len, int* f, int* l) {
  int64_t a = first - off, b = last - off;
  a = a < -1 ? -1 : (a > len ? len : a);
  b = b < -1 ? -1 : (b > len ? len : b);
  *f = int(a);
  *l = int(b);
}

struct BandKeep {
  const Band* bands;
  FM_ALWAYS_INLINE void operator()(int i, int64_t off, int64_t len, const float* d, int32_t* km) const {
    const Band& b = bands[i];
    const float lo = b.lo, hi = b.hi;
    int lf, ll, hf, hl;
    local_range(b.lo_first, b.lo_last, off, len, &lf, &ll);
    local_range(b.hi_first, b.hi_last, off, len, &hf, &hl);
    for (int j = 0; j < int(len); ++j) {
      const float x = bits_f32(abs_bits(d[j]));
      km[j] = (x > lo && x < hi) || (x == lo && j >= lf && j <= ll) || (x == hi && j >= hf && j <= hl);
    }
  }
};

#if FM_HAS_FUSED_BLOCK
// BandKeep for gtacpu::fused_block, W lanes at a time, for a block where each boundary's tie rule is
// uniform: ok[2i] / ok[2i + 1] = every / no tie at lo / hi kept (all ones / zeros). Blocks that a topk
// cut runs through (at most two per model) take merge_block.
//
// The open interval lo < |δ| < hi is one unsigned compare on bit patterns (band_bits): GCC 12 lowered the
// AND of two float-compare masks lane by lane here (breadcrumbs_ties 3x slower than merge_block, measured).
template <int W>
struct BandVKeep {
  const Band* bands;
  const int32_t* ok;
  const uint32_t* bb;  // per model: band_bits' (base, width)
  FM_ALWAYS_INLINE typename gtacpu::Lanes<W>::I operator()(int i, int64_t, typename gtacpu::Lanes<W>::F d) const {
    typedef typename gtacpu::Lanes<W>::F VF;
    typedef typename gtacpu::Lanes<W>::I VI;
    typedef typename gtacpu::Lanes<W>::U VU;
    VU bits;
    std::memcpy(&bits, &d, sizeof bits);
    bits &= 0x7fffffffu;
    VF x;
    std::memcpy(&x, &bits, sizeof x);
    const VI inside = (bits - bb[2 * i]) < bb[2 * i + 1];
    const VF lo = VF{} + bands[i].lo;
    const VF hi = VF{} + bands[i].hi;
    const VI lo_ok = VI{} + ok[2 * i];
    const VI hi_ok = VI{} + ok[2 * i + 1];
    return inside | ((x == lo) & lo_ok) | ((x == hi) & hi_ok);
  }
};

// lo < a < hi for a = |δ| (sign bit clear, NaN above +inf), as `(bits(a) − base) < width` in uint32.
// Non-negative floats order like their bit patterns, so with L = the largest bit pattern <= lo (−1: none,
// lo < 0) and H = bits(hi), the test is L < bits(a) < H. A NaN |δ| has bits above H, so it is never
// inside: a float compare would say the same. A NaN lo or hi makes the float test false for every a, and
// so does an empty (L + 1 >= H) range: width 0 there.
FM_ALWAYS_INLINE void band_bits(float lo, float hi, uint32_t* base, uint32_t* width) {
  if (lo != lo || hi != hi || !(hi > 0.0f)) {
    *base = 0;
    *width = 0;
    return;
  }
  const int64_t L = lo < 0.0f ? -1 : int64_t(abs_bits(lo));  // −0.0 counts as +0.0, as in the float test
  const int64_t H = int64_t(f32_bits(hi));
  *base = uint32_t(L + 1);
  *width = H > L + 1 ? uint32_t(H - (L + 1)) : 0u;
}
#endif

template <int W>
FM_ALWAYS_INLINE void band_merge_block_w(const GtaArgs& g, const gtacpu::ModelScale* ms, const Band* bands,
                                         int64_t off, int64_t len, float* rows) {
#if FM_HAS_FUSED_BLOCK
  if (gtacpu::fusable(g, len)) {
    int32_t ok[2 * gtacpu::kMaxFusedModels];
    uint32_t bb[2 * gtacpu::kMaxFusedModels];
    bool uniform = true;
    for (int i = 0; i < g.num_inputs; ++i) {
      band_bits(bands[i].lo, bands[i].hi, &bb[2 * i], &bb[2 * i + 1]);
      const int lo_rule = gtacpu::tie_rule(bands[i].lo_first, bands[i].lo_last, off, len);
      const int hi_rule = gtacpu::tie_rule(bands[i].hi_first, bands[i].hi_last, off, len);
      ok[2 * i] = -int32_t(lo_rule == 1);
      ok[2 * i + 1] = -int32_t(hi_rule == 1);
      uniform = uniform && lo_rule >= 0 && hi_rule >= 0;
    }
    if (uniform) {
      gtacpu::fused_block<W>(g, ms, BandVKeep<W>{bands, ok, bb}, off, len, rows);
      return;
    }
  }
#endif
  gtacpu::merge_block<W>(g, ms, BandKeep{bands}, off, len, rows);
}

FM_LANE_CLONES(band_merge_block,
               (const GtaArgs& g, const gtacpu::ModelScale* ms, const Band* bands, int64_t off, int64_t len,
                float* rows),
               (g, ms, bands, off, len, rows))

template <int W>
FM_ALWAYS_INLINE void band_sums_block_w(const GtaArgs& g, const char* need, const Band* bands, int64_t off,
                                        int64_t len, float* rows, double* partial) {
  gtacpu::sums_block<W>(g, need, BandKeep{bands}, off, len, rows, partial);
}

FM_LANE_CLONES(band_sums_block,
               (const GtaArgs& g, const char* need, const Band* bands, int64_t off, int64_t len, float* rows,
                double* partial),
               (g, need, bands, off, len, rows, partial))

// topk: the index range of the ties at v kept by the band [n_bot, n_bot + target).
void tie_range(const GtaArgs& g, int i, const KthAbs& r, int64_t n_bot, int64_t target, int threads,
               int64_t* first, int64_t* last) {
  const int64_t n = g.n;
  const float v = bits_f32(r.bits);
  *first = n;  // empty
  *last = -1;
  if (std::isnan(v)) return;  // `mag == NaN` holds nowhere
  const int64_t eq = r.count_equal;
  const int64_t below = n - r.count_above - eq;  // count_above includes the NaNs, which are not < v
  int64_t r0 = n_bot - below, r1 = n_bot + target - below;  // kept tie ranks [r0, r1), 0-based
  if (r0 < 0) r0 = 0;
  if (r1 > eq) r1 = eq;
  if (r0 >= r1) return;
  *first = r0 == 0 ? 0 : nth_equal_abs_diff_index(g.inputs[i], g.input_dtypes[i], g.base, g.base_dtype, n, v, r0 + 1, threads);
  *last = r1 == eq ? n - 1 : nth_equal_abs_diff_index(g.inputs[i], g.input_dtypes[i], g.base, g.base_dtype, n, v, r1, threads);
}

}  // namespace

void breadcrumbs(const BreadcrumbsArgs& a, int threads) {
  const GtaArgs& g = a.g;
  const int64_t n = g.n;
  const int T = g.num_inputs;
  if (n <= 0) return;
  const float nan = std::nanf("");
  gtacpu::Scratch& sc = gtacpu::scratch();
  gtacpu::init_models(sc, T);
  gtacpu::grow(tls_bands, size_t(T));
  gtacpu::grow(tls_queries, size_t(2 * T));
  gtacpu::grow(tls_qidx, size_t(2 * T));
  Band* bands = tls_bands.data();
  KthQuery* q = tls_queries.data();
  int* qidx = tls_qidx.data();
  gtacpu::ModelScale* ms = sc.scales.data();

  // The band of each model (methods/breadcrumbs.py `band`): Python's double products, truncated.
  int nq = 0;
  bool any_norms = false;
  for (int i = 0; i < T; ++i) {
    const bool whole = a.densities[i] >= 1.0;  // band_mask returns None: kept whole, outliers included
    ms[i] = gtacpu::ModelScale{whole, false, 1.0f};
    sc.need[i] = g.rescale && !whole;
    any_norms = any_norms || sc.need[i];
    qidx[2 * i] = qidx[2 * i + 1] = -1;
    bands[i] = Band{nan, nan, 0, n - 1, 0, n - 1};  // keeps nothing (target = 0) until set below
    if (whole) continue;
    const int64_t target = int64_t(a.densities[i] * double(n));
    const int64_t n_top = int64_t(a.gammas[i] * double(n));
    const int64_t n_bot = n - target - n_top > 0 ? n - target - n_top : 0;
    if (target == 0) continue;
    qidx[2 * i] = nq;
    q[nq++] = KthQuery{i, n - n_bot - target + 1, KthAbs{}};
    if (n_bot > 0 || a.exact) {  // topk with n_bot = 0 needs min |δ|: the n-th largest
      qidx[2 * i + 1] = nq;
      q[nq++] = KthQuery{i, n - n_bot, KthAbs{}};
    }
  }
  kth_largest_abs_diff_multi(g.inputs, g.input_dtypes, g.base, g.base_dtype, n, q, nq, threads);

  for (int i = 0; i < T; ++i) {
    if (qidx[2 * i] < 0) continue;
    const KthAbs& rh = q[qidx[2 * i]].result;
    const int64_t target = int64_t(a.densities[i] * double(n));
    const int64_t n_top = int64_t(a.gammas[i] * double(n));
    const int64_t n_bot = n - target - n_top > 0 ? n - target - n_top : 0;
    Band& b = bands[i];
    b.hi = bits_f32(rh.bits);
    if (!a.exact) {
      b.lo = n_bot > 0 ? bits_f32(q[qidx[2 * i + 1]].result.bits) : -1.0f;
      // `mag <= NaN` keeps nothing, whatever lo (more NaNs than n_top: the upper boundary is a NaN)
      if (std::isnan(b.hi)) b.lo = nan;
      continue;  // every tie kept: the ranges stay [0, n − 1]
    }
    const KthAbs& rl = q[qidx[2 * i + 1]].result;
    b.lo = bits_f32(rl.bits);
    if (n_bot == 0 && rl.count_nan > 0) b.lo = nan;  // torch's min() propagates NaN
    tie_range(g, i, rh, n_bot, target, threads, &b.hi_first, &b.hi_last);
    if (std::isnan(b.lo)) {
      b.lo_first = n;
      b.lo_last = -1;
    } else if (rl.bits == rh.bits) {  // one value: the reference's set {lo, hi} visits it once
      b.lo_first = b.hi_first;
      b.lo_last = b.hi_last;
    } else {
      tie_range(g, i, rl, n_bot, target, threads, &b.lo_first, &b.lo_last);
    }
  }

  const Band* bp = bands;
  if (any_norms) {
    gtacpu::norms_pass(g, threads, sc, [&](int64_t, int64_t off, int64_t len, float* rows, double* partial) {
      band_sums_block(g, sc.need.data(), bp, off, len, rows, partial);
    });
  }
  gtacpu::merge_pass(g, threads, sc, [&](int64_t off, int64_t len, float* rows) {
    band_merge_block(g, ms, bp, off, len, rows);
  });
}

}  // namespace cpu
}  // namespace fastmerge
