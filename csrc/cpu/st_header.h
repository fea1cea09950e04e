// The safetensors header parse of fastmerge.io.index._read_header, in one pass (cpu/st_header.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastmerge {
namespace cpu {

// (metadata dict, [TensorInfo] sorted by (begin, end)) of the JSON header `raw` of a safetensors file of
// `size` bytes whose data section starts at byte `data_start`, exactly as _read_header's Python loop builds
// them; None where it declines (any error, or JSON it does not take: the Python loop then raises its message).
// `dtypes` / `itemsize`: io.index.ST_DTYPES / ITEMSIZE. Holds the GIL (it builds Python objects throughout).
pybind11::object parse_safetensors_header(const pybind11::bytes& raw, int64_t data_start, int64_t size,
                                          const pybind11::object& path, const pybind11::type& cls,
                                          const pybind11::dict& dtypes, const pybind11::dict& itemsize);

}  // namespace cpu
}  // namespace fastmerge
