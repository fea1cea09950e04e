// fastmerge.io.index.layer_indices over a list of tensor names in one pass (cpu/layer_index.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fastmerge {
namespace cpu {

// For each name, what fastmerge.io.index.LAYER_RE.search(name) gives as int(group 1), or None where it does not
// match: the leftmost "layers.N." / "h.N." / "layer.N." / "blocks.N." / "block.N." starting the name or after a
// dot. A name that is not ASCII (Python's \d also takes other decimal digits) or whose N has more than 18 digits is
// given to `fallback` (io.index.layer_index) instead. Holds the GIL.
pybind11::list layer_indices(const pybind11::list& names, const pybind11::object& fallback);

}  // namespace cpu
}  // namespace fastmerge
