// CPU kernel of PEFT's TIES / magnitude_prune merge step (peft.utils.merge_utils semantics, see
// fastmerge/lora/merge_utils.py), on K separate input tensors (no stacked copy).
#pragma once

#include <cstdint>

namespace fastmerge {
namespace cpu {

// How input i is pruned: element j is kept iff all, or |x| > th, or (|x| == th and j <= cut). A kept element
// enters as x * 1, a dropped one as x * 0 (so a dropped NaN or inf stays a NaN, as in torch's `x * mask`).
struct PeftRule {
  float th;
  int64_t cut;
  bool all;
};

enum PeftMode : int { PEFT_TOTAL = 0, PEFT_FREQUENCY = 1, PEFT_WEIGHTED_SUM = 2 };

struct PeftArgs {
  float* out;                   // n fp32 outputs
  int64_t n;
  int num_inputs;               // 1..kPeftMaxInputs
  const void* const* inputs;
  const int* dtypes;            // F32 / F16 / BF16
  const PeftRule* rules;
  const float* weights;         // fp32, as torch's `stack * tensor(weights)` rounds them
  int mode;                     // PeftMode
  int sum_dtype;                // dtype torch rounds the majority sum to (the inputs' dtype)
  // Elements whose sums torch adds in its 4-way interleaved order (row_sum) instead of in input order: for
  // the majority sum (a) and the weighted sums (c), [start, end) pairs (fastmerge/lora/merge_utils.py).
  const int64_t* ilp_a;
  int num_ilp_a;
  const int64_t* ilp_c;
  int num_ilp_c;
};

// torch.sum(dim=0) over more than 16 rows switches to its cascade (chunks of 16); not modelled.
constexpr int kPeftMaxInputs = 16;

// PEFT's exactly-k magnitude pruning thresholds of K inputs in one read (kth_largest_abs_diff_multi), k in
// [1, n − 1]. status[i]: 0 = rules[i] gives the same kept set as the torch path; 1 = the torch path's topk
// decides (the k-th |x| is a NaN, fewer than k pass |x| >= th because of NaNs, or ties at th with
// index_ties false).
void peft_prune_rules(const void* const* xs, const int* dtypes, int num_inputs, int64_t n, int64_t k, bool index_ties,
                      PeftRule* rules, int* status, int threads);

void peft_merge(const PeftArgs& a, int threads);

}  // namespace cpu
}  // namespace fastmerge
