// fastmerge/ties.h: the per-element formulas of fused TIES (trim, elect sign, disjoint merge), shared by
// the CPU kernel (csrc/cpu/ties.cpp) and any CUDA kernel, mirroring fastmerge/methods/ties.py op for op.
//
// Per element j, with th_i the k_i-th largest |δ_i| of the whole tensor (found beforehand, see
// csrc/cpu/select.h) and T models in order:
//
//     δ_i  = x_i − b
//     m_i  = keep_all_i  or  |δ_i| > th_i  or  (|δ_i| == th_i and tie_ok_i(j))
//     wd_i = m_i ? w_i · δ_i : +0.0f
//     tot  = Σ_i wd_i        (election "sum")    or    Σ_i sign(wd_i)   (election "count"), from +0.0f
//     maj  = tot >= 0 ? +1 : −1
//     a_i  = sign(wd_i) == maj                   (sign(0) = 0 never agrees; a NaN never agrees)
//     num  = Σ_i (a_i ? wd_i : 0.0f)             div = Σ_i (a_i ? w_i : 0.0f)      (both from +0.0f)
//     if normalize: num = num / (div == 0 ? 1 : div)
//     if λ != 1:    num = num · λ
//     out  = b + num
//
// tie_ok_i(j) is "true" in threshold mode (every |δ| equal to the threshold is kept) and "j <= cut_i" in
// exact-k mode, where cut_i is the index of the (k_i − #{|δ_i| > th_i})-th element equal to th_i.
// The additions of 0.0f are real additions (−0 + 0 = +0), as torch.where(..., 0.0) followed by `+`.
#pragma once

#include <cstddef>

#include "fastmerge/common.h"

namespace fastmerge {
namespace ties {

enum Election : int { SUM = 0, COUNT = 1 };

// torch.sign: −1, 0 or +1, and NaN for NaN (so that a NaN propagates through a "count" election the way
// it does in the reference).
FM_HOST_DEVICE float sign(float v) { return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : (v == 0.0f ? 0.0f : v)); }

// The trimmed, weighted delta of one model at one element. `d` is x − b (already computed, fp32).
// Comparisons are float comparisons, as in the reference (`mag >= threshold`): a NaN |δ| is never kept
// by a threshold, and a NaN threshold keeps nothing.
FM_HOST_DEVICE float trimmed(float d, float w, float th, bool keep_all, bool tie_ok) {
  const float a = bits_f32(abs_bits(d));
  const bool keep = keep_all || a > th || (a == th && tie_ok);
  return keep ? fm_mul(w, d) : 0.0f;
}

FM_HOST_DEVICE float elect_add(float tot, float wd, int election) {
  return fm_add(tot, election == COUNT ? sign(wd) : wd);
}

FM_HOST_DEVICE float majority(float tot) { return tot >= 0.0f ? 1.0f : -1.0f; }

FM_HOST_DEVICE bool agrees(float wd, float maj) { return sign(wd) == maj; }

struct Finish {
  float lam;  // used when scale
  bool normalize;
  bool scale;  // lambda != 1
};

FM_HOST_DEVICE float finish(float num, float div, float b, const Finish& f) {
  if (f.normalize) num = fm_div(num, div == 0.0f ? 1.0f : div);
  if (f.scale) num = fm_mul(num, f.lam);
  return fm_add(b, num);
}

}  // namespace ties

// Entry point (csrc/cpu/ties.cpp, bound in csrc/bind_cpu.cpp; arguments checked there).
struct TiesArgs {
  void* out;
  int out_dtype;
  int64_t n;
  int num_inputs;
  const void* const* inputs;
  const int* input_dtypes;
  const float* weights;     // rounded to fp32
  const double* densities;  // in (0, +inf); >= 1 keeps everything
  const void* base;         // required
  int base_dtype;
  ties::Finish fin;
  int election;  // ties::SUM or ties::COUNT
  bool exact_k;  // false: keep every |δ| >= th; true: exactly k, ties at th broken by index order
};

namespace cpu {
void ties(const TiesArgs& a, int threads);
// Bytes of the calling thread's grow-only scratch (selection histograms + fused-pass blocks).
size_t ties_scratch_bytes();
}  // namespace cpu

}  // namespace fastmerge
