// CUDA kernel of weighted_delta_sum (linear, task_arithmetic): the formula is fastmerge/linear.h, the
// same header the CPU kernel uses, so the two produce the same bits (fm_add/fm_mul/... are __f*_rn
// intrinsics on the device: never contracted to FMA).
//
// One thread per element in a grid-stride loop: consecutive threads touch consecutive elements of every
// operand, so each warp's loads and stores are coalesced. The dtype of each operand is uniform across the
// launch, so the dtype switch in load_f32/store_f32 never diverges within a warp.
#include <cuda_runtime.h>

#include "fastmerge/common.h"
#include "fastmerge/linear.h"

namespace fastmerge {
namespace cuda {
namespace {

// Passed by value in the kernel parameter block (about 0.6 KiB with kMaxInputs = 32; the limit is 4 KiB),
// so a launch needs no device-side copy of the pointer list.
struct DevArgs {
  const void* inputs[kMaxInputs];
  float weights[kMaxInputs];
  int dtypes[kMaxInputs];
  void* out;
  const void* base;
  int64_t n;
  int num_inputs;
  int out_dtype;
  int base_dtype;
  linear::Finish fin;
};

__global__ void wds_kernel(const DevArgs a) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const bool has_base = a.base != nullptr;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < a.n; j += stride) {
    const float b = has_base ? load_f32(a.base, a.base_dtype, j) : 0.0f;
    float acc = 0.0f;
    for (int i = 0; i < a.num_inputs; ++i) {
      acc = linear::accumulate(acc, a.weights[i], load_f32(a.inputs[i], a.dtypes[i], j), b, has_base);
    }
    store_f32(a.out, a.out_dtype, j, linear::finish(acc, b, a.fin));
  }
}

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU (132 SMs x 2048 threads / 256 = 1056 blocks on an H100) several
// times over; larger tensors are covered by the grid-stride loop.
constexpr int64_t kMaxBlocks = 8192;

}  // namespace

int weighted_delta_sum(const WdsArgs& a, void* stream) {
  if (a.n <= 0) return int(cudaSuccess);
  if (a.num_inputs < 1 || a.num_inputs > kMaxInputs) return int(cudaErrorInvalidValue);
  DevArgs d{};
  for (int i = 0; i < a.num_inputs; ++i) {
    d.inputs[i] = a.inputs[i];
    d.weights[i] = a.weights[i];
    d.dtypes[i] = a.input_dtypes[i];
  }
  d.out = a.out;
  d.base = a.base;
  d.n = a.n;
  d.num_inputs = a.num_inputs;
  d.out_dtype = a.out_dtype;
  d.base_dtype = a.base_dtype;
  d.fin = a.fin;
  int64_t blocks = (a.n + kThreadsPerBlock - 1) / kThreadsPerBlock;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  wds_kernel<<<unsigned(blocks), kThreadsPerBlock, 0, static_cast<cudaStream_t>(stream)>>>(d);
  return int(cudaGetLastError());
}

int check_kernel_image() {
  cudaFuncAttributes attr;
  return int(cudaFuncGetAttributes(&attr, wds_kernel));
}

}  // namespace cuda
}  // namespace fastmerge
