// Instances of a Python class filled field by field from C: a MoE plan makes 20k-45k TensorInfo (one per header
// entry, cpu/st_header.cpp) and OutTensor rows per model, where a dataclass __init__ run per row costs ~0.35-0.5 us
// of Python and a __dict__ per instance one more allocation than slots. (TensorPlan, which keeps a __dict__ for
// its memos, was tried too: 6.9 ms for 20k against 7.3 ms through its __init__; with its fields in slots and the
// memos in a __dict__ made at the first write it is made here too.) ``replaced``: copies of rows with one field
// changed (a header byte-identical to one parsed: the TensorInfo rows of another file).
#include "cpu/instances.h"

#include <structmember.h>

#include <string>
#include <unordered_map>

namespace py = pybind11;

namespace fastmerge {
namespace cpu {
FieldWriter::FieldWriter(const py::type& cls, PyObject* const* names, int n)
    : type_(reinterpret_cast<PyTypeObject*>(cls.ptr())), names_(names), n_(n), empty_(own(PyTuple_New(0))) {
  if (n < 0 || n > 16) throw py::value_error("FieldWriter: 0 to 16 fields");
  for (int i = 0; i < n && slotted_; ++i) {
    PyObject* d = _PyType_Lookup(type_, names[i]);  // borrowed
    slotted_ = d != nullptr && Py_TYPE(d) == &PyMemberDescr_Type &&
               reinterpret_cast<PyMemberDescrObject*>(d)->d_member->type == T_OBJECT_EX;
    if (slotted_) offsets_[i] = reinterpret_cast<PyMemberDescrObject*>(d)->d_member->offset;
  }
  if (!slotted_ && type_->tp_dictoffset == 0)
    throw py::type_error(std::string("FieldWriter: ") + type_->tp_name + " has neither these slots nor a __dict__");
}

py::object FieldWriter::make(PyObject* const* values) const {
  // object.__new__(cls): no __init__ (a frozen dataclass's is one object.__setattr__ per field)
  py::object t = own(PyBaseObject_Type.tp_new(type_, empty_.ptr(), nullptr));
  if (slotted_) {
    for (int i = 0; i < n_; ++i) {
      Py_INCREF(values[i]);
      *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(t.ptr()) + offsets_[i]) = values[i];
    }
  } else {
    // object.__setattr__, past a frozen class's own: into the instance's inline values where the class keeps them
    // (CPython 3.11+; a __dict__ made and filled was no faster than the dataclass __init__)
    for (int i = 0; i < n_; ++i)
      if (PyObject_GenericSetAttr(t.ptr(), names_[i], values[i]) < 0) throw py::error_already_set();
  }
  return t;
}

py::list instances(const py::type& cls, const py::tuple& names, const py::tuple& columns, Py_ssize_t n, Py_ssize_t start) {
  const Py_ssize_t k = PyTuple_GET_SIZE(names.ptr());
  if (PyTuple_GET_SIZE(columns.ptr()) != k) throw py::value_error("instances: one column per name");
  if (n < 0 || start < 0) throw py::value_error("instances: n < 0 or start < 0");
  PyObject* keys[16];
  PyObject* cols[16];
  bool is_list[16];
  if (k > 16) throw py::value_error("instances: at most 16 fields");
  for (Py_ssize_t j = 0; j < k; ++j) {
    keys[j] = PyTuple_GET_ITEM(names.ptr(), j);
    if (!PyUnicode_Check(keys[j])) throw py::type_error("instances: field names are str");
    cols[j] = PyTuple_GET_ITEM(columns.ptr(), j);
    is_list[j] = PyList_CheckExact(cols[j]);
    if (is_list[j] && PyList_GET_SIZE(cols[j]) < start + n) throw py::value_error("instances: a column shorter than start + n");
  }
  FieldWriter writer(cls, keys, static_cast<int>(k));
  GcPause pause;
  py::list out = own(PyList_New(n));
  PyObject* row[16];
  for (Py_ssize_t i = 0; i < n; ++i) {
    for (Py_ssize_t j = 0; j < k; ++j) row[j] = is_list[j] ? PyList_GET_ITEM(cols[j], start + i) : cols[j];
    PyList_SET_ITEM(out.ptr(), i, writer.make(row).release().ptr());
  }
  return out;
}

py::object replaced(const py::type& cls, const py::tuple& names, const py::object& rows, Py_ssize_t k, const py::object& value) {
  const Py_ssize_t nf = PyTuple_GET_SIZE(names.ptr());
  if (nf > 16) throw py::value_error("replaced: at most 16 fields");
  if (k < 0 || k >= nf) throw py::value_error("replaced: k is not a field's position");
  PyObject* keys[16];
  for (Py_ssize_t j = 0; j < nf; ++j) {
    keys[j] = PyTuple_GET_ITEM(names.ptr(), j);
    if (!PyUnicode_Check(keys[j])) throw py::type_error("replaced: field names are str");
  }
  FieldWriter writer(cls, keys, static_cast<int>(nf));
  if (!writer.slotted()) throw py::type_error("replaced: the fields are not all slots of the class");
  const bool keyed = PyDict_CheckExact(rows.ptr());
  if (!keyed && !PyList_CheckExact(rows.ptr())) throw py::type_error("replaced: rows are a list or a dict");
  const Py_ssize_t n = keyed ? PyDict_GET_SIZE(rows.ptr()) : PyList_GET_SIZE(rows.ptr());
  GcPause pause;
  py::object out = own(keyed ? dict_presized(n) : PyList_New(n));
  PyObject* row[16];
  Py_ssize_t pos = 0, i = 0;
  PyObject *key = nullptr, *src = nullptr;
  Py_hash_t hash = 0;
  // a dict: its keys in its order, each with its copied row (the key's hash as the source dict keeps it)
  while (keyed ? dict_next(rows.ptr(), &pos, &key, &src, &hash) : i < n) {
    if (!keyed) src = PyList_GET_ITEM(rows.ptr(), i);
    if (Py_TYPE(src) != reinterpret_cast<PyTypeObject*>(cls.ptr())) throw py::type_error("replaced: a row of another class");
    for (Py_ssize_t j = 0; j < nf; ++j) {
      row[j] = writer.slot(src, static_cast<int>(j));
      if (row[j] == nullptr && j != k) throw py::value_error("replaced: a row with an unset field");
    }
    row[k] = value.ptr();
    py::object made = writer.make(row);
    if (keyed) {
      if (dict_set_with_hash(out.ptr(), key, made.ptr(), hash) < 0) throw py::error_already_set();
    } else {
      PyList_SET_ITEM(out.ptr(), i, made.release().ptr());
    }
    ++i;
  }
  if (keyed && PyDict_GET_SIZE(rows.ptr()) != n) throw py::value_error("replaced: the dict changed");
  return out;
}

py::list mapped_by_identity(const py::list& values, const py::object& fn) {
  const Py_ssize_t n = PyList_GET_SIZE(values.ptr());
  std::unordered_map<PyObject*, PyObject*> answers;  // borrowed keys (values holds them), owned answers (out holds them)
  py::list out = own(PyList_New(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = PyList_GET_ITEM(values.ptr(), i);
    auto found = answers.find(v);
    if (found == answers.end()) {
      // fn may run Python that changes `values`: the list is read again after it (its length too)
      py::object got = fn(py::reinterpret_borrow<py::object>(v), i);
      if (PyList_GET_SIZE(values.ptr()) != n || PyList_GET_ITEM(values.ptr(), i) != v)
        throw py::value_error("mapped_by_identity: the list changed");
      found = answers.emplace(v, got.ptr()).first;
      PyList_SET_ITEM(out.ptr(), i, got.release().ptr());
      continue;
    }
    Py_INCREF(found->second);
    PyList_SET_ITEM(out.ptr(), i, found->second);
  }
  return out;
}

py::list transposed(const py::list& columns, Py_ssize_t start) {
  const Py_ssize_t k = PyList_GET_SIZE(columns.ptr());
  Py_ssize_t n = -1;
  for (Py_ssize_t j = 0; j < k; ++j) {
    PyObject* c = PyList_GET_ITEM(columns.ptr(), j);
    if (!PyList_CheckExact(c)) throw py::type_error("transposed: columns are lists");
    if (n >= 0 && PyList_GET_SIZE(c) != n) throw py::value_error("transposed: columns of different lengths");
    n = PyList_GET_SIZE(c);
  }
  if (n < 0) n = 0;
  if (start < 0 || start > n) throw py::value_error("transposed: start outside the columns");
  GcPause pause;
  py::list out = own(PyList_New(n - start));
  for (Py_ssize_t i = start; i < n; ++i) {
    PyObject* row = PyList_New(k);
    if (row == nullptr) throw py::error_already_set();
    for (Py_ssize_t j = 0; j < k; ++j) {
      PyObject* v = PyList_GET_ITEM(PyList_GET_ITEM(columns.ptr(), j), i);
      Py_INCREF(v);
      PyList_SET_ITEM(row, j, v);
    }
    PyList_SET_ITEM(out.ptr(), i - start, row);
  }
  return out;
}

}  // namespace cpu
}  // namespace fastmerge
