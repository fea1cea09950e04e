// fastmerge._C: the CPU kernels, bound on raw buffers.
//
// Not linked to libtorch on purpose: the wheel then works with any torch version and builds without torch.
// Every function takes data pointers as Python ints (tensor.data_ptr()), element counts and dtype codes
// (0 = float32, 1 = float16, 2 = bfloat16). The tensors themselves (device, contiguity, size, dtype) are
// checked by the typed wrappers in fastmerge/_native.py; here we check what can be checked without them
// (list lengths, dtype codes, scalar ranges) and raise ValueError naming the argument. The GIL is released
// around every kernel, so several Python threads can merge different tensors at once.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/select.h"
#include "fastmerge/common.h"
#include "fastmerge/linear.h"
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
    FM_CHECK_DTYPE(input_dtypes[i], "input_dtypes[" << i << "]");
    FM_CHECK(n == 0 || inputs[i] != 0, "inputs[" << i << "]: null data pointer");
    r.ptrs.push_back(reinterpret_cast<const void*>(inputs[i]));
    r.dtypes.push_back(input_dtypes[i]);
    r.weights.push_back(static_cast<float>(weights[i]));  // the reference rounds weights to fp32 too
  }
  return r;
}

void py_weighted_delta_sum(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
                           const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype,
                           const std::vector<double>& weights, double divisor, double lam, int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK(n == 0 || out != 0, "out: null data pointer");
  if (base != 0) FM_CHECK_DTYPE(base_dtype, "base_dtype");
  if (n == 0) return;
  const WdsArgs a = make_wds_args(reinterpret_cast<void*>(out), out_dtype, n, int(in.ptrs.size()), in.ptrs.data(),
                                  in.dtypes.data(), in.weights.data(), reinterpret_cast<const void*>(base),
                                  base_dtype, divisor, lam);
  py::gil_scoped_release nogil;
  cpu::weighted_delta_sum(a, threads);
}

void py_ties(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
             const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype, const std::vector<double>& weights,
             const std::vector<double>& densities, bool normalize, double lam, int election, bool exact_k,
             int threads) {
  Inputs in = check_inputs(n, inputs, input_dtypes, weights);
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK(n == 0 || out != 0, "out: null data pointer");
  FM_CHECK(base != 0 || n == 0, "base: TIES needs a base model (got a null pointer)");
  FM_CHECK_DTYPE(base_dtype, "base_dtype");
  FM_CHECK(densities.size() == inputs.size(),
           "densities: " << densities.size() << " densities for " << inputs.size() << " inputs");
  for (size_t i = 0; i < densities.size(); ++i) {
    // `> 0` is also false for NaN.
    FM_CHECK(densities[i] > 0.0, "densities[" << i << "]: density must be > 0 (1 keeps everything), got "
                                              << densities[i]);
  }
  FM_CHECK(election == ties::SUM || election == ties::COUNT,
           "election: must be 0 (sum) or 1 (count), got " << election);
  if (n == 0) return;
  TiesArgs a{};
  a.out = reinterpret_cast<void*>(out);
  a.out_dtype = out_dtype;
  a.n = n;
  a.num_inputs = int(in.ptrs.size());
  a.inputs = in.ptrs.data();
  a.input_dtypes = in.dtypes.data();
  a.weights = in.weights.data();
  a.densities = densities.data();
  a.base = reinterpret_cast<const void*>(base);
  a.base_dtype = base_dtype;
  a.fin.normalize = normalize;
  a.fin.lam = static_cast<float>(lam);
  a.fin.scale = lam != 1.0;
  a.election = election;
  a.exact_k = exact_k;
  py::gil_scoped_release nogil;
  cpu::ties(a, threads);
}

double py_kth_largest_abs_diff(uintptr_t x, int x_dtype, uintptr_t base, int base_dtype, int64_t n, int64_t k,
                               int threads) {
  FM_CHECK_DTYPE(x_dtype, "x_dtype");
  if (base != 0) FM_CHECK_DTYPE(base_dtype, "base_dtype");
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

  m.def("weighted_delta_sum", &py_weighted_delta_sum, py::arg("out"), py::arg("out_dtype"), py::arg("n"),
        py::arg("inputs"), py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"),
        py::arg("divisor"), py::arg("lam"), py::arg("threads") = 0,
        "out = [base +] lam * (sum_i w_i * (x_i [- base])) [/ divisor], fp32 math, one rounding on store "
        "(linear, task_arithmetic). base=0: none; divisor=0.0: no division.");
  m.def("ties", &py_ties, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"), py::arg("densities"),
        py::arg("normalize"), py::arg("lam"), py::arg("election"), py::arg("exact_k"), py::arg("threads") = 0,
        "Fused TIES (trim by magnitude, elect sign, disjoint merge), fp32 math, one rounding on store. "
        "election: 0 = sum, 1 = count.");
  m.def("kth_largest_abs_diff", &py_kth_largest_abs_diff, py::arg("x"), py::arg("x_dtype"), py::arg("base"),
        py::arg("base_dtype"), py::arg("n"), py::arg("k"), py::arg("threads") = 0,
        "k-th largest |x - base| in fp32 (|x| if base=0), by radix select; NaN ranks largest.");
  m.def("scratch_bytes", &cpu::ties_scratch_bytes,
        "Bytes of grow-only scratch held for the calling thread (selection histograms, TIES blocks).");
  m.def("build_info", &build_info, "How this module was built (compiler, OpenMP, SIMD clones, versions).");
}
