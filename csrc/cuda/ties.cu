// CUDA kernel of fused TIES: the same per-element formulas as the CPU kernel (fastmerge/ties.h for the
// trim, fastmerge/gta.h for the weights, sign election, disjoint mean, λ and base; fm_* are __f*_rn
// intrinsics on the device, never contracted to FMA), so both give the same bits for the same thresholds.
//
// Per call (device pointers, asynchronous on `stream`: every decision is taken on the device, nothing is
// read back, the host never waits; launches that turn out unneeded exit at once):
//  (1) thresholds: the k_i-th largest |δ_i| of every trimmed model by a radix select on the fp32 bit
//      patterns of |δ| (non-negative floats order like their bits; NaN above +inf, as torch.kthvalue):
//      three histogram passes of 11, 11 and 10 bits, all models in one launch per pass (blockIdx.y), each
//      block counting in shared memory; a one-warp scan kernel picks the bin of every model (State);
//  (2) exact-k only, for the models where more elements equal the threshold than there is room for:
//      per-chunk tie counts, then one block per model walks the chunk counts and scans the chunk holding
//      the cut (the same load/sub/abs formulas);
//  (3) rescale only: per-block double partial L1 norms, added in block order by one thread per model;
//  (4) one fused elementwise pass, reading thresholds, cuts and rescale factors from State.
// Scratch device memory is the caller's (a torch tensor of ties_scratch_bytes(n, T) bytes): no cudaMalloc here,
// so no cudaFree that synchronises the whole device, no process-wide mutex, and the bytes are in torch's
// allocator statistics and the GPU engine's --max-gpu-memory budget. The caller's buffers (torch tensors)
// are ordered by the stream, as any torch operation's.
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

// Passed by value (kernel parameter block, < 4 KiB): what the host knows before any data is read.
struct DevModels {
  const void* x[kMaxInputs];
  int dtype[kMaxInputs];
  float w[kMaxInputs];
  uint8_t all[kMaxInputs];  // density >= 1: keep every entry
};

struct DevSelect {
  const void* x[kMaxInputs];  // trimmed model s's input
  int dtype[kMaxInputs];
  int model[kMaxInputs];      // its index i among all models
  int64_t k[kMaxInputs];      // its keep count
  int S;                      // trimmed models
  int exact_k;
};

// What the device decides (in the caller's scratch): per trimmed slot s the selection state, per model i
// what the merge reads. Initialised by init_kernel: th 0, cut n (every tie kept), no rescale.
struct State {
  int64_t remaining[kMaxInputs], above[kMaxInputs], equal[kMaxInputs], nans[kMaxInputs], room[kMaxInputs];
  uint32_t prefix[kMaxInputs];
  int32_t need[kMaxInputs];  // exact-k: the cut of slot s must be searched
  float th_s[kMaxInputs];    // slot s's threshold
  float th[kMaxInputs];      // model i's threshold
  int64_t cut[kMaxInputs];   // model i: ties kept for index <= cut
  float factor[kMaxInputs];
  int32_t rescaled[kMaxInputs];
};

__device__ __forceinline__ uint32_t absdiff_bits(const void* x, int xdt, const void* b, int bdt, int64_t j) {
  return abs_bits(fm_sub(load_f32(x, xdt, j), load_f32(b, bdt, j)));
}

__global__ void init_kernel(DevSelect sel, int64_t n, State* st) {
  const int i = threadIdx.x;
  if (i >= kMaxInputs) return;
  st->th[i] = 0.0f;
  st->cut[i] = n;
  st->factor[i] = 1.0f;
  st->rescaled[i] = 0;
  st->remaining[i] = i < sel.S ? sel.k[i] : 0;
  st->above[i] = st->equal[i] = st->nans[i] = st->room[i] = 0;
  st->prefix[i] = 0;
  st->need[i] = 0;
  st->th_s[i] = 0.0f;
}

// Histogram of the digit (bits >> shift) & (kBins − 1) of the elements whose decided bits match, for slot
// blockIdx.y; NaNs counted on the first pass.
__global__ void hist_kernel(DevSelect s, const void* base, int bdt, int64_t n, int shift, uint32_t digit_mask,
                            uint32_t prefix_mask, const State* st, unsigned long long* hist, unsigned long long* nans) {
  __shared__ unsigned int h[kBins];
  __shared__ unsigned int nn;
  const int m = blockIdx.y;
  for (int i = threadIdx.x; i < kBins; i += blockDim.x) h[i] = 0;
  if (threadIdx.x == 0) nn = 0;
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const uint32_t pm = prefix_mask, pv = st->prefix[m];
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

// One thread per slot: the bin holding the remaining-th largest (from the top), as the host scan it replaces.
__global__ void scan_kernel(DevSelect sel, const unsigned long long* hist, const unsigned long long* nans, int shift,
                            uint32_t digit_mask, int last, State* st) {
  const int s = threadIdx.x;
  if (s >= sel.S) return;
  if (nans != nullptr) st->nans[s] = int64_t(nans[s]);
  const unsigned long long* hs = hist + size_t(s) * kBins;
  int64_t cum = 0;
  int bin = 0;
  for (int b = int(digit_mask); b >= 0; --b) {
    if (cum + int64_t(hs[b]) >= st->remaining[s]) {
      bin = b;
      break;
    }
    cum += int64_t(hs[b]);
  }
  st->above[s] += cum;
  st->remaining[s] -= cum;
  st->prefix[s] |= uint32_t(bin) << shift;
  if (!last) return;
  st->equal[s] = int64_t(hs[bin]);
  const uint32_t bits = st->prefix[s];
  const int i = sel.model[s];
  st->th[i] = st->th_s[s] = bits_f32(bits);
  // exact-k: the entries equal to th that are kept; NaN bits rank above but `NaN > th` is false. A NaN
  // threshold keeps nothing anyway.
  st->room[s] = sel.k[s] - (st->above[s] - st->nans[s]);
  st->need[s] = sel.exact_k && (bits & 0x7fffffffu) <= 0x7f800000u && st->equal[s] > st->room[s];
}

// Ties (|δ| == th, float comparison) per chunk of kChunk elements, slot blockIdx.y; one block per chunk.
// Slots whose cut is not needed exit at once.
__global__ void tie_count_kernel(DevSelect s, const void* base, int bdt, int64_t n, const State* st,
                                 unsigned int* counts, int64_t chunks) {
  __shared__ unsigned int c;
  const int m = blockIdx.y;
  if (!st->need[m]) return;
  const float th = st->th_s[m];
  for (int64_t ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
    if (threadIdx.x == 0) c = 0;
    __syncthreads();
    unsigned int mine = 0;
    const int64_t end = (ch + 1) * kChunk < n ? (ch + 1) * kChunk : n;
    for (int64_t j = ch * kChunk + threadIdx.x; j < end; j += blockDim.x) {
      mine += bits_f32(absdiff_bits(s.x[m], s.dtype[m], base, bdt, j)) == th;
    }
    atomicAdd(&c, mine);
    __syncthreads();
    if (threadIdx.x == 0) counts[size_t(m) * chunks + ch] = c;
    __syncthreads();
  }
}

// One thread per slot with a needed cut: the chunk where the room-th tie falls (counts in index order), then
// the element, by the same formula as the counts.
__global__ void cut_kernel(DevSelect s, const void* base, int bdt, int64_t n, const unsigned int* counts,
                           int64_t chunks, State* st) {
  const int m = threadIdx.x;
  if (m >= s.S || !st->need[m]) return;
  const float th = st->th_s[m];
  const int64_t room = st->room[m];
  int64_t cum = 0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c = counts[size_t(m) * chunks + ch];
    if (cum + c < room) {
      cum += c;
      continue;
    }
    const int64_t end = (ch + 1) * kChunk < n ? (ch + 1) * kChunk : n;
    for (int64_t j = ch * kChunk; j < end; ++j) {
      cum += bits_f32(absdiff_bits(s.x[m], s.dtype[m], base, bdt, j)) == th;
      if (cum == room) {
        st->cut[s.model[m]] = j;
        return;
      }
    }
    return;
  }
}

__device__ __forceinline__ bool kept_at(const DevModels& mdl, const float* th, const int64_t* cut, int i, float d,
                                        int64_t j) {
  return mdl.all[i] || ties::kept(d, th[i], j <= cut[i]);
}

// Per-block L1 norms (‖δ‖₁, ‖kept δ‖₁) of model blockIdx.y, in double.
__global__ void norms_kernel(DevModels mdl, const void* base, int bdt, int64_t n, const State* st, double* partial) {
  __shared__ double s_all[kThreads];
  __shared__ double s_kept[kThreads];
  const int m = blockIdx.y;
  double all = 0.0, kept = 0.0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float d = fm_sub(load_f32(mdl.x[m], mdl.dtype[m], j), load_f32(base, bdt, j));
    const double a = double(bits_f32(abs_bits(d)));
    all += a;
    if (kept_at(mdl, st->th, st->cut, m, d, j)) kept += a;
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

// One thread per model: the block partials added in block order (the order the host used), then the factor.
__global__ void scale_kernel(const double* partial, int64_t blocks, int T, State* st) {
  const int i = threadIdx.x;
  if (i >= T) return;
  double all = 0.0, kept = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    all += partial[(size_t(b) * T + i) * 2];
    kept += partial[(size_t(b) * T + i) * 2 + 1];
  }
  const gta::Scale sc = gta::l1_scale(all, kept);
  st->rescaled[i] = sc.rescaled;
  st->factor[i] = sc.factor;
}

// The fused pass, one thread per element: the CPU's gtacpu::merge_block + tail_block, element by element,
// in the same op order. No per-thread array: the election's second loop recomputes w·δ' of each model
// from the same load (an L1 hit) by the same formula, so the bits are those of the first loop, and the
// kernel keeps no local memory (it held `float wd[32]` in a 128-byte stack frame: STL/LDL per element;
// tests/kernels/test_cuda_ptxas.py asserts a zero stack frame with `nvcc -Xptxas -v`). The device-decided
// per-model values are copied once per block into shared memory.
struct Decided {
  float th[kMaxInputs];
  int64_t cut[kMaxInputs];
  float factor[kMaxInputs];
  int32_t rescaled[kMaxInputs];
};

__device__ __forceinline__ float merge_wd(const DevModels& mdl, const Decided& dc, int i, float b, int64_t j) {
  const float d = fm_sub(load_f32(mdl.x[i], mdl.dtype[i], j), b);
  const bool keep = kept_at(mdl, dc.th, dc.cut, i, d, j);
  return gta::weighted_kept(d, mdl.w[i], keep, dc.rescaled[i] != 0, dc.factor[i]);
}

__global__ void merge_kernel(DevModels mdl, int T, const void* base, int bdt, void* out, int odt, int64_t n,
                             gta::Tail tail, const State* st) {
  __shared__ Decided dc;
  for (int i = threadIdx.x; i < kMaxInputs; i += blockDim.x) {
    dc.th[i] = st->th[i];
    dc.cut[i] = st->cut[i];
    dc.factor[i] = st->factor[i];
    dc.rescaled[i] = st->rescaled[i];
  }
  __syncthreads();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const float b = load_f32(base, bdt, j);
    float tot = 0.0f;
    for (int i = 0; i < T; ++i) tot = gta::elect_add(tot, merge_wd(mdl, dc, i, b, j), tail.consensus);
    const float maj = gta::majority(tot);
    float num = 0.0f, div = 0.0f;
    for (int i = 0; i < T; ++i) {
      const float wd = merge_wd(mdl, dc, i, b, j);
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
// tie counts (S·chunks u32), the State, norms (grid·T·2 f64); each part 256-byte aligned.
struct ScratchLayout {
  size_t hist, ties, state, norms, total;
};

size_t align256(size_t b) { return (b + 255) & ~size_t(255); }

ScratchLayout scratch_layout(int64_t n, int S, int T) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  ScratchLayout l{};
  l.hist = align256(size_t(S) * (kBins + 1) * sizeof(unsigned long long));
  l.ties = align256(size_t(S) * size_t(chunks) * sizeof(unsigned int));
  l.state = align256(sizeof(State));
  l.norms = align256(size_t(grid_for(n)) * size_t(T) * 2 * sizeof(double));
  l.total = l.hist + l.ties + l.state + l.norms + 256;  // + 256: the base pointer's alignment
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
  for (int i = 0; i < T; ++i) {
    mdl.x[i] = g.inputs[i];
    mdl.dtype[i] = g.input_dtypes[i];
    mdl.w[i] = g.weights[i];
    mdl.all[i] = a.densities[i] >= 1.0;
    if (!mdl.all[i]) {
      const int s = sel.S++;
      sel.x[s] = g.inputs[i];
      sel.dtype[s] = g.input_dtypes[i];
      sel.model[s] = i;
      sel.k[s] = ties::keep_count(a.densities[i], n);
    }
  }
  sel.exact_k = a.exact_k ? 1 : 0;
  const int S = sel.S;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t grid = grid_for(n);
  const ScratchLayout lay = scratch_layout(n, S, T);
  if (scr == nullptr || scr_bytes < lay.total) return cudaErrorInvalidValue;  // the binding checks first
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scr) + 255) & ~uintptr_t(255));
  unsigned long long* d_hist = reinterpret_cast<unsigned long long*>(p);
  unsigned long long* d_nans = d_hist + size_t(S) * kBins;
  unsigned int* d_ties = reinterpret_cast<unsigned int*>(p + lay.hist);
  State* d_state = reinterpret_cast<State*>(p + lay.hist + lay.ties);
  double* d_norms = reinterpret_cast<double*>(p + lay.hist + lay.ties + lay.state);

  init_kernel<<<1, kMaxInputs, 0, stream>>>(sel, n, d_state);
  FM_CUDA_TRY(cudaGetLastError());

  // (1) radix select, all trimmed models per launch; the bins are picked on the device
  if (S > 0) {
    const int shifts[3] = {21, 10, 0};
    const uint32_t digit_masks[3] = {0x7ffu, 0x7ffu, 0x3ffu};
    uint32_t prefix_mask = 0;
    for (int pass = 0; pass < 3; ++pass) {
      FM_CUDA_TRY(cudaMemsetAsync(d_hist, 0, size_t(S) * (kBins + 1) * sizeof(unsigned long long), stream));
      const dim3 blocks = dim3(unsigned(grid), unsigned(S));
      hist_kernel<<<blocks, kThreads, 0, stream>>>(sel, g.base, g.base_dtype, n, shifts[pass], digit_masks[pass],
                                                   prefix_mask, d_state, d_hist, pass == 0 ? d_nans : nullptr);
      FM_CUDA_TRY(cudaGetLastError());
      scan_kernel<<<1, kMaxInputs, 0, stream>>>(sel, d_hist, pass == 0 ? d_nans : nullptr, shifts[pass],
                                                digit_masks[pass], pass == 2, d_state);
      FM_CUDA_TRY(cudaGetLastError());
      prefix_mask |= digit_masks[pass] << shifts[pass];
    }
    // (2) exact-k cut: launched whenever exact_k; slots that need no cut exit at once
    if (a.exact_k) {
      const dim3 blocks = dim3(unsigned(chunks < kMaxBlocks ? chunks : kMaxBlocks), unsigned(S));
      tie_count_kernel<<<blocks, kThreads, 0, stream>>>(sel, g.base, g.base_dtype, n, d_state, d_ties, chunks);
      FM_CUDA_TRY(cudaGetLastError());
      cut_kernel<<<1, kMaxInputs, 0, stream>>>(sel, g.base, g.base_dtype, n, d_ties, chunks, d_state);
      FM_CUDA_TRY(cudaGetLastError());
    }
  }

  // (3) rescale factors (every model, density >= 1 included, as the reference's all-ones mask)
  if (g.rescale) {
    const dim3 blocks = dim3(unsigned(grid), unsigned(T));
    norms_kernel<<<blocks, kThreads, 0, stream>>>(mdl, g.base, g.base_dtype, n, d_state, d_norms);
    FM_CUDA_TRY(cudaGetLastError());
    scale_kernel<<<1, kMaxInputs, 0, stream>>>(d_norms, grid, T, d_state);
    FM_CUDA_TRY(cudaGetLastError());
  }

  // (4) fused merge
  merge_kernel<<<unsigned(grid), kThreads, 0, stream>>>(mdl, T, g.base, g.base_dtype, g.out, g.out_dtype, n, g.tail,
                                                        d_state);
  return cudaGetLastError();  // no synchronisation: the caller's stream orders everything after
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
