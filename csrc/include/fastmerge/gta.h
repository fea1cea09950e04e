// fastmerge/gta.h: the generalized-task-arithmetic tail shared by ties, dare_*, breadcrumbs* and della*,
// per element, host and device (csrc/cpu/*.cpp and csrc/cuda/ties.cu include it), mirroring
// fastmerge/methods/gta.py op for op (fp32, one rounding per operation, no FMA):
//
//     δ_i  = x_i − b
//     wd_i = keep_i ? (rescaled_i ? w_i · (δ_i · f_i) : w_i · δ_i) : +0.0f     (f_i = ‖δ_i‖₁ / ‖keep_i·δ_i‖₁)
//     consensus NONE:       num = Σ_i wd_i (from +0.0f, model order)
//                           normalize: num = num / D,  D = fp32 Σ w_i (in order), |D| < 1e-8 → 1
//     consensus SUM/COUNT:  tot = Σ_i wd_i  (SUM)  or  Σ_i sign(wd_i)  (COUNT), from +0.0f
//                           maj = tot >= 0 ? +1 : −1;  a_i = sign(wd_i) == maj (0 and NaN never agree)
//                           num = Σ_i (a_i ? wd_i : 0),  div = Σ_i (a_i ? w_i : 0)
//                           normalize: num = num / (div == 0 ? 1 : div)
//     λ != 1:  num = num · λ
//     out  = b + num
//
// The rescale factor f_i comes from two L1 norms over the whole tensor. The kernels sum them in double (8
// fixed lanes per 1024-element block, block partials added in block order: the same bits for any thread
// count) and round each norm once to fp32, which is the correctly rounded norm up to ~1e-12 relative. torch's
// fp32 `abs().sum()` (the reference) carries ~1e-7 relative error instead, so with rescale on, f_i (one fp32
// value per model) may differ from the reference's by a few fp32 ulp, and outputs by as much (see the
// tests' tolerances); where both sums are exact (e.g. deltas that are multiples of 1/4) outputs are equal.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastmerge/common.h"

namespace fastmerge {
namespace gta {

// The codes of the Python API: ties' election "sum" = 0, "count" = 1; 2 = no consensus (a weighted sum).
enum Consensus : int { SUM = 0, COUNT = 1, NONE = 2 };

// mergekit's rescale guard: no rescale when either L1 norm (as fp32) is below 1e-7 (RESCALE_EPS of gta.py).
// The reference compares an fp32 tensor with the double 1e-7; fp32(1e-7) is just above 1e-7, so `< 1e-7f`
// gives the same answer for every fp32 norm.
constexpr float kRescaleEps = 1e-7f;

// torch.sign: −1, 0 or +1; NaN for NaN (so that a NaN propagates through a "count" election as in torch).
FM_HOST_DEVICE float sign(float v) { return v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : (v == 0.0f ? 0.0f : v)); }

// w·δ' of one element (see the header comment). The rescaled product rounds δ·f first, then w·(δ·f),
// as `torch.where(keep, w * (masked * factor), 0.0)`.
FM_HOST_DEVICE float weighted_kept(float d, float w, bool keep, bool rescaled, float factor) {
  return keep ? (rescaled ? fm_mul(w, fm_mul(d, factor)) : fm_mul(w, d)) : 0.0f;
}

FM_HOST_DEVICE float elect_add(float tot, float wd, int consensus) {
  return fm_add(tot, consensus == COUNT ? sign(wd) : wd);
}

FM_HOST_DEVICE float majority(float tot) { return tot >= 0.0f ? 1.0f : -1.0f; }

FM_HOST_DEVICE bool agrees(float wd, float maj) { return sign(wd) == maj; }

// Loop-invariant scalars of the epilogue, already rounded to fp32.
struct Tail {
  int consensus;   // SUM, COUNT or NONE
  bool normalize;  // divide by the (agreeing) weights' sum
  float divisor;   // NONE + normalize: fp32 Σ w_i, 1 when |Σ| < 1e-8
  float lam;       // used when scale
  bool scale;      // λ != 1
};

FM_HOST_DEVICE float finish(float num, float div, float b, const Tail& t) {
  if (t.normalize) num = fm_div(num, t.consensus == NONE ? t.divisor : (div == 0.0f ? 1.0f : div));
  if (t.scale) num = fm_mul(num, t.lam);
  return fm_add(b, num);
}

// The rescale decision from the two norms (accumulated in double): each rounded once to fp32, then the
// guard and one fp32 division, as `before / after` on two fp32 0-dim tensors.
struct Scale {
  bool rescaled;
  float factor;
};

FM_HOST_DEVICE Scale l1_scale(double sum_all, double sum_kept) {
  const float before = float(sum_all);
  const float after = float(sum_kept);
  Scale s;
  s.rescaled = !(before < kRescaleEps || after < kRescaleEps);  // NaN norms rescale (to NaN), as torch
  s.factor = s.rescaled ? fm_div(before, after) : 1.0f;
  return s;
}

// Host: the epilogue scalars from the Python-level values. `w` are the weights already rounded to fp32.
inline Tail make_tail(int consensus, bool normalize, double lam, const float* w, int num_inputs) {
  Tail t{};
  t.consensus = consensus;
  t.normalize = normalize;
  // weight_divisor of methods/linear.py: fp32 sum of the fp32 weights in model order, from +0.
  float d = 0.0f;
  for (int i = 0; i < num_inputs; ++i) d = fm_add(d, w[i]);
  t.divisor = (double(d) < 0 ? -double(d) : double(d)) < 1e-8 ? 1.0f : d;
  t.lam = float(lam);
  t.scale = lam != 1.0;
  return t;
}

}  // namespace gta

// ---------------------------------------------------------------------------------------------------------
// Argument blocks of the entry points (host side; the bindings fill and check them, see bind_cpu.cpp).

// What every generalized-task-arithmetic kernel takes.
struct GtaArgs {
  void* out;
  int out_dtype;
  int64_t n;
  int num_inputs;
  const void* const* inputs;
  const int* input_dtypes;
  const float* weights;  // rounded to fp32
  const void* base;      // required
  int base_dtype;
  gta::Tail tail;
  bool rescale;  // L1-rescale each sparsified delta
};

// ties: keep the k_i = max(1, int(density_i·n)) largest |δ_i| (density >= 1: all, still rescaled, as the
// reference's all-ones mask); exact_k: exactly k, ties at the threshold by index order.
struct TiesArgs {
  GtaArgs g;
  const double* densities;
  bool exact_k;
};

// dare_linear / dare_ties: keep element j of model i iff u_i(j) < fp32(density_i); density >= 1: whole.
struct DareArgs {
  GtaArgs g;
  const double* densities;
  uint64_t seed;
  uint64_t key;
};

// della / della_linear: per row (outer × inner rows of row_len elements; element c of row (o, q) is at
// o·row_len·inner + c·inner + q), keep probability (density − ε) + 2ε·rank/(row_len − 1).
struct DellaArgs {
  GtaArgs g;
  const double* densities;
  const double* epsilons;
  uint64_t seed;
  uint64_t key;
  int64_t outer;
  int64_t row_len;
  int64_t inner;
  const int* key_dtypes;  // per model: the dtype |δ| is rounded to before ranking (F32, F16 or BF16)
};

// breadcrumbs / breadcrumbs_ties: keep the band of ascending |δ| ranks [n_bot, n_bot + target).
struct BreadcrumbsArgs {
  GtaArgs g;
  const double* densities;
  const double* gammas;
  bool exact;  // selection "topk": exactly target entries, ties by index order
};

namespace cpu {
// `threads`: 0 = OpenMP default; results do not depend on it. The caller releases the GIL.
void ties(const TiesArgs& a, int threads);
void dare(const DareArgs& a, int threads);
void della(const DellaArgs& a, int threads);
void breadcrumbs(const BreadcrumbsArgs& a, int threads);
// Bytes of the calling thread's grow-only scratch (selection, blocks, masks, norms).
size_t gta_scratch_bytes();
}  // namespace cpu

namespace cuda {
// Most inputs one launch takes: the pointers travel by value in the kernel's parameter block.
constexpr int kMaxInputs = 32;
// Device pointers; asynchronous on `stream` (a cudaStream_t): every decision is taken on the device.
// `scratch`: device memory of at least ties_scratch_bytes(n, num_inputs) bytes, owned by the caller (a torch
// tensor: PyTorch's caching allocator, counted in its statistics and in the engine's memory budget).
// Returns a cudaError_t.
int ties(const TiesArgs& a, void* scratch, size_t scratch_bytes, void* stream);
// Device scratch one ties() call needs for n elements and num_inputs models.
size_t ties_scratch_bytes(int64_t n, int num_inputs);
// cudaSuccess if this binary holds code (SASS or PTX) that the current device can run, else the
// cudaError_t of asking (cudaErrorNoKernelImageForDevice when built for other architectures).
int check_kernel_image();
}  // namespace cuda

}  // namespace fastmerge
