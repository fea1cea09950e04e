// A safetensors header straight into fastmerge.io.index.TensorInfo objects, for CheckpointIndex.open.
//
// A DeepSeek-V3-shaped header holds 20k-45k entries (2.4 MB of JSON for the 20,347 of bench_moe.py's
// moe-small); json.loads builds a dict per entry and _read_header's Python loop then checks each one and makes
// its TensorInfo: ~0.15 s per header, three headers per merge. Here one pass over the bytes checks each entry as
// it is read and only the objects that are returned are made (a str name, two ints, a TensorInfo with slots;
// one shape tuple per distinct (dtype, shape), as the Python loop's cache shares them).
//
// Only what a safetensors writer produces is taken: an object of tensor entries, each an object of exactly
// "dtype" (a string), "shape" (non-negative integers) and "data_offsets" (two of them) in any order, and an
// optional "__metadata__" object of strings; strings with any JSON escape (surrogate pairs joined), JSON
// whitespace anywhere. Anything else - a float, a negative or 19-digit integer, an extra key, a duplicate key,
// a lone surrogate, invalid UTF-8, a byte-order mark, trailing data - and every failed check (unknown dtype,
// offsets that disagree with the shape or leave the file, overlap, gap, bytes after the last tensor) returns
// None: _read_header then runs its Python loop, which accepts what it accepts and raises its one-line
// CheckpointError naming the file and tensor. A decline costs the parse done so far, nothing more.
#include "cpu/st_header.h"
#include "cpu/instances.h"

#include <Python.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace fastmerge {
namespace cpu {
namespace {

struct Dtype {
  std::string st;    // safetensors name ("BF16")
  py::object name;   // the ST_DTYPES value, the very str object the Python loop stores ("bfloat16")
  int64_t itemsize;
};

// JSON tokens over raw bytes. Every method returns false for input it does not take; the cursor is then
// meaningless (the parse is abandoned).
class Json {
 public:
  Json(const char* b, size_t n) : p_(b), end_(b + n) {}

  void ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
  }
  bool eat(char c) {
    ws();
    if (p_ < end_ && *p_ == c) {
      ++p_;
      return true;
    }
    return false;
  }
  bool at_end() {
    ws();
    return p_ == end_;
  }

  // A string, its escapes decoded, as UTF-8 bytes (not validated here: PyUnicode_DecodeUTF8 checks the strings
  // that become str objects; the others are compared with ASCII names). The view lives until the next str().
  bool str(std::string_view& out) {
    if (!eat('"')) return false;
    const char* s = p_;
    while (p_ < end_) {  // the common case: no escape, a view of the raw bytes
      const auto c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        out = std::string_view(s, static_cast<size_t>(p_ - s));
        ++p_;
        return true;
      }
      if (c == '\\') break;
      if (c < 0x20) return false;  // json.loads (strict) refuses control characters in strings
      ++p_;
    }
    buf_.assign(s, p_);
    while (p_ < end_) {
      const auto c = static_cast<unsigned char>(*p_++);
      if (c == '"') {
        out = buf_;
        return true;
      }
      if (c < 0x20) return false;
      if (c != '\\') {
        buf_.push_back(static_cast<char>(c));
        continue;
      }
      if (p_ >= end_) return false;
      switch (*p_++) {
        case '"': buf_.push_back('"'); break;
        case '\\': buf_.push_back('\\'); break;
        case '/': buf_.push_back('/'); break;
        case 'b': buf_.push_back('\b'); break;
        case 'f': buf_.push_back('\f'); break;
        case 'n': buf_.push_back('\n'); break;
        case 'r': buf_.push_back('\r'); break;
        case 't': buf_.push_back('\t'); break;
        case 'u': {
          uint32_t cp = 0, lo = 0;
          if (!hex4(cp)) return false;
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // a high surrogate: only as the first half of a pair
            if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u') return false;
            p_ += 2;
            if (!hex4(lo) || lo < 0xDC00 || lo > 0xDFFF) return false;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return false;  // json.loads gives a lone surrogate, which the Python loop may keep
          }
          utf8(cp);
          break;
        }
        default: return false;
      }
    }
    return false;
  }

  // A non-negative integer of at most 18 digits (below 2^63; a larger offset is not a file of this world,
  // and Python's ints take it), no fraction or exponent.
  bool uint(int64_t& v) {
    ws();
    const char* s = p_;
    while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    const size_t n = static_cast<size_t>(p_ - s);
    if (n == 0 || n > 18 || (n > 1 && *s == '0')) return false;
    if (p_ < end_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E')) return false;
    v = 0;
    for (const char* q = s; q < p_; ++q) v = v * 10 + (*q - '0');
    return true;
  }

 private:
  bool hex4(uint32_t& v) {
    if (end_ - p_ < 4) return false;
    v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = *p_++;
      uint32_t d;
      if (c >= '0' && c <= '9') d = static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f') d = static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') d = static_cast<uint32_t>(c - 'A' + 10);
      else return false;
      v = v * 16 + d;
    }
    return true;
  }
  void utf8(uint32_t cp) {
    if (cp < 0x80) {
      buf_.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      buf_.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      buf_.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      buf_.push_back(static_cast<char>(0xE0 | (cp >> 12)));
      buf_.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      buf_.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      buf_.push_back(static_cast<char>(0xF0 | (cp >> 18)));
      buf_.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      buf_.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      buf_.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  const char* p_;
  const char* end_;
  std::string buf_;
};

// A str of UTF-8 bytes; a null object (error cleared) for invalid UTF-8, which json.loads refuses too.
py::object utf8_str(std::string_view s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), nullptr);
  if (o == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) throw py::error_already_set();
    PyErr_Clear();
    return py::object();
  }
  return py::reinterpret_steal<py::object>(o);
}

struct Entry {
  py::object name;
  PyObject* shape;  // borrowed from the shape cache
  int dtype;        // index into the dtype table
  int64_t begin, end;  // absolute byte offsets
};

struct Shape {
  py::object tuple;
  int64_t nbytes;
};

class HeaderParser {
 public:
  HeaderParser(const char* raw, size_t n, int64_t data_start, int64_t size, std::vector<Dtype>& dtypes)
      : js_(raw, n), data_start_(data_start), size_(size), dtypes_(dtypes) {}

  // false: declined
  bool parse() {
    if (!js_.eat('{')) return false;
    if (!js_.eat('}')) {
      do {
        std::string_view key;
        if (!js_.str(key) || !js_.eat(':')) return false;
        if (key == "__metadata__") {
          if (meta_ || !metadata()) return false;
        } else if (!entry(key)) {
          return false;
        }
      } while (js_.eat(','));
      if (!js_.eat('}')) return false;
    }
    if (!js_.at_end()) return false;
    if (!meta_) meta_ = own(PyDict_New());
    return layout();
  }

  py::object result(const py::object& path, const py::type& cls) {
    static PyObject* const keys[6] = {PyUnicode_InternFromString("name"), PyUnicode_InternFromString("file"),
                                      PyUnicode_InternFromString("dtype"), PyUnicode_InternFromString("shape"),
                                      PyUnicode_InternFromString("begin"), PyUnicode_InternFromString("end")};
    for (PyObject* k : keys)
      if (k == nullptr) throw py::error_already_set();
    // 20k+ container objects would start collections of the young generation, none of which can free anything
    // here: a quarter of this call (18.1 -> 13.6 ms, 20k entries); slots instead of a __dict__ each: 13.6 -> ~10 ms
    GcPause pause;
    FieldWriter writer(cls, keys, 6);  // TensorInfo's slots
    py::object list = own(PyList_New(static_cast<Py_ssize_t>(order_.size())));
    // the rows by name too, in file order: the checkpoint's table (a set of the names for the duplicate check, and
    // the table built from them after, hashed and inserted each name twice)
    py::object by_name = own(dict_presized(static_cast<Py_ssize_t>(order_.size())));  // no resize as it fills
    for (size_t k = 0; k < order_.size(); ++k) {
      const Entry& e = entries_[order_[k]];
      py::object b = own(PyLong_FromLongLong(e.begin)), en = own(PyLong_FromLongLong(e.end));
      PyObject* vals[6] = {e.name.ptr(), path.ptr(), dtypes_[e.dtype].name.ptr(), e.shape, b.ptr(), en.ptr()};
      PyObject* row = writer.make(vals).release().ptr();
      PyList_SET_ITEM(list.ptr(), static_cast<Py_ssize_t>(k), row);
      if (PyDict_SetItem(by_name.ptr(), e.name.ptr(), row) < 0) throw py::error_already_set();
      if (PyDict_GET_SIZE(by_name.ptr()) != static_cast<Py_ssize_t>(k) + 1)
        return py::none();  // a duplicate name: json.loads keeps the last, the Python loop decides
    }
    return py::make_tuple(meta_, list, by_name);
  }

 private:
  bool metadata() {
    meta_ = own(PyDict_New());
    if (!js_.eat('{')) return false;
    if (js_.eat('}')) return true;
    do {
      std::string_view s;
      if (!js_.str(s)) return false;
      py::object k = utf8_str(s);
      if (!k || !js_.eat(':') || !js_.str(s)) return false;
      py::object v = utf8_str(s);
      if (!v) return false;
      const int had = PyDict_Contains(meta_.ptr(), k.ptr());
      if (had < 0) throw py::error_already_set();
      if (had) return false;  // json.loads keeps the last value; the Python loop decides
      if (PyDict_SetItem(meta_.ptr(), k.ptr(), v.ptr()) < 0) throw py::error_already_set();
    } while (js_.eat(','));
    return js_.eat('}');
  }

  bool entry(std::string_view key) {
    Entry e;
    e.name = utf8_str(key);
    if (!e.name) return false;

    int dtype = -1;
    bool has_shape = false, has_offsets = false;
    int64_t b = 0, en = 0;
    if (!js_.eat('{')) return false;
    do {
      std::string_view k;
      if (!js_.str(k) || !js_.eat(':')) return false;
      if (k == "dtype" && dtype < 0) {
        std::string_view st;
        if (!js_.str(st)) return false;
        for (size_t i = 0; i < dtypes_.size() && dtype < 0; ++i)
          if (dtypes_[i].st == st) dtype = static_cast<int>(i);
        if (dtype < 0) return false;
      } else if (k == "shape" && !has_shape) {
        dims_.clear();
        if (!js_.eat('[')) return false;
        if (!js_.eat(']')) {
          do {
            int64_t d;
            if (!js_.uint(d)) return false;
            dims_.push_back(d);
          } while (js_.eat(','));
          if (!js_.eat(']')) return false;
        }
        has_shape = true;
      } else if (k == "data_offsets" && !has_offsets) {
        if (!js_.eat('[') || !js_.uint(b) || !js_.eat(',') || !js_.uint(en) || !js_.eat(']')) return false;
        has_offsets = true;
      } else {
        return false;  // an unknown or repeated key
      }
    } while (js_.eat(','));
    if (!js_.eat('}') || dtype < 0 || !has_shape || !has_offsets) return false;

    // entries come in runs of a few shapes (an expert's 3 matrices, 256 experts a layer): the last few first, then
    // the cache (its key built and hashed was most of an entry's shape step where the shapes alternate)
    const Shape* s = nullptr;
    for (const Recent& r : recent_) {
      if (r.shape != nullptr && r.dtype == dtype && r.dims == dims_) {
        s = r.shape;
        break;
      }
    }
    if (s == nullptr) {
      s = shape(dtype);
      if (s == nullptr) return false;
      Recent& slot = recent_[next_recent_++ % recent_.size()];
      slot.shape = s;
      slot.dtype = dtype;
      slot.dims = dims_;
    }
    if (en < b || en - b != s->nbytes || data_start_ + en > size_) return false;
    e.shape = s->tuple.ptr();
    e.dtype = dtype;
    e.begin = data_start_ + b;
    e.end = data_start_ + en;
    entries_.push_back(std::move(e));
    return true;
  }

  // The cached (tuple, byte size) of dims_ in a dtype; null if numel * itemsize overflows int64.
  const Shape* shape(int dtype) {
    key_.assign(1, static_cast<char>(dtype));
    key_.append(reinterpret_cast<const char*>(dims_.data()), dims_.size() * sizeof(int64_t));
    auto it = shapes_.find(key_);
    if (it != shapes_.end()) return &it->second;
    int64_t nbytes = dtypes_[dtype].itemsize;
    for (int64_t d : dims_) {
      if (d != 0 && nbytes > INT64_MAX / d) return nullptr;  // Python's ints would take it; no file holds it
      nbytes *= d;
    }
    py::object t = own(PyTuple_New(static_cast<Py_ssize_t>(dims_.size())));
    for (size_t i = 0; i < dims_.size(); ++i)
      PyTuple_SET_ITEM(t.ptr(), static_cast<Py_ssize_t>(i), own(PyLong_FromLongLong(dims_[i])).release().ptr());
    return &shapes_.emplace(key_, Shape{std::move(t), nbytes}).first->second;
  }

  // File order (stable by (begin, end), as list.sort), and the data section covered back to back from its
  // first byte to the end of the file.
  bool layout() {
    order_.resize(entries_.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<uint32_t>(i);
    const auto before = [this](uint32_t x, uint32_t y) {
      const Entry &a = entries_[x], &b = entries_[y];
      return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
    };
    // writers list the entries in file order (one check instead of a merge sort of 20k-45k)
    if (!std::is_sorted(order_.begin(), order_.end(), before)) std::stable_sort(order_.begin(), order_.end(), before);
    int64_t pos = data_start_;
    for (uint32_t i : order_) {
      if (entries_[i].begin != pos) return false;
      pos = entries_[i].end;
    }
    return pos == size_;
  }

  Json js_;
  const int64_t data_start_, size_;
  std::vector<Dtype>& dtypes_;
  py::object meta_;
  std::vector<Entry> entries_;
  std::vector<uint32_t> order_;
  std::vector<int64_t> dims_;
  std::string key_;
  struct Recent {
    const Shape* shape = nullptr;  // unordered_map nodes do not move
    int dtype = -1;
    std::vector<int64_t> dims;
  };
  std::array<Recent, 4> recent_;  // the shapes seen last, replaced in turn
  size_t next_recent_ = 0;
  // the shape cache grows by (dtype, shape) seen: a few dozen in a MoE header of 20k entries
  std::unordered_map<std::string, Shape> shapes_;
};

// A name safetensors' own writer (serde_json) and json.dumps both write as itself between quotes: printable
// ASCII other than '"' and '\\' (the rule of fastmerge.io.writer._PLAIN_NAMES).
bool plain_name(const char* s, Py_ssize_t n) {
  for (Py_ssize_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') return false;
  }
  return true;
}

void append_int(std::string& out, int64_t v) {
  char buf[24];  // int64's 19 digits and a sign
  const auto r = std::to_chars(buf, buf + sizeof(buf), v);
  out.append(buf, static_cast<size_t>(r.ptr - buf));
}

}  // namespace

py::object parse_safetensors_header(const py::bytes& raw, int64_t data_start, int64_t size, const py::object& path,
                                    const py::type& cls, const py::dict& dtypes, const py::dict& itemsize) {
  std::vector<Dtype> table;
  for (auto kv : dtypes) {
    py::object name = py::reinterpret_borrow<py::object>(kv.second);
    table.push_back(Dtype{py::cast<std::string>(kv.first), name, py::cast<int64_t>(itemsize[name])});
  }
  char* buf = nullptr;
  Py_ssize_t n = 0;
  if (PyBytes_AsStringAndSize(raw.ptr(), &buf, &n) < 0) throw py::error_already_set();
  HeaderParser parser(buf, static_cast<size_t>(n), data_start, size, table);
  if (!parser.parse()) return py::none();
  return parser.result(path, cls);
}

py::object safetensors_header(const py::list& rows, const py::dict& st_names, const py::bytes& head) {
  const Py_ssize_t n = PyList_GET_SIZE(rows.ptr());
  static PyObject* const keys[4] = {PyUnicode_InternFromString("name"), PyUnicode_InternFromString("dtype"),
                                    PyUnicode_InternFromString("shape"), PyUnicode_InternFromString("nbytes")};
  for (PyObject* k : keys)
    if (k == nullptr) throw py::error_already_set();
  char* hb = nullptr;
  Py_ssize_t hn = 0;
  if (PyBytes_AsStringAndSize(head.ptr(), &hb, &hn) < 0) throw py::error_already_set();
  // Two passes: each row's pieces found and the exact size summed, then the bytes written in place into the bytes
  // object (a std::string grown piece by piece and copied out after was ~2x the time for 20k rows).
  struct Piece {
    const char* name;
    size_t name_len;
    const std::string_view* st;
    const std::string* shape;
    int64_t begin, end;
  };
  std::vector<Piece> pieces(static_cast<size_t>(n));
  // the text of each distinct shape tuple object (the plan shares them: a few dozen in 20k tensors, which
  // alternate - an expert's down, gate and up projections), and the safetensors name of each dtype str object
  std::unordered_map<PyObject*, std::string> shape_texts;
  std::unordered_map<PyObject*, std::string_view> st_of;
  static constexpr size_t kFixed = 2 + 12 + 11 + 18 + 1 + 2;  // the entry's text around its variable parts
  size_t total = 8 + static_cast<size_t>(hn) + 1;  // length, head, closing brace
  char digits[24];
  if (n) {
    PyTypeObject* type = Py_TYPE(PyList_GET_ITEM(rows.ptr(), 0));
    FieldWriter fields(py::reinterpret_borrow<py::type>(reinterpret_cast<PyObject*>(type)), keys, 4);
    if (!fields.slotted()) return py::none();
    int64_t at = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* row = PyList_GET_ITEM(rows.ptr(), i);
      if (Py_TYPE(row) != type) return py::none();
      PyObject* name = fields.slot(row, 0);
      PyObject* dtype = fields.slot(row, 1);
      PyObject* shape = fields.slot(row, 2);
      PyObject* nbytes = fields.slot(row, 3);
      if (name == nullptr || dtype == nullptr || shape == nullptr || nbytes == nullptr) return py::none();
      Piece& pc = pieces[static_cast<size_t>(i)];
      Py_ssize_t ln = 0;
      pc.name = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &ln) : nullptr;  // the str's own buffer
      if (pc.name == nullptr) {
        PyErr_Clear();
        return py::none();
      }
      if (!plain_name(pc.name, ln)) return py::none();
      pc.name_len = static_cast<size_t>(ln);
      auto st = st_of.find(dtype);
      if (st == st_of.end()) {
        PyObject* got = PyDict_GetItemWithError(st_names.ptr(), dtype);  // borrowed; the dict holds it
        Py_ssize_t ld = 0;
        const char* sd = got != nullptr && PyUnicode_Check(got) ? PyUnicode_AsUTF8AndSize(got, &ld) : nullptr;
        if (sd == nullptr || !plain_name(sd, ld)) {
          PyErr_Clear();
          return py::none();
        }
        st = st_of.emplace(dtype, std::string_view(sd, static_cast<size_t>(ld))).first;
      }
      pc.st = &st->second;  // (unordered_map nodes do not move)
      auto found = shape_texts.find(shape);
      if (found == shape_texts.end()) {
        if (!PyTuple_Check(shape)) return py::none();
        std::string text;
        for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(shape); ++k) {
          const int64_t d = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, k));
          if (d < 0) {  // negative, not an int, or past int64 (-1 with an error set)
            PyErr_Clear();
            return py::none();
          }
          if (k) text.push_back(',');
          append_int(text, d);
        }
        found = shape_texts.emplace(shape, std::move(text)).first;  // the rows hold the tuples: pointers stay valid
      }
      pc.shape = &found->second;
      const int64_t nb = PyLong_AsLongLong(nbytes);
      if (nb < 0 || nb > INT64_MAX - at) {
        PyErr_Clear();
        return py::none();
      }
      pc.begin = at;
      at += nb;
      pc.end = at;
      total += kFixed + pc.name_len + pc.st->size() + pc.shape->size() +
               static_cast<size_t>(std::to_chars(digits, digits + sizeof(digits), pc.begin).ptr - digits) +
               static_cast<size_t>(std::to_chars(digits, digits + sizeof(digits), pc.end).ptr - digits);
    }
  }
  const size_t pad = (8 - (total - 8) % 8) % 8;  // the data section 8-byte aligned, as safetensors pads
  total += pad;
  py::object out = own(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(total)));
  char* w = PyBytes_AS_STRING(out.ptr());
  const uint64_t len = total - 8;
  for (int k = 0; k < 8; ++k) w[k] = static_cast<char>((len >> (8 * k)) & 0xFF);  // little-endian
  w += 8;
  const auto put = [&w](const char* src, size_t m) {
    std::memcpy(w, src, m);
    w += m;
  };
  put(hb, static_cast<size_t>(hn));
  for (const Piece& pc : pieces) {
    put(",\"", 2);
    put(pc.name, pc.name_len);
    put("\":{\"dtype\":\"", 12);
    put(pc.st->data(), pc.st->size());
    put("\",\"shape\":[", 11);
    put(pc.shape->data(), pc.shape->size());
    put("],\"data_offsets\":[", 18);
    w = std::to_chars(w, w + 20, pc.begin).ptr;
    *w++ = ',';
    w = std::to_chars(w, w + 20, pc.end).ptr;
    put("]}", 2);
  }
  *w++ = '}';
  std::memset(w, ' ', pad);
  w += pad;
  if (w != PyBytes_AS_STRING(out.ptr()) + total) throw std::logic_error("safetensors_header: size miscounted");
  return out;
}

}  // namespace cpu
}  // namespace fastmerge
