// Many instances of one Python class from columns of field values (cpu/instances.cpp).
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

namespace fastmerge {
namespace cpu {

// A new reference from the C API, or the pending Python error (allocation failures only) as an exception.
inline pybind11::object own(PyObject* o) {
  if (o == nullptr) throw pybind11::error_already_set();
  return pybind11::reinterpret_steal<pybind11::object>(o);
}

// CPython's private dict calls where this build's headers export them (3.10-3.12): a table presized, walked with its
// keys' hashes and filled with them (no rehash of 20k-45k names); the public calls elsewhere.
inline PyObject* dict_presized(Py_ssize_t n) {
#if PY_VERSION_HEX < 0x030D0000
  return _PyDict_NewPresized(n);
#else
  (void)n;
  return PyDict_New();
#endif
}
inline int dict_next(PyObject* d, Py_ssize_t* pos, PyObject** key, PyObject** value, Py_hash_t* hash) {
#if PY_VERSION_HEX < 0x030D0000
  return _PyDict_Next(d, pos, key, value, hash);
#else
  *hash = -1;
  return PyDict_Next(d, pos, key, value);
#endif
}
inline int dict_set_with_hash(PyObject* d, PyObject* key, PyObject* value, Py_hash_t hash) {
#if PY_VERSION_HEX < 0x030D0000
  return _PyDict_SetItem_KnownHash(d, key, value, hash);
#else
  (void)hash;
  return PyDict_SetItem(d, key, value);
#endif
}

// The cyclic garbage collector off for a scope (as it was before, after it): tens of thousands of new container
// objects would start collections of the young generation, none of which can free anything they make.
struct GcPause {
  const int was_enabled = PyGC_Disable();
  ~GcPause() {
    if (was_enabled) PyGC_Enable();
  }
};

// How instances of a class get their fields: written into its __slots__ (each name a slot of the class), else
// set in each instance's __dict__. What a dataclass's __init__ would store, without calling it.
class FieldWriter {
 public:
  FieldWriter(const pybind11::type& cls, PyObject* const* names, int n);
  // A new instance with field k = values[k]; a Python error as pybind11::error_already_set.
  pybind11::object make(PyObject* const* values) const;
  bool slotted() const { return slotted_; }
  // field k of obj (an instance of the class; slotted() only), borrowed; null where unset
  PyObject* slot(PyObject* obj, int k) const {
    return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(obj) + offsets_[k]);
  }

 private:
  PyTypeObject* type_;
  PyObject* const* names_;
  int n_;
  bool slotted_ = true;
  Py_ssize_t offsets_[16];
  pybind11::object empty_;
};

// [cls instance i with names[k] = columns[k][start + i] for each k, i < n]; a column that is not a list is every
// row's value. Lists shorter than start + n: ValueError. For a plan's 20k-45k OutTensor rows of a MoE model, where the dataclass
// __init__ called per row was ~0.5 us of Python each.
pybind11::list instances(const pybind11::type& cls, const pybind11::tuple& names, const pybind11::tuple& columns,
                         Py_ssize_t n, Py_ssize_t start);

// [a copy of rows[i] with field names[k] = value]: rows all exactly of cls, whose fields names are all slots, each set
// (ValueError otherwise). A header byte-identical to one parsed already: its 20k-45k TensorInfo rows with
// another file, without a column per field taken in Python first (~1 ms each). `rows` a dict: a dict of the same
// keys, in the same order, each with its row's copy (the table by name, without hashing a name again).
pybind11::object replaced(const pybind11::type& cls, const pybind11::tuple& names, const pybind11::object& rows,
                          Py_ssize_t k, const pybind11::object& value);

// [fn(values[i], i) for each i], fn called once per distinct object of values (by identity: its first index i), its
// answer shared by the others. A MoE plan's 20k-45k rows share a few dozen shape tuples: the backend and the byte
// size of each shape, asked once, mapped over the rows (three passes over dicts keyed by id() were ~4 ms).
pybind11::list mapped_by_identity(const pybind11::list& values, const pybind11::object& fn);

// [[columns[0][i], columns[1][i], ...] for i from start]: the lists of equal length (ValueError otherwise). Each
// planned tensor's sources (one list per tensor) from its models' input columns, without a tuple per row.
pybind11::list transposed(const pybind11::list& columns, Py_ssize_t start);

}  // namespace cpu
}  // namespace fastmerge
