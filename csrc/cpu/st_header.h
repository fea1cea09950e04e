// The safetensors header parse of fastmerge.io.index._read_header, in one pass (cpu/st_header.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace fastmerge {
namespace cpu {

// (metadata dict, [TensorInfo] sorted by (begin, end), {name: TensorInfo} in that order) of the JSON header `raw` of
// a safetensors file of `size` bytes whose data section starts at byte `data_start`, exactly as _read_header's
// Python loop builds them; None where it declines (a duplicate name among them) (any error, or JSON it does not take: the Python loop then raises its message).
// `dtypes` / `itemsize`: io.index.ST_DTYPES / ITEMSIZE. Holds the GIL (it builds Python objects throughout).
pybind11::object parse_safetensors_header(const pybind11::bytes& raw, int64_t data_start, int64_t size,
                                          const pybind11::object& path, const pybind11::type& cls,
                                          const pybind11::dict& dtypes, const pybind11::dict& itemsize);

// The whole header of a safetensors shard as fastmerge.io.writer.Shard._header_bytes writes it: the 8-byte
// little-endian length, `head` (the opening brace and __metadata__), then per row of `rows` (OutTensor: name,
// dtype, shape, nbytes in slots) `,"name":{"dtype":"BF16","shape":[a,b],"data_offsets":[begin,end]}` with offsets
// from 0 accumulated from nbytes and the safetensors dtype name from `st_names`, the closing brace and spaces to a
// multiple of 8. None where a row is not of the first row's slotted class, a name or dtype name is not plain
// printable ASCII (no quote, no backslash: json.dumps would escape it), a shape is not a tuple of non-negative
// ints or a size is negative: the caller's Python loop then writes them. Read from the rows themselves: the four
// columns taken in Python first were ~2.5 ms of a 20k-tensor shard, joining the pieces ~1.5 ms more.
pybind11::object safetensors_header(const pybind11::list& rows, const pybind11::dict& st_names, const pybind11::bytes& head);

}  // namespace cpu
}  // namespace fastmerge
