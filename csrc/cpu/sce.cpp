// CPU kernel of SCE (default mode), mirroring fastmerge/methods/sce.py op for op: see fastmerge/sce.h.
//
// Passes over the tensor, each over 1024-element blocks split statically across OpenMP threads:
//  (0) select_topk < 1 only: the per-element variance of the deltas into an n-float grow-only buffer (plus
//      per-block nnz counts), then the k-th largest variance by the radix select of select.cpp (two reads of
//      that buffer, no sort);
//  (1) per model, Σ δ² of the (selected) deltas in double: 8 fixed lanes per block, blocks added in block
//      order, so the sums (and the weights) are the same bits for any thread count;
//  (2) election, disjoint weighted mean, base, one rounding on store.
// Every element's fp32 arithmetic is independent of the blocking, so outputs do not depend on threads.
#include "fastmerge/sce.h"

#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "gta_cpu.h"
#include "select.h"

namespace fastmerge {
namespace cpu {
namespace {

// The reference's divisor floor and uniform-weights threshold (TINY of methods/sce.py).
constexpr double kTiny = 1e-6;

struct SceScratch {
  std::vector<float> var;        // n: the variance (select_topk < 1)
  std::vector<int64_t> nnz;      // per block: non-zero variances
  std::vector<double> partials;  // blocks × T: Σ δ²
  std::vector<float> rows;       // threads × (4 + T) × kBlock

  size_t bytes() const {
    return var.capacity() * sizeof(float) + nnz.capacity() * sizeof(int64_t) + partials.capacity() * sizeof(double) +
           rows.capacity() * sizeof(float);
  }
};

thread_local SceScratch tls_sce;

inline size_t sce_rows_per_thread(int T) { return size_t(4 + T) * size_t(kBlock); }

// Loads the block's deltas δ_i = x_i − b into T rows (stride kBlock); b is left in `b`.
FM_ALWAYS_INLINE void load_deltas(const SceArgs& a, int64_t off, int64_t len, float* b, float* d) {
  load_block(b, a.base, a.base_dtype, off, len);
  for (int i = 0; i < a.num_inputs; ++i) {
    float* di = d + int64_t(i) * kBlock;
    load_block(di, a.inputs[i], a.input_dtypes[i], off, len);
    for (int64_t j = 0; j < len; ++j) di[j] = fm_sub(di[j], b[j]);
  }
}

// δ_i · keep (1 or 0 as a float: the reference multiplies by the mask, so an inf δ that is dropped is NaN).
FM_ALWAYS_INLINE void apply_keep(const float* var, float th, int T, int64_t len, float* d) {
  for (int i = 0; i < T; ++i) {
    float* di = d + int64_t(i) * kBlock;
    for (int64_t j = 0; j < len; ++j) di[j] = fm_mul(di[j], var[j] >= th ? 1.0f : 0.0f);
  }
}

// Pass 0, one block: v = mean_i (c_i − mean c)², c_i = δ_i − δ_0 (variance_mask's two-pass form).
FM_TARGET_CLONES void sce_var_block(const SceArgs& a, int64_t off, int64_t len, float* rows, float* var,
                                    int64_t* nnz) {
  const int T = a.num_inputs;
  float* b = rows;
  float* m = b + kBlock;
  float* q = m + kBlock;
  float* d = q + 2 * kBlock;
  load_deltas(a, off, len, b, d);
  const float ft = float(T);
  // c_i = δ_i − δ_0 in place, from the last model down so that δ_0 is still there
  for (int i = T - 1; i >= 0; --i) {
    float* di = d + int64_t(i) * kBlock;
    for (int64_t j = 0; j < len; ++j) di[j] = fm_sub(di[j], d[j]);
  }
  for (int64_t j = 0; j < len; ++j) m[j] = 0.0f;
  for (int i = 0; i < T; ++i) {
    const float* ci = d + int64_t(i) * kBlock;
    for (int64_t j = 0; j < len; ++j) m[j] = fm_add(m[j], ci[j]);
  }
  for (int64_t j = 0; j < len; ++j) {
    m[j] = fm_div(m[j], ft);
    q[j] = 0.0f;
  }
  for (int i = 0; i < T; ++i) {
    const float* ci = d + int64_t(i) * kBlock;
    for (int64_t j = 0; j < len; ++j) {
      const float e = fm_sub(ci[j], m[j]);
      q[j] = fm_add(q[j], fm_mul(e, e));
    }
  }
  int64_t c = 0;
  float* v = var + off;
  for (int64_t j = 0; j < len; ++j) {
    v[j] = fm_div(q[j], ft);
    c += v[j] != 0.0f;  // NaN counts, as torch.count_nonzero
  }
  *nnz = c;
}

// Σ fp32(δ²) of one row in double: 8 fixed lanes, combined pairwise (thread- and clone-independent order).
FM_ALWAYS_INLINE double sum_squares(const float* d, int64_t len) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    for (int k = 0; k < 8; ++k) l[k] += double(fm_mul(d[j + k], d[j + k]));
  }
  for (int k = 0; j < len; ++j, ++k) l[k] += double(fm_mul(d[j], d[j]));
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// Pass 1, one block: partial[i] = Σ δ_i² of the (selected) deltas.
FM_TARGET_CLONES void sce_sums_block(const SceArgs& a, const float* var, float th, bool select, int64_t off,
                                     int64_t len, float* rows, double* partial) {
  const int T = a.num_inputs;
  float* b = rows;
  float* d = b + 4 * kBlock;
  load_deltas(a, off, len, b, d);
  if (select) apply_keep(var + off, th, T, len, d);
  for (int i = 0; i < T; ++i) partial[i] = sum_squares(d + int64_t(i) * kBlock, len);
}

// Pass 2, one block: election on the (selected) deltas, the weighted disjoint mean, base, store.
FM_TARGET_CLONES void sce_merge_block(const SceArgs& a, const float* var, float th, bool select, const float* w,
                                      int64_t off, int64_t len, float* rows) {
  const int T = a.num_inputs;
  float* b = rows;
  float* tot = b + kBlock;
  float* num = tot + kBlock;
  float* den = num + kBlock;
  float* d = den + kBlock;
  load_deltas(a, off, len, b, d);
  if (select) apply_keep(var + off, th, T, len, d);
  for (int64_t j = 0; j < len; ++j) tot[j] = 0.0f;
  for (int i = 0; i < T; ++i) {
    const float* di = d + int64_t(i) * kBlock;
    for (int64_t j = 0; j < len; ++j) tot[j] = fm_add(tot[j], di[j]);
  }
  for (int64_t j = 0; j < len; ++j) {
    tot[j] = gta::majority(tot[j]);  // NaN sum: −1, as torch.where(sum >= 0, 1, −1)
    num[j] = 0.0f;
    den[j] = 0.0f;
  }
  for (int i = 0; i < T; ++i) {
    const float* di = d + int64_t(i) * kBlock;
    const float wi = w[i];
    for (int64_t j = 0; j < len; ++j) {
      // w · agree is a product (a NaN weight stays NaN where the model disagrees), as in the reference
      const float aw = fm_mul(wi, gta::agrees(di[j], tot[j]) ? 1.0f : 0.0f);
      num[j] = fm_add(num[j], fm_mul(di[j], aw));
      den[j] = fm_add(den[j], aw);
    }
  }
  const float floor = float(kTiny);  // clamp(min=1e-6) on an fp32 tensor compares with fp32(1e-6)
  for (int64_t j = 0; j < len; ++j) {
    const float dv = den[j] < floor ? floor : den[j];  // NaN stays NaN, as torch.clamp
    num[j] = fm_add(b[j], fm_div(num[j], dv));
  }
  store_block(a.out, a.out_dtype, off, num, len);
}

}  // namespace

void sce(const SceArgs& a, int threads) {
  const int T = a.num_inputs;
  const int64_t n = a.n;
  if (n <= 0) return;
  SceScratch& sc = tls_sce;
  const int64_t nb = num_blocks(n);
  const int nt = threads_for_elems(threads, n);  // as gtacpu::for_blocks
  gtacpu::grow(sc.rows, sce_rows_per_thread(T) * size_t(nt));
  float* rows = sc.rows.data();
  const size_t rpt = sce_rows_per_thread(T);

  const bool select = a.select_topk < 1.0;
  float th = 0.0f;
  const float* var = nullptr;
  if (select) {
    gtacpu::grow(sc.var, size_t(n));
    gtacpu::grow(sc.nnz, size_t(nb));
    float* v = sc.var.data();
    int64_t* nz = sc.nnz.data();
    gtacpu::for_blocks(n, threads, [&](int64_t blk, int64_t off, int64_t len, int t) {
      sce_var_block(a, off, len, rows + size_t(t) * rpt, v, nz + blk);
    });
    int64_t nnz = 0;
    for (int64_t blk = 0; blk < nb; ++blk) nnz += nz[blk];
    // topk_count: torch multiplies the int64 count by the Python float in fp32 (both operands rounded to
    // fp32 first, then the product), and int() truncates
    const int64_t k = int64_t(fm_mul(float(nnz), float(a.select_topk)));
    var = v;
    if (k <= 0) {
      th = bits_f32(0x7fc00000u);  // NaN: `v >= th` keeps nothing, every δ becomes δ·0
    } else {
      th = bits_f32(kth_largest_abs_diff(v, F32, nullptr, F32, n, k, threads).bits);  // v >= 0: |v| = v
    }
  }

  // (1) the weights
  gtacpu::grow(sc.partials, size_t(nb) * size_t(T));
  double* partials = sc.partials.data();
  gtacpu::for_blocks(n, threads, [&](int64_t blk, int64_t off, int64_t len, int t) {
    sce_sums_block(a, var, th, select, off, len, rows + size_t(t) * rpt, partials + size_t(blk) * size_t(T));
  });
  std::vector<double> energy(static_cast<size_t>(T), 0.0);
  for (int64_t blk = 0; blk < nb; ++blk)  // block order: thread-count independent
    for (int i = 0; i < T; ++i) energy[size_t(i)] += partials[size_t(blk) * size_t(T) + size_t(i)];
  double total = 0.0;
  for (int i = 0; i < T; ++i) {
    energy[size_t(i)] /= double(n);
    total += energy[size_t(i)];
  }
  std::vector<float> w(static_cast<size_t>(T));
  const bool uniform = (total < 0 ? -total : total) < kTiny;  // false for NaN, as Python's abs(nan) < 1e-6
  for (int i = 0; i < T; ++i) w[size_t(i)] = uniform ? float(1.0 / double(T)) : float(energy[size_t(i)] / total);

  // (2) the merge
  const float* wp = w.data();
  gtacpu::for_blocks(n, threads, [&](int64_t, int64_t off, int64_t len, int t) {
    sce_merge_block(a, var, th, select, wp, off, len, rows + size_t(t) * rpt);
  });
}

size_t sce_scratch_bytes() { return tls_sce.bytes(); }

}  // namespace cpu
}  // namespace fastmerge
