"""ModelReader / Prefetcher: read-only views, safe page release, order and read-ahead budget."""

import threading

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastmerge.io.index import CheckpointIndex
from fastmerge.io.reader import ModelReader, Prefetcher
from helpers.checkpoints import random_state


def _big(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {f"t{i}": torch.randn(300_000, generator=g) for i in range(4)}  # 1.2 MB each: many pages
    save_file(sd, str(tmp_path / "model.safetensors"))
    return sd, ModelReader(CheckpointIndex.open(tmp_path))


def test_get_matches_safetensors(tmp_path):
    sd = random_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    r = ModelReader(CheckpointIndex.open(tmp_path))
    for name, info in r.index.tensors.items():
        assert torch.equal(r.get(info), sd[name])


def test_safetensors_read_through_the_readers_own_mapping(tmp_path, monkeypatch):
    """Every tensor of a safetensors file (scalars and empty ones too) is a view into the reader's own read-only
    mapping: no safe_open (it parsed the whole header again per file: ~15 ms for 20k entries) and no scan of
    /proc/self/maps to populate or drop it."""
    import safetensors

    from fastmerge.io import reader

    sd = {**random_state(), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3, dtype=torch.bfloat16)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    r = ModelReader(CheckpointIndex.open(tmp_path))
    monkeypatch.setattr(safetensors, "safe_open", None)
    monkeypatch.setattr(reader, "_file_mappings", None)
    for name, info in r.index.tensors.items():
        t = r.get(info)
        r.populate(info, t)
        assert t.shape == sd[name].shape and t.dtype == sd[name].dtype and torch.equal(t, sd[name])
        r.drop(info, t)
        assert torch.equal(t, sd[name])
    r.close()


def test_unmapped_reader_reads_through_safe_open_and_spans_through_a_mapping(tmp_path, monkeypatch):
    """``mapped=False`` (callers that never drop pages): tensors through safe_open handles, at most ``max_open`` open
    (each view keeps its own mapping); a span is still one view of the reader's own mapping."""
    from fastmerge.io import reader

    sd = random_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    r = ModelReader(CheckpointIndex.open(tmp_path), mapped=False)
    for name, info in r.index.tensors.items():
        assert torch.equal(r.get(info), sd[name])
    assert r._raw is None and len(r._handles) == 1
    infos = list(r.index.tensors.values())  # file order: back to back
    first, last = infos[0], infos[1]
    assert first.dtype == last.dtype and first.end == last.begin
    span = reader.span(first, last)
    t = r.get(span)
    assert torch.equal(t, torch.cat([sd[first.name].reshape(-1), sd[last.name].reshape(-1)]))
    assert r._mapped_range(span, t) is not None
    r.close()


def test_drop_releases_pages_but_never_data(tmp_path):
    sd, r = _big(tmp_path)
    info = r.index.tensors["t1"]
    t = r.get(info)
    r.populate(info, t)
    assert r._mapped_range(info, t) is not None
    r.drop(info, t)
    assert torch.equal(t, sd["t1"])  # re-faulted from the page cache
    with safe_open(str(info.file), framework="pt") as f:
        assert torch.equal(f.get_tensor("t1"), sd["t1"])  # file untouched


def test_mapping_found_after_the_path_is_deleted(tmp_path):
    # a concurrent cleanup can delete a mapped file ("(deleted)" in /proc/self/maps): match by inode
    sd, r = _big(tmp_path)
    info = r.index.tensors["t2"]
    t = r.get(info)
    info.file.unlink()
    r._maps.clear()
    assert r._mapped_range(info, t) is not None
    r.drop(info, t)
    assert torch.equal(t, sd["t2"])


def test_heap_memory_is_never_advised(tmp_path):
    sd, r = _big(tmp_path)
    info = r.index.tensors["t0"]
    heap = sd["t0"].clone()
    assert r._mapped_range(info, heap) is None
    r.drop(info, heap)
    assert torch.equal(heap, sd["t0"])


def test_prefetcher_order_and_budget(tmp_path):
    sd, r = _big(tmp_path)
    infos = list(r.index.tensors.values())
    groups = [[(r, i)] for i in infos] * 3  # 12 groups of 1.2 MB
    seen_inflight = []
    pf = Prefetcher(groups, budget_bytes=int(2.5 * infos[0].nbytes))
    orig = pf._q.put

    def spy(item):
        seen_inflight.append(pf._inflight)
        orig(item)

    pf._q.put = spy
    order = []
    for i, tensors in pf:
        order.append(i)
        assert torch.equal(tensors[0], sd[groups[i][0][1].name])
        pf.release(i)
    pf.close()
    assert order == list(range(12))
    assert max(seen_inflight) <= 2.5 * infos[0].nbytes


def test_prefetcher_surfaces_reader_errors(tmp_path):
    sd, r = _big(tmp_path)
    bad = r.index.tensors["t3"]
    info = type(bad)(bad.name, bad.file, bad.dtype, (7,), bad.begin, bad.end)  # header no longer matches
    pf = Prefetcher([[(r, info)]], budget_bytes=1)
    try:
        for _ in pf:
            raise AssertionError("should have raised")
    except Exception as e:
        assert "changed shape" in str(e)
    pf.close()
    assert not any(t.name == "fastmerge-read" and t.is_alive() for t in threading.enumerate())


def test_span_raw_reader_reads_spans_as_raw_views(tmp_path, monkeypatch):
    """The torch engine's reader (``SpanRawReader``): a span of consecutive tensors is a raw view of its own mapping,
    over exactly the span's bytes, populated and dropped through that mapping; a single tensor is a torch view."""
    import ctypes

    from fastmerge.io import reader
    from fastmerge.io.reader import RawView, SpanRawReader

    sd, _ = _big(tmp_path)
    r = SpanRawReader(CheckpointIndex.open(tmp_path))
    infos = list(r.index.tensors.values())  # file order: back to back
    whole = r.get(reader.span(infos[1], infos[3]))
    assert isinstance(whole, RawView) and whole.dtype == "float32" and whole.numel == 3 * 300_000
    got = torch.frombuffer(bytearray(ctypes.string_at(whole.ptr, whole.nbytes)), dtype=torch.float32)
    assert torch.equal(got, torch.cat([sd["t1"], sd["t2"], sd["t3"]]))
    advised = []
    monkeypatch.setattr(reader, "_madvise", lambda a, b, advice: advised.append((a, b, advice)) or True)
    monkeypatch.setattr(reader, "DROP_BATCH", 0)  # each drop at once (test_raw_drops_of_consecutive_ranges_are_joined)
    r.populate(infos[1], whole)
    r.drop(infos[1], whole)
    assert [(a, b) for a, b, _ in advised] == [(whole.ptr, whole.ptr + whole.nbytes)] * 2
    one = r.get(infos[0])
    assert isinstance(one, torch.Tensor) and torch.equal(one, sd["t0"])
    assert torch.equal(reader.torch_view(whole), got)  # the torch path's view of a raw span
    empty = reader.torch_view(RawView(whole.ptr, 0, "bfloat16", 0))
    assert empty.dtype == torch.bfloat16 and empty.numel() == 0
    r.close()


def test_raw_drops_of_consecutive_ranges_are_joined(tmp_path, monkeypatch):
    """``RawReader.drop``: a released range that continues the last one joins it, and the joined range is dropped in one
    call once it reaches ``DROP_BATCH`` bytes; a range elsewhere drops what was held first; close unmaps what is
    still held. Every page released is dropped once, and the file's bytes read back unchanged."""
    import ctypes

    from fastmerge.io import reader
    from fastmerge.io.reader import RawReader

    sd, _ = _big(tmp_path)
    r = RawReader(CheckpointIndex.open(tmp_path))
    infos = list(r.index.tensors.values())  # t0..t3, back to back, 1.2 MB each
    views = [r.get(i) for i in infos]
    assert all(a.ptr + a.nbytes == b.ptr for a, b in zip(views, views[1:]))
    dropped = []
    real = reader._madvise
    monkeypatch.setattr(reader, "_madvise", lambda a, b, advice: dropped.append((a, b)) or real(a, b, advice))
    monkeypatch.setattr(reader, "DROP_BATCH", int(2.5 * infos[0].nbytes))
    r.drop(infos[0], views[0])
    r.drop(infos[1], views[1])
    assert dropped == []  # 2 x 1.2 MB held
    r.drop(infos[2], views[2])
    assert dropped == [(views[0].ptr, views[2].ptr + views[2].nbytes)]  # one call for the three
    r.drop(infos[3], views[3])
    r.drop(infos[0], views[0])  # not where the last one ended: t3 dropped, t0 held
    assert dropped[1:] == [(views[3].ptr, views[3].ptr + views[3].nbytes)]
    for info, v in zip(infos, views):  # the pages come back from the page cache
        got = torch.frombuffer(bytearray(ctypes.string_at(v.ptr, v.nbytes)), dtype=torch.float32)
        assert torch.equal(got, sd[info.name])
    monkeypatch.setattr(reader, "DROP_BATCH", 0)
    r.drop(infos[1], views[1])  # continues t0: joined, and at DROP_BATCH 0 dropped at once
    assert dropped[2:] == [(views[0].ptr, views[1].ptr + views[1].nbytes)]
    r.close()
    assert len(dropped) == 3 and r._held is None
