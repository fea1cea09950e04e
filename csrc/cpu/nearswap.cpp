// CPU kernel of NearSwap (default mode, t >= 1e-6): see fastmerge/nearswap.h for the formula. One read of
// the base and the other model, one write: blocks of kBlock elements converted to fp32 rows on the stack,
// split statically across OpenMP threads (elementwise: any thread count gives the same bits).
#include "fastmerge/nearswap.h"

namespace fastmerge {
namespace cpu {
namespace {

FM_TARGET_CLONES void nearswap_block(const NearswapArgs& a, int64_t off, int64_t len) {
  alignas(64) float b[kBlock];
  alignas(64) float v[kBlock];
  load_block(b, a.base, a.base_dtype, off, len);
  load_block(v, a.x, a.x_dtype, off, len);
  const float t = a.t;
  for (int64_t j = 0; j < len; ++j) v[j] = nearswap::clamp_to_base(v[j], b[j], t);
  store_block(a.out, a.out_dtype, off, v, len);
}

}  // namespace

void nearswap(const NearswapArgs& a, int threads) {
  for_each_block(a.n, threads, [&a](int64_t off, int64_t len) { nearswap_block(a, off, len); });
}

}  // namespace cpu
}  // namespace fastmerge
