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

// The tensor entries of a safetensors header as fastmerge.io.writer.Shard._header_bytes writes them, bytes of
// `,"name":{"dtype":"BF16","shape":[a,b],"data_offsets":[begin,end]}` per tensor, offsets from 0 accumulated
// from `nbytes`; None where a name or dtype is not plain printable ASCII (no quote, no backslash: json.dumps would
// escape it), a shape is not a tuple of non-negative ints or a size is negative: the caller's Python loop then
// writes them. Columns are lists of equal length.
pybind11::object format_safetensors_entries(const pybind11::list& names, const pybind11::list& dtypes,
                                            const pybind11::list& shapes, const pybind11::list& nbytes);

}  // namespace cpu
}  // namespace fastmerge
