// CPU kernel of DARE (dare_linear, dare_ties): the counter-based keep mask of fastmerge/rng.h, the L1
// rescale and the shared tail of fastmerge/gta.h, mirroring fastmerge/methods/dare.py.
//
// The mask is a pure function of (seed, key, model, element index). Per tensor:
//  (1) rescale on and some density < 1: one pass for the two L1 norms of every such model, which also
//      stores each mask as bits (n/8 bytes per model of grow-only scratch);
//  (2) one fused pass: mask (drawn, or read back from (1)), rescale, weights, [sign election,] sum, λ,
//      base, one rounding on store.
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "fastmerge/rng.h"
#include "gta_cpu.h"

namespace fastmerge {
namespace cpu {
namespace {

struct DareModel {
  rng::Stream st;
  int32_t threshold;  // keep iff (h >> 8) < threshold
};

thread_local std::vector<DareModel> tls_models;

struct DareKeep {
  const DareModel* dm;
  FM_ALWAYS_INLINE void operator()(int i, int64_t off, int64_t len, const float*, int32_t* km) const {
    const DareModel m = dm[i];
    const uint32_t hw = rng::hi_word(m.st, uint64_t(off));  // a block never straddles a multiple of 2^32
    const uint32_t lo0 = uint32_t(off);
    for (int64_t j = 0; j < len; ++j) km[j] = rng::keep_scalar(rng::hash_lo(m.st, lo0 + uint32_t(j), hw), m.threshold);
  }
};

#if FM_HAS_FUSED_BLOCK
// DareKeep for gtacpu::fused_block: the generator on W lanes (rng.h's hash_lo_lanes: the same integer
// operations per lane, so the same bits as DareKeep).
template <int W>
struct DareVKeep {
  const DareModel* dm;
  int64_t off;  // the block's first element
  FM_ALWAYS_INLINE typename gtacpu::Lanes<W>::I operator()(int i, int64_t j, typename gtacpu::Lanes<W>::F) const {
    typedef typename gtacpu::Lanes<W>::U VU;
    typedef typename gtacpu::Lanes<W>::I VI;
    const DareModel& m = dm[i];
    const uint32_t hw = rng::hi_word(m.st, uint64_t(off));  // a block never straddles a multiple of 2^32
    const VU lo = (VU{} + uint32_t(off + j)) + gtacpu::lane_const<W>(gtacpu::kLaneIndex);
    const VU h = rng::hash_lo_lanes(m.st, lo, hw) >> 8;  // < 2^24: the int32 compare of keep_scalar
    return reinterpret_cast<const VI&>(h) < m.threshold;
  }
};
#endif

// The generator's mask, also stored as bits for the merge pass (the norms pass draws every mask the merge
// needs: ~1.3 cycles per element and model to draw, against a 1/8-byte store and load).
struct DareKeepStore {
  const DareModel* dm;
  uint64_t* mask;
  int64_t words;
  FM_ALWAYS_INLINE void operator()(int i, int64_t off, int64_t len, const float* d, int32_t* km) const {
    DareKeep{dm}(i, off, len, d, km);
    gtacpu::pack_bits(km, len, mask + i * words + (off >> 6));
  }
};

template <int W>
FM_ALWAYS_INLINE void dare_merge_block_w(const GtaArgs& g, const gtacpu::ModelScale* ms, const DareModel* dm,
                                         int64_t off, int64_t len, float* rows) {
#if FM_HAS_FUSED_BLOCK
  if (gtacpu::fusable(g, len)) {
    gtacpu::fused_block<W>(g, ms, DareVKeep<W>{dm, off}, off, len, rows);
    return;
  }
#endif
  gtacpu::merge_block<W>(g, ms, DareKeep{dm}, off, len, rows);
}

FM_LANE_CLONES(dare_merge_block,
               (const GtaArgs& g, const gtacpu::ModelScale* ms, const DareModel* dm, int64_t off, int64_t len,
                float* rows),
               (g, ms, dm, off, len, rows))

template <int W>
FM_ALWAYS_INLINE void dare_merge_block_stored_w(const GtaArgs& g, const gtacpu::ModelScale* ms,
                                                const gtacpu::MaskKeep& mk, int64_t off, int64_t len, float* rows) {
  gtacpu::mask_merge_block<W>(g, ms, mk, off, len, rows);
}

FM_LANE_CLONES(dare_merge_block_stored,
               (const GtaArgs& g, const gtacpu::ModelScale* ms, const gtacpu::MaskKeep& mk, int64_t off,
                int64_t len, float* rows),
               (g, ms, mk, off, len, rows))

template <int W>
FM_ALWAYS_INLINE void dare_sums_block_w(const GtaArgs& g, const char* need, const DareKeepStore& ks, int64_t off,
                                        int64_t len, float* rows, double* partial) {
  gtacpu::sums_block<W>(g, need, ks, off, len, rows, partial);
}

FM_LANE_CLONES(dare_sums_block,
               (const GtaArgs& g, const char* need, const DareKeepStore& ks, int64_t off, int64_t len, float* rows,
                double* partial),
               (g, need, ks, off, len, rows, partial))

}  // namespace

void dare(const DareArgs& a, int threads) {
  const GtaArgs& g = a.g;
  const int T = g.num_inputs;
  if (g.n <= 0) return;
  gtacpu::Scratch& sc = gtacpu::scratch();
  gtacpu::init_models(sc, T);
  gtacpu::grow(tls_models, size_t(T));
  DareModel* dm = tls_models.data();
  gtacpu::ModelScale* ms = sc.scales.data();
  bool any_norms = false;
  for (int i = 0; i < T; ++i) {
    const bool whole = a.densities[i] >= 1.0;  // dare_keep returns None: δ kept whole, never rescaled
    dm[i] = DareModel{rng::stream_keys(a.seed, a.key, uint32_t(i)), rng::scalar_threshold(a.densities[i])};
    ms[i] = gtacpu::ModelScale{whole, false, 1.0f};
    sc.need[i] = g.rescale && !whole;
    any_norms = any_norms || sc.need[i];
  }
  if (!any_norms) {
    gtacpu::merge_pass(g, threads, sc, [&](int64_t off, int64_t len, float* rows) {
      dare_merge_block(g, ms, dm, off, len, rows);
    });
    return;
  }
  // rescale: every model that is not kept whole needs its norms, so the norms pass draws (and stores) every
  // mask the merge pass uses
  const int64_t words = (g.n + 63) / 64;
  gtacpu::grow(sc.mask, size_t(T) * size_t(words));
  const DareKeepStore ks{dm, sc.mask.data(), words};
  gtacpu::norms_pass(g, threads, sc, [&](int64_t, int64_t off, int64_t len, float* rows, double* partial) {
    dare_sums_block(g, sc.need.data(), ks, off, len, rows, partial);
  });
  const gtacpu::MaskKeep mk{sc.mask.data(), words};
  gtacpu::merge_pass(g, threads, sc, [&](int64_t off, int64_t len, float* rows) {
    dare_merge_block_stored(g, ms, mk, off, len, rows);
  });
}

}  // namespace cpu
}  // namespace fastmerge
