// CUDA kernel of fused TIES: the same per-element formulas as the CPU kernel (fastmerge/ties.h for the
// trim, fastmerge/gta.h for the weights, sign election, disjoint mean, λ and base; fm_* are __f*_rn
// intrinsics on the device, never contracted to FMA), so both give the same bits for the same thresholds.
//
// Per call (device pointers, synchronous on `stream`):
//  (1) thresholds: the k_i-th largest |δ_i| of every trimmed model by a radix select on the fp32 bit
//      patterns of |δ| (non-negative floats order like their bits; NaN above +inf, as torch.kthvalue):
//      three histogram passes of 11, 11 and 10 bits, all models in one launch per pass (blockIdx.y), each
//      block counting in shared memory; the host reads the 2048-bin histograms back and picks the bin;
//  (2) exact-k only, when more elements equal a threshold than there is room for: per-chunk tie counts,
//      a host prefix sum, and a host scan of the one chunk holding the cut (the same load/sub/abs
//      formulas, compiled for the host from common.h);
//  (3) rescale only: per-block double partial L1 norms, added on the host in block order;
//  (4) one fused elementwise pass.
// Scratch device memory is the caller's (a torch tensor of ties_scratch_bytes(n, T) bytes): no cudaMalloc here,
// so no cudaFree that synchronises the whole device, no process-wide mutex, and the bytes are in torch's
// allocator statistics and the GPU engine's --max-gpu-memory budget.
//
// Not run in this repository's CI (no GPU there): tests/native/test_native_ties.py::test_cuda_ties_matches_reference
// checks it against the torch reference wherever a GPU is present.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "fastmerge/ties.h"

namespace fastmerge {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;  // 2048 uint32 counters: 8 KiB of shared memory per block
constexpr int64_t kMaxBlocks = 4096;
constexpr int64_t kChunk = 4096;  // elements per tie-count chunk (exact-k cut)

// Passed by value (kernel parameter block, < 4 KiB).
struct DevModels {
  const void* x[kMaxInputs];
  int dtype[kMaxInputs];
  float w[kMaxInputs];
  float th[kMaxInputs];
  int64_t cut[kMaxInputs];  // ties kept for index <= cut
  uint8_t all[kMaxInputs];  // density >= 1: keep every entry
  uint8_t rescaled[kMaxInputs];
  float factor[kMaxInputs];
};

struct DevSelect {
  const void* x[kMaxInputs];
  int dtype[kMaxInputs];
  uint32_t prefix_mask;          // bits already decided (same for all models of a pass)
  uint32_t prefix[kMaxInputs];   // their value, per model
};

__device__ __forceinline__ uint32_t absdiff_bits(const void* x, int xdt, const void* b, int bdt, int64_t j) {
  return abs_bits(fm_sub(load_f32(x, xdt, j), load_f32(b, bdt, j)));
}

// Histogram of the digit (bits >> shift) & (kBins − 1) of the elements whose decided bits match, for model
// blockIdx.y; NaNs counted on the first pass.
__global__ void hist_kernel(DevSelect s, const void* base, int bdt, int64_t n, int shift, uint32_t digit_mask,
                            unsigned long long* hist, unsigned long long* nans) {
  __shared__ unsigned int h[kBins];
  __shared__ unsigned int nn;
  const int m = blockIdx.y;
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) h[i] = 0;
  if (threadIdx.x == 0) nn = 0;
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const uint32_t pm = s.prefix_mask, pv = s.prefix[m];
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const uint32_t bits = absdiff_bits(s.x[m], s.dtype[m], base, bdt, j);
    if ((bits & pm) == pv) atomicAdd(&h[(bits >> shift) & digit_mask], 1u);
    if (nans != nullptr && bits > 0x7f800000u) atomicAdd(&nn, 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
    if (h[i] != 0) atomicAdd(&hist[size_t(m) * kBins + i], (unsigned long long)h[i]);
  }
  if (nans != nullptr && threadIdx.x == 0 && nn != 0) atomicAdd(&nans[m], (unsigned long long)nn);
}

// Ties (|δ| == th, float comparison) per chunk of kChunk elements, model blockIdx.y; one block per chunk.
__global__ void tie_count_kernel(DevSelect s, const void* base, int bdt, int64_t n, const float* th,
                                 unsigned int* counts, int64_t chunks) {
  __shared__ unsigned int c;
  const int m = blockIdx.y;
  for (int64_t ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    if (threadIdx.x == 0) c = 0;
    __syncthreads();
    unsigned int mine = 0;
    const int64_t end = (ch + 1) * kChunk < n ? (ch + 1) * kChunk : n;
    for (int64_t j = ch * kChunk + threadIdx.x; j < end; j += blockDim.x) {
      mine += bits_f32(absdiff_bits(s.x[m], s.dtype[m], base, bdt, j)) == th[m];
    }
    atomicAdd(&c, mine);
    __syncthreads();
    if (threadIdx.x == 0) counts[size_t(m) * chunks + ch] = c;
    __syncthreads();
  }
}

// Per-block L1 norms (‖δ‖₁, ‖kept δ‖₁) of model blockIdx.y, in double.
__global__ void norms_kernel(DevModels mdl, const void* base, int bdt, int64_t n, double* partial) {
  __shared__ double s_all[kThreads];
  __shared__ double s_kept[kThreads];
  const int m = blockIdx.y;
  double all = 0.0, kept = 0.0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float d = fm_sub(load_f32(mdl.x[m], mdl.dtype[m], j), load_f32(base, bdt, j));
    const double a = double(bits_f32(abs_bits(d)));
    all += a;
    if (mdl.all[m] || ties::kept(d, mdl.th[m], j <= mdl.cut[m])) kept += a;
  }
  s_all[threadIdx.x] = all;
  s_kept[threadIdx.x] = kept;
  __syncthreads();
  for (int h = blockDim.x / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) {
      s_all[threadIdx.x] += s_all[threadIdx.x + h];
      s_kept[threadIdx.x] += s_kept[threadIdx.x + h];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    partial[(size_t(blockIdx.x) * gridDim.y + m) * 2] = s_all[0];
    partial[(size_t(blockIdx.x) * gridDim.y + m) * 2 + 1] = s_kept[0];
  }
}

// The fused pass, one thread per element: the CPU's gtacpu::merge_block + tail_block, element by element,
// in the same op order. No per-thread array: the election's second loop recomputes w·δ' of each model
// from the same load (an L1 hit) by the same formula, so the bits are those of the first loop, and the
// kernel keeps no local memory (it held `float wd[32]` in a 128-byte stack frame: STL/LDL per element;
// tests/kernels/test_cuda_ptxas.py asserts a zero stack frame with `nvcc -Xptxas -v`).
__device__ __forceinline__ float merge_wd(const DevModels& mdl, int i, float b, int64_t j) {
  const float d = fm_sub(load_f32(mdl.x[i], mdl.dtype[i], j), b);
  const bool keep = mdl.all[i] || ties::kept(d, mdl.th[i], j <= mdl.cut[i]);
  return gta::weighted_kept(d, mdl.w[i], keep, mdl.rescaled[i] != 0, mdl.factor[i]);
}

__global__ void merge_kernel(DevModels mdl, int T, const void* base, int bdt, void* out, int odt, int64_t n,
                             gta::Tail tail) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float b = load_f32(base, bdt, j);
    float tot = 0.0f;
    for (int i = 0; i < T; ++i) tot = gta::elect_add(tot, merge_wd(mdl, i, b, j), tail.consensus);
    const float maj = gta::majority(tot);
    float num = 0.0f, div = 0.0f;
    for (int i = 0; i < T; ++i) {
      const float wd = merge_wd(mdl, i, b, j);
      const bool ag = gta::agrees(wd, maj);
      num = fm_add(num, ag ? wd : 0.0f);
      div = fm_add(div, ag ? mdl.w[i] : 0.0f);
    }
    store_f32(out, odt, j, gta::finish(num, div, b, tail));
  }
}

#define FM_CUDA_TRY(expr)                  \
  do {                                     \
    const cudaError_t fm_e_ = (expr);      \
    if (fm_e_ != cudaSuccess) return fm_e_; \
  } while (0)

int64_t grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// The scratch layout of one call, for S trimmed models (S <= T): histograms + NaN counts (S·(kBins + 1) u64),
// tie counts (S·chunks u32), thresholds (kMaxInputs f32), norms (grid·T·2 f64, 8-byte aligned).
struct ScratchLayout {
  size_t hist, ties, th, norms, total;
};

ScratchLayout scratch_layout(int64_t n, int S, int T) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  ScratchLayout l{};
  l.hist = size_t(S) * (kBins + 1) * sizeof(unsigned long long);
  l.ties = size_t(S) * size_t(chunks) * sizeof(unsigned int);
  l.th = size_t(kMaxInputs) * sizeof(float);
  l.norms = size_t(grid_for(n)) * size_t(T) * 2 * sizeof(double);
  l.total = l.hist + l.ties + l.th + l.norms + 8;  // + 8: the norms' alignment
  return l;
}

cudaError_t ties_impl(const TiesArgs& a, void* scr, size_t scr_bytes, cudaStream_t stream) {
  const GtaArgs& g = a.g;
  const int64_t n = g.n;
  const int T = g.num_inputs;
  if (n <= 0) return cudaSuccess;
  if (T < 1 || T > kMaxInputs) return cudaErrorInvalidValue;

  DevModels mdl{};
  DevSelect sel{};
  std::vector<int> trimmed;  // models with density < 1
  std::vector<int64_t> k(T, 0);
  for (int i = 0; i < T; ++i) {
    mdl.x[i] = g.inputs[i];
    mdl.dtype[i] = g.input_dtypes[i];
    mdl.w[i] = g.weights[i];
    mdl.all[i] = a.densities[i] >= 1.0;
    mdl.th[i] = 0.0f;
    mdl.cut[i] = n;
    mdl.rescaled[i] = 0;
    mdl.factor[i] = 1.0f;
    if (!mdl.all[i]) {
      trimmed.push_back(i);
      k[i] = ties::keep_count(a.densities[i], n);
    }
  }
  const int S = int(trimmed.size());
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t grid = grid_for(n);
  const ScratchLayout lay = scratch_layout(n, S, T);
  if (scr == nullptr || scr_bytes < lay.total) return cudaErrorInvalidValue;  // the binding checks first
  const size_t hist_bytes = lay.hist, ties_bytes = lay.ties, th_bytes = lay.th, norm_bytes = lay.norms;
  unsigned long long* d_hist = static_cast<unsigned long long*>(scr);
  unsigned long long* d_nans = d_hist + size_t(S) * kBins;
  unsigned int* d_ties = reinterpret_cast<unsigned int*>(d_nans + S);
  float* d_th = reinterpret_cast<float*>(d_ties + size_t(S) * chunks);
  double* d_norms = reinterpret_cast<double*>(
      (reinterpret_cast<uintptr_t>(d_th + kMaxInputs) + 7) & ~uintptr_t(7));

  // (1) radix select, all trimmed models per launch
  if (S > 0) {
    for (int s = 0; s < S; ++s) {
      sel.x[s] = g.inputs[trimmed[s]];
      sel.dtype[s] = g.input_dtypes[trimmed[s]];
      sel.prefix[s] = 0;
    }
    std::vector<int64_t> remaining(S), above(S, 0), equal(S, 0), nans(S, 0);
    for (int s = 0; s < S; ++s) remaining[s] = k[trimmed[s]];
    std::vector<unsigned long long> h(size_t(S) * (kBins + 1));
    const int shifts[3] = {21, 10, 0};
    const uint32_t digit_masks[3] = {0x7ffu, 0x7ffu, 0x3ffu};
    sel.prefix_mask = 0;
    for (int pass = 0; pass < 3; ++pass) {
      FM_CUDA_TRY(cudaMemsetAsync(d_hist, 0, hist_bytes, stream));
      const dim3 blocks = dim3(unsigned(grid), unsigned(S));
      hist_kernel<<<blocks, kThreads, 0, stream>>>(sel, g.base, g.base_dtype, n, shifts[pass], digit_masks[pass],
                                                   d_hist, pass == 0 ? d_nans : nullptr);
      FM_CUDA_TRY(cudaGetLastError());
      FM_CUDA_TRY(cudaMemcpyAsync(h.data(), d_hist, hist_bytes, cudaMemcpyDeviceToHost, stream));
      FM_CUDA_TRY(cudaStreamSynchronize(stream));
      for (int s = 0; s < S; ++s) {
        if (pass == 0) nans[s] = int64_t(h[size_t(S) * kBins + s]);
        const unsigned long long* hs = h.data() + size_t(s) * kBins;
        int64_t cum = 0;
        int bin = 0;
        for (int b = int(digit_masks[pass]); b >= 0; --b) {
          if (cum + int64_t(hs[b]) >= remaining[s]) {
            bin = b;
            break;
          }
          cum += int64_t(hs[b]);
        }
        above[s] += cum;
        remaining[s] -= cum;
        sel.prefix[s] |= uint32_t(bin) << shifts[pass];
        if (pass == 2) equal[s] = int64_t(hs[bin]);
      }
      sel.prefix_mask |= digit_masks[pass] << shifts[pass];
    }
    for (int s = 0; s < S; ++s) mdl.th[trimmed[s]] = bits_f32(sel.prefix[s]);

    // (2) exact-k cut
    if (a.exact_k) {
      std::vector<float> th_host(kMaxInputs, 0.0f);
      std::vector<int> need;
      std::vector<int64_t> room(S, 0);
      for (int s = 0; s < S; ++s) {
        const uint32_t bits = sel.prefix[s];
        if ((bits & 0x7fffffffu) > 0x7f800000u) continue;  // a NaN threshold keeps nothing anyway
        room[s] = k[trimmed[s]] - (above[s] - nans[s]);  // NaN bits rank above but `NaN > th` is false
        th_host[s] = bits_f32(bits);
        if (equal[s] > room[s]) need.push_back(s);
      }
      if (!need.empty()) {
        FM_CUDA_TRY(cudaMemcpyAsync(d_th, th_host.data(), th_bytes, cudaMemcpyHostToDevice, stream));
        const dim3 blocks = dim3(unsigned(chunks < kMaxBlocks ? chunks : kMaxBlocks), unsigned(S));
        tie_count_kernel<<<blocks, kThreads, 0, stream>>>(sel, g.base, g.base_dtype, n, d_th, d_ties, chunks);
        FM_CUDA_TRY(cudaGetLastError());
        std::vector<unsigned int> counts(size_t(S) * chunks);
        FM_CUDA_TRY(cudaMemcpyAsync(counts.data(), d_ties, ties_bytes, cudaMemcpyDeviceToHost, stream));
        FM_CUDA_TRY(cudaStreamSynchronize(stream));
        std::vector<unsigned char> xs(size_t(kChunk) * 4), bs(size_t(kChunk) * 4);
        for (int s : need) {
          const int i = trimmed[s];
          int64_t cum = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) {
            const int64_t c = counts[size_t(s) * chunks + ch];
            if (cum + c < room[s]) {
              cum += c;
              continue;
            }
            // the cut is in this chunk: scan it on the host with the same formulas
            const int64_t off = ch * kChunk;
            const int64_t len = n - off < kChunk ? n - off : kChunk;
            const int xsz = dtype_size(g.input_dtypes[i]), bsz = dtype_size(g.base_dtype);
            FM_CUDA_TRY(cudaMemcpyAsync(xs.data(), static_cast<const char*>(g.inputs[i]) + off * xsz, size_t(len) * xsz,
                                        cudaMemcpyDeviceToHost, stream));
            FM_CUDA_TRY(cudaMemcpyAsync(bs.data(), static_cast<const char*>(g.base) + off * bsz, size_t(len) * bsz,
                                        cudaMemcpyDeviceToHost, stream));
            FM_CUDA_TRY(cudaStreamSynchronize(stream));
            for (int64_t j = 0; j < len; ++j) {
              const float d = fm_sub(load_f32(xs.data(), g.input_dtypes[i], j), load_f32(bs.data(), g.base_dtype, j));
              cum += bits_f32(abs_bits(d)) == th_host[s];
              if (cum == room[s]) {
                mdl.cut[i] = off + j;
                break;
              }
            }
            break;
          }
        }
      }
    }
  }

  // (3) rescale factors (every model, density >= 1 included, as the reference's all-ones mask)
  if (g.rescale) {
    const dim3 blocks = dim3(unsigned(grid), unsigned(T));
    norms_kernel<<<blocks, kThreads, 0, stream>>>(mdl, g.base, g.base_dtype, n, d_norms);
    FM_CUDA_TRY(cudaGetLastError());
    std::vector<double> part(size_t(grid) * T * 2);
    FM_CUDA_TRY(cudaMemcpyAsync(part.data(), d_norms, norm_bytes, cudaMemcpyDeviceToHost, stream));
    FM_CUDA_TRY(cudaStreamSynchronize(stream));
    for (int i = 0; i < T; ++i) {
      double all = 0.0, kept = 0.0;
      for (int64_t b = 0; b < grid; ++b) {
        all += part[(size_t(b) * T + i) * 2];
        kept += part[(size_t(b) * T + i) * 2 + 1];
      }
      const gta::Scale sc = gta::l1_scale(all, kept);
      mdl.rescaled[i] = sc.rescaled;
      mdl.factor[i] = sc.factor;
    }
  }

  // (4) fused merge
  merge_kernel<<<unsigned(grid), kThreads, 0, stream>>>(mdl, T, g.base, g.base_dtype, g.out, g.out_dtype, n, g.tail);
  FM_CUDA_TRY(cudaGetLastError());
  return cudaStreamSynchronize(stream);  // the scratch (and the caller's host arrays) outlive the call
}

}  // namespace

int ties(const TiesArgs& a, void* scratch, size_t scratch_bytes, void* stream) {
  return int(ties_impl(a, scratch, scratch_bytes, static_cast<cudaStream_t>(stream)));
}

size_t ties_scratch_bytes(int64_t n, int num_inputs) {
  return n <= 0 ? 0 : scratch_layout(n, num_inputs, num_inputs).total;  // S <= T trimmed models
}

int check_kernel_image() {
  cudaFuncAttributes attr;
  return int(cudaFuncGetAttributes(&attr, merge_kernel));
}

}  // namespace cuda
}  // namespace fastmerge
