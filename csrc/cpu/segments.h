// Kernels over many consecutive segments of packed buffers, each segment merged as its own tensor.
#pragma once

#include <cstdint>

#include "fastmerge/gta.h"

namespace fastmerge {
namespace cpu {

// TIES on segments [offsets[s], offsets[s + 1]) of every buffer of `a` (a.g.n unused), s < num_segments;
// offsets[0] == 0, non-decreasing; no FP8 operand (std::invalid_argument). Bit-identical to one ties() call
// per segment.
void ties_segments(const TiesArgs& a, const int64_t* offsets, int64_t num_segments, int threads);

}  // namespace cpu
}  // namespace fastmerge
