// A MoE checkpoint has 20k-45k tensor names and the planner asks each one's layer: the regex search and int() per
// name were ~0.6 us each (12 ms of a 20k-tensor plan), this loop ~30 ns.
#include "cpu/layer_index.h"

#include <Python.h>

#include <cstdint>
#include <cstring>

namespace py = pybind11;

namespace fastmerge {
namespace cpu {
namespace {

// The words of LAYER_RE's alternation: at one position at most one of them can be followed by ".<digits>."
// ("layers" and "layer" differ in the character after "layer", as "blocks" and "block").
constexpr const char* kWords[] = {"layers", "h", "layer", "blocks", "block"};

// 1: matched (layer in *out); 0: no match; -1: a match whose number is too long for int64 (the caller asks Python).
int find_layer(const char* s, Py_ssize_t n, int64_t* out) {
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i != 0 && s[i - 1] != '.') continue;
    for (const char* w : kWords) {
      const Py_ssize_t lw = static_cast<Py_ssize_t>(std::strlen(w));
      if (i + lw + 1 > n || std::memcmp(s + i, w, static_cast<size_t>(lw)) != 0 || s[i + lw] != '.') continue;
      Py_ssize_t j = i + lw + 1, k = j;
      while (k < n && s[k] >= '0' && s[k] <= '9') ++k;
      if (k == j || k >= n || s[k] != '.') continue;  // \d+ then a dot (backing off digits leaves a digit there)
      if (k - j > 18) return -1;
      int64_t v = 0;
      for (Py_ssize_t d = j; d < k; ++d) v = v * 10 + (s[d] - '0');
      *out = v;
      return 1;
    }
  }
  return 0;
}

}  // namespace

py::list layer_indices(const py::list& names, const py::object& fallback) {
  const Py_ssize_t n = PyList_GET_SIZE(names.ptr());
  py::list out(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* name = PyList_GET_ITEM(names.ptr(), i);
    int found = -1;
    int64_t v = 0;
    if (PyUnicode_Check(name) && PyUnicode_IS_ASCII(name))
      found = find_layer(reinterpret_cast<const char*>(PyUnicode_DATA(name)), PyUnicode_GET_LENGTH(name), &v);
    py::object item;
    if (found == 1) {
      item = py::reinterpret_steal<py::object>(PyLong_FromLongLong(v));
      if (!item) throw py::error_already_set();
    } else if (found == 0) {
      item = py::none();
    } else {
      item = fallback(py::reinterpret_borrow<py::object>(name));
    }
    PyList_SET_ITEM(out.ptr(), i, item.release().ptr());
  }
  return out;
}

}  // namespace cpu
}  // namespace fastmerge
