"""``_memo.instances``: objects of one class made from columns, in C (``_C.instances``) and in Python (its fallback),
equal to what the class's own ``__init__`` makes, for classes with slots and with a ``__dict__``; ``_memo.replaced``:
copies of rows with one field changed, in C (``_C.replaced``) and in Python."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from fastmerge import _memo, _native
from fastmerge.io.index import TensorInfo
from fastmerge.io.writer import OutTensor
from fastmerge.plan import TensorPlan

needs_native = pytest.mark.skipif(not _native.HAS_CPU_EXT, reason=f"fastmerge._C not built: {_native.LOAD_ERRORS.get('_C')}")


def _native_or_python(request, monkeypatch, native_attr: str) -> None:
    """The lane ``request.param`` names: the C function ``_memo.<native_attr>`` (which a built ``_C`` provides), or
    the Python fallback with it set to None."""
    if request.param == "native":
        if not _native.HAS_CPU_EXT:
            pytest.skip("fastmerge._C not built")
        assert getattr(_memo, native_attr) is not None
    else:
        monkeypatch.setattr(_memo, native_attr, None)


@pytest.fixture(params=["native", "python"])
def make(request, monkeypatch):
    _native_or_python(request, monkeypatch, "_INSTANCES")
    return _memo.instances


@dataclasses.dataclass(frozen=True)
class _Plain:  # a __dict__, frozen
    a: int
    b: str


def _fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def test_slotted_frozen_class_equals_its_init(make):
    names, shapes = ["w.0", "w.1", "b"], [(3, 4), (3, 4), (7,)]
    got = make(TensorInfo, _fields(TensorInfo), (names, "f", "bfloat16", shapes, [8, 32, 56], [32, 56, 70]), 3)
    want = [TensorInfo(n, "f", "bfloat16", s, b, e) for n, s, b, e in zip(names, shapes, [8, 32, 56], [32, 56, 70])]
    assert got == want
    assert [t.shape for t in got][0] is shapes[0]  # the column's own objects, not copies
    assert not hasattr(got[0], "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].name = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(got[2])) == want[2]


def test_out_tensor_many_equals_its_init(make, monkeypatch):
    monkeypatch.setattr("fastmerge.io.writer.instances", make)
    names, dtypes, shapes = ["a", "b", "c", "d"], ["bfloat16", "float32", "bfloat16", "float8_e4m3fn"], [(3, 5), (3, 5), (0,), (2, 2)]
    got = OutTensor.many(names, dtypes, shapes)
    want = list(map(OutTensor, names, dtypes, shapes))
    assert got == want
    assert [t.nbytes for t in got] == [30, 60, 0, 4] == [t.nbytes for t in want]
    assert OutTensor.many([], [], []) == []


def test_dict_class_equals_its_init(make):
    got = make(_Plain, ("a", "b"), ([1, 2], "x"), 2)
    assert got == [_Plain(1, "x"), _Plain(2, "x")] and vars(got[1]) == {"a": 2, "b": "x"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].a = 5  # type: ignore[misc]


def test_tensor_plan_keeps_its_memo(make):
    """Fields in slots and a ``__dict__`` from its base for the memos: the memo still lands in the instance (``_memo.memo``)."""
    src = TensorInfo("w", "f", "float32", (2, 3), 0, 24)
    values = ("w", (2, 3), "float32", None, src, [src], None, 0, "native", {}, None, None)
    got = make(TensorPlan, _fields(TensorPlan), [[v] for v in values], 1)[0]  # one-row columns (a list is a column)
    assert got == TensorPlan(*values)
    assert "name" in TensorPlan.__slots__ and vars(got) == {}  # its fields in slots, the dict empty until a memo is read
    assert got.in_bytes == 48 and vars(got)["in_bytes"] == 48
    assert got.out_tensor == OutTensor("w", "float32", (2, 3))


def test_rows_from_a_start(make):
    """``start``: the rows of columns[k][start:start + n], the columns themselves not copied or changed."""
    cols = ([1, 2, 3, 4], ["w", "x", "y", "z"])
    assert make(_Plain, ("a", "b"), cols, 2, 1) == [_Plain(2, "x"), _Plain(3, "y")]
    assert make(_Plain, ("a", "b"), (cols[0], "k"), 1, 3) == [_Plain(4, "k")]
    assert make(_Plain, ("a", "b"), cols, 0, 4) == []
    with pytest.raises(ValueError):
        make(_Plain, ("a", "b"), cols, 2, 3)  # past the end
    assert cols == ([1, 2, 3, 4], ["w", "x", "y", "z"])


def test_tensor_plan_output_tensor_in_its_slot(make):
    """``out_tensor``: made on first read and kept in the row's slot (no ``__dict__``), or set through ``instances``."""
    src = TensorInfo("w", "f", "float32", (2, 3), 0, 24)
    values = ("w", (2, 3), "float32", None, src, [src], None, 0, "native", {}, None, None)
    row = make(TensorPlan, _fields(TensorPlan), [[v] for v in values], 1)[0]
    first = row.out_tensor
    assert first == OutTensor("w", "float32", (2, 3)) and row.out_tensor is first and vars(row) == {}
    given = OutTensor("w", "float32", (2, 3))
    row2 = make(TensorPlan, (*_fields(TensorPlan), "_out"), [*([v] for v in values), [given]], 1)[0]
    assert row2.out_tensor is given and row2 == row


def test_bad_columns(make):
    with pytest.raises(ValueError):
        make(_Plain, ("a", "b"), ([1], ["x", "y"]), 2)  # a column shorter than n
    assert make(_Plain, ("a", "b"), ([1, 2, 3], "x"), 2) == [_Plain(1, "x"), _Plain(2, "x")]  # longer: its first n
    assert make(_Plain, ("a", "b"), ([], []), 0) == []


@needs_native
def test_native_refuses_what_it_cannot_fill():
    class NoDict:
        __slots__ = ("a",)

    with pytest.raises(TypeError):
        _native._C.instances(NoDict, ("a", "b"), ([1], [2]), 1)  # "b": neither a slot nor a __dict__
    with pytest.raises(ValueError):
        _native._C.instances(_Plain, ("a",), ([1], [2]), 1)  # columns and names differ in number


@pytest.fixture(params=["native", "python"])
def replace_rows(request, monkeypatch):
    _native_or_python(request, monkeypatch, "_REPLACED")
    return _memo.replaced


def test_replaced_rows_equal_dataclasses_replace(replace_rows):
    rows = [TensorInfo(f"w.{i}", "a.safetensors", "bfloat16", (2, i + 1), 8 + 4 * i, 12 + 4 * i) for i in range(5)]
    fields = _fields(TensorInfo)
    got = replace_rows(TensorInfo, fields, rows, fields.index("file"), "b.safetensors")
    assert got == [dataclasses.replace(r, file="b.safetensors") for r in rows]
    assert all(g.name is r.name and g.shape is r.shape and g is not r for g, r in zip(got, rows))  # the same values
    assert rows[0].file == "a.safetensors"  # the rows themselves untouched
    assert replace_rows(TensorInfo, fields, [], 1, "x") == []
    out = [OutTensor("a", "bfloat16", (3,))]
    assert replace_rows(OutTensor, _fields(OutTensor), out, 0, "b")[0] == OutTensor("b", "bfloat16", (3,))


@needs_native
def test_native_replaced_refuses_what_it_cannot_copy():
    rows = [TensorInfo("w", "f", "float32", (1,), 0, 4)]
    fields = _fields(TensorInfo)
    with pytest.raises(ValueError):
        _native._C.replaced(TensorInfo, fields, rows, len(fields), "g")  # not a field's position
    with pytest.raises(TypeError):
        _native._C.replaced(TensorInfo, fields, [OutTensor("w", "float32", (1,))], 1, "g")  # a row of another class
    with pytest.raises(TypeError):
        _native._C.replaced(_Plain, ("a", "b"), [_Plain(1, "x")], 0, 2)  # no slots
    unset = object.__new__(TensorInfo)
    with pytest.raises(ValueError):
        _native._C.replaced(TensorInfo, fields, [unset], 1, "g")  # a row with fields never set


def test_replaced_table_by_name(replace_rows):
    """Rows given as a dict: a dict of the same keys in the same order, each with its row's copy."""
    rows = {f"w.{i}": TensorInfo(f"w.{i}", "a.safetensors", "bfloat16", (2, i + 1), 8 + 4 * i, 12 + 4 * i) for i in (3, 1, 2)}
    fields = _fields(TensorInfo)
    got = replace_rows(TensorInfo, fields, rows, fields.index("file"), "b.safetensors")
    assert type(got) is dict and list(got) == ["w.3", "w.1", "w.2"]
    assert got == {k: dataclasses.replace(r, file="b.safetensors") for k, r in rows.items()}
    assert all(got[k] is not r and got[k].shape is r.shape for k, r in rows.items())
    assert replace_rows(TensorInfo, fields, {}, 1, "x") == {}


@pytest.fixture(params=["native", "python"])
def by_identity(request, monkeypatch):
    _native_or_python(request, monkeypatch, "_MAPPED")
    return _memo.mapped_by_identity


def test_mapped_by_identity_asks_once_per_object(by_identity):
    a, b, c = tuple([2, 3]), tuple([2, 3]), (5,)  # a and b equal, not the same object
    asked = []

    def fn(v, i):
        asked.append((v, i))
        return [len(asked)]  # a new object per question

    got = by_identity([a, c, a, b, c, a], fn)
    assert asked == [(a, 0), (c, 1), (b, 3)]  # in order of first appearance, with its index
    assert got == [[1], [2], [1], [3], [2], [1]] and got[0] is got[2] is got[5] and got[1] is got[4]
    assert by_identity([], fn) == []


def test_mapped_by_identity_passes_errors_on(by_identity):
    def fn(v, i):
        raise KeyError(v)

    with pytest.raises(KeyError):
        by_identity([1, 2], fn)


@pytest.fixture(params=["native", "python"])
def transpose(request, monkeypatch):
    _native_or_python(request, monkeypatch, "_TRANSPOSED")
    return _memo.transposed


def test_transposed_rows(transpose):
    cols = [[1, 2, 3], ["a", "b", "c"]]
    assert transpose(cols) == [[1, "a"], [2, "b"], [3, "c"]]
    assert transpose(cols, 2) == [[3, "c"]] and transpose(cols, 3) == []
    rows = transpose(cols)
    assert rows[0] is not rows[1] and all(type(r) is list for r in rows)  # a list of its own per row
    assert transpose([]) == [] and transpose([[]]) == []
    with pytest.raises(ValueError):
        transpose([[1, 2], [1]])


def test_out_tensor_many_with_sizes():
    """``sizes=True``: the rows and their byte sizes (one dtype, and several)."""
    rows, sizes = OutTensor.many(["a", "b"], ["bfloat16", "bfloat16"], [(3, 5), (2,)], sizes=True)
    assert rows == [OutTensor("a", "bfloat16", (3, 5)), OutTensor("b", "bfloat16", (2,))] and sizes == [30, 4]
    rows, sizes = OutTensor.many(["a", "b"], ["float32", "bfloat16"], [(3, 5), (3, 5)], sizes=True)
    assert sizes == [60, 30] == [t.nbytes for t in rows]
