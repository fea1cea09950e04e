// fastmerge._C_cuda: the CUDA kernels, bound on raw device pointers (same conventions as _C, see
// bind_cpu.cpp), plus a runtime availability check.
//
// The module links the CUDA runtime statically (CMAKE_CUDA_RUNTIME_LIBRARY Static), so it imports on a
// machine without a GPU or driver; importing therefore says nothing about usability. is_available() asks
// the driver (cudaGetDeviceCount: cudaErrorInsufficientDriver without one) and checks that this binary
// has code for the device (cudaFuncGetAttributes on the kernel). fastmerge._native.cuda_usable() gates on it.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fastmerge/common.h"
#include "fastmerge/gta.h"
#include "fastmerge/ties.h"

#ifndef FASTMERGE_VERSION
#define FASTMERGE_VERSION "unknown"
#endif
#ifndef FASTMERGE_COMPILER
#define FASTMERGE_COMPILER "unknown"
#endif
#ifndef FASTMERGE_CUDA_COMPILER
#define FASTMERGE_CUDA_COMPILER "unknown"
#endif
#ifndef FASTMERGE_CUDA_ARCHS
#define FASTMERGE_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using namespace fastmerge;

namespace {

std::string err_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

std::pair<bool, std::string> is_available() {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // reset the (non-sticky) last-error state so later runtime calls start clean
    return {false, err_text(e)};
  }
  if (count == 0) return {false, "no CUDA device"};
  int dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceProp prop;
  e = cudaGetDeviceProperties(&prop, dev);
  if (e != cudaSuccess) return {false, err_text(e)};
  const std::string cc = std::to_string(prop.major) + "." + std::to_string(prop.minor);
  e = static_cast<cudaError_t>(cuda::check_kernel_image());
  if (e != cudaSuccess) {
    cudaGetLastError();
    return {false, err_text(e) + " (device " + std::to_string(dev) + " is " + prop.name + ", compute capability " +
                       cc + "; this build has code for CUDA archs " + FASTMERGE_CUDA_ARCHS +
                       ": rebuild with FASTMERGE_CUDA_ARCHS=" + std::to_string(prop.major * 10 + prop.minor) + ")"};
  }
  return {true, std::to_string(count) + " device(s); device " + std::to_string(dev) + ": " + prop.name +
                    " (compute capability " + cc + ")"};
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

// A host pointer handed to a kernel is an illegal access that poisons the whole CUDA context, so check
// each pointer's memory type first (one cheap driver query per buffer).
void check_device_pointer(uintptr_t p, const std::string& name) {
  cudaPointerAttributes attr;
  const cudaError_t e = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(p));
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::invalid_argument(name + ": not a CUDA pointer (" + err_text(e) + ")");
  }
  FM_CHECK(attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged,
           name << ": must point to device memory (got a host pointer)");
}

void py_ties(uintptr_t out, int out_dtype, int64_t n, const std::vector<uintptr_t>& inputs,
             const std::vector<int>& input_dtypes, uintptr_t base, int base_dtype, const std::vector<double>& weights,
             const std::vector<double>& densities, bool normalize, double lam, int election, bool exact_k,
             uintptr_t stream, bool rescale, uintptr_t scratch, size_t scratch_bytes) {
  FM_CHECK(n >= 0, "n: element count must be >= 0, got " << n);
  FM_CHECK(!inputs.empty(), "inputs: need at least one input buffer");
  FM_CHECK(int(inputs.size()) <= cuda::kMaxInputs,
           "inputs: at most " << cuda::kMaxInputs << " inputs per launch, got " << inputs.size());
  FM_CHECK(input_dtypes.size() == inputs.size(), "input_dtypes: " << input_dtypes.size() << " dtype codes for "
                                                                  << inputs.size() << " inputs");
  FM_CHECK(weights.size() == inputs.size(),
           "weights: " << weights.size() << " weights for " << inputs.size() << " inputs");
  FM_CHECK(densities.size() == inputs.size(),
           "densities: " << densities.size() << " densities for " << inputs.size() << " inputs");
  for (size_t i = 0; i < densities.size(); ++i) {
    FM_CHECK(densities[i] > 0.0, "densities[" << i << "]: density must be > 0 (1 keeps everything), got "
                                              << densities[i]);
  }
  FM_CHECK(election == ties::SUM || election == ties::COUNT,
           "election: must be 0 (sum) or 1 (count), got " << election);
  FM_CHECK_DTYPE(out_dtype, "out_dtype");
  FM_CHECK_DTYPE(base_dtype, "base_dtype");
  if (n == 0) return;
  std::vector<const void*> ptrs;
  std::vector<float> w;
  for (size_t i = 0; i < inputs.size(); ++i) {
    FM_CHECK_DTYPE(input_dtypes[i], "input_dtypes[" << i << "]");
    check_device_pointer(inputs[i], "inputs[" + std::to_string(i) + "]");
    ptrs.push_back(reinterpret_cast<const void*>(inputs[i]));
    w.push_back(static_cast<float>(weights[i]));
  }
  check_device_pointer(out, "out");
  check_device_pointer(base, "base");
  const size_t need = cuda::ties_scratch_bytes(n, int(inputs.size()));
  FM_CHECK(scratch_bytes >= need, "scratch: " << scratch_bytes << " bytes given, ties needs " << need
                                               << " (ties_scratch_bytes(n, len(inputs)))");
  check_device_pointer(scratch, "scratch");
  TiesArgs a{};
  a.g.out = reinterpret_cast<void*>(out);
  a.g.out_dtype = out_dtype;
  a.g.n = n;
  a.g.num_inputs = int(ptrs.size());
  a.g.inputs = ptrs.data();
  a.g.input_dtypes = input_dtypes.data();
  a.g.weights = w.data();
  a.g.base = reinterpret_cast<const void*>(base);
  a.g.base_dtype = base_dtype;
  a.g.tail = gta::make_tail(election, normalize, lam, w.data(), int(w.size()));
  a.g.rescale = rescale;
  a.densities = densities.data();
  a.exact_k = exact_k;
  cudaError_t e;
  {
    py::gil_scoped_release nogil;  // only launches: the kernels run asynchronously on `stream`
    e = static_cast<cudaError_t>(
        cuda::ties(a, reinterpret_cast<void*>(scratch), scratch_bytes, reinterpret_cast<void*>(stream)));
  }
  if (e != cudaSuccess) throw std::runtime_error("ties: CUDA error: " + err_text(e));
}

py::dict build_info() {
  py::dict d;
  d["module"] = "fastmerge._C_cuda";
  d["version"] = FASTMERGE_VERSION;
  d["compiler"] = FASTMERGE_COMPILER;
  d["cuda_compiler"] = FASTMERGE_CUDA_COMPILER;
  d["cuda_archs"] = FASTMERGE_CUDA_ARCHS;
  d["cudart_static"] = true;
  d["cudart_build_version"] = long(CUDART_VERSION);
  int v = 0;
  d["cudart_version"] = cudaRuntimeGetVersion(&v) == cudaSuccess ? py::object(py::int_(v)) : py::object(py::none());
  v = 0;
  // 0 when no driver is installed
  d["driver_version"] = cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
  d["max_inputs"] = cuda::kMaxInputs;
  d["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                  std::to_string(PYBIND11_VERSION_PATCH);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastmerge CUDA kernels on raw device pointers (use fastmerge._native for checked wrappers)";
  m.attr("__version__") = FASTMERGE_VERSION;
  m.def("is_available", &is_available,
        "(True, description) if a driver, a device and a kernel image for it are present; else (False, reason).");
  m.def("device_count", &device_count, "Number of CUDA devices (0 without a driver).");
  m.def("ties", &py_ties, py::arg("out"), py::arg("out_dtype"), py::arg("n"), py::arg("inputs"),
        py::arg("input_dtypes"), py::arg("base"), py::arg("base_dtype"), py::arg("weights"), py::arg("densities"),
        py::arg("normalize"), py::arg("lam"), py::arg("election"), py::arg("exact_k"), py::arg("stream") = 0,
        py::arg("rescale") = false, py::arg("scratch") = 0, py::arg("scratch_bytes") = 0,
        "Same semantics as fastmerge._C.ties on device pointers; asynchronous on `stream` (the selection is "
        "decided on the device, nothing is read back). `scratch`: device memory of ties_scratch_bytes(n, "
        "len(inputs)) bytes (a torch tensor: no cudaMalloc inside).");
  m.def("ties_scratch_bytes", &cuda::ties_scratch_bytes, py::arg("n"), py::arg("num_inputs"),
        "Bytes of device scratch one ties() call needs.");
  m.def("build_info", &build_info, "How this module was built (nvcc, archs, CUDA runtime/driver versions).");
}
