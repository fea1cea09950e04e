"""``engine.session.Session``, the one way an output folder is produced: several outputs committed
all-or-nothing, a custom read order with its own shards, nothing left at any OUT (and no temporary
directory beside it) after an exception, an ``OSError`` as one ``OutputError`` line, writer-thread errors
surfacing, readers closed either way, ``torch_threads`` restoring the caller's thread count."""

import errno

import pytest
import torch

from fastmerge.config import MergeConfig
from fastmerge.engine.session import Output, Session, torch_threads
from fastmerge.errors import OutputError
from fastmerge.io import writer as writer_mod
from fastmerge.io.reader import ModelReader
from fastmerge.io.writer import plan_shards
from fastmerge.plan import build_plan, make_options
from helpers.parity import load_model


class CountingReader(ModelReader):
    """A ModelReader that records every instance and how often each was closed."""

    made: list["CountingReader"] = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.closed = 0
        CountingReader.made.append(self)

    def close(self):
        self.closed += 1
        super().close()


@pytest.fixture
def readers():
    CountingReader.made = []
    yield CountingReader.made
    CountingReader.made = []


def assert_all_closed(made):
    assert made and all(r.closed >= 1 for r in made), [r.closed for r in made]


@pytest.fixture(scope="module")
def plan(family_fp32):
    _, fts = family_fp32
    cfg = MergeConfig.from_dict({"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": 1.0}}
                                                                      for f in fts]})
    return build_plan(cfg, make_options(progress=False), None)


def leftovers(*dirs):
    """Temporary (or half-committed) folders of the session beside the outputs."""
    return sorted(p.name for d in {x.parent for x in dirs} for p in d.iterdir() if ".fastmerge-" in p.name)


def loop(s, plan, outputs=1, fail_at=None, exc=None):
    """The shape of every engine's loop: the first model's tensor is 'the merge', put to every output."""
    for n, (i, tensors) in enumerate(s.prefetch):
        if n == fail_at:
            raise exc
        tp = plan.tensors[i]
        for k in range(outputs):
            s.put(tp.name, tensors[0].clone(), output=k)
        del tensors
        s.prefetch.release(i)
        s.advance(tp.in_bytes)


def test_several_outputs_are_committed_together(plan, family_fp32, tmp_path, readers):
    a, b = tmp_path / "a", tmp_path / "b"
    with Session(plan, [Output(a, plan.shards), Output(b, plan.shards)], reader=CountingReader) as s:
        loop(s, plan, outputs=2)
    want = load_model(family_fp32[1][0])
    for out in (a, b):
        got = load_model(out)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert (out / "config.json").exists()
    assert s.bytes_written == 2 * sum(t.nbytes for sh in plan.shards for t in sh.tensors)
    assert leftovers(a, b) == []
    assert_all_closed(readers)


def test_outputs_are_all_or_nothing_when_one_cannot_be_committed(plan, tmp_path, readers):
    a, b = tmp_path / "a", tmp_path / "b"
    with pytest.raises(OutputError, match="output exists"):
        with Session(plan, [Output(a, plan.shards), Output(b, plan.shards)], reader=CountingReader) as s:
            loop(s, plan, outputs=2)
            b.mkdir()  # appears while the merge runs (the plan checked it was free)
    assert not a.exists() and list(b.iterdir()) == []  # b untouched, a never committed alone
    assert leftovers(a, b) == []
    assert_all_closed(readers)


def test_own_order_and_shards(plan, family_fp32, tmp_path, readers):
    order = list(reversed(range(len(plan.tensors))))
    shards = plan_shards([plan.tensors[i].out_tensor for i in order], 30_000)
    assert len(shards) > 1
    seen = []
    with Session(plan, [Output(tmp_path / "o", shards)], reader=CountingReader, order=order) as s:
        for i, tensors in s.prefetch:
            seen.append(i)
            s.put(plan.tensors[i].name, tensors[0].clone())
            del tensors
            s.prefetch.release(i)
    assert seen == order
    got, want = load_model(tmp_path / "o"), load_model(family_fp32[1][0])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert_all_closed(readers)


@pytest.mark.parametrize("outputs", [1, 2])
def test_exception_mid_loop_leaves_nothing(plan, tmp_path, readers, outputs):
    outs = [tmp_path / f"o{k}" for k in range(outputs)]
    with pytest.raises(RuntimeError, match="boom"):
        with Session(plan, [Output(o, plan.shards) for o in outs], reader=CountingReader) as s:
            loop(s, plan, outputs=outputs, fail_at=3, exc=RuntimeError("boom"))
    assert not any(o.exists() for o in outs)
    assert leftovers(*outs) == []
    assert_all_closed(readers)


def _fail_on_write(monkeypatch, exc, at=2):
    write = writer_mod.ShardWriter.write
    calls = []

    def failing(self, name, t):
        calls.append(name)
        if len(calls) == at:
            raise exc
        write(self, name, t)

    monkeypatch.setattr(writer_mod.ShardWriter, "write", failing)
    return calls


@pytest.mark.parametrize("where", ["writer", "loop"])
def test_oserror_is_one_output_error_line(plan, tmp_path, readers, monkeypatch, where):
    disk_full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "model.safetensors"))
    if where == "writer":
        _fail_on_write(monkeypatch, disk_full)
    outs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(OutputError) as ei:
        with Session(plan, [Output(o, plan.shards) for o in outs], reader=CountingReader) as s:
            loop(s, plan, outputs=2, fail_at=4 if where == "loop" else None, exc=disk_full)
    msg = str(ei.value)
    assert "\n" not in msg and "No space left on device" in msg and "nothing was left" in msg, msg
    assert not any(o.exists() for o in outs)
    assert leftovers(*outs) == []
    assert_all_closed(readers)


def test_writer_thread_error_surfaces(plan, tmp_path, readers, monkeypatch):
    calls = _fail_on_write(monkeypatch, ValueError("bad tensor"), at=1)
    with pytest.raises(ValueError, match="bad tensor"):
        with Session(plan, tmp_path / "o", reader=CountingReader) as s:
            loop(s, plan)
    assert calls  # it ran on the writer thread, and its error reached the caller
    assert not (tmp_path / "o").exists() and leftovers(tmp_path / "o") == []
    assert_all_closed(readers)


def test_output_parent_not_a_directory(plan, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot create output directory") as ei:
        with Session(plan, tmp_path / "file" / "o", reader=ModelReader) as s:
            loop(s, plan)
    assert "\n" not in str(ei.value)


def test_torch_threads_restores_the_callers_count():
    saved = torch.get_num_threads()
    other = 3 if saved != 3 else 2
    try:
        torch.set_num_threads(other)
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == other
        with pytest.raises(RuntimeError):
            with torch_threads(1):
                raise RuntimeError
        assert torch.get_num_threads() == other
        with torch_threads(0):  # 0: unchanged
            assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(saved)
