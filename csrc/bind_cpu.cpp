// fastmerge._C: the CPU kernels, bound on raw buffers.
//
// Not linked to libtorch on purpose: the wheel then works with any torch version and builds without torch.
// Every function takes data pointers as Python ints (tensor.data_ptr()), element counts and dtype codes
// (0 = float32, 1 = float16, 2 = bfloat16; an input or a base may also be 3 = FP8, its pointer then the address
// of an FP8 source descriptor, checked here: cpu/fp8.h, fastmerge._native.Fp8Source). The tensors themselves (device, contiguity, size, dtype) are
// checked by the typed wrappers in fastmerge/_native.py; here we check what can be checked without them
// (list lengths, dtype codes, scalar ranges) and raise ValueError naming the argument. The GIL is released
// around every kernel, so several Python threads can merge different tensors at once.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/segments.h"
#include "cpu/fp8.h"
#include "cpu/peft_ties.h"
#include "cpu/select.h"
#include "cpu/layer_index.h"
#include "cpu/st_header.h"
#include "cpu/instances.h"
#include "cpu/xxh64.h"
#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "fastmerge/linear.h"
#include "fastmerge/nearswap.h"
#include "fastmerge/rng.h"
#include "fastmerge/sce.h"
#include "fastmerge/ties.h"

#ifndef FASTMERGE_VERSION
#define FASTMERGE_VERSION "unknown"
#endif
#ifndef FASTMERGE_COMPILER
#define FASTMERGE_COMPILER "unknown"
#endif
#ifndef FASTMERGE_BUILD_TYPE
#define FASTMERGE_BUILD_TYPE "unknown"
#endif

namespace py = pybind11;
using namespace fastmerge;

namespace {

struct Inputs {
  std::vector<const void*> ptrs;
  std::vector<int> dtypes;
  std::vector<float> weights;
};

Inputs check_inputs(int64_t n, const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes,
                    const std::vector<double>& weights) {
  FM_CHECK(n >= 0, "n: element count must be >= 0, got " << n);
  FM_CHECK(!inputs.empty(), "inputs: need at least one input buffer");
  FM_CHECK(input_dtypes.size() == inputs.size(), "input_dtypes: " << input_dtypes.size() << " dtype codes for "
                                                                  << inputs.size() << " inputs");
  FM_CHECK(weights.size() == inputs.size(),
           "weights: " << weights.size() << " weights for " << inputs.size() << " inputs");
  Inputs r;
  for (size_t i = 0; i < inputs.size(); ++i) {
    FM_CHECK_IN_DTYPE(input_dtypes[i], inputs[i], "input_dtypes[" << i << "]");
    FM_CHECK(n == 0 || inputs[i] != 0, "inputs[" << i << "]: null data pointer");
    r.ptrs.push_back(reinterpret_cast<const void*>(inputs[i]));
    r.dtypes.push_back(input_dtypes[i]);
    r.weights.push_back(static_cast<float>(weights[i]));  // the reference rounds weights to fp32 too
  }
  return r;
}

// Whether n values of a dtype at ptr hold an inf or a NaN (exponent bits all ones), for the engine's
// non-finite output warning. Blocks of 4096 OR-reduced without branches, so GCC vectorises them; numpy's
// and/compare/any passes on the writer thread cost ~0.1 s per 271 MB of output and competed with 2-thread
// kernels on 2 cores (a linear merge of the benchmark family 0.32 -> 0.43 s).
template <typename U>
bool any_exp_all_ones(const U* p, int64_t n, U mask) {
  constexpr int64_t B = 4096;
  for (int64_t i = 0; i < n; i += B) {
    const int64_t e = i + B < n ? i + B : n;
    unsigned acc = 0;
    for (int64_t j = i; j < e; ++j) acc |= static_cast<unsigned>((p[j] & mask) == mask);
    if (acc) return true;
  }
  return false;
}

bool py_any_nonfinite(uintptr_t ptr, int dtype, int64_t n) {
  if (n < 0) throw std::invalid_argument("any_nonfinite: n must be >= 0");
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("any_nonfinite: dtype code must be 0, 1 or 2");
  py::gil_scoped_release release;
  if (dtype == 0) return any_exp_all_ones(reinterpret_cast<const uint32_t*>(ptr), n, uint32_t{0x7F800000u});
  const uint16_t mask = dtype == 1 ? uint16_t{0x7C00} : uint16_t{0x7F80};
  return any_exp_all_ones(reinterpret_cast<const uint16_t*>(ptr), n, mask);
}

void py_weighted_delta_sum(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
                           const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype,
                           const std::vector<double>& weights, double divisor, double lam, int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK(n == 0 || out != 0, "out: null data pointer");
  if (base != 0) FM_CHECK_IN_DTYPE(base_dtype, base, "base_dtype");
  if (n == 0) return;
  const WdsArgs a = make_wds_args(reinterpret_cast<void*>(out), out_dtype, n, int(in.ptrs.size()), in.ptrs.data(),
                                  in.dtypes.data(), in.weights.data(), reinterpret_cast<const void*>(base),
                                  base_dtype, divisor, lam);
  py::gil_scoped_release nogil;
  cpu::weighted_delta_sum(a, threads);
}

void py_nearswap(uintptr_t out, int out_dtype, int64_t n, uintptr_t x, int x_dtype, uintptr_t base, int base_dtype,
                 double t, int threads) {
  FM_CHECK(n >= 0, "n: element count must be >= 0, got " << n);
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK_IN_DTYPE(x_dtype, x, "x_dtype");
  FM_CHECK_IN_DTYPE(base_dtype, base, "base_dtype");
  FM_CHECK(n == 0 || (out != 0 && x != 0 && base != 0), "out, x, base: null data pointer");
  FM_CHECK(t >= nearswap::kMinT, "t: the kernel covers t >= 1e-6 (the clamp form), got " << t);
  if (n == 0) return;
  const NearswapArgs a{reinterpret_cast<void*>(out), out_dtype, n, reinterpret_cast<const void*>(x), x_dtype,
                       reinterpret_cast<const void*>(base), base_dtype, static_cast<float>(t)};
  py::gil_scoped_release nogil;
  cpu::nearswap(a, threads);
}

// Checks and fills the part of the argument block every generalized-task-arithmetic kernel shares.
GtaArgs gta_args(const Inputs& in, uintptr_t out, int out_dtype, int64_t n, uintptr_t base, int base_dtype,
                 int consensus, bool normalize, double lam, bool rescale) {
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK(n == 0 || out != 0, "out: null data pointer");
  FM_CHECK(base != 0 || n == 0, "base: this method needs a base model (got a null pointer)");
  FM_CHECK_IN_DTYPE(base_dtype, base, "base_dtype");
  FM_CHECK(consensus == gta::SUM || consensus == gta::COUNT || consensus == gta::NONE,
           "consensus: must be 0 (sum), 1 (count) or 2 (none), got " << consensus);
  GtaArgs g{};
  g.out = reinterpret_cast<void*>(out);
  g.out_dtype = out_dtype;
  g.n = n;
  g.num_inputs = int(in.ptrs.size());
  g.inputs = in.ptrs.data();
  g.input_dtypes = in.dtypes.data();
  g.weights = in.weights.data();
  g.base = reinterpret_cast<const void*>(base);
  g.base_dtype = base_dtype;
  g.tail = gta::make_tail(consensus, normalize, lam, in.weights.data(), int(in.weights.size()));
  g.rescale = rescale;
  return g;
}

void check_per_model(const std::vector<double>& v, size_t count, const char* name, bool positive) {
  FM_CHECK(v.size() == count, name << ": " << v.size() << " values for " << count << " inputs");
  if (!positive) return;
  for (size_t i = 0; i < v.size(); ++i) {
    // `> 0` is also false for NaN.
    FM_CHECK(v[i] > 0.0, name << "[" << i << "]: density must be > 0 (1 keeps everything), got " << v[i]);
  }
}

// The checked TiesArgs of py_ties and py_ties_segments (``in`` must outlive them: they point into it).
TiesArgs ties_args(const Inputs& in, uintptr_t out, int out_dtype, int64_t n, uintptr_t base, int base_dtype,
                   const std::vector<double>& densities, bool normalize, double lam, int election, bool exact_k,
                   bool rescale) {
  FM_CHECK(base != 0 || n == 0, "base: TIES needs a base model (got a null pointer)");
  check_per_model(densities, in.ptrs.size(), "densities", true);
  FM_CHECK(election == ties::SUM || election == ties::COUNT,
           "election: must be 0 (sum) or 1 (count), got " << election);
  TiesArgs a{};
  a.g = gta_args(in, out, out_dtype, n, base, base_dtype, election, normalize, lam, rescale);
  a.densities = densities.data();
  a.exact_k = exact_k;
  return a;
}

void py_ties(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
             const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype, const std::vector<double>& weights,
             const std::vector<double>& densities, bool normalize, double lam, int election, bool exact_k,
             int threads, bool rescale) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  const TiesArgs a = ties_args(in, out, out_dtype, n, base, base_dtype, densities, normalize, lam, election, exact_k, rescale);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  cpu::ties(a, threads);
}

// py_ties over consecutive segments [offsets[s], offsets[s + 1]) of packed buffers (cpu/segments.cpp).
void py_ties_segments(uintptr_t out, int out_dtype, const std::vector<int64_t>& offsets,
                      const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes, uintptr_t base,
                      int base_dtype, const std::vector<double>& weights, const std::vector<double>& densities,
                      bool normalize, double lam, int election, bool exact_k, int threads, bool rescale) {
  FM_CHECK(!offsets.empty() && offsets[0] == 0, "offsets: must start with 0");
  for (size_t s = 1; s < offsets.size(); ++s) {
    FM_CHECK(offsets[s] >= offsets[s - 1], "offsets: must not decrease (offsets[" << s << "] = " << offsets[s] << ")");
  }
  const int64_t n = offsets.back();
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  const TiesArgs a = ties_args(in, out, out_dtype, n, base, base_dtype, densities, normalize, lam, election, exact_k, rescale);
  if (n == 0) return;
  py::gil_scoped_release nogil;
  cpu::ties_segments(a, offsets.data(), int64_t(offsets.size()) - 1, threads);
}

void py_dare(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
             const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype, const std::vector<double>& weights,
             const std::vector<double>& densities, int consensus, bool normalize, double lam, bool rescale,
             uint64_t seed, uint64_t key, int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  check_per_model(densities, inputs.size(), "densities", true);
  DareArgs a{};
  a.g = gta_args(in, out, out_dtype, n, base, base_dtype, consensus, normalize, lam, rescale);
  a.densities = densities.data();
  a.seed = seed;
  a.key = key;
  if (n == 0) return;
  py::gil_scoped_release nogil;
  cpu::dare(a, threads);
}

void py_sce(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
            const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype, double select_topk, int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, std::vector<double>(inputs.size(), 1.0));
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK(base != 0 || n == 0, "base: SCE needs a base model (got a null pointer)");
  FM_CHECK_IN_DTYPE(base_dtype, base, "base_dtype");
  FM_CHECK(out != 0 || n == 0, "out: null data pointer");
  // `> 0 && <= 1` is also false for NaN
  FM_CHECK(select_topk > 0.0 && select_topk <= 1.0, "select_topk: must be in (0, 1], got " << select_topk);
  SceArgs a{};
  a.out = reinterpret_cast<void*>(out);
  a.out_dtype = out_dtype;
  a.n = n;
  a.num_inputs = int(in.ptrs.size());
  a.inputs = in.ptrs.data();
  a.input_dtypes = in.dtypes.data();
  a.base = reinterpret_cast<const void*>(base);
  a.base_dtype = base_dtype;
  a.select_topk = select_topk;
  if (n == 0) return;
  py::gil_scoped_release nogil;
  cpu::sce(a, threads);
}

void py_della(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
              const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype, const std::vector<double>& weights,
              const std::vector<double>& densities, const std::vector<double>& epsilons, int consensus,
              bool normalize, double lam, bool rescale, uint64_t seed, uint64_t key, int64_t outer, int64_t row_len,
              int64_t inner, int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  check_per_model(densities, inputs.size(), "densities", true);
  check_per_model(epsilons, inputs.size(), "epsilons", false);
  FM_CHECK(outer >= 1 && row_len >= 1 && inner >= 1,
           "rows: outer, row_len and inner must be >= 1, got " << outer << ", " << row_len << ", " << inner);
  FM_CHECK(n == 0 || outer * row_len * inner == n,
           "rows: outer x row_len x inner = " << outer * row_len * inner << ", expected n = " << n);
  FM_CHECK(row_len < (int64_t(1) << 32), "row_len: rows of 2^32 or more elements are not supported, got " << row_len);
  DellaArgs a{};
  a.g = gta_args(in, out, out_dtype, n, base, base_dtype, consensus, normalize, lam, rescale);
  a.densities = densities.data();
  a.epsilons = epsilons.data();
  a.seed = seed;
  a.key = key;
  a.outer = outer;
  a.row_len = row_len;
  a.inner = inner;
  if (n == 0) return;
  py::gil_scoped_release nogil;
  cpu::della(a, threads);
}

void py_breadcrumbs(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
                    const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype,
                    const std::vector<double>& weights, const std::vector<double>& densities,
                    const std::vector<double>& gammas, int consensus, bool normalize, double lam, bool rescale,
                    bool exact, int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  check_per_model(densities, inputs.size(), "densities", true);
  check_per_model(gammas, inputs.size(), "gammas", false);
  for (size_t i = 0; i < gammas.size(); ++i) {
    FM_CHECK(gammas[i] >= 0.0 && gammas[i] <= 1.0, "gammas[" << i << "]: must be in [0, 1], got " << gammas[i]);
  }
  BreadcrumbsArgs a{};
  a.g = gta_args(in, out, out_dtype, n, base, base_dtype, consensus, normalize, lam, rescale);
  a.densities = densities.data();
  a.gammas = gammas.data();
  a.exact = exact;
  if (n == 0) return;
  py::gil_scoped_release nogil;
  cpu::breadcrumbs(a, threads);
}

// Test hooks of the generator (rng.h): the raw 32-bit outputs, or a scalar-p keep mask (uint8 0/1).
void py_rng_hash(uintptr_t out, int64_t n, uint64_t start, uint64_t seed, uint64_t key, uint32_t model) {
  FM_CHECK(n >= 0, "n: must be >= 0, got " << n);
  FM_CHECK(n == 0 || out != 0, "out: null data pointer");
  const rng::Stream st = rng::stream_keys(seed, key, model);
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < n; ++j) o[j] = rng::hash(st, start + uint64_t(j));
}

void py_rng_keep(uintptr_t out, int64_t n, uint64_t start, uint64_t seed, uint64_t key, uint32_t model, double p) {
  FM_CHECK(n >= 0, "n: must be >= 0, got " << n);
  FM_CHECK(n == 0 || out != 0, "out: null data pointer");
  const rng::Stream st = rng::stream_keys(seed, key, model);
  const int32_t th = rng::scalar_threshold(p);
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  for (int64_t j = 0; j < n; ++j) o[j] = rng::keep_scalar(rng::hash(st, start + uint64_t(j)), th) ? 1 : 0;
}

// Test hook of the one-read selection: [(value, count_above, count_equal, count_nan)] per (model, k), and
// how many queries fell back to the radix select.
py::tuple py_kth_multi(const std::vector<uintptr_t>& xs, const std::vector<int>& x_dtypes, uintptr_t base,
                       int base_dtype, int64_t n, const std::vector<int>& models, const std::vector<int64_t>& ks,
                       int threads) {
  FM_CHECK(n >= 1, "n: need at least one element, got " << n);
  FM_CHECK(!xs.empty() && xs.size() == x_dtypes.size(), "xs / x_dtypes: need as many dtype codes as buffers");
  FM_CHECK(models.size() == ks.size(), "models / ks: one model index per k");
  FM_CHECK_IN_DTYPE(base_dtype, base, "base_dtype");
  FM_CHECK(base != 0, "base: null data pointer");
  std::vector<const void*> ptrs;
  for (size_t i = 0; i < xs.size(); ++i) {
    FM_CHECK_IN_DTYPE(x_dtypes[i], xs[i], "x_dtypes[" << i << "]");
    FM_CHECK(xs[i] != 0, "xs[" << i << "]: null data pointer");
    ptrs.push_back(reinterpret_cast<const void*>(xs[i]));
  }
  std::vector<cpu::KthQuery> q;
  for (size_t j = 0; j < ks.size(); ++j) {
    FM_CHECK(models[j] >= 0 && size_t(models[j]) < xs.size(), "models[" << j << "]: no such buffer");
    FM_CHECK(ks[j] >= 1 && ks[j] <= n, "ks[" << j << "]: must be in [1, n=" << n << "], got " << ks[j]);
    q.push_back(cpu::KthQuery{models[j], ks[j], cpu::KthAbs{}});
  }
  int64_t fallbacks = 0;
  {
    py::gil_scoped_release nogil;
    cpu::kth_largest_abs_diff_multi(ptrs.data(), x_dtypes.data(), reinterpret_cast<const void*>(base), base_dtype,
                                    n, q.data(), int(q.size()), threads);
    fallbacks = cpu::select_fallbacks();
  }
  py::list res;
  for (const auto& x : q) {
    res.append(py::make_tuple(double(bits_f32(x.result.bits)), x.result.count_above, x.result.count_equal,
                              x.result.count_nan));
  }
  return py::make_tuple(res, fallbacks);
}

// PEFT's TIES / magnitude_prune merge step (cpu/peft_ties.h): the pruning rules of K inputs from one read,
// then the fused merge. Inputs: CPU, contiguous, n elements each, dtype codes 0/1/2 (no FP8).
std::vector<const void*> peft_inputs(int64_t n, const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes) {
  FM_CHECK(n >= 1, "n: need at least one element, got " << n);
  FM_CHECK(!inputs.empty() && int(inputs.size()) <= cpu::kPeftMaxInputs,
           "inputs: need 1.." << cpu::kPeftMaxInputs << " input buffers, got " << inputs.size());
  FM_CHECK(dtypes.size() == inputs.size(), "input_dtypes: " << dtypes.size() << " dtype codes for " << inputs.size() << " inputs");
  std::vector<const void*> ptrs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    FM_CHECK_DTYPE(dtypes[i], "input_dtypes[" << i << "]");
    FM_CHECK(inputs[i] != 0, "inputs[" << i << "]: null data pointer");
    ptrs.push_back(reinterpret_cast<const void*>(inputs[i]));
  }
  return ptrs;
}

// [(threshold, cut, status)] per input; status 1: the torch path's topk decides that input
py::list py_peft_prune_rules(int64_t n, const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes,
                             int64_t k, bool index_ties, int threads) {
  const std::vector<const void*> ptrs = peft_inputs(n, inputs, input_dtypes);
  FM_CHECK(k >= 1 && k < n, "k: must be in [1, n - 1 = " << n - 1 << "], got " << k);
  std::vector<cpu::PeftRule> rules(ptrs.size());
  std::vector<int> status(ptrs.size());
  {
    py::gil_scoped_release nogil;
    cpu::peft_prune_rules(ptrs.data(), input_dtypes.data(), int(ptrs.size()), n, k, index_ties, rules.data(),
                          status.data(), threads);
  }
  py::list res;
  for (size_t i = 0; i < rules.size(); ++i) res.append(py::make_tuple(double(rules[i].th), rules[i].cut, status[i]));
  return res;
}

void py_peft_merge(uintptr_t out, int64_t n, const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes,
                   const std::vector<double>& thresholds, const std::vector<int64_t>& cuts, const std::vector<bool>& all,
                   const std::vector<double>& weights, int mode, int sum_dtype, const std::vector<int64_t>& ilp_a,
                   const std::vector<int64_t>& ilp_c, int threads) {
  const std::vector<const void*> ptrs = peft_inputs(n, inputs, input_dtypes);
  const size_t K = ptrs.size();
  FM_CHECK(out != 0, "out: null data pointer");
  FM_CHECK(thresholds.size() == K && cuts.size() == K && all.size() == K && weights.size() == K,
           "thresholds, cuts, all, weights: need one value per input (" << K << ")");
  FM_CHECK(mode == cpu::PEFT_TOTAL || mode == cpu::PEFT_FREQUENCY || mode == cpu::PEFT_WEIGHTED_SUM,
           "mode: must be 0 (total), 1 (frequency) or 2 (weighted sum), got " << mode);
  FM_CHECK_DTYPE(sum_dtype, "sum_dtype");
  for (const std::vector<int64_t>* r : {&ilp_a, &ilp_c}) {
    FM_CHECK(r->size() % 2 == 0, "ilp ranges: need [start, end) pairs");
    for (size_t q = 0; q < r->size(); q += 2)
      FM_CHECK(0 <= (*r)[q] && (*r)[q] <= (*r)[q + 1] && (*r)[q + 1] <= n, "ilp ranges: [" << (*r)[q] << ", " << (*r)[q + 1] << ") is not inside [0, " << n << ")");
  }
  std::vector<cpu::PeftRule> rules(K);
  std::vector<float> w(K);
  for (size_t i = 0; i < K; ++i) {
    rules[i] = cpu::PeftRule{float(thresholds[i]), cuts[i], bool(all[i])};
    w[i] = float(weights[i]);
  }
  cpu::PeftArgs a{reinterpret_cast<float*>(out), n, int(K), ptrs.data(), input_dtypes.data(), rules.data(), w.data(),
                  mode, sum_dtype, ilp_a.data(), int(ilp_a.size() / 2), ilp_c.data(), int(ilp_c.size() / 2)};
  py::gil_scoped_release nogil;
  cpu::peft_merge(a, threads);
}

size_t scratch_bytes() { return cpu::gta_scratch_bytes() + cpu::sce_scratch_bytes(); }

double py_kth_largest_abs_diff(uintptr_t x, int x_dtype, uintptr_t base, int base_dtype, int64_t n, int64_t k,
                               int threads) {
  FM_CHECK_IN_DTYPE(x_dtype, x, "x_dtype");
  if (base != 0) FM_CHECK_IN_DTYPE(base_dtype, base, "base_dtype");
  FM_CHECK(n >= 1, "n: need at least one element, got " << n);
  FM_CHECK(k >= 1 && k <= n, "k: must be in [1, n=" << n << "], got " << k);
  FM_CHECK(x != 0, "x: null data pointer");
  cpu::KthAbs r;
  {
    py::gil_scoped_release nogil;
    r = cpu::kth_largest_abs_diff(reinterpret_cast<const void*>(x), x_dtype, reinterpret_cast<const void*>(base),
                                  base_dtype, n, k, threads);
  }
  return double(bits_f32(r.bits));
}

py::dict build_info() {
  py::dict d;
  d["module"] = "fastmerge._C";
  d["version"] = FASTMERGE_VERSION;
  d["compiler"] = FASTMERGE_COMPILER;
  d["build_type"] = FASTMERGE_BUILD_TYPE;
  d["cxx_standard"] = long(__cplusplus);
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
#if defined(_OPENMP)
  d["openmp"] = true;
  d["openmp_version"] = long(_OPENMP);
#else
  d["openmp"] = false;
  d["openmp_version"] = py::none();
#endif
  d["max_threads"] = cpu::max_threads();
  d["fp_contract"] = "off";
  d["target_clones"] = FM_HAS_TARGET_CLONES ? "x86-64-v4,x86-64-v3,x86-64-v2,default" : "none";
#if FM_HAS_TARGET_CLONES
  __builtin_cpu_init();
  d["cpu_avx2"] = bool(__builtin_cpu_supports("avx2"));
  d["cpu_avx512f"] = bool(__builtin_cpu_supports("avx512f"));
#endif
  d["block_elems"] = long(cpu::kBlock);
  d["dtype_codes"] = py::dict(py::arg("float32") = int(F32), py::arg("float16") = int(F16),
                              py::arg("bfloat16") = int(BF16));
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastmerge CPU kernels on raw buffers (pointers as ints; use fastmerge._native for checked wrappers)";
  m.attr("__version__") = FASTMERGE_VERSION;

  py::class_<fastmerge::Xxh64>(m, "Xxh64", "Incremental XXH64 (seed 0): update(buffer) with the GIL released, digest().")
      .def(py::init<>())
      .def("update", [](fastmerge::Xxh64& h, py::buffer b) {
             py::buffer_info info = b.request();
             const auto* p = static_cast<const uint8_t*>(info.ptr);
             const uint64_t n = static_cast<uint64_t>(info.size) * static_cast<uint64_t>(info.itemsize);
             if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
               throw std::invalid_argument("Xxh64.update: needs a flat contiguous buffer (memoryview.cast('B'))");
             py::gil_scoped_release release;
             h.update(p, n);
           }, py::arg("data"))
      .def("digest", &fastmerge::Xxh64::digest);
  m.def("any_nonfinite", &py_any_nonfinite, py::arg("ptr"), py::arg("dtype"), py::arg("n"),
        "Whether n values (dtype code: 0 float32, 1 float16, 2 bfloat16) at ptr include an inf or a NaN.");
  m.def("weighted_delta_sum", &py_weighted_delta_sum, py::arg("out"), py::arg("out_dtype"), py::arg("n"),
        py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"),
        py::arg("divisor"), py::arg("lam"), py::arg("threads") = 0,
        "out = [base +] lam * (sum_i w_i * (x_i [- base])) [/ divisor], fp32 math, one rounding on store "
        "(linear, task_arithmetic). base=0: none; divisor=0.0: no division.");
  m.def("nearswap", &py_nearswap, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("x"),
        py::arg("x_dtype"), py::arg("base"), py::arg("base_dtype"), py::arg("t"), py::arg("threads") = 0,
        "NearSwap, default mode (t >= 1e-6): out = min(max(base - t, x), base + t) in fp32 (NaN propagates), "
        "one rounding on store.");
  m.def("ties", &py_ties, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"), py::arg("densities"),
        py::arg("normalize"), py::arg("lam"), py::arg("election"), py::arg("exact_k"), py::arg("threads") = 0,
        py::arg("rescale") = false,
        "Fused TIES (trim by magnitude, elect sign, disjoint merge), fp32 math, one rounding on store. "
        "election: 0 = sum, 1 = count; exact_k: selection topk; rescale: L1 rescale of each trimmed delta.");
  m.def("ties_segments", &py_ties_segments, py::arg("out"), py::arg("out_dtype"), py::arg("offsets"),
        py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"),
        py::arg("densities"), py::arg("normalize"), py::arg("lam"), py::arg("election"), py::arg("exact_k"),
        py::arg("threads") = 0, py::arg("rescale") = false,
        "ties on each segment [offsets[s], offsets[s+1]) of packed buffers, as one ties call per segment.");
  m.def("dare", &py_dare, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"), py::arg("densities"),
        py::arg("consensus"), py::arg("normalize"), py::arg("lam"), py::arg("rescale"), py::arg("seed"),
        py::arg("key"), py::arg("threads") = 0,
        "DARE (dare_linear: consensus 2, dare_ties: 0): counter-based random drop (fastmerge/rng.h), L1 rescale, "
        "generalized task arithmetic tail. seed: modulo 2^64; key: the tensor name's hash.");
  m.def("della", &py_della, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"), py::arg("densities"),
        py::arg("epsilons"), py::arg("consensus"), py::arg("normalize"), py::arg("lam"), py::arg("rescale"),
        py::arg("seed"), py::arg("key"), py::arg("outer"), py::arg("row_len"), py::arg("inner"),
        py::arg("threads") = 0,
        "DELLA (della: consensus 0, della_linear: 2): per-row magnitude ranks -> keep probabilities -> "
        "counter-based mask, L1 rescale, tail. Rows: outer x inner rows of row_len elements, stride inner.");
  m.def("breadcrumbs", &py_breadcrumbs, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"), py::arg("densities"),
        py::arg("gammas"), py::arg("consensus"), py::arg("normalize"), py::arg("lam"), py::arg("rescale"),
        py::arg("exact"), py::arg("threads") = 0,
        "Model Breadcrumbs (breadcrumbs: consensus 2, breadcrumbs_ties: 0): keep a band of |delta| ranks "
        "(exact: selection topk), optional L1 rescale, tail.");
  m.def("sce", &py_sce, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("select_topk"),
        py::arg("threads") = 0,
        "SCE (default mode): variance selection (select_topk < 1), matrix-level weights (double mean of "
        "squares), sign election, weighted disjoint mean; fp32 math, one rounding on store.");
  m.def("rng_hash", &py_rng_hash, py::arg("out"), py::arg("n"), py::arg("start"), py::arg("seed"), py::arg("key"),
        py::arg("model"), "Test hook: the generator's 32-bit outputs h of elements start.. into a uint32 buffer.");
  m.def("rng_keep", &py_rng_keep, py::arg("out"), py::arg("n"), py::arg("start"), py::arg("seed"), py::arg("key"),
        py::arg("model"), py::arg("p"), "Test hook: the scalar-p keep mask (u < fp32(p)) into a uint8 buffer.");
  m.def("kth_largest_abs_diff_multi", &py_kth_multi, py::arg("xs"), py::arg("x_dtypes"), py::arg("base"),
        py::arg("base_dtype"), py::arg("n"), py::arg("models"), py::arg("ks"), py::arg("threads") = 0,
        "Test hook of the one-read selection: ([(value, count_above, count_equal, count_nan)], fallbacks).");
  m.def("kth_largest_abs_diff", &py_kth_largest_abs_diff, py::arg("x"), py::arg("x_dtype"), py::arg("base"),
        py::arg("base_dtype"), py::arg("n"), py::arg("k"), py::arg("threads") = 0,
        "k-th largest |x - base| in fp32 (|x| if base=0), by radix select; NaN ranks largest.");
  m.def("peft_prune_rules", &py_peft_prune_rules, py::arg("n"), py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("k"), py::arg("index_ties"), py::arg("threads") = 0,
        "PEFT's exactly-k magnitude pruning of K inputs as (threshold, tie cut, status) from one read; status 1: "
        "the threshold does not give exactly k (NaN, or ties with index_ties false).");
  m.def("peft_merge", &py_peft_merge, py::arg("out"), py::arg("n"), py::arg("inputs"), py::arg("input_dtypes"),
        py::arg("thresholds"), py::arg("cuts"), py::arg("all"), py::arg("weights"), py::arg("mode"),
        py::arg("sum_dtype"), py::arg("ilp_a"), py::arg("ilp_c"), py::arg("threads") = 0,
        "PEFT's TIES disjoint merge (mode 0 total, 1 frequency) or weighted sum (2) of pruned inputs into fp32 out, "
        "torch's summation order (ilp_a / ilp_c: element ranges summed in its interleaved order).");
  m.def("scratch_bytes", &scratch_bytes,
        "Bytes of grow-only scratch held for the calling thread (selection, blocks, masks, norms).");
  m.def("parse_safetensors_header", &cpu::parse_safetensors_header, py::arg("raw"), py::arg("data_start"),
        py::arg("size"), py::arg("path"), py::arg("cls"), py::arg("dtypes"), py::arg("itemsize"),
        "(metadata, [cls] in file order) of a safetensors header's JSON bytes, as fastmerge.io.index._read_header "
        "builds them; None where it declines (any error or unusual JSON: the Python parse then reports it).");
  m.def("safetensors_header", &cpu::safetensors_header, py::arg("rows"), py::arg("st_names"), py::arg("head"),
        "A safetensors shard's header (length, head, one entry per OutTensor row, closing brace, padding) as "
        "fastmerge.io.writer writes it; None where a row, name or dtype needs the Python writer.");
  m.def("instances", &cpu::instances, py::arg("cls"), py::arg("names"), py::arg("columns"), py::arg("n"), py::arg("start") = 0,
        "[cls instance i with names[k] = columns[k][start + i]] for i < n (a column that is not a list: every row's value), "
        "written into the class's slots, else each instance's __dict__; __init__ is not called.");
  m.def("mapped_by_identity", &cpu::mapped_by_identity, py::arg("values"), py::arg("fn"),
        "[fn(values[i], i)], fn called once per distinct object (by identity, at its first index), its answer shared.");
  m.def("transposed", &cpu::transposed, py::arg("columns"), py::arg("start"),
        "[[c[i] for c in columns] for i from start]: lists of equal length.");
  m.def("replaced", &cpu::replaced, py::arg("cls"), py::arg("names"), py::arg("rows"), py::arg("k"), py::arg("value"),
        "[a copy of each row with field names[k] = value]: rows exactly of cls, names all slots of cls and set in "
        "every row; __init__ is not called. rows a dict: the same keys, each with its row's copy.");
  m.def("layer_indices", &cpu::layer_indices, py::arg("names"), py::arg("fallback"),
        "fastmerge.io.index.LAYER_RE's layer number of each name (None: no match); names that are not ASCII, or "
        "with a number of more than 18 digits, through fallback(name).");
  m.def("build_info", &build_info, "How this module was built (compiler, OpenMP, SIMD clones, versions).");
}
