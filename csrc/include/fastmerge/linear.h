// fastmerge/linear.h: the per-element formula of `weighted_delta_sum` (csrc/cpu/linear.cpp), written with
// the fm_* operations of common.h so that it compiles for the host and the device alike.
//
// It serves `linear` (no base; divisor = fp32 sum of the weights when normalize) and `task_arithmetic`
// (base; optional divisor; lambda). Per element, in fp32, one rounding per operation, in this order:
//
//     b   = base ? base[j] : 0
//     acc = 0.0f
//     for i in 0..T-1:  base: acc = acc + w_i * (x_i[j] - b)      (product rounded, then the sum)
//                       no base: acc = fma(w_i, x_i[j], acc)        (one rounding, as torch's addcmul_)
//     if divisor != 0:  acc = acc / divisor
//     if lambda  != 1:  acc = acc * lambda
//     if base:          acc = b + acc
//     out[j] = round_to_nearest_even(acc)
//
// This is exactly the op order of the torch references in fastmerge/methods/{linear,task_arithmetic}.py
// (linear: `acc.addcmul_(x, w)`, fused, as mergekit 0.1.5 computes it; task_arithmetic:
// `acc = acc + w * (x - b)`, unfused, as mergekit's stacked multiply-then-sum), starting from a zero
// fp32 tensor, so results are bit-identical. acc starts at +0.0f and the first step really adds.
#pragma once

#include "fastmerge/common.h"

namespace fastmerge {
namespace linear {

// One accumulation step: acc + w * (x - b) with two roundings, or fma(w, x, acc) without a base.
FM_HOST_DEVICE float accumulate(float acc, float w, float x, float b, bool has_base) {
  return has_base ? fm_add(acc, fm_mul(w, fm_sub(x, b))) : fm_fma(w, x, acc);
}

// Loop-invariant scalars of the epilogue, already rounded to fp32.
struct Finish {
  float divisor;  // used when divide
  float lam;      // used when scale
  bool divide;    // divisor != 0
  bool scale;     // lambda != 1
  bool has_base;
};

FM_HOST_DEVICE float finish(float acc, float b, const Finish& f) {
  if (f.divide) acc = fm_div(acc, f.divisor);
  if (f.scale) acc = fm_mul(acc, f.lam);
  return f.has_base ? fm_add(b, acc) : acc;
}

}  // namespace linear

// Entry points (defined in csrc/cpu/linear.cpp and csrc/cuda/linear.cu, bound in csrc/bind_*.cpp). The
// arguments are trusted: the bindings check list lengths and dtype codes, the Python wrappers check the
// tensors behind the pointers.
struct WdsArgs {
  void* out;
  int out_dtype;
  int64_t n;
  int num_inputs;
  const void* const* inputs;  // num_inputs pointers
  const int* input_dtypes;    // num_inputs dtype codes
  const float* weights;       // num_inputs weights, already rounded to fp32
  const void* base;           // nullptr: no base
  int base_dtype;
  linear::Finish fin;
};

// The argument block, filled the same way by the CPU and the CUDA bindings (host code only).
inline WdsArgs make_wds_args(void* out, int out_dtype, int64_t n, int num_inputs, const void* const* inputs,
                             const int* input_dtypes, const float* weights, const void* base, int base_dtype,
                             double divisor, double lam) {
  WdsArgs a{};
  a.out = out;
  a.out_dtype = out_dtype;
  a.n = n;
  a.num_inputs = num_inputs;
  a.inputs = inputs;
  a.input_dtypes = input_dtypes;
  a.weights = weights;
  a.base = base;
  a.base_dtype = base_dtype;
  a.fin.divisor = static_cast<float>(divisor);
  a.fin.divide = divisor != 0.0;
  a.fin.lam = static_cast<float>(lam);
  a.fin.scale = lam != 1.0;
  a.fin.has_base = base != nullptr;
  return a;
}

namespace cpu {
// `threads`: 0 = OpenMP default. The caller releases the GIL.
void weighted_delta_sum(const WdsArgs& a, int threads);
}  // namespace cpu

}  // namespace fastmerge
