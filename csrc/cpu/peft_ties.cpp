// CPU kernel of PEFT's TIES merge step (and magnitude_prune's weighted sum), bit-identical to the torch code
// of fastmerge/lora/merge_utils.py (which is bit-identical to peft.utils.merge_utils):
//
//   p_i   = x_i * keep_i                       (keep_i from PeftRule: threshold, tie cut)
//   maj   = Σ_i p_i >= 0 ? 1 : −1              ("total"; "frequency": Σ_i sign(p_i)), UNWEIGHTED, the sum
//                                              rounded to the inputs' dtype as torch's bf16/fp16 sum is
//   m_i   = sign(p_i) == maj                   (a zero or NaN p_i never agrees)
//   out   = Σ_i ((p_i · w_i) · m_i) / max(Σ_i m_i, 1)    in fp32
//
// The torch path makes ~30 full passes over a stacked copy of the K inputs (stack, abs, compare, multiply,
// sign, where, three sums, clamp, divide: 14.7 s of a 17 s ties_svd call on 8 ΔW's of a 1B-shaped layer);
// here the inputs are read once per block of 1024 elements into K fp32 rows (K·4 KiB, L1/L2-resident) and
// every step runs on those rows.
//
// Summation order: torch's sum(dim=0) over the stacked [K, n] tensor adds the K rows in input order from +0
// for most columns (multi_row_sum, K <= 16), but in a 4-way interleaved order (row_sum: four partial sums
// of rows k, k+4, ..., the leftover rows into the first, then p0+p1+p2+p3) for the last columns of each
// thread's chunk that do not fill 4 vectors. The Python side computes those element ranges from torch's
// chunking; the block pass adds in input order and a serial fix-up recomputes the few elements in the
// ranges (at most 4·vector lanes − 1 per torch thread) with the interleaved order.
#include "peft_ties.h"

#include <cmath>
#include <vector>

#include "fastmerge/common.h"
#include "select.h"

namespace fastmerge {
namespace cpu {
namespace {

thread_local std::vector<float> tls_rows;  // per OpenMP worker: K rows of kBlock fp32 (grow-only)

// sign(p) == maj for maj = ±1: torch compares sign(p) (1, −1, 0; 0 for NaN) with where(s >= 0, 1, −1)
FM_ALWAYS_INLINE bool agrees(float p, bool pos) { return pos ? p > 0.0f : p < 0.0f; }

FM_ALWAYS_INLINE float round_to(float s, int dt) {
  // torch's bf16/fp16 sum accumulates in fp32 and stores into the bf16/fp16 output; the sign cannot change
  // (a nonzero sum of bf16/fp16 values is at least their smallest subnormal in magnitude), but the compare
  // is on the rounded value, so round as torch does.
  if (dt == BF16) return bf16_to_f32(f32_to_bf16(s));
  if (dt == F16) return f16_to_f32(f32_to_f16(s));
  return s;
}

// torch's row_sum order for K values (SumKernel.cpp, ilp_factor 4)
FM_ALWAYS_INLINE float ilp_sum(const float* v, int K) {
  float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int m = K / 4;
  for (int r = 0; r < m; ++r)
    for (int k = 0; k < 4; ++k) p[k] = fm_add(p[k], v[4 * r + k]);
  for (int i = 4 * m; i < K; ++i) p[0] = fm_add(p[0], v[i]);
  for (int k = 1; k < 4; ++k) p[0] = fm_add(p[0], p[k]);
  return p[0];
}

FM_ALWAYS_INLINE float seq_sum(const float* v, int K) {
  float s = 0.0f;
  for (int i = 0; i < K; ++i) s = fm_add(s, v[i]);
  return s;
}

FM_ALWAYS_INLINE float pruned(float x, const PeftRule& r, int64_t j) {
  if (r.all) return x;
  const float a = std::fabs(x);
  const bool keep = a > r.th || (a == r.th && j <= r.cut);
  return fm_mul(x, keep ? 1.0f : 0.0f);
}

// One element with a chosen order for each sum: the fix-up of the interleaved-order elements (and the
// reference the block code follows with ilp_a = ilp_c = false).
float element(const PeftArgs& a, int64_t j, bool ilp_a, bool ilp_c) {
  const int K = a.num_inputs;
  float p[kPeftMaxInputs], t[kPeftMaxInputs];
  for (int i = 0; i < K; ++i) p[i] = pruned(load_f32(a.inputs[i], a.dtypes[i], j), a.rules[i], j);
  if (a.mode == PEFT_WEIGHTED_SUM) {
    for (int i = 0; i < K; ++i) t[i] = fm_mul(p[i], a.weights[i]);
    return ilp_c ? ilp_sum(t, K) : seq_sum(t, K);
  }
  float s;
  if (a.mode == PEFT_TOTAL) {
    s = round_to(ilp_a ? ilp_sum(p, K) : seq_sum(p, K), a.sum_dtype);
  } else {
    s = 0.0f;  // small integers: exact in any order
    for (int i = 0; i < K; ++i) s += float(p[i] > 0.0f) - float(p[i] < 0.0f);
  }
  const bool pos = s >= 0.0f;  // NaN: false, −1 as torch.where(NaN >= 0, 1, −1)
  int cnt = 0;
  for (int i = 0; i < K; ++i) {
    const bool m = agrees(p[i], pos);
    cnt += m;
    t[i] = fm_mul(fm_mul(p[i], a.weights[i]), m ? 1.0f : 0.0f);
  }
  const float mixed = ilp_c ? ilp_sum(t, K) : seq_sum(t, K);
  return fm_div(mixed, float(cnt < 1 ? 1 : cnt));
}

FM_TARGET_CLONES void merge_block(const PeftArgs& a, int64_t off, int64_t len, float* rows) {
  alignas(64) float s[kBlock];
  alignas(64) float acc[kBlock];
  alignas(64) float cnt[kBlock];
  const int K = a.num_inputs;
  float* out = a.out + off;
  for (int i = 0; i < K; ++i) {
    float* r = rows + int64_t(i) * kBlock;
    load_block(r, a.inputs[i], a.dtypes[i], off, len);
    const PeftRule& ru = a.rules[i];
    if (ru.all) continue;
    const float th = ru.th;
    // The tie cut as a block-local index: all ties kept, none, or up to lc. Three loops so that each
    // vectorises without a per-element index test where none is needed (as ties.cpp).
    const int64_t lc64 = ru.cut - off;
    if (lc64 >= len - 1) {
      for (int64_t j = 0; j < len; ++j) r[j] = r[j] * (std::fabs(r[j]) >= th ? 1.0f : 0.0f);
    } else if (lc64 < 0) {
      for (int64_t j = 0; j < len; ++j) r[j] = r[j] * (std::fabs(r[j]) > th ? 1.0f : 0.0f);
    } else {
      const int lc = int(lc64);
      for (int j = 0; j < int(len); ++j) {
        const float ab = std::fabs(r[j]);
        r[j] = r[j] * ((ab > th || (ab == th && j <= lc)) ? 1.0f : 0.0f);
      }
    }
  }
  for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
  if (a.mode == PEFT_WEIGHTED_SUM) {
    for (int i = 0; i < K; ++i) {
      const float* r = rows + int64_t(i) * kBlock;
      const float w = a.weights[i];
      for (int64_t j = 0; j < len; ++j) acc[j] = acc[j] + r[j] * w;
    }
    for (int64_t j = 0; j < len; ++j) out[j] = acc[j];
    return;
  }
  for (int64_t j = 0; j < len; ++j) s[j] = 0.0f;
  if (a.mode == PEFT_TOTAL) {
    for (int i = 0; i < K; ++i) {
      const float* r = rows + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) s[j] = s[j] + r[j];
    }
    if (a.sum_dtype == BF16) {
      for (int64_t j = 0; j < len; ++j) s[j] = bf16_to_f32(f32_to_bf16(s[j]));
    } else if (a.sum_dtype == F16) {
      for (int64_t j = 0; j < len; ++j) s[j] = f16_to_f32(f32_to_f16(s[j]));
    }
  } else {
    for (int i = 0; i < K; ++i) {
      const float* r = rows + int64_t(i) * kBlock;
      for (int64_t j = 0; j < len; ++j) s[j] = s[j] + ((r[j] > 0.0f ? 1.0f : 0.0f) - (r[j] < 0.0f ? 1.0f : 0.0f));
    }
  }
  // s becomes the elected sign ±1 (NaN >= 0 is false: −1). p agrees with it iff p · sign > 0: exact (a
  // product by ±1), false for zeros and NaN as torch's sign(p) == maj. One compare and two selects per
  // element: the form GCC vectorises (a select between two compares kept this loop scalar, 16x slower).
  for (int64_t j = 0; j < len; ++j) {
    s[j] = s[j] >= 0.0f ? 1.0f : -1.0f;
    cnt[j] = 0.0f;
  }
  for (int i = 0; i < K; ++i) {
    const float* r = rows + int64_t(i) * kBlock;
    const float w = a.weights[i];
    for (int64_t j = 0; j < len; ++j) {
      const float m = r[j] * s[j] > 0.0f ? 1.0f : 0.0f;
      cnt[j] = cnt[j] + m;
      acc[j] = acc[j] + (r[j] * w) * m;
    }
  }
  for (int64_t j = 0; j < len; ++j) out[j] = acc[j] / (cnt[j] < 1.0f ? 1.0f : cnt[j]);
}

bool in_ranges(const int64_t* r, int nr, int64_t j) {
  for (int q = 0; q < nr; ++q)
    if (j >= r[2 * q] && j < r[2 * q + 1]) return true;
  return false;
}

}  // namespace

void peft_prune_rules(const void* const* xs, const int* dtypes, int num_inputs, int64_t n, int64_t k, bool index_ties,
                      PeftRule* rules, int* status, int threads) {
  std::vector<KthQuery> q(static_cast<size_t>(num_inputs));
  for (int i = 0; i < num_inputs; ++i) {
    q[i] = KthQuery{i, k, KthAbs{}};
    q[i].want_cut = index_ties;
  }
  kth_largest_abs_diff_multi(xs, dtypes, nullptr, F32, n, q.data(), num_inputs, threads);
  for (int i = 0; i < num_inputs; ++i) {
    const KthAbs& r = q[i].result;
    rules[i] = PeftRule{bits_f32(r.bits), n, false};
    status[i] = 1;
    if ((r.bits & 0x7fffffffu) > 0x7f800000u) continue;  // the k-th |x| is a NaN: topk decides
    // The torch path counts |x| >= th: the larger bit patterns except the NaNs (`NaN >= th` is false), and
    // the equal ones; exactly k is the common case.
    const int64_t above = r.count_above - r.count_nan;
    const int64_t pass = above + r.count_equal;
    if (pass == k) {
      status[i] = 0;
    } else if (index_ties && pass > k) {
      // keep the first room tied elements by index, as the torch path's nonzero(|x| == th) cut
      const int64_t room = k - above;
      rules[i].cut = q[i].cut >= 0 ? q[i].cut : nth_equal_abs_diff_index(xs[i], dtypes[i], nullptr, F32, n, rules[i].th, room, threads);
      status[i] = 0;
    }
  }
}

void peft_merge(const PeftArgs& a, int threads) {
  const int K = a.num_inputs;
  for_each_block(a.n, threads, [&a, K](int64_t off, int64_t len) {
    if (tls_rows.size() < size_t(K) * size_t(kBlock)) tls_rows.resize(size_t(K) * size_t(kBlock));
    merge_block(a, off, len, tls_rows.data());
  });
  // the elements torch sums in its interleaved order (a few per torch thread chunk)
  for (int q = 0; q < a.num_ilp_a; ++q)
    for (int64_t j = a.ilp_a[2 * q]; j < a.ilp_a[2 * q + 1]; ++j)
      a.out[j] = element(a, j, true, in_ranges(a.ilp_c, a.num_ilp_c, j));
  for (int q = 0; q < a.num_ilp_c; ++q)
    for (int64_t j = a.ilp_c[2 * q]; j < a.ilp_c[2 * q + 1]; ++j)
      if (!in_ranges(a.ilp_a, a.num_ilp_a, j)) a.out[j] = element(a, j, false, true);  // else done above
}

}  // namespace cpu
}  // namespace fastmerge
