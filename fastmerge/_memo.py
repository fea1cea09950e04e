"""Per-tensor overhead helpers: ``memo``, a property computed once per instance without
``functools.cached_property``'s lock; ``gc_paused`` and ``gc_frozen``, steps run without the cyclic
collector walking the objects of a plan; ``instances``, many objects of one class made from columns.

``memo``: Python 3.11's cached_property takes an RLock on every first access (removed in 3.12); a plan of a MoE
model asks 20k-45k tensors for their sizes, and the lock was ~2 us of each. Like cached_property, the
value lands in the instance's ``__dict__`` under the same name, which then shadows this non-data
descriptor: later reads are plain attribute reads. Not thread-safe on first access (two threads may
both compute it; both get an equal value)."""

from __future__ import annotations

import itertools
import operator
from typing import Any, Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


class memo(Generic[T]):  # noqa: N801 - used like @property
    def __init__(self, fn: Callable[[Any], T]):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        v = obj.__dict__[self.name] = self.fn(obj)
        return v


def gc_paused(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with the cyclic garbage collector paused (restored after, whatever happens).

    For steps that build many long-lived, acyclic objects at once: a plan of a MoE model makes ~10 objects
    per tensor (20k-45k tensors), and the collections their allocations set off, each walking every object
    made so far, were half the planning time (0.22 vs 0.11 s of CPU for 20k tensors). Reference counting
    still frees everything these steps drop; nothing they make is cyclic garbage."""
    import functools
    import gc

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return run


def gc_frozen(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` with every object that exists now moved out of the cyclic collector's sight (``gc.freeze``),
    moved back after (unless the process had frozen objects of its own, which stay as they were).

    For a merge loop after its plan is built: the plan of a MoE model is ~200k objects, and each full
    collection the loop's own allocations set off walked all of them (the writer's 20k-entry order list
    alone took ~6% of a merge of 20k small tensors). New garbage is still collected; reference counting
    frees the frozen objects as ever."""
    import functools
    import gc

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        global _frozen_depth
        # Nested under another gc_frozen call, the freeze is that call's to undo. Asked only at the outermost call:
        # get_freeze_count walks every frozen object (~8 ms after a MoE plan is frozen, per nested call)
        mine = _frozen_depth == 0 and gc.get_freeze_count() == 0
        gc.freeze()
        _frozen_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _frozen_depth -= 1
            if mine:
                gc.unfreeze()

    return run


#: gc_frozen calls running now (the collector's state is the process's, so the count is too)
_frozen_depth = 0


def instances(cls: type[T], fields: tuple[str, ...], columns: Sequence[Any], n: int, start: int = 0) -> list[T]:
    """``n`` new ``cls`` objects, object i with ``fields[k]`` set to ``columns[k][start + i]`` (a column that is not a list:
    every object's value), ``__init__`` not called: what a dataclass's ``__init__`` would store, for a caller that
    has computed every field (defaults and ``init=False`` fields included).

    In C where ``fastmerge._C`` is built (``_C.instances``: into the class's slots, else each ``__dict__``). A MoE
    plan makes 20k-45k OutTensor rows per model; ``__init__`` run per row was ~0.5 us each, this ~0.1 us (10 ms ->
    ~2 ms for 20k). A class with a ``__dict__`` gains little (TensorPlan: 7.3 -> 6.9 ms). Without ``_C``, one
    ``object.__setattr__`` per field."""
    if _INSTANCES is not None:
        return _INSTANCES(cls, tuple(fields), tuple(columns), n, start)
    cols = [itertools.islice(c, start, None) if type(c) is list else itertools.repeat(c) for c in columns]
    out = []
    new, put = object.__new__, object.__setattr__
    for row in itertools.islice(zip(*cols), n):
        obj = new(cls)
        for f, v in zip(fields, row):
            put(obj, f, v)
        out.append(obj)
    if len(out) < n:
        raise ValueError("instances: a column shorter than start + n")
    return out


def replaced(cls: type[T], fields: tuple[str, ...], rows: list[T] | dict[Any, T], k: int, value: Any) -> Any:
    """[a copy of each of ``rows`` with ``fields[k]`` set to ``value``], ``__init__`` not called: ``rows`` all exactly
    of ``cls``, ``fields`` every field of a slotted dataclass; ``rows`` a dict: a dict of its keys, in its order, each
    with its row's copy. In C where ``fastmerge._C`` is built (``_C.replaced``, ~0.1 us a row: the TensorInfo rows of a
    header byte-identical to one parsed, 20k-45k per model, and the table of them by name); without it, through
    ``instances`` from the rows' columns."""
    if _REPLACED is not None:
        return _REPLACED(cls, tuple(fields), rows, k, value)
    values = list(rows.values()) if type(rows) is dict else rows
    cols = [value if j == k else list(map(operator.attrgetter(f), values)) for j, f in enumerate(fields)]
    made = instances(cls, fields, cols, len(values))
    return dict(zip(rows, made)) if type(rows) is dict else made


def mapped_by_identity(values: list[Any], fn: Callable[[Any, int], T]) -> list[T]:
    """``[fn(v, i) for i, v in enumerate(values)]`` with ``fn`` called once per distinct object (by identity, at its
    first index) and its answer shared by the other places of that object. A MoE plan's 20k-45k rows share a few
    dozen shape tuples: each shape's backend and byte size asked once (``_C.mapped_by_identity``, a loop in C; else
    dicts keyed by ``id``)."""
    if _MAPPED is not None:
        return _MAPPED(values, fn)
    ids = list(map(id, values))
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))  # each object's first index
    got = {k: fn(values[i], i) for k, i in sorted(first.items(), key=operator.itemgetter(1))}
    return list(map(got.__getitem__, ids))


def transposed(columns: list[list[Any]], start: int = 0) -> list[list[Any]]:
    """``[[c[i] for c in columns] for i in range(start, n)]``: columns of equal length ``n`` turned into a list per
    row (a planned tensor's sources from its models' input columns; ``_C.transposed``, without a tuple per row)."""
    if _TRANSPOSED is not None:
        return _TRANSPOSED(columns, start)
    if len({len(c) for c in columns}) > 1:
        raise ValueError("transposed: columns of different lengths")
    return list(map(list, zip(*[c[start:] for c in columns]))) if columns else []


def _native(name: str) -> Any:
    from . import _native

    return getattr(_native._C, name, None) if _native.HAS_CPU_EXT else None


_INSTANCES, _REPLACED = _native("instances"), _native("replaced")
_MAPPED, _TRANSPOSED = _native("mapped_by_identity"), _native("transposed")
